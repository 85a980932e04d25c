"""SQuAD v2: does the accuracy comparison depend on the no-answer rule?

The evaluation fits a no-answer rule (signal and threshold) on 400 held-out calibration questions and
scores the 1000 evaluated questions with it; greedy decoding's own abstention (the first-token margin at
0) is the other natural choice. For every evaluated SQuAD v2 model of a run folder this recomputes, from
its predictions file and the official dev file, each question's F1 under both (checking the means
against eval.json), and gives with 95 % intervals (lorascope's hierarchical bootstrap over seeds, then
the paragraphs; 2000 resamples):
  - per model, rule - greedy (paired, one model);
  - full - always-no-answer and LoRA - always-no-answer, and LoRA - full, under each.
Usage: LORASCOPE_DATA_DIR=... python rule_vs_greedy.py RUN_DIR   (RUN_DIR: a run folder or archive/)
"""
import json
import os
import sys
from pathlib import Path

from lorascope.report.verdict import hierarchical_bootstrap
from lorascope.tasks import squad_metric
from lorascope.tasks.squad_v2 import predictions_at

run = Path(sys.argv[1])
data = json.load(open(Path(os.environ["LORASCOPE_DATA_DIR"]) / "squad_v2" / "dev-v2.0.json"))["data"]
ev_dir = run / "eval" / "squad_v2"
models = sorted(p.name[: -len(".predictions.json")] for p in ev_dir.glob("*.predictions.json"))
models = [m for m in models if m != "base"]

per = {}
for m in models:
    pred = json.load(open(ev_dir / f"{m}.predictions.json"))
    metrics = json.load(open(ev_dir / f"{m}.json"))["metrics"]
    ids = set(pred["answers"])
    arts = [{"title": a["title"], "paragraphs": [
        {"context": p["context"], "qas": [q for q in p["qas"] if q["id"] in ids]} for p in a["paragraphs"]]}
        for a in data]
    _, rule = squad_metric.raw_scores(arts, pred["predictions"])
    greedy_pred = predictions_at(pred["no_answer_margin"], pred["answers"], 0.0)
    _, greedy = squad_metric.raw_scores(arts, greedy_pred)
    _, abstain = squad_metric.raw_scores(arts, {q: "" for q in ids})
    rule = {k: 100.0 * v for k, v in rule.items()}
    greedy = {k: 100.0 * v for k, v in greedy.items()}
    abstain = {k: 100.0 * v for k, v in abstain.items()}
    assert len(rule) == len(ids), (m, len(rule), len(ids))
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    # independent check: the recomputed means reproduce what the evaluation wrote
    assert abs(mean(rule) - metrics["f1"]) < 1e-6, (m, mean(rule), metrics["f1"])
    assert abs(mean(greedy) - metrics["greedy"]["f1"]) < 1e-6, (m, mean(greedy), metrics["greedy"]["f1"])
    if "scores" in pred:  # the evaluation's own per-question F1 (0-1)
        assert all(abs(100.0 * pred["scores"][k] - rule[k]) < 1e-6 for k in rule), m
    groups = pred["paragraph"]
    per[m] = {"rule": rule, "greedy": greedy, "abstain": abstain, "groups": groups,
              "signal": pred.get("no_answer_signal"), "threshold": pred.get("no_answer_threshold"),
              "abstained": {"rule": sum(1 for v in pred["predictions"].values() if v == ""),
                            "greedy": sum(1 for v in greedy_pred.values() if v == "")}}


def fmt(b):
    return f"{b['value']:+.2f} [{b['ci_low']:+.2f}, {b['ci_high']:+.2f}]"


print(f"run folder: {run}; models: {', '.join(models)}; {len(next(iter(per.values()))['rule'])} scored questions\n")
print("| model | F1, fitted rule | F1, greedy | rule - greedy [95 % CI] | abstains (rule / greedy) | rule |")
print("|---|---|---|---|---|---|")
for m, p in per.items():
    b = hierarchical_bootstrap([p["rule"]], [p["greedy"]], groups=p["groups"])
    f1 = {k: sum(p[k].values()) / len(p[k]) for k in ("rule", "greedy")}
    print(f"| {m} | {f1['rule']:.2f} | {f1['greedy']:.2f} | {fmt(b)} "
          f"| {p['abstained']['rule']} / {p['abstained']['greedy']} | {p['signal']} > {p['threshold']:.3g} |")

full = [m for m in models if m.startswith("full_")]
lora = [m for m in models if m.startswith("lora_")]
groups = next(iter(per.values()))["groups"]
abstain = next(iter(per.values()))["abstain"]
print("\n| comparison | fitted rule | greedy |")
print("|---|---|---|")
for name, a, b in ((f"full ({len(full)} seeds) - always no answer", full, None),
                   (f"LoRA ({len(lora)} seeds) - always no answer", lora, None),
                   (f"LoRA ({len(lora)}) - full ({len(full)})", lora, full)):
    if not a or (b is not None and not b):
        continue
    row = []
    for kind in ("rule", "greedy"):
        A = [per[m][kind] for m in a]
        B = [abstain] if b is None else [per[m][kind] for m in b]
        row.append(fmt(hierarchical_bootstrap(A, B, groups=groups)))
    print(f"| {name} | {row[0]} | {row[1]} |")
