"""Test helpers shared by the test modules: the tiny model's corpus, small data rows, running the CLI.

Fixtures live in conftest.py; test modules import these with `from helpers import ...`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CORPUS = [
    "Sentence 1: Amrozi accused his brother of deliberately distorting his evidence.",
    "Sentence 2: Referring to him as only the witness, Amrozi accused his brother.",
    "Do the two sentences mean the same thing? Answer yes or no. yes no",
    "Context: The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "Question: In what country is Normandy located? France unanswerable Answer with a short span copied",
    "from the context, or with if the context does not contain the answer. 0123456789 , . ? ! ' \" ( ) - : ;",
] * 8


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def mrpc_rows(n: int, offset: int = 0) -> list[str]:
    rows = []
    for i in range(n):
        label = (i + offset) % 3 != 0
        k = i + 100 * offset  # no pair (id or text) in two splits
        s1 = f'The company said "profits rose {k}" on Monday.'
        s2 = f'Profits went up {k}, the firm said.' if label else f"The weather was cold on day {k}."
        rows.append(f"{int(label)}\t{1000 + k}\t{2000 + k}\t{s1}\t{s2}")
    return rows


def squad_articles(n_articles: int, q_per: int) -> dict:
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


def write_data(d: Path, *, mrpc=(48, 20, 6), squad=(10, 6)) -> Path:
    """A data folder in the shared layout: mrpc/{train,dev,test}.tsv (train, dev, test rows; no pair in
    two files) and squad_v2/dev-v2.0.json (articles, questions per article)."""
    (d / "mrpc").mkdir(parents=True)
    (d / "squad_v2").mkdir()
    n_train, n_dev, n_test = mrpc
    (d / "mrpc" / "train.tsv").write_text("\n".join([MRPC_HEADER, *mrpc_rows(n_train)]) + "\n")
    (d / "mrpc" / "dev.tsv").write_text("\n".join([MRPC_HEADER, *mrpc_rows(n_dev, 1)]) + "\n")
    (d / "mrpc" / "test.tsv").write_text("\n".join(["index\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                                     *[f"{i}\t{r.split(chr(9), 1)[1]}" for i, r in
                                                       enumerate(mrpc_rows(n_test, 2))]]) + "\n")
    (d / "squad_v2" / "dev-v2.0.json").write_text(json.dumps(squad_articles(*squad)))
    return d


def run_cli(*args: str, env: dict | None = None):
    """Run `python -m lorascope ARGS` in a subprocess; return the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorascope", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=600)
