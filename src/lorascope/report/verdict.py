"""The proposal's success criteria, judged from a run directory's result files.

1. Accuracy: LoRA (the primary rank) within `accuracy_margin` points of full fine-tuning
   on each task's primary metric (MRPC accuracy, SQuAD v2 F1), mean over seeds, with a
   95 % paired bootstrap interval over evaluation examples.
2a. Drift: LoRA's drift (1 - content-token CKA averaged over layers) at least
    `drift_reduction` below full fine-tuning's, judged by
    :func:`lorascope.drift.criterion.judge_drift`: PASS only when the primary ratio's
    interval is below 1 - drift_reduction and the other drift measures agree.
2b. Serving: the unmerged adapter's overhead over merged serving at most
    `max_serving_overhead` at every batch size measured.
Overall: 1 and (2a or 2b), per task.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

PRIMARY = {"mrpc": ("accuracy", "MRPC accuracy"), "squad_v2": ("f1", "SQuAD v2 F1")}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def per_example_scores(task: str, eval_file: Path) -> dict[str, float] | None:
    """Per-example primary-metric scores (0-100) from an eval's predictions file."""
    pred = _load(eval_file.with_suffix(".predictions.json"))
    if pred is None:
        return None
    if task == "mrpc":
        return {k: 100.0 * (v["pred"] == v["label"]) for k, v in pred.items() if v.get("label") is not None}
    if "scores" in pred:
        return {k: 100.0 * v for k, v in pred["scores"].items()}
    return None


def paired_bootstrap(a: dict[str, float], b: dict[str, float], *, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over shared examples, with a 95 % percentile bootstrap interval."""
    keys = sorted(set(a) & set(b))
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(n))
    return {"value": statistics.fmean(diffs), "ci_low": means[int(0.025 * n)], "ci_high": means[int(0.975 * n) - 1],
            "n": len(keys)}


def judge(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    study = _load(run_dir / "study.json")
    if study is None:
        raise FileNotFoundError(f"{run_dir}: no study.json; not a `lorascope run` directory")
    cfg = study["config"]
    rank, seeds = study["primary_rank"], study["seeds"]
    tasks = {}
    for task in cfg["tasks"]:
        metric, label = PRIMARY.get(task, ("accuracy", task))
        t: dict[str, Any] = {"metric": metric, "label": label}
        full = [_load(run_dir / "eval" / task / f"full_s{s}.json") for s in seeds]
        lora = [_load(run_dir / "eval" / task / f"lora_r{rank}_s{s}.json") for s in seeds]
        if all(full) and all(lora):
            fv = statistics.fmean(f["metrics"][metric] for f in full)
            lv = statistics.fmean(x["metrics"][metric] for x in lora)
            acc: dict[str, Any] = {"full": fv, "lora": lv, "diff": lv - fv, "seeds": len(seeds)}
            fs = [per_example_scores(task, run_dir / "eval" / task / f"full_s{s}.json") for s in seeds]
            ls = [per_example_scores(task, run_dir / "eval" / task / f"lora_r{rank}_s{s}.json") for s in seeds]
            if all(fs) and all(ls):
                keys = set.intersection(*(set(x) for x in fs + ls))
                fa = {k: statistics.fmean(x[k] for x in fs) for k in keys}
                la = {k: statistics.fmean(x[k] for x in ls) for k in keys}
                acc["bootstrap"] = paired_bootstrap(la, fa)
            base_ev = _load(run_dir / "eval" / task / "base.json")
            if base_ev and base_ev.get("baselines"):
                name, m = max(base_ev["baselines"].items(), key=lambda kv: kv[1].get(metric, float("-inf")))
                acc["best_baseline"] = {"name": name.replace("_", " "), "value": m.get(metric)}
                acc["beats_baseline"] = {"full": fv > m.get(metric, float("inf")),
                                         "lora": lv > m.get(metric, float("inf"))}
            acc["pass"] = acc["diff"] >= -cfg["accuracy_margin"]
            acc["confident"] = acc.get("bootstrap", {}).get("ci_low", -1e9) >= -cfg["accuracy_margin"]
            t["accuracy"] = acc
        drift = _load(run_dir / "drift" / task / "drift.json")
        if drift:
            from lorascope.drift.criterion import criterion_from_drift

            c = criterion_from_drift(drift, f"lora_r{rank}", "full")  # PASS / FAIL / INCONCLUSIVE over measures
            if c is not None and c["ratio"] is not None:
                t["drift"] = c
        serve = _load(run_dir / "serve" / f"r{rank}" / "serve.json")
        if serve:
            rows = [x for x in serve["summary"]["rows"] if x["config"] == f"unmerged:{task}" and x["overhead"] is not None]
            if rows:
                worst = max(rows, key=lambda x: x["overhead"])
                t["serving"] = {"engine": serve["settings"]["engine"],
                                "overheads": {x["batch_size"]: x["overhead"] for x in rows},
                                "max": worst["overhead"], "max_at_batch": worst["batch_size"],
                                "min": min(x["overhead"] for x in rows),
                                "flop_limit": worst["expected_overhead_flops"],
                                "pass": worst["overhead"] <= cfg["max_serving_overhead"]}
        acc_ok = t.get("accuracy", {}).get("pass")
        alt = [t[k]["pass"] for k in ("drift", "serving") if k in t]
        if acc_ok is None or not alt:
            t["verdict"] = "incomplete"
        else:
            t["verdict"] = "meets the criteria" if acc_ok and any(alt) else "does not meet the criteria"
        tasks[task] = t
    verdicts = [t["verdict"] for t in tasks.values()]
    if all(v == "meets the criteria" for v in verdicts):
        overall = "LoRA meets the proposal's success criteria on every task"
    elif "incomplete" in verdicts:
        overall = "incomplete: some results are missing (see the tables)"
    else:
        failed = [k for k, t in tasks.items() if t["verdict"] != "meets the criteria"]
        overall = f"LoRA does not meet the criteria on {', '.join(failed)}"
    return {"tasks": tasks, "overall": overall, "recommendation": recommend(tasks, rank, cfg), "rank": rank,
            "seeds": seeds, "criteria": {
        "accuracy_margin": cfg["accuracy_margin"], "drift_reduction": cfg["drift_reduction"],
        "max_serving_overhead": cfg["max_serving_overhead"]}}


def recommend(tasks: dict[str, Any], rank: int, cfg: dict[str, Any]) -> str:
    """A plain-language recommendation that follows from the measured criteria (not a fixed text)."""
    parts = []
    acc = {k: t["accuracy"] for k, t in tasks.items() if "accuracy" in t}
    if acc:
        behind = [k for k, a in acc.items() if not a["pass"]]
        if behind:
            parts.append(f"LoRA r={rank} falls more than {cfg['accuracy_margin']:g} points behind full fine-tuning on "
                         f"{', '.join(behind)}: prefer full fine-tuning there, or try a higher rank")
        else:
            parts.append(f"LoRA r={rank} is within {cfg['accuracy_margin']:g} points of full fine-tuning on every task")
    drift = {k: t["drift"] for k, t in tasks.items() if "drift" in t}
    if drift:
        ratios = ", ".join(f"{k} {d['ratio']:.2f}" for k, d in drift.items())
        if all(d["pass"] for d in drift.values()):
            parts.append(f"it moves the hidden states much less (drift ratio LoRA / full: {ratios}), so less "
                         f"forgetting is expected")
        else:
            parts.append(f"its drift is not clearly lower than full fine-tuning's (ratio LoRA / full: {ratios})")
    serving = {k: t["serving"] for k, t in tasks.items() if "serving" in t}
    if serving:
        worst = max(s["max"] for s in serving.values())
        engine = next(iter(serving.values()))["engine"]
        if worst <= cfg["max_serving_overhead"]:
            parts.append(f"serving adapters unmerged costs at most {worst:.0%} in {engine}: keep one base model and "
                         f"choose the adapter per request")
        else:
            parts.append(f"serving adapters unmerged costs up to {worst:.0%} in {engine} on this hardware: merge them "
                         f"where latency or throughput matters, and keep them unmerged only where one model copy per "
                         f"task does not fit in memory")
    return "; ".join(parts) + "." if parts else "not enough results for a recommendation."
