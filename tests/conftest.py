"""Shared fixtures: a tiny random Llama saved to disk, small data folders, the real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CORPUS = [
    "Sentence 1: Amrozi accused his brother of deliberately distorting his evidence.",
    "Sentence 2: Referring to him as only the witness, Amrozi accused his brother.",
    "Do the two sentences mean the same thing? Answer yes or no. yes no",
    "Context: The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "Question: In what country is Normandy located? France unanswerable Answer with a short span copied",
    "from the context, or with if the context does not contain the answer. 0123456789 , . ? ! ' \" ( ) - : ;",
] * 8


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from lorascope.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", corpus=TINY_CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = os.environ.get("LORASCOPE_DATA_DIR")
    if not d or not (Path(d) / "mrpc" / "dev.tsv").is_file():
        pytest.skip("set LORASCOPE_DATA_DIR to the shared data folder (with mrpc/ and squad_v2/) for real-data tests")
    return Path(d)


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def _mrpc_rows(n: int, offset: int = 0) -> list[str]:
    rows = []
    for i in range(n):
        label = (i + offset) % 3 != 0
        k = i + 100 * offset  # no pair (id or text) in two splits
        s1 = f'The company said "profits rose {k}" on Monday.'
        s2 = f'Profits went up {k}, the firm said.' if label else f"The weather was cold on day {k}."
        rows.append(f"{int(label)}\t{1000 + k}\t{2000 + k}\t{s1}\t{s2}")
    return rows


def _squad_articles(n_articles: int, q_per: int) -> dict:
    data = []
    for a in range(n_articles):
        ctx = f"Article {a} says that the river Alpha{a} flows through the city of Beta{a} in the year 19{a:02d}."
        qas = []
        for q in range(q_per):
            qid = f"q{a}_{q}"
            if q % 2 == 0:
                start = ctx.index(f"Beta{a}")
                qas.append({"id": qid, "question": f"Which city does Alpha{a} flow through ({q})?",
                            "answers": [{"text": f"Beta{a}", "answer_start": start}], "is_impossible": False})
            else:
                qas.append({"id": qid, "question": f"Who founded Gamma{a} ({q})?", "answers": [],
                            "plausible_answers": [{"text": f"Beta{a}", "answer_start": 0}], "is_impossible": True})
        data.append({"title": f"Title_{a}", "paragraphs": [{"context": ctx, "qas": qas}]})
    return {"version": "v2.0", "data": data}


@pytest.fixture()
def small_data(tmp_path) -> Path:
    """A data folder in the shared layout: mrpc/{train,dev,test}.tsv and squad_v2/dev-v2.0.json."""
    d = tmp_path / "data"
    (d / "mrpc").mkdir(parents=True)
    (d / "squad_v2").mkdir()
    (d / "mrpc" / "train.tsv").write_text("\n".join([MRPC_HEADER, *_mrpc_rows(48)]) + "\n")
    (d / "mrpc" / "dev.tsv").write_text("\n".join([MRPC_HEADER, *_mrpc_rows(20, 1)]) + "\n")
    (d / "mrpc" / "test.tsv").write_text("\n".join(["index\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                                     *[f"{i}\t{r.split(chr(9), 1)[1]}" for i, r in
                                                       enumerate(_mrpc_rows(6, 2))]]) + "\n")
    (d / "squad_v2" / "dev-v2.0.json").write_text(json.dumps(_squad_articles(10, 6)))
    return d


def run_cli(*args: str, env: dict | None = None):
    """Run `python -m lorascope ARGS` in a subprocess; return the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorascope", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=600)
