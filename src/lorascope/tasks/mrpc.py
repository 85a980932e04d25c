"""GLUE MRPC: is sentence 2 a paraphrase of sentence 1?

A causal LM is prompted with both sentences and the label is the answer ("yes"/"no")
with the higher log-probability, so no free generation is needed. Metrics: accuracy and
F1 of the positive (paraphrase) class, on the 408-pair dev split GLUE reports.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.lm import candidate_logprobs
from lorascope.tasks.base import Example, Task, answer_ids, build_prompt, prompt_ids, register

log = logging.getLogger(__name__)

LABELS = {1: "yes", 0: "no"}
GLUE_COLUMNS = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
GLUE_TEST_COLUMNS = ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"]
# split -> candidate files, GLUE's names first, then the original MSR release's
FILES = {"train": ["train.tsv", "msr_paraphrase_train.txt"], "eval": ["dev.tsv"],
         "test": ["test.tsv", "msr_paraphrase_test.txt"]}


def make_prompt(s1: str, s2: str) -> str:
    return prompt_and_content(s1, s2)[0]


def prompt_and_content(s1: str, s2: str) -> tuple[str, list[tuple[int, int]]]:
    """The user message and the character spans of the two sentences in it."""
    return build_prompt(("Sentence 1: ", False), (s1, True), ("\nSentence 2: ", False), (s2, True),
                        ("\nDo the two sentences mean the same thing? Answer yes or no.", False))


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """Read a GLUE or MSR MRPC file: tab-separated, quoting off, optional BOM and CRLF."""
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise LorascopeError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        try:
            rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        except UnicodeDecodeError as exc:
            hint = (
                " (it looks like UTF-16: re-save it as UTF-8)" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
            )
            raise LorascopeError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start}){hint}; expected "
                                 f"a UTF-8 tab-separated MRPC file") from None
        except csv.Error as exc:
            raise LorascopeError(f"{path}: not a tab-separated text file ({exc}); expected a UTF-8 MRPC TSV") from None
    if not rows:
        raise LorascopeError(f"{path}: empty file; expected a header {chr(9).join(GLUE_COLUMNS)!r} and rows")
    header = [h.strip() for h in rows[0]]
    labelled = header == GLUE_COLUMNS
    if not labelled and header != GLUE_TEST_COLUMNS:
        raise LorascopeError(f"{path}: unexpected columns {header}; expected {GLUE_COLUMNS} "
                             f"(or {GLUE_TEST_COLUMNS} for an unlabelled test split)")
    out = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or row == [""]:
            continue
        if any("\x00" in field for field in row):
            raise LorascopeError(f"{path}, line {lineno}: contains NUL bytes (a binary file?); expected UTF-8 "
                                 f"tab-separated text")
        if len(row) != 5:
            raise LorascopeError(f"{path}, line {lineno}: expected 5 tab-separated fields, got {len(row)}")
        label = None
        if labelled:
            if row[0] not in ("0", "1"):
                raise LorascopeError(f"{path}, line {lineno}: field Quality must be 0 or 1, got {row[0]!r}")
            label = int(row[0])
        pair_id = f"{row[1]}-{row[2]}"
        if pair_id in seen:
            raise LorascopeError(f"{path}, line {lineno}: duplicate pair id {pair_id!r} (#1 ID-#2 ID), first on line "
                                 f"{seen[pair_id]}; each pair must appear once")
        seen[pair_id] = lineno
        out.append({"id": pair_id, "s1": row[3], "s2": row[4], "label": label})
    if not out:
        raise LorascopeError(f"{path}: the file has a header but no rows (an empty split)")
    return out


@register
class MRPC(Task):
    name = "mrpc"
    description = "GLUE MRPC paraphrase detection (accuracy, F1), scored by answer log-probabilities"
    primary_metric, primary_label = "accuracy", "MRPC accuracy"
    report_columns = (("accuracy", "accuracy"), ("f1", "F1"))
    drift_splits = ("eval", "test")

    def per_example_scores(self, pred):
        return {k: 100.0 * (v["pred"] == v["label"]) for k, v in pred.items() if v.get("label") is not None}

    def baseline_scores(self, pred):
        labels = {k: v["label"] for k, v in pred.items() if v.get("label") is not None}
        if not labels:
            return {}
        majority = int(sum(labels.values()) * 2 >= len(labels))  # the rule of baselines()
        return {f"majority_class ({LABELS[majority]})": {k: 100.0 * (y == majority) for k, y in labels.items()}}

    def load_split(self, split: str, data) -> list[Example]:
        if split not in FILES:
            raise LorascopeError(f"mrpc: unknown split {split!r}; accepted: {', '.join(FILES)}")
        root = data.resolved_dir()
        rows = self._local(Path(root), split) if root else self._hub(split)
        out = []
        for r in rows:
            prompt, content = prompt_and_content(r["s1"], r["s2"])
            out.append(Example(r["id"], prompt, LABELS[r["label"]] if r["label"] is not None else None,
                               {"label": r["label"]}, content=content))
        return out

    def _local(self, root: Path, split: str) -> list[dict]:
        d = root / "mrpc" if (root / "mrpc").is_dir() else root
        if not d.is_dir():
            raise LorascopeError(f"mrpc: data directory {d} does not exist")
        for name in FILES[split]:
            if (d / name).is_file():
                rows = read_tsv(d / name)
                if name == "msr_paraphrase_train.txt":
                    rows = self._without_held_out(d, rows)
                return rows
        raise LorascopeError(f"mrpc: no file for the {split} split in {d}; expected one of {', '.join(FILES[split])}")

    def _without_held_out(self, d: Path, rows: list[dict]) -> list[dict]:
        """The MSR train release minus every pair in the dev or test file beside it.

        GLUE carved its 408 dev pairs out of the MSR train release: training on that file
        as is would train on the evaluation set.
        """
        held: set = set()
        for split in ("eval", "test"):
            for name in FILES[split]:
                if (d / name).is_file():
                    held |= {k for r in read_tsv(d / name) for k in (r["id"], (r["s1"], r["s2"]))}
        kept = [r for r in rows if r["id"] not in held and (r["s1"], r["s2"]) not in held]
        self.removed_from_train = len(rows) - len(kept)
        log.info("mrpc: training from msr_paraphrase_train.txt: removed %d of %d pairs that are in the dev or test "
                 "file, %d left", self.removed_from_train, len(rows), len(kept))
        if not kept:
            raise LorascopeError(f"mrpc: every pair of {d / 'msr_paraphrase_train.txt'} is in the dev or test file; "
                                 "no training pairs are left")
        return kept

    def _hub(self, split: str) -> list[dict]:
        from datasets import load_dataset

        hub_split = {"train": "train", "eval": "validation", "test": "test"}[split]
        try:
            ds = load_dataset("nyu-mll/glue", "mrpc", split=hub_split)
        except Exception as exc:
            raise LorascopeError(f"mrpc: could not load nyu-mll/glue (mrpc) from the Hugging Face Hub "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                 f"set data.dir or LORASCOPE_DATA_DIR to a local copy") from None
        return [{"id": str(r["idx"]), "s1": r["sentence1"], "s2": r["sentence2"],
                 "label": r["label"] if r["label"] in (0, 1) else None} for r in ds]

    def evaluate(self, model, tok, examples, *, batch_size, max_new_tokens=None, max_len=1024):
        import torch
        from tqdm.auto import tqdm

        labelled = [e for e in examples if e.meta.get("label") is not None]
        if not labelled:
            raise LorascopeError("mrpc: the evaluation examples carry no labels (the GLUE test split has none)")
        cands = [answer_ids(tok, LABELS[1], eos=False), answer_ids(tok, LABELS[0], eos=False)]
        preds: dict[str, Any] = {}
        model.eval()
        order = sorted(range(len(labelled)), key=lambda i: len(labelled[i].prompt))  # less padding
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="mrpc eval", unit="batch"):
                batch = [labelled[i] for i in order[start:start + batch_size]]
                prompts = [prompt_ids(tok, e.prompt) for e in batch]
                scores = candidate_logprobs(model, tok, prompts, cands, device)
                for j, e in enumerate(batch):
                    lp_yes, lp_no = scores[0][j], scores[1][j]
                    preds[e.id] = {"label": e.meta["label"], "pred": int(lp_yes > lp_no),
                                   "logp_yes": lp_yes, "logp_no": lp_no}
        return classification_metrics(preds), preds

    def baselines(self, examples):
        labels = [e.meta["label"] for e in examples if e.meta.get("label") is not None]
        majority = int(sum(labels) * 2 >= len(labels))
        preds = {str(i): {"label": y, "pred": majority} for i, y in enumerate(labels)}
        return {f"majority_class ({LABELS[majority]})": classification_metrics(preds)}


def classification_metrics(preds: dict[str, dict]) -> dict[str, Any]:
    tp = sum(1 for p in preds.values() if p["pred"] == 1 and p["label"] == 1)
    fp = sum(1 for p in preds.values() if p["pred"] == 1 and p["label"] == 0)
    fn = sum(1 for p in preds.values() if p["pred"] == 0 and p["label"] == 1)
    tn = sum(1 for p in preds.values() if p["pred"] == 0 and p["label"] == 0)
    n = tp + fp + fn + tn
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"accuracy": 100.0 * (tp + tn) / n, "f1": 100.0 * f1, "n": n,
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}
