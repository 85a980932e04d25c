"""The verdict: PASS / FAIL / INCONCLUSIVE per criterion and task, intervals over seeds and clusters."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

N = 300  # MRPC-like evaluation pairs; 60 % paraphrases


def _labels() -> list[int]:
    return [int(i % 5 < 3) for i in range(N)]


def _write_mrpc_eval(d: Path, name: str, correct: list[bool], metric: float | None = None) -> None:
    labels = _labels()
    preds = {str(i): {"label": y, "pred": y if c else 1 - y} for i, (y, c) in enumerate(zip(labels, correct))}
    acc = 100.0 * sum(correct) / len(correct)
    ev = {"metrics": {"accuracy": acc if metric is None else metric},
          "baselines": {"majority_class (yes)": {"accuracy": 60.0}}}
    (d / f"{name}.predictions.json").write_text(json.dumps(preds))
    (d / f"{name}.json").write_text(json.dumps(ev))


def _correct(rate: float, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < rate for _ in range(N)]


def fake_run(tmp_path: Path, *, full: list[float], lora: list[float], base: float = 0.60, ratio: float = 0.5,
             ratio_ci: tuple | None = None, overhead: float = 0.1, drift: bool = True) -> Path:
    """A run directory with MRPC evaluations of len(full) seeds, a drift ratio and a serving overhead."""
    from lorascope.pipeline import StudyArgs

    run = tmp_path / "run"
    d = run / "eval" / "mrpc"
    d.mkdir(parents=True)
    seeds = list(range(len(full)))
    cfg = dataclasses.asdict(StudyArgs(tasks=["mrpc"]))
    (run / "study.json").write_text(json.dumps({"config": cfg, "primary_rank": 8, "seeds": seeds, "ranks": [8]}))
    labels = _labels()
    _write_mrpc_eval(d, "base", [y == 1 for y in labels] if base == 0.60 else _correct(base, 99))
    for s, (f, l_) in enumerate(zip(full, lora)):
        _write_mrpc_eval(d, f"full_s{s}", _correct(f, 10 + s))
        _write_mrpc_eval(d, f"lora_r8_s{s}", _correct(l_, 10 + s))  # coupled with full
    if drift:
        lo, hi = ratio_ci if ratio_ci is not None else (ratio - 0.01, ratio + 0.01)
        (run / "drift" / "mrpc").mkdir(parents=True)
        from lorascope.drift.criterion import LABELS, judge_drift

        entry = {"lora": "lora_r8", "full": "full", **{m: {
            "value": ratio, "ci_low": lo, "ci_high": hi, "lora_drift": 0.01 * ratio, "full_drift": 0.01,
            "seeds_lora": 1, "seeds_full": 1, "seed_variance_included": False} for m in LABELS}}
        (run / "drift" / "mrpc" / "drift.json").write_text(json.dumps({"selection": {"tokens": "content"}, "summary": {
            "method_ratios": [entry], "criterion_2a": [judge_drift(entry)]}}))
    (run / "serve" / "r8").mkdir(parents=True)
    (run / "serve" / "r8" / "serve.json").write_text(json.dumps({"settings": {"engine": "vllm"}, "summary": {"rows": [
        {"config": "unmerged:mrpc", "batch_size": b, "overhead": overhead * (b / 4), "expected_overhead_flops": 0.02}
        for b in (1, 4)]}}))
    return run


@pytest.mark.parametrize("full,lora,ratio,overhead,expected", [
    ([0.90], [0.90], 0.5, 2.0, "PASS"),  # both learned, equal, drift clearly lower
    ([0.90], [0.90], 0.9, 0.3, "PASS"),  # (2a) fails, serving passes (worst batch 0.3 <= 0.3)
    ([0.90], [0.90], 0.9, 0.4, "FAIL"),  # neither drift nor serving
    ([0.92], [0.75], 0.5, 0.1, "FAIL"),  # LoRA far more than 3 points behind, and learned
    ([0.60], [0.60], 0.5, 0.1, "INCONCLUSIVE"),  # nobody beats the majority class
    ([0.90], [0.61], 0.5, 0.1, "INCONCLUSIVE"),  # LoRA has not learned
])
def test_verdict_logic(tmp_path, full, lora, ratio, overhead, expected):
    from lorascope.report import judge

    v = judge(fake_run(tmp_path, full=full, lora=lora, ratio=ratio, overhead=overhead))
    t = v["tasks"]["mrpc"]
    assert t["verdict"] == expected, t["reason"]
    assert t["serving"]["max"] == pytest.approx(overhead) and t["serving"]["max_at_batch"] == 4
    if min(full + lora) > 0.7:  # both learned: drift is judged over every measure (all equal here)
        assert t["drift"]["status"] == ("PASS" if ratio <= 0.8 else "FAIL") and t["drift"]["ratio"] == ratio
    else:
        assert t["drift"]["status"] == "INCONCLUSIVE" and "learned" in t["drift"]["reason"]
    if expected == "INCONCLUSIVE":
        assert t["accuracy"]["status"] == "INCONCLUSIVE" and "not learned the task" in t["accuracy"]["reason"]
        # drift is not judged between models that did not learn, however low the ratio
        assert t["drift"]["status"] == "INCONCLUSIVE" and "learned" in t["drift"]["reason"]
        assert v["overall"].startswith("mrpc INCONCLUSIVE") and "To decide, run:" in v["overall"]
        assert "no recommendation on accuracy or drift for mrpc" in v["recommendation"]
        assert "moves the hidden states" not in v["recommendation"]
    else:
        assert all(x["learned"] for x in t["accuracy"]["learned"].values())


def test_undefined_drift_interval_is_inconclusive_not_a_crash(tmp_path):
    from lorascope.report import judge

    run = fake_run(tmp_path, full=[0.9], lora=[0.9], ratio=0.5, ratio_ci=(None, None), overhead=0.5)
    t = judge(run)["tasks"]["mrpc"]
    assert t["drift"]["status"] == "INCONCLUSIVE" and "has no interval" in t["drift"]["reason"]
    assert t["verdict"] == "INCONCLUSIVE"  # (1) PASS and ((2a) ? or (2b) FAIL)
    from lorascope.report.verdict import drift_criterion

    c = drift_criterion({"summary": {"method_ratios": []}}, 8, 0.2, True)
    assert c["status"] == "INCONCLUSIVE" and "no content-token comparison" in c["reason"]


def test_a_drift_part_with_one_method_says_the_other_is_not_measured_yet():
    """A study run in parts pools the full fine-tuning pair's drift before any LoRA model's: the reason names
    what is missing, not an old file format (it read "written by an older lorascope?; rerun the drift stage")."""
    from lorascope.report.verdict import drift_criterion

    full_only = {"summary": {"method_ratios": [], "per_model": {
        "full_s0": {"kind": "full", "method": "full"}, "full_s1": {"kind": "full", "method": "full"}}}}
    c = drift_criterion(full_only, 8, 0.2, True)
    assert c["status"] == "INCONCLUSIVE" and c["ratio"] is None
    assert c["reason"] == "no drift of LoRA r=8 measured yet (drift.json holds full_s0, full_s1)"
    from lorascope.report.render import _drift_seeds

    assert c["seeds"] == {"lora": 0, "full": 2} and _drift_seeds(c) == "seeds LoRA 0, full 2"
    assert _drift_seeds({"seeds": None}) == "seeds unknown"
    # a LoRA model of another rank is not the rank judged
    other_rank = {"summary": {"method_ratios": [], "per_model": {
        "full_s0": {"kind": "full", "method": "full"}, "lora_r16_s0": {"kind": "lora", "method": "lora_r16"}}}}
    assert drift_criterion(other_rank, 8, 0.2, True)["reason"].startswith("no drift of LoRA r=8 measured yet")
    # both methods there but no comparison between them: the file itself is at fault
    both = {"summary": {"method_ratios": [], "per_model": {
        "full_s0": {"kind": "full", "method": "full"}, "lora_r8_s0": {"kind": "lora", "method": "lora_r8"}}}}
    assert "no content-token comparison lora_r8 / full" in drift_criterion(both, 8, 0.2, True)["reason"]


def test_accuracy_interval_straddling_the_margin_is_inconclusive(tmp_path):
    from lorascope.report import judge

    acc = judge(fake_run(tmp_path, full=[0.90], lora=[0.87], ratio=0.5))["tasks"]["mrpc"]["accuracy"]
    ci = acc["bootstrap"]
    assert ci["ci_low"] < -3 < ci["ci_high"]
    assert acc["status"] == "INCONCLUSIVE" and "straddles -3" in acc["reason"]
    assert "1 seed" in acc["reason"]


def test_three_valued_logic():
    from lorascope.report.verdict import and3, or3

    P, F, I = "PASS", "FAIL", "INCONCLUSIVE"
    assert and3(P, P) == P and and3(P, I) == I and and3(I, F) == F
    assert or3(F, P) == P and or3(F, I) == I and or3(F, F) == F and or3() == I


def _loop_diff(a_seeds, b_seeds, keys):
    tot = 0.0
    for k in keys:
        tot += sum(float(s[k]) for s in a_seeds) / len(a_seeds) - sum(float(s[k]) for s in b_seeds) / len(b_seeds)
    return tot / len(keys)


def test_hierarchical_bootstrap_value_matches_a_plain_loop_and_widens_with_seeds_and_clusters():
    from lorascope.report.verdict import hierarchical_bootstrap

    rng = random.Random(0)
    keys = [str(i) for i in range(400)]
    a = [{k: 100.0 * (rng.random() < 0.7) for k in keys} for _ in range(3)]
    b = [{k: 100.0 * (rng.random() < 0.6) for k in keys}]
    r = hierarchical_bootstrap(a, b)
    assert r["value"] == pytest.approx(_loop_diff(a, b, keys), abs=1e-9)
    assert r["ci_low"] < r["value"] < r["ci_high"] and r["seeds"] == [3, 1] and r["clusters"] == 400

    # seeds that disagree (one shifted by +20 points) widen the interval beyond the examples-only one
    shifted = [a[0], {k: v + 20 for k, v in a[0].items()}]
    one = hierarchical_bootstrap([a[0]], b)
    two = hierarchical_bootstrap(shifted, b)
    assert (two["ci_high"] - two["ci_low"]) > 1.5 * (one["ci_high"] - one["ci_low"])

    # 40 clusters of 10 identical questions: the interval is about sqrt(10) times wider than
    # an (invalid) bootstrap over questions
    groups = {k: str(int(k) // 10) for k in keys}
    clustered_a = {k: 100.0 * (int(k) // 10 % 3 == 0) for k in keys}
    zero = {k: 0.0 for k in keys}
    naive = hierarchical_bootstrap([clustered_a], [zero])
    by_cluster = hierarchical_bootstrap([clustered_a], [zero], groups=groups)
    ratio = (by_cluster["ci_high"] - by_cluster["ci_low"]) / (naive["ci_high"] - naive["ci_low"])
    assert 2.3 < ratio < 4.3 and by_cluster["clusters"] == 40
    # the cluster bootstrap equals a bootstrap over the 40 cluster means (computed independently)
    means = np.array([100.0 * (c % 3 == 0) for c in range(40)])
    g = np.random.default_rng(5)
    boot = np.sort([means[g.integers(0, 40, 40)].mean() for _ in range(4000)])
    assert by_cluster["ci_low"] == pytest.approx(boot[100], abs=4.0)
    assert by_cluster["ci_high"] == pytest.approx(boot[3899], abs=4.0)


def test_paired_bootstrap_interval():
    from lorascope.report.verdict import paired_bootstrap

    a = {str(i): 100.0 * (i % 2) for i in range(400)}
    b = {str(i): 0.0 for i in range(400)}
    r = paired_bootstrap(a, b)
    assert r["value"] == pytest.approx(50.0) and r["ci_low"] < 50.0 < r["ci_high"] and r["ci_high"] - r["ci_low"] < 15
    same = paired_bootstrap(a, a)
    assert same["value"] == same["ci_low"] == same["ci_high"] == 0.0


def test_squad_baseline_and_clusters_come_from_the_predictions(tmp_path):
    from lorascope.report.verdict import baseline_scores, clusters

    f = tmp_path / "full_s0.json"
    f.with_suffix(".predictions.json").write_text(json.dumps({
        "scores": {"a": 1.0, "b": 0.5, "c": 0.0}, "has_answer": {"a": True, "b": False, "c": True},
        "paragraph": {"a": "p1", "b": "p1", "c": "p2"}}))
    assert baseline_scores("squad_v2", f) == {"always_no_answer": {"a": 0.0, "b": 100.0, "c": 0.0}}
    groups, unit = clusters("squad_v2", f)
    assert unit == "paragraph" and groups == {"a": "p1", "b": "p1", "c": "p2"}


def test_serving_2b_is_decided_by_the_paired_intervals():
    from lorascope.report.verdict import serving_2b

    def serve(rows):
        return {"settings": {"engine": "vllm"}, "summary": {"rows": [
            {"config": "unmerged:mrpc", "batch_size": b, "overhead": m, "overhead_ci_low": lo, "overhead_ci_high": hi,
             "overhead_ci_coverage": 0.96, "expected_overhead_flops": 0.02} for b, m, lo, hi in rows]}}

    assert serving_2b(serve([(1, 0.10, 0.05, 0.20), (4, 0.20, 0.10, 0.29)]), "mrpc", 0.3)["status"] == "PASS"
    s = serving_2b(serve([(1, 0.10, 0.05, 0.20), (4, 0.28, 0.20, 0.40)]), "mrpc", 0.3)
    assert s["status"] == "INCONCLUSIVE" and "batch 4" in s["reason"] and not s["pass"]
    s = serving_2b(serve([(1, 0.50, 0.35, 0.70), (4, 0.28, 0.20, 0.40)]), "mrpc", 0.3)
    assert s["status"] == "FAIL" and "batch 1" in s["reason"]
    few = serve([(1, 0.10, 0.05, 0.20)])
    few["summary"]["rows"][0]["overhead_ci_coverage"] = 0.75  # 3 rounds: min-max
    s = serving_2b(few, "mrpc", 0.3)
    assert s["status"] == "INCONCLUSIVE" and "too few rounds" in s["reason"]
    # an older serve.json without intervals: medians decide, and the reason says so
    old = {"settings": {"engine": "vllm"}, "summary": {"rows": [
        {"config": "unmerged:mrpc", "batch_size": 1, "overhead": 0.2, "expected_overhead_flops": 0.02}]}}
    s = serving_2b(old, "mrpc", 0.3)
    assert s["status"] == "PASS" and "no intervals" in s["reason"]


def test_recommendation_claims_no_more_than_the_verdict():
    """(1) bounds how far LoRA falls behind: "at most 3 points below", and an overall verdict that (1) alone does
    not carry is named; a task not evaluated yet is "not measured", not INCONCLUSIVE; memory advice only from a
    measured multi-adapter engine."""
    from lorascope.report.verdict import recommend, serving_2b

    cfg = {"accuracy_margin": 3.0, "max_serving_overhead": 0.3}
    serving = {"max": 0.8, "engine": "vllm"}
    text = recommend({"mrpc": {"accuracy": {"status": "PASS"}, "verdict": "INCONCLUSIVE", "serving": serving},
                      "squad_v2": {"verdict": "INCONCLUSIVE"}}, 8, cfg)
    assert ("LoRA r=8 is at most 3 points below full fine-tuning on mrpc (criterion 1; the task's overall verdict is "
            "INCONCLUSIVE on mrpc: see (2a) and (2b))") in text
    assert "for squad_v2: criterion (1) is not measured there yet" in text and "within 3 points" not in text
    assert "was not measured here (study.serve.modes without multi)" in text and "does not fit in memory" not in text
    serving["multi_memory"] = {"ratio": 0.6, "multi_mib": 600.0, "merged_alternative_mib": 1000.0}
    text = recommend({"mrpc": {"accuracy": {"status": "PASS"}, "verdict": "PASS", "serving": serving}}, 8, cfg)
    assert text.endswith("one engine with every task's adapter took 600 MiB against 1000 MiB for a merged copy per "
                         "task (0.60x): keep them unmerged where that memory matters more.")
    assert "overall verdict" not in text
    serving["multi_memory"]["ratio"] = 1.1
    text = recommend({"mrpc": {"serving": serving}}, 8, cfg)
    assert "no less than 1000 MiB for a merged copy per task (1.10x)" in text
    # from a serve.json: bench.py's multi-vs-merged comparison, read as it wrote it
    serve = {"settings": {"engine": "vllm"}, "summary": {"rows": [
        {"config": "unmerged:mrpc", "batch_size": 1, "overhead": 0.8, "expected_overhead_flops": 0.02}],
        "memory": {"multi": {"peak_pss_mib": 650.0, "peak_rss_mib": 700.0}, "merged_alternative_mib": 1300.0,
                   "multi_vs_merged_alternative": 0.5}}}
    assert serving_2b(serve, "mrpc", 0.3)["multi_memory"] == {"ratio": 0.5, "multi_mib": 650.0,
                                                              "merged_alternative_mib": 1300.0}
    del serve["summary"]["memory"]
    assert "multi_memory" not in serving_2b(serve, "mrpc", 0.3)


def test_recommendation_says_whether_the_serving_overhead_is_arithmetic_or_implementation():
    from lorascope.report.verdict import recommend, serving_2b

    serve = {"settings": {"engine": "transformers"}, "summary": {"rows": [
        {"config": "unmerged:mrpc", "batch_size": 1, "overhead": 0.25, "overhead_ci_low": 0.2, "overhead_ci_high": 0.28,
         "overhead_ci_coverage": 0.96, "expected_overhead_flops": 0.018}], "time_split": [
        {"config": "unmerged:mrpc", "batch_size": 1, "phase": "decode", "overhead": 0.25, "lora_share": 0.21,
         "flop_limit": 0.018},
        {"config": "merged:mrpc", "batch_size": 1, "phase": "decode", "overhead": None, "lora_share": 0.0,
         "flop_limit": None}]}}
    s = serving_2b(serve, "mrpc", 0.3)
    assert s["time_split"] == [{"batch_size": 1, "phase": "decode", "overhead": 0.25, "lora_share": 0.21,
                                "flop_limit": 0.018}]
    cfg = {"accuracy_margin": 3.0, "max_serving_overhead": 0.3}
    text = recommend({"mrpc": {"accuracy": {"status": "INCONCLUSIVE"}, "serving": s}}, 8, cfg)
    assert "LoRA operations take 21% of the step against a FLOP-count limit of 1.8%" in text
    assert "implementation, not arithmetic" in text
    s["time_split"][0]["lora_share"] = 0.02
    assert "close to the arithmetic" in recommend({"mrpc": {"serving": s}}, 8, cfg)
    del s["time_split"]
    assert "where the unmerged time goes" not in recommend({"mrpc": {"serving": s}}, 8, cfg)


def test_a_task_s_own_seeds_are_the_ones_judged(tmp_path):
    from lorascope.report import judge

    run = fake_run(tmp_path, full=[0.9, 0.9], lora=[0.9, 0.9])
    study = json.loads((run / "study.json").read_text())
    study["seeds"] = [0, 1, 2]  # the study's list; mrpc trained with two of them
    (run / "study.json").write_text(json.dumps(study))
    assert "evaluations still to run for full_s2, lora_r8_s2" in judge(run)["tasks"]["mrpc"]["reason"]
    study["task_seeds"] = {"mrpc": [0, 1]}
    (run / "study.json").write_text(json.dumps(study))
    t = judge(run)["tasks"]["mrpc"]
    assert t["seeds"] == [0, 1] and t["accuracy"]["seeds"] == {"full": 2, "lora": 2}
    assert t["accuracy"]["bootstrap"]["seeds"] == [2, 2] and "missing" not in t["accuracy"]["reason"]


def test_a_task_left_out_of_serving_says_why_2b_is_missing(tmp_path):
    from lorascope.report import judge

    run = fake_run(tmp_path, full=[0.9], lora=[0.9], ratio=0.9, overhead=0.1)
    study = json.loads((run / "study.json").read_text())
    study["config"]["serve"]["tasks"] = ["squad_v2"]  # mrpc's adapter was not served
    (run / "study.json").write_text(json.dumps(study))
    serve = run / "serve" / "r8" / "serve.json"
    serve.write_text(serve.read_text().replace("unmerged:mrpc", "unmerged:squad_v2"))
    t = judge(run)["tasks"]["mrpc"]
    assert "serving" not in t and "study.serve.tasks: squad_v2" in t["serving_absent"]
    assert t["verdict"] == "FAIL"  # (2a) fails and (2b) is not there to rescue it
    study["config"]["serve"]["enabled"] = False
    (run / "study.json").write_text(json.dumps(study))
    assert "serving is off" in judge(run)["tasks"]["mrpc"]["serving_absent"]
    # drift left out for this task: (2a) says why, and with (2b) off too nothing can rescue (1)
    study["config"]["drift"]["tasks"] = ["squad_v2"]
    (run / "study.json").write_text(json.dumps(study))
    shutil.rmtree(run / "drift" / "mrpc")
    t = judge(run)["tasks"]["mrpc"]
    assert "drift" not in t and "study.drift.tasks: squad_v2" in t["drift_absent"]
    assert t["verdict"] == "INCONCLUSIVE" and t["reason"].startswith("neither drift (2a) nor serving (2b)")
    # a run folder from before study.serve was a section: the same judgement from its flat fields
    flat = {k: v for k, v in study["config"].items() if k not in ("drift", "serve")}
    flat.update(serve=False, serve_tasks=None, drift_reduction=0.2, max_serving_overhead=0.3)
    (run / "eval" / "mrpc").rename(run / "eval" / "mrpc.learned")
    shutil.copytree(fake_run(tmp_path / "unlearned", full=[0.5], lora=[0.5], drift=False) / "eval" / "mrpc",
                    run / "eval" / "mrpc")
    (run / "study.json").write_text(json.dumps(dict(study, config=flat)))
    t = judge(run)["tasks"]["mrpc"]
    assert "serving is off" in t["serving_absent"] and "no drift result" in t["drift_absent"]
    # models that learned nothing: that is the reason given, before anything about (2a) or (2b)
    assert t["verdict"] == "INCONCLUSIVE" and t["reason"].startswith("(1) the models have not learned")


def test_mean_interval_matches_a_plain_loop_bootstrap():
    from lorascope.report.verdict import mean_interval

    rng = random.Random(4)
    a = {str(i): 100.0 * (rng.random() < 0.8) for i in range(565)}
    r = mean_interval(a)
    assert r["value"] == pytest.approx(sum(a.values()) / len(a), abs=1e-9) and r["n"] == 565
    # a plain-loop percentile bootstrap over examples (another generator): the same interval to Monte Carlo error
    vals = list(a.values())
    boot = sorted(sum(vals[rng.randrange(len(vals))] for _ in vals) / len(vals) for _ in range(2000))
    assert r["ci_low"] == pytest.approx(boot[50], abs=0.8) and r["ci_high"] == pytest.approx(boot[1949], abs=0.8)
    # clusters: questions of one paragraph are resampled together, which widens the interval
    groups = {k: str(int(k) // 8) for k in a}
    same_per_cluster = {k: 100.0 * (int(k) // 8 % 4 != 0) for k in a}
    assert (lambda c, n: (c["ci_high"] - c["ci_low"]) > 2 * (n["ci_high"] - n["ci_low"]))(
        mean_interval(same_per_cluster, groups=groups), mean_interval(same_per_cluster))
    const = mean_interval({k: 50.0 for k in a})
    assert const["value"] == const["ci_low"] == const["ci_high"] == 50.0


def test_the_report_gives_search_trials_intervals_and_each_selection_its_margin(tmp_path):
    """A synthetic MRPC search (no training): the table's interval per trial and the paired runner-up line equal
    the same bootstrap computed directly on the trials' per-pair predictions."""
    from lorascope.report.render import Doc, _lr_section
    from lorascope.report.verdict import hierarchical_bootstrap, mean_interval

    rng = random.Random(1)
    labels = {f"p{i}": int(rng.random() < 0.67) for i in range(300)}
    tdir = tmp_path / "tune" / "mrpc" / "full"
    hit_rates = {"lr_1.00e-04": 0.70, "lr_3.00e-04": 0.80, "lr_3.00e-04_epochs_2": 0.83}
    per_pair, trials = {}, []
    for name, p in hit_rates.items():
        pred = {k: {"label": y, "pred": y if rng.random() < p else 1 - y} for k, y in labels.items()}
        (tdir / name).mkdir(parents=True)
        (tdir / name / "eval.predictions.json").write_text(json.dumps(pred))
        (tdir / name / "eval.json").write_text("{}")
        per_pair[name] = {k: 100.0 * (v["pred"] == v["label"]) for k, v in pred.items()}
        lr, e = (3e-4 if "3.00" in name else 1e-4), (2.0 if "epochs" in name else 1.0)
        trials.append({"lr": lr, "epochs": e, "value": sum(per_pair[name].values()) / 300, "metric": "accuracy",
                       "state": "complete", "train_dir": f"/elsewhere/{name}/train"})  # another machine's path
    best_e = 2.0 if trials[2]["value"] > trials[1]["value"] else 1.0
    (tdir / "tune.json").write_text(json.dumps({
        "task": "mrpc", "method": "full", "metric": "accuracy", "epochs": 1.0, "trials": trials[:2],
        "best_lr": 3e-4, "best_value": trials[1]["value"], "best_epochs": best_e, "epochs_rule": "x",
        "epoch_trials": [dict(trials[1], reused_from="lr_3.00e-04"), trials[2]]}))
    doc = Doc()
    _lr_section(doc, tmp_path, ["mrpc"])
    table = next(b for b in doc.blocks if b[0] == "table")
    assert "95 % CI" in table[1] and len(table[2]) == 3  # the reused 1-epoch trial is not shown twice
    for row, name in zip(table[2], hit_rates):
        ci = mean_interval(per_pair[name])
        assert row[5] == f"[{ci['ci_low']:.1f}, {ci['ci_high']:.1f}]"
    text = " ".join(b[1] for b in doc.blocks if b[0] == "p")
    rate = hierarchical_bootstrap([per_pair["lr_3.00e-04"]], [per_pair["lr_1.00e-04"]])
    diff = sum(per_pair["lr_3.00e-04"].values()) / 300 - sum(per_pair["lr_1.00e-04"].values()) / 300
    assert rate["value"] == pytest.approx(diff)
    assert (f"mrpc / full, rate: 3.0e-04, 1 epoch(s) ({trials[1]['value']:.1f}) vs 1.0e-04, 1 epoch(s) "
            f"({trials[0]['value']:.1f}): {rate['value']:+.1f} [{rate['ci_low']:+.1f}, {rate['ci_high']:+.1f}] "
            f"points over 300 examples" + ("" if rate["ci_low"] > 0 or rate["ci_high"] < 0 else
                                            " (the interval includes 0)")) in text
    sel, other = ("lr_3.00e-04_epochs_2", "lr_3.00e-04") if best_e == 2.0 else ("lr_3.00e-04", "lr_3.00e-04_epochs_2")
    ep = hierarchical_bootstrap([per_pair[sel]], [per_pair[other]])
    assert f"mrpc / full, epochs: 3.0e-04, {best_e:g} epoch(s)" in text
    assert f"{ep['value']:+.1f} [{ep['ci_low']:+.1f}, {ep['ci_high']:+.1f}] points over 300 examples" in text


def test_an_unfinished_search_shows_its_finished_trials_and_selects_nothing(tmp_path):
    """A study run in parts: a search without tune.json yet shows each finished trial with the interval computed
    directly from its per-pair predictions, says how far it got, and neither selects a rate nor draws a curve."""
    from lorascope.report.render import Doc, _lr_section
    from lorascope.report.verdict import mean_interval

    rng = random.Random(2)
    labels = {f"p{i}": int(rng.random() < 0.67) for i in range(200)}
    mdir = tmp_path / "tune" / "mrpc" / "lora"
    pred = {k: {"label": y, "pred": y if rng.random() < 0.75 else 1 - y} for k, y in labels.items()}
    (mdir / "lr_1.00e-03").mkdir(parents=True)
    (mdir / "lr_1.00e-03" / "eval.predictions.json").write_text(json.dumps(pred))
    (mdir / "lr_1.00e-03" / "eval.json").write_text("{}")
    hits = [100.0 * (v["pred"] == v["label"]) for v in pred.values()]
    (mdir / "lr_1.00e-03" / "validation.json").write_text(json.dumps({
        "lr": 1e-3, "epochs": 1.0, "value": sum(hits) / len(hits), "metric": "accuracy", "state": "complete",
        "train_dir": "/elsewhere/lr_1.00e-03/train", "train_config_hash": "x", "scoring": {}}))
    (mdir / "lr_3.00e-03" / "train").mkdir(parents=True)  # started, interrupted before its validation.json
    doc = Doc()
    _lr_section(doc, tmp_path, ["mrpc"])
    table = next(b for b in doc.blocks if b[0] == "table")
    assert len(table[2]) == 1
    row = table[2][0]
    ci = mean_interval(dict(zip(pred, hits)))
    assert row[:5] == ["mrpc", "lora", "1.0e-03", "1", f"{sum(hits) / len(hits):.1f}"]
    assert row[5] == f"[{ci['ci_low']:.1f}, {ci['ci_high']:.1f}]" and row[7] == "search unfinished"
    text = " ".join(b[1] for b in doc.blocks if b[0] == "p")
    assert "mrpc / lora: 1 trial(s) finished, 1 started and not finished" in text
    assert "selected" not in row and not any(b[0] == "fig" for b in doc.blocks)
    assert "against its runner-up" not in text  # nothing selected, so no margin either


def test_an_unfinished_search_leaves_out_trials_outside_the_studys_grid(tmp_path):
    """Trials left in the search folder by an earlier grid (another rate, or another epoch count than the study's
    rate trials train) are counted in the sentence, not shown as this search's; without study.json all show."""
    from lorascope.report.render import Doc, _lr_section

    mdir = tmp_path / "tune" / "mrpc" / "lora"
    pred = {f"p{i}": {"label": i % 2, "pred": i % 3 % 2} for i in range(60)}
    for name, lr, epochs in (("lr_1.00e-03", 1e-3, 1.0), ("lr_1.00e-04", 1e-4, 1.0), ("lr_3.00e-03", 3e-3, 2.0)):
        (mdir / name).mkdir(parents=True)
        (mdir / name / "eval.predictions.json").write_text(json.dumps(pred))
        (mdir / name / "eval.json").write_text("{}")
        (mdir / name / "validation.json").write_text(json.dumps({
            "lr": lr, "epochs": epochs, "value": 50.0, "metric": "accuracy", "state": "complete"}))

    def shown():
        doc = Doc()
        _lr_section(doc, tmp_path, ["mrpc"])
        rows = next(b for b in doc.blocks if b[0] == "table")[2]
        return [r[2] for r in rows], " ".join(b[1] for b in doc.blocks if b[0] == "p")

    assert shown()[0] == ["1.0e-03", "1.0e-04", "3.0e-03"]  # no study.json: nothing to check against
    (tmp_path / "study.json").write_text(json.dumps({
        "config": {"tune_lrs_full": [1e-5, 1e-4], "tune_lrs_lora": [1e-3, 3e-3], "tune_epochs": None,
                   "per_task": {"squad_v2": {"tune_lrs_lora": [1e-4, 1e-2]}}},
        "base_config": {"train": {"epochs": 1.0}}}))
    rates, text = shown()
    assert rates == ["1.0e-03"]
    assert ("mrpc / lora: 1 trial(s) finished (2 other finished trial(s) not shown, outside this study's grid: "
            "1.0e-04, 1 epoch(s), 3.0e-03, 2 epoch(s))") in text


def test_a_study_still_running_shows_the_criteria_on_what_it_has_and_decides_nothing(tmp_path):
    """Evaluations missing (a study run in parts): criterion (1) and the learned check on the seeds evaluated so
    far, shown but INCONCLUSIVE, and (2a) not decided either; a method with no evaluation at all: nothing shown."""
    from lorascope.report import judge
    from lorascope.report.verdict import FINISH, PASS

    run = fake_run(tmp_path, full=[0.95, 0.95], lora=[0.95, 0.95], ratio=0.5, overhead=2.0)
    assert judge(run)["tasks"]["mrpc"]["verdict"] == PASS  # complete, it passes
    d = run / "eval" / "mrpc"
    (d / "full_s1.json").unlink()
    t = judge(run)["tasks"]["mrpc"]
    acc = t["accuracy"]
    assert acc["status"] == "INCONCLUSIVE" and acc["interim"]["missing"] == ["full_s1"]
    assert acc["seeds"] == {"full": 1, "lora": 2}
    assert acc["reason"].startswith("interim, not decided: evaluations still to run for full_s1; on the seeds "
                                    "evaluated so far (1 full, 2 LoRA) the rule gives PASS: LoRA - full = ")
    # one method's seed variance is in the interval, the other's is not: the note names which
    assert acc["reason"].endswith("(full fine-tuning 1 seed(s), LoRA 2: the interval covers evaluation examples "
                                  "and the seed variance of LoRA only)")

    def mean_correct(name):  # a second, plain computation of a model's accuracy from its predictions
        p = json.loads((d / f"{name}.predictions.json").read_text())
        return 100.0 * sum(r["label"] == r["pred"] for r in p.values()) / len(p)

    lora = (mean_correct("lora_r8_s0") + mean_correct("lora_r8_s1")) / 2
    assert acc["diff"] == pytest.approx(lora - mean_correct("full_s0"), abs=1e-9)
    assert acc["bootstrap"]["seeds"] == [2, 1]  # LoRA - full
    assert acc["learned"]["full"]["learned"] and acc["learned"]["lora"]["learned"]
    assert t["drift"]["status"] == "INCONCLUSIVE" and t["drift"]["pass"] is False
    assert "evaluations still to run (criterion 1)" in t["drift"]["reason"] and "the rule gives PASS" in t[
        "drift"]["reason"]
    assert t["verdict"] == "INCONCLUSIVE" and t["next"] == FINISH
    v = judge(run)
    assert v["overall"].endswith(f"To decide, run: {FINISH}") and "moves the hidden states" not in v["recommendation"]
    (d / "full_s0.json").unlink()  # no full fine-tuning evaluated yet: nothing to compare
    v = judge(run)
    acc = v["tasks"]["mrpc"]["accuracy"]
    assert acc["reason"] == "evaluations missing: full_s0, full_s1" and "interim" not in acc and "diff" not in acc
    from lorascope.report.render import Doc, _verdict_section

    doc = Doc()
    _verdict_section(doc, v, 8)
    row = next(b for b in doc.blocks if b[0] == "table")[2][0]
    assert row[2] == f"LoRA {lora:.1f} vs full not evaluated yet; seeds 0 full, 2 LoRA"  # named, not "-"
    # the method evaluated so far gets its learned check (shown; drift is not judged on one method's)
    assert list(acc["learned"]) == ["lora"] and acc["learned"]["lora"]["learned"]
    assert v["tasks"]["mrpc"]["drift"]["status"] == "INCONCLUSIVE"
    learned = next(b for b in doc.blocks if b[0] == "table" and "learned" in b[1])[2]
    assert [r[1:4] for r in learned] == [["LoRA r=8", f"{lora:.1f}", "2"]]
    assert learned[0][-1] == "yes (on the seeds evaluated so far)"
    assert "over the 2 seed(s) of each method" in " ".join(b[1] for b in doc.blocks if b[0] == "p")
    for f in d.glob("lora_r8_s*.json"):  # no tuned model evaluated at all: (1) has a row that says so
        f.unlink()
    v = judge(run)
    t = v["tasks"]["mrpc"]
    assert "accuracy" not in t and t["accuracy_absent"].startswith("not measured: no tuned model")
    assert t["verdict"] == "INCONCLUSIVE" and t["reason"] == "no evaluation of the tuned models"
    doc = Doc()
    _verdict_section(doc, v, 8)
    table = next(b for b in doc.blocks if b[0] == "table")
    assert [r[1][:3] for r in table[2]] == ["(1)", "(2a", "(2b", "ove"]
    assert table[2][0][2:] == ["-", t["accuracy_absent"]]


def test_an_undecided_second_criterion_says_what_more_could_decide_it_and_nothing_where_more_cannot(tmp_path):
    """(1) passes; the headline's "To decide, run" follows what left (2a) or (2b) open: nothing for a difference
    below the whole interval of the seed noise floor (more prompts or seeds do not lower it), more rounds for a
    serving interval that straddles the limit."""
    from lorascope.drift.criterion import judge_drift
    from lorascope.report import judge

    run = fake_run(tmp_path, full=[0.95, 0.95], lora=[0.95, 0.95], ratio=0.5, overhead=2.0)  # (2b) FAIL: medians
    assert judge(run)["tasks"]["mrpc"]["verdict"] == "PASS"  # (2a) passes without a noise floor
    path = run / "drift" / "mrpc" / "drift.json"
    drift = json.loads(path.read_text())
    entry = drift["summary"]["method_ratios"][0]  # LoRA drift 0.005, full 0.01: a difference of 0.005
    entry["noise_floor"] = {"full": {"pairs": 1, "token_cka": {"value": 0.02, "ci_low": 0.018, "ci_high": 0.022}}}
    drift["summary"]["criterion_2a"] = [judge_drift(entry)]
    path.write_text(json.dumps(drift))
    v = judge(run)
    t = v["tasks"]["mrpc"]
    assert t["accuracy"]["status"] == "PASS" and t["serving"]["status"] == "FAIL"
    assert t["verdict"] == "INCONCLUSIVE" and t["next"] is None and "To decide" not in v["overall"]
    assert t["reason"].startswith("(2a) the difference between the methods' content-token linear CKA drifts (0.005)")
    assert "not a finding; more prompts would not change that" in t["reason"] and t["reason"].endswith("; (2b) FAIL")
    # the floor's interval reaches below the difference: more prompts could still tell
    entry["noise_floor"]["full"]["token_cka"]["ci_low"] = 0.004
    path.write_text(json.dumps(drift))
    t = judge(run)["tasks"]["mrpc"]
    assert t["next"] == "more drift prompts (study.drift.max_examples)"
    # (2a) fails clearly and (2b) straddles the limit: the reason and the advice are about serving
    shutil.rmtree(tmp_path / "run")
    run = fake_run(tmp_path, full=[0.95, 0.95], lora=[0.95, 0.95], ratio=0.95, ratio_ci=(0.9, 1.0))
    serve = run / "serve" / "r8" / "serve.json"
    s = json.loads(serve.read_text())
    for r in s["summary"]["rows"]:
        r.update(overhead=0.2, overhead_ci_low=0.1, overhead_ci_high=0.4, overhead_ci_coverage=0.96)
    serve.write_text(json.dumps(s))
    v = judge(run)
    t = v["tasks"]["mrpc"]
    assert t["drift"]["status"] == "FAIL" and t["serving"]["status"] == "INCONCLUSIVE"
    assert t["reason"] == "(2a) FAIL; (2b) the interval at batch 1, 4 straddles 30%; worst median +20% at batch 1"
    assert t["next"] == "more serving rounds (study.serve.batches)" and v["overall"].endswith(
        "To decide, run: more serving rounds (study.serve.batches)")


def test_a_criterion_still_to_run_counts_as_inconclusive_not_as_left_out(tmp_path):
    """A study in parts whose serving has not run yet: (2a) failing does not make the task FAIL, since (2b) could
    still pass; (2a) passing decides it whatever (2b) will say. A task the study does not serve: left out."""
    from lorascope.report import judge
    from lorascope.report.verdict import FINISH

    run = fake_run(tmp_path, full=[0.95, 0.95], lora=[0.95, 0.95], ratio=0.95, ratio_ci=(0.9, 1.0), overhead=0.1)
    t = judge(run)["tasks"]["mrpc"]
    assert (t["drift"]["status"], t["serving"]["status"], t["verdict"]) == ("FAIL", "PASS", "PASS")
    shutil.rmtree(run / "serve")
    t = judge(run)["tasks"]["mrpc"]
    assert t["pending"] == ["2b"] and t["verdict"] == "INCONCLUSIVE"
    assert t["reason"] == "(2a) FAIL; (2b) not measured yet" and t["next"] == FINISH
    study = json.loads((run / "study.json").read_text())
    study["config"]["serve"]["tasks"] = ["squad_v2"]  # left out by the study, not still to run: (2a) decides
    (run / "study.json").write_text(json.dumps(study))
    t = judge(run)["tasks"]["mrpc"]
    assert "pending" not in t and t["verdict"] == "FAIL"
    shutil.rmtree(tmp_path / "run")
    run = fake_run(tmp_path, full=[0.95, 0.95], lora=[0.95, 0.95], ratio=0.5)
    shutil.rmtree(run / "serve")
    t = judge(run)["tasks"]["mrpc"]
    assert t["pending"] == ["2b"] and t["verdict"] == "PASS"  # nothing (2b) says can change an "or" (2a) passes


def _loop_t_interval(a_seeds, b_seeds, keys, groups):
    """The t interval's variance and degrees of freedom by plain loops in float64 (textbook formulas)."""
    parts = []
    for seeds in (a_seeds, b_seeds):
        k = len(seeds)
        if k < 2:
            continue
        means = [sum(s[x] for x in keys) / len(keys) for s in seeds]
        mu = sum(means) / k
        parts.append((sum((m - mu) ** 2 for m in means) / (k - 1) / k, k - 1))
    diff = {x: sum(s[x] for s in a_seeds) / len(a_seeds) - sum(s[x] for s in b_seeds) / len(b_seeds) for x in keys}
    mean = sum(diff.values()) / len(keys)
    totals: dict[str, float] = {}
    for x in keys:
        totals[groups[x]] = totals.get(groups[x], 0.0) + diff[x] - mean
    g = len(totals)
    parts.append((g / (g - 1) * sum(t * t for t in totals.values()) / len(keys) ** 2, g - 1))
    var = sum(v for v, _ in parts)
    return mean, var, var**2 / sum(v * v / d for v, d in parts)


def test_t_interval_matches_a_plain_loop_and_is_wider_than_the_bootstrap_with_two_seeds():
    from lorascope.drift.stats import t975
    from lorascope.report.verdict import hierarchical_bootstrap, t_interval

    rng = random.Random(3)
    keys = [str(i) for i in range(300)]
    groups = {k: str(int(k) // 6) for k in keys}  # 50 paragraphs of 6 questions
    a = [{k: 100.0 * (rng.random() < p) for k in keys} for p in (0.72, 0.64)]  # two seeds 8 points apart
    b = [{k: 100.0 * (rng.random() < 0.6) for k in keys} for _ in range(3)]
    r = t_interval(a, b, groups=groups)
    mean, var, df = _loop_t_interval(a, b, keys, groups)
    assert r["value"] == pytest.approx(mean, abs=1e-9) and r["se"] == pytest.approx(var**0.5, rel=1e-9)
    assert r["df"] == pytest.approx(df, rel=1e-9) and r["clusters"] == 50 and r["seeds"] == [2, 3]
    assert r["ci_high"] - r["value"] == pytest.approx(t975(int(df)) * var**0.5, rel=1e-9)
    assert r["value"] - r["ci_low"] == pytest.approx(r["ci_high"] - r["value"], rel=1e-9)
    # the bootstrap over 2 seeds has half their sample variance: its interval is narrower here
    boot = hierarchical_bootstrap(a, b, groups=groups)
    assert boot["value"] == pytest.approx(r["value"], abs=1e-9)
    assert (r["ci_high"] - r["ci_low"]) > 1.3 * (boot["ci_high"] - boot["ci_low"])
    # one seed each, every question its own cluster: the variance of a paired mean, s^2 / n
    one = t_interval([a[0]], [b[0]])
    d = [a[0][k] - b[0][k] for k in keys]
    m = sum(d) / len(d)
    assert one["se"] ** 2 == pytest.approx(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d), rel=1e-9)
    assert one["se_seeds"] == 0.0 and one["df"] == pytest.approx(len(keys) - 1)


def test_criterion_1_is_inconclusive_where_the_bootstrap_and_the_t_interval_disagree(tmp_path):
    from lorascope.report import judge

    # two seeds each, whose accuracies differ by a few points. The bootstrap's seed level (half their sample
    # variance, normal tails) keeps LoRA - full above -3; Student t with about 3 degrees of freedom does not
    run = fake_run(tmp_path, full=[0.90, 0.90], lora=[0.94, 0.91], ratio=0.5)
    acc = judge(run)["tasks"]["mrpc"]["accuracy"]
    ci, ct = acc["bootstrap"], acc["t_interval"]
    assert ci["ci_low"] >= -3 and ct["ci_low"] < -3 < ct["ci_high"], (ci, ct)
    assert acc["status"] == "INCONCLUSIVE" and "the two must agree" in acc["reason"]
    assert "by the bootstrap (PASS)" in acc["reason"] and "gives INCONCLUSIVE" in acc["reason"]
    # where they agree the decision stands, and the reason shows both
    run2 = fake_run(tmp_path / "b", full=[0.90], lora=[0.90], ratio=0.5)
    acc2 = judge(run2)["tasks"]["mrpc"]["accuracy"]
    assert acc2["status"] == "PASS" and "t interval" in acc2["reason"] and "agrees" in acc2["reason"]


def test_the_learned_column_names_the_t_interval_that_keeps_a_model_from_learned():
    from lorascope.report.render import _not_learned

    boot = {"baseline: majority class": {"value": 3.0, "ci_low": 0.5, "ci_high": 5.5},
            "zero-shot base model": {"value": 9.0, "ci_low": 6.0, "ci_high": 12.0}}
    t = {"baseline: majority class": {"value": 3.0, "ci_low": -1.2, "ci_high": 7.2},
         "zero-shot base model": {"value": 9.0, "ci_low": 5.0, "ci_high": 13.0}}
    assert _not_learned({"vs": boot, "vs_t": t, "learned": False}) == (
        "no: vs majority class, the t interval +3.0 [-1.2, +7.2] does not exclude 0")
    # the bootstrap itself includes 0: a plain no
    boot_bad = dict(boot, **{"zero-shot base model": {"value": 1.0, "ci_low": -1.0, "ci_high": 3.0}})
    assert _not_learned({"vs": boot_bad, "vs_t": t, "learned": False}) == "no"


def test_a_ratio_that_two_digits_would_round_onto_the_threshold_gets_a_third():
    """0.803 against 0.8 must not read "0.80" beside "no, not within 0.8"."""
    from lorascope.report.render import _near

    assert [_near(x, 0.8) for x in (0.803, 0.7951, 0.6049, 0.8, 0.805)] == ["0.803", "0.795", "0.60", "0.80", "0.81"]


def _squad_run(tmp_path: Path, models: dict[str, dict[str, list]], *, answer_f1: bool = True) -> Path:
    """A run folder with SQuAD v2 evaluations of 400 questions (100 paragraphs of 4, half unanswerable).
    models: name -> {"greedy": per-question abstain?, "rule": per-question abstain?, "right": per-question
    answer correct?}; the evaluation's rule is an answer-NLL threshold (1.0), greedy's the first-token margin."""
    from lorascope.pipeline import StudyArgs

    run = tmp_path / "run"
    d = run / "eval" / "squad_v2"
    d.mkdir(parents=True)
    cfg = dataclasses.asdict(StudyArgs(tasks=["squad_v2"]))
    cfg["serve"]["enabled"] = cfg["drift"]["enabled"] = False
    (run / "study.json").write_text(json.dumps({"config": cfg, "primary_rank": 8, "seeds": [0], "ranks": [8]}))
    qs = [f"q{i}" for i in range(400)]
    has = {q: i % 2 == 0 for i, q in enumerate(qs)}
    for name, m in models.items():
        ans = {q: "right" if r else "wrong" for q, r in zip(qs, m["right"])}
        a_f1 = {q: 1.0 if has[q] and m["right"][i] else 0.0 for i, q in enumerate(qs)}
        na_f1 = {q: 0.0 if has[q] else 1.0 for q in qs}
        nll = {q: 2.0 if ab else 0.5 for q, ab in zip(qs, m["rule"])}
        preds = {q: "" if nll[q] > 1.0 else ans[q] for q in qs}
        scores = {q: na_f1[q] if preds[q] == "" else a_f1[q] for q in qs}
        pred = {"predictions": preds, "answers": ans, "answer_nll": nll, "scores": scores,
                "no_answer_margin": {q: 1.0 if ab else -1.0 for q, ab in zip(qs, m["greedy"])},
                "no_answer_signal": "answer_nll", "no_answer_threshold": 1.0, "no_answer_f1": na_f1,
                "paragraph": {q: f"p{i // 4}" for i, q in enumerate(qs)}, "has_answer": has}
        if answer_f1:
            pred["answer_f1"] = a_f1
        (d / f"{name}.predictions.json").write_text(json.dumps(pred))
        (d / f"{name}.json").write_text(json.dumps({"metrics": {"f1": 100.0 * sum(scores.values()) / len(qs)},
                                                    "baselines": {"always_no_answer": {"f1": 50.0}}}))
    return run


def _behaviour(kind: str) -> dict[str, list]:
    n = 400
    if kind == "abstains":  # on every question: always-no-answer
        return {"abstain": [True] * n, "right": [False] * n}
    # answers the answerable questions (9 in 10 right) and abstains on the unanswerable ones
    return {"abstain": [i % 2 == 1 for i in range(n)], "right": [i % 2 == 0 and i % 20 != 0 for i in range(n)]}


def _model(greedy: str, rule: str) -> dict[str, list]:
    g, r = _behaviour(greedy), _behaviour(rule)
    return {"greedy": g["abstain"], "rule": r["abstain"], "right": [a or b for a, b in zip(g["right"], r["right"])]}


@pytest.mark.parametrize("lora_greedy,lora_rule,status,lora_learned", [
    ("learned", "learned", "PASS", True),  # both measures: learned, level with full
    ("learned", "abstains", "INCONCLUSIVE", False),  # the rule hides what greedy shows (session 17's LoRA s0)
    ("abstains", "learned", "INCONCLUSIVE", False),  # the rule passes, greedy abstention has not learned
])
def test_squad_decisions_stand_only_where_both_no_answer_measures_give_them(tmp_path, lora_greedy, lora_rule,
                                                                           status, lora_learned):
    from lorascope.report import judge
    from lorascope.report.render import Doc, _verdict_section

    run = _squad_run(tmp_path, {"base": _model("abstains", "abstains"), "full_s0": _model("learned", "learned"),
                                "lora_r8_s0": _model(lora_greedy, lora_rule)})
    v = judge(run)
    acc = v["tasks"]["squad_v2"]["accuracy"]
    mc = acc["measure_check"]
    assert acc["status"] == status, acc["reason"]
    assert acc["learned"]["full"]["learned"] and acc["learned"]["lora"]["learned"] == lora_learned
    assert acc["learned"]["lora"]["learned_primary"] == (lora_rule == "learned")
    assert mc["learned"]["lora"] == (lora_greedy == "learned") and mc["measure"].startswith("greedy abstention")
    # a second computation of the greedy-abstention means, a plain loop over the questions
    for name, m in (("full", "full_s0"), ("lora", "lora_r8_s0")):
        p = json.loads((run / "eval" / "squad_v2" / f"{m}.predictions.json").read_text())
        loop = 0.0
        for q in p["answers"]:
            loop += p["no_answer_f1"][q] if p["no_answer_margin"][q] > 0 else p["answer_f1"][q]
        assert mc["means"][name] == pytest.approx(100.0 * loop / len(p["answers"]))
    if lora_greedy != lora_rule:
        assert "the decision depends on the measure" in acc["reason"]
        assert mc["status"] == ("PASS" if lora_greedy == "learned" else "INCONCLUSIVE")
        assert v["overall"].startswith("squad_v2 INCONCLUSIVE")
    else:
        assert mc["status"] == "PASS" and "depends on the measure" not in acc["reason"]
    doc = Doc()
    _verdict_section(doc, v, 8)
    text = " ".join(b[1] for b in doc.blocks if b[0] == "p")
    assert "squad_v2, the same decisions under a second measure, greedy abstention" in text
    learned = next(b for b in doc.blocks if b[0] == "table" and "learned" in b[1])[2]
    lora_cell = next(r[-1] for r in learned if r[1] == "LoRA r=8")
    assert lora_cell == ("yes" if lora_learned else "no: not under the second measure (below)"
                         if lora_rule == "learned" else "no")


def test_squad_without_answer_f1_or_data_says_the_second_measure_was_not_checked(tmp_path):
    from lorascope.report import judge

    run = _squad_run(tmp_path, {"base": _model("abstains", "abstains"), "full_s0": _model("learned", "learned"),
                                "lora_r8_s0": _model("abstains", "learned")}, answer_f1=False)
    acc = judge(run)["tasks"]["squad_v2"]["accuracy"]
    assert acc["status"] == "PASS" and acc["measure_check"]["status"] is None  # decided on the rule alone
    assert acc["measure_check"]["reason"].startswith("not checked (full_s0): this evaluation predates answer_f1")


def test_a_base_model_evaluated_with_greedy_abstention_is_its_own_second_measure(tmp_path):
    from lorascope.report import judge

    run = _squad_run(tmp_path, {"base": _model("learned", "abstains"), "full_s0": _model("learned", "learned"),
                                "lora_r8_s0": _model("learned", "learned")})
    f = run / "eval" / "squad_v2" / "base.predictions.json"
    base = json.loads(f.read_text())
    base.update(no_answer_signal="first_token", no_answer_threshold=0.0)  # its scores: as if greedy abstained
    f.write_text(json.dumps(base))
    acc = judge(run)["tasks"]["squad_v2"]["accuracy"]
    # under the second measure the base model is compared by its recorded scores (always-no-answer here), so
    # the tuned models still beat it; had its greedy margins been used, it would equal them
    assert acc["measure_check"]["status"] == "PASS" and acc["status"] == "PASS"
    assert acc["measure_check"]["vs"]["lora"]["zero-shot base model"]["value"] == pytest.approx(
        acc["learned"]["lora"]["vs"]["zero-shot base model"]["value"])


def test_serving_row_names_one_batch_size_without_a_range(tmp_path):
    """(2b)'s measured cell: a range over batch sizes, or with one batch size that one value."""
    from lorascope.report import judge
    from lorascope.report.render import Doc, _verdict_section

    def serving_cell(run):
        doc = Doc()
        _verdict_section(doc, judge(run), 8)
        rows = next(b for b in doc.blocks if b[0] == "table")[2]
        return next(r for r in rows if r[1].startswith("(2b)"))[2]

    run = fake_run(tmp_path, full=[0.9], lora=[0.9], overhead=0.4)  # batch 1: +10 %, batch 4: +40 %
    assert serving_cell(run) == "vllm: +10% to +40% over batch sizes (worst at 4; FLOP limit +2%)"
    (run / "serve" / "r8" / "serve.json").write_text(json.dumps({"settings": {"engine": "vllm"}, "summary": {
        "rows": [{"config": "unmerged:mrpc", "batch_size": 1, "overhead": 0.93, "expected_overhead_flops": 0.02}]}}))
    assert serving_cell(run) == "vllm: +93% at batch 1 (FLOP limit +2%)"
