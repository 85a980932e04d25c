"""MRPC F1 of the final models: LoRA r=8 - full fine-tuning with a 95 % hierarchical bootstrap, the same
scheme as the verdict's accuracy interval (each resample draws each method's 3 seeds with replacement, then
the 408 dev pairs with replacement, the same pairs for every model), and accuracy the same way as a check
against the report's +0.7 [-2.2, +3.9]. Reads only archive/eval/mrpc/*.predictions.json.

    python mrpc_f1_interval.py     (from this folder; output: mrpc_f1_interval.txt)
"""
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
EV = HERE / "archive" / "eval" / "mrpc"


def load(name):
    p = json.loads((EV / f"{name}.predictions.json").read_text())
    ids = sorted(p)
    return ids, np.array([p[i]["label"] for i in ids]), np.array([p[i]["pred"] for i in ids])


def f1(y, p):
    tp = np.sum((p == 1) & (y == 1), axis=-1)
    fp = np.sum((p == 1) & (y == 0), axis=-1)
    fn = np.sum((p == 0) & (y == 1), axis=-1)
    return 100.0 * 2 * tp / (2 * tp + fp + fn)


def acc(y, p):
    return 100.0 * np.mean(p == y, axis=-1)


models = {m: [f"{m}_s{s}" for s in range(3)] for m in ("full", "lora_r8")}
ids0, y, _ = load("full_s0")
preds = {}
for names in models.values():
    for n in names:
        ids, yy, pp = load(n)
        assert ids == ids0 and (yy == y).all()
        preds[n] = pp
rng = np.random.default_rng(0)
B = 2000
out = []
for label, fn in (("F1", f1), ("accuracy", acc)):
    point = {m: float(np.mean([fn(y, preds[n]) for n in names])) for m, names in models.items()}
    diffs = np.empty(B)
    for b in range(B):
        idx = rng.integers(0, len(y), len(y))
        mean = {}
        for m, names in models.items():
            draw = rng.integers(0, len(names), len(names))
            mean[m] = np.mean([fn(y[idx], preds[names[k]][idx]) for k in draw])
        diffs[b] = mean["lora_r8"] - mean["full"]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    per = {n: round(float(fn(y, preds[n])), 2) for names in models.values() for n in names}
    out.append(f"{label}: per model {per}; mean full {point['full']:.2f}, LoRA {point['lora_r8']:.2f}; "
               f"LoRA - full {point['lora_r8'] - point['full']:+.2f} [{lo:+.2f}, {hi:+.2f}] "
               f"(95 %, {B} resamples over 3 seeds per method, then the {len(y)} pairs)")
(HERE / "mrpc_f1_interval.txt").write_text("\n".join(out) + "\n")
print("\n".join(out))
