"""The proposal's success criteria, judged from a run directory's result files.

Every criterion, and every task's overall verdict, is PASS, FAIL or INCONCLUSIVE, and
each comes with its reason. A criterion is decided by its 95 % interval, never by a point
value alone: PASS when the whole interval is on the good side of the threshold, FAIL when
it is all on the bad side, INCONCLUSIVE when it straddles it or cannot be computed.

0. Learned: a tuned model has learned a task when it beats both the best trivial baseline
   (MRPC: the majority class; SQuAD v2: always answering "no answer") and the zero-shot base
   model, with the interval of each difference excluding 0. Comparisons of models that
   have not learned the task say nothing about the methods, so:
1. Accuracy: LoRA (the primary rank) within `accuracy_margin` points of full fine-tuning
   on the task's primary metric (MRPC accuracy, SQuAD v2 F1), mean over seeds.
   INCONCLUSIVE unless both methods learned the task.
2a. Drift: LoRA's drift (1 - content-token CKA averaged over layers) at least
    `drift_reduction` below full fine-tuning's, judged by
    :func:`lorascope.drift.criterion.judge_drift`: PASS only when the primary ratio's
    interval is below 1 - drift_reduction and the other drift measures agree. Judged only
    between models that learned the task (INCONCLUSIVE otherwise).
2b. Serving: the unmerged adapter's overhead over merged serving at most
    `max_serving_overhead` at every batch size measured (median of paired repetitions).
Overall, per task: (1) and ((2a) or (2b)) in three-valued (Kleene) logic: FAIL wins an
"and", PASS wins an "or", INCONCLUSIVE otherwise. A criterion the study did not measure for
a task (study.drift.tasks, study.serve.tasks, or the stage switched off) is left out of that
"or", and the task's `drift_absent` / `serving_absent` says why (`accuracy_absent` when no tuned
model of the task has been evaluated yet). One the study measures but has not yet (a study run in
parts: its stage still to run) counts as INCONCLUSIVE in the "or" (the task's `pending`), since it
could still decide it.

Accuracy intervals come from a hierarchical bootstrap: each resample draws the seeds of
each method with replacement, then the evaluation clusters with replacement (MRPC: single
sentence pairs; SQuAD v2: whole context paragraphs, since questions on one paragraph are
not independent), so they cover seed variance as well as the choice of examples. With k seeds
that bootstrap's seed level has only (k - 1) / k of the seeds' sample variance and no small-sample
tails, so each accuracy interval has a second, analytic estimate (:func:`t_interval`: unbiased
seed variance plus cluster-robust example variance, Student t with Welch-Satterthwaite degrees
of freedom, as the drift ratio's interval), and a decision (learned, PASS or FAIL) stands only
where both intervals give it; where they disagree the result is INCONCLUSIVE.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from lorascope.layout import RunLayout, trained_name

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
RESAMPLES = 2000
REFERENCE_PRESET = "configs/reference.yaml"


FINISH = "rerun `lorascope run` with the same config to finish the missing stages"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------
# per-example scores and clusters


def primary(task: str) -> tuple[str, str]:
    """The task's primary metric and its label (a task no longer registered: accuracy)."""
    from lorascope.tasks import TASKS

    t = TASKS.get(task)
    return (t.primary_metric, t.primary_label or task) if t else ("accuracy", task)


def _task(task: str):
    from lorascope.tasks import TASKS
    from lorascope.tasks.base import Task

    return TASKS[task]() if task in TASKS else Task()


def per_example_scores(task: str, eval_file: Path) -> dict[str, float] | None:
    """Per-example primary-metric scores (0-100) from an eval's predictions file."""
    pred = _load(eval_file.with_suffix(".predictions.json"))
    return None if pred is None else _task(task).per_example_scores(pred)


def clusters(task: str, eval_file: Path) -> tuple[dict[str, str] | None, str]:
    """Example id -> the unit the bootstrap resamples, and that unit's name (the task decides:
    SQuAD v2 questions cluster by context paragraph, MRPC pairs are their own clusters)."""
    return _task(task).clusters(_load(eval_file.with_suffix(".predictions.json")) or {})


def baseline_scores(task: str, eval_file: Path) -> dict[str, dict[str, float]]:
    """Per-example scores of the task's trivial baselines, recomputed from the gold labels."""
    pred = _load(eval_file.with_suffix(".predictions.json"))
    return {} if pred is None else _task(task).baseline_scores(pred)


def hierarchical_bootstrap(a: list[dict[str, float]], b: list[dict[str, float]], *,
                           groups: dict[str, str] | None = None, n: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Mean difference A - B over shared examples, with a 95 % percentile interval over seeds and clusters.

    a, b: one {example id: score} per seed (a baseline or the base model is one "seed").
    Each resample draws A's seeds and B's seeds with replacement, then the clusters of
    `groups` (default: each example its own) with replacement, and takes
    mean_seeds(A) - mean_seeds(B) averaged over the drawn examples.
    """
    keys = sorted(set.intersection(*(set(x) for x in a + b)))
    if not keys:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0, "clusters": 0, "seeds": [len(a), len(b)]}
    A = np.array([[x[k] for k in keys] for x in a], dtype=np.float64)  # seeds x examples
    B = np.array([[x[k] for k in keys] for x in b], dtype=np.float64)
    labels = [groups.get(k, k) for k in keys] if groups else keys
    uniq = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    gidx = np.array([uniq[g] for g in labels])
    n_cl = len(uniq)
    rng = np.random.default_rng(seed)
    cl_counts = rng.multinomial(n_cl, np.full(n_cl, 1.0 / n_cl), size=n)  # resamples x clusters
    w = cl_counts[:, gidx].astype(np.float64)  # resamples x examples
    wa = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=n) / len(a)  # resamples x seeds
    wb = rng.multinomial(len(b), np.full(len(b), 1.0 / len(b)), size=n) / len(b)
    per_seed_a = (w @ A.T) / w.sum(1, keepdims=True)  # resamples x seeds: each seed's weighted mean
    per_seed_b = (w @ B.T) / w.sum(1, keepdims=True)
    diffs = np.sort((wa * per_seed_a).sum(1) - (wb * per_seed_b).sum(1))
    return {"value": float(A.mean() - B.mean()), "ci_low": float(diffs[int(0.025 * n)]),
            "ci_high": float(diffs[int(0.975 * n) - 1]), "n": len(keys), "clusters": n_cl,
            "seeds": [len(a), len(b)], "resamples": n}


def t_interval(a: list[dict[str, float]], b: list[dict[str, float]], *,
               groups: dict[str, str] | None = None) -> dict[str, Any]:
    """The quantity of :func:`hierarchical_bootstrap` with a 95 % Student t interval: a second estimate of its
    uncertainty, which the verdict requires to agree with the bootstrap's.

    With k seeds, the bootstrap's seed level has the variance (k - 1) / k of the seeds' sample variance
    (1/2 with 2 seeds, 2/3 with 3) and normal-like tails. Here the variance is the sum of each method's
    between-seed variance (sample variance of its per-seed means, ddof 1, over k; k - 1 degrees of freedom)
    and the cluster-robust variance of the mean per-example difference of the seed means
    (G / (G - 1) * sum over the G clusters of the squared sum of centred differences in it, / N^2; G - 1
    degrees of freedom), with Welch-Satterthwaite degrees of freedom.
    """
    from lorascope.drift.stats import t975

    keys = sorted(set.intersection(*(set(x) for x in a + b)))
    out: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None, "se": None, "df": None,
                           "se_seeds": None, "se_examples": None, "n": len(keys), "seeds": [len(a), len(b)]}
    if not keys:
        return out
    A = np.array([[x[k] for k in keys] for x in a], dtype=np.float64)  # seeds x examples
    B = np.array([[x[k] for k in keys] for x in b], dtype=np.float64)
    value = float(A.mean() - B.mean())
    parts: list[tuple[float, int]] = []
    for M in (A, B):
        if len(M) > 1:
            parts.append((float(np.var(M.mean(1), ddof=1)) / len(M), len(M) - 1))
    seed_var = sum(v for v, _ in parts)
    x = A.mean(0) - B.mean(0)
    labels = [groups.get(k, k) for k in keys] if groups else keys
    uniq = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    totals = np.bincount([uniq[g] for g in labels], weights=x - x.mean(), minlength=len(uniq))
    n_cl = len(uniq)
    ex_var = float(n_cl / (n_cl - 1) * np.sum(totals**2) / len(x) ** 2) if n_cl > 1 else 0.0
    if n_cl > 1:
        parts.append((ex_var, n_cl - 1))
    var = seed_var + ex_var
    den = sum(v**2 / df for v, df in parts)
    df = var**2 / den if den > 0 else float("inf")
    half = (t975(max(1, int(math.floor(df)))) if math.isfinite(df) else 1.959963984540054) * math.sqrt(var)
    out.update(value=value, ci_low=value - half, ci_high=value + half, se=math.sqrt(var), df=df,
               se_seeds=math.sqrt(seed_var), se_examples=math.sqrt(ex_var), clusters=n_cl)
    return out


def mean_interval(a: dict[str, float], *, groups: dict[str, str] | None = None, n: int = RESAMPLES,
                  seed: int = 0) -> dict[str, Any]:
    """Mean of one set of per-example scores, with a 95 % percentile bootstrap interval over the clusters of
    `groups` (default: each example its own): one model, one seed, so it covers the examples only."""
    return hierarchical_bootstrap([a], [dict.fromkeys(a, 0.0)], groups=groups, n=n, seed=seed)


def paired_bootstrap(a: dict[str, float], b: dict[str, float], *, n: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Mean of a - b over shared examples, with a 95 % percentile bootstrap interval over examples."""
    return hierarchical_bootstrap([a], [b], n=n, seed=seed)


# ---------------------------------------------------------------------------------------
# criteria


def _interval(ci: dict, fmt: str = "+.1f") -> str:
    return f"{ci['value']:{fmt}} [{ci['ci_low']:{fmt}}, {ci['ci_high']:{fmt}}]"


def accuracy_criterion(task: str, run_dir: Path, seeds: list[int], rank: int, margin: float,
                       data=None) -> dict[str, Any] | None:
    """Criterion (1) with the 'learned' check (0); None when no tuned model has been evaluated. `data` (a
    DataConfig): where gold labels that older predictions files lack can be read (Task.alternative_scores)."""
    metric, _ = primary(task)
    layout = RunLayout(run_dir)
    files = {m: [layout.eval(task, trained_name(m, rank, s)) for s in seeds] for m in ("full", "lora")}
    evs = {m: [_load(f) for f in fs] for m, fs in files.items()}
    if not any(e for es in evs.values() for e in es):
        return None
    acc: dict[str, Any] = {"seeds": {m: sum(1 for e in es if e) for m, es in evs.items()}}
    missing = [f.stem for m in files for f, e in zip(files[m], evs[m]) if e is None]
    for m in ("full", "lora"):
        vals = [e["metrics"][metric] for e in evs[m] if e]
        acc[m] = statistics.fmean(vals) if vals else None
        acc[f"{m}_per_seed"] = vals
    if missing:
        have = {m: [f for f, e in zip(files[m], evs[m]) if e] for m in files}
        if not all(have.values()):
            acc.update(status=INCONCLUSIVE, reason=f"evaluations missing: {', '.join(missing)}", next=FINISH)
            # the learned check of a method evaluated so far (shown, not decided on: the other has none yet)
            scores = {m: [per_example_scores(task, f) for f in fs] for m, fs in have.items() if fs}
            if all(s for ss in scores.values() for s in ss):
                first = next(fs[0] for fs in have.values() if fs)
                groups, acc["unit"] = clusters(task, first)
                refs, _ = _references(task, layout, first, acc)
                acc["learned"] = {m: _learned_check(s, refs, groups) for m, s in scores.items()}
            return acc
        # a study still running (in parts): the rule on the seeds evaluated so far, shown but not decided on
        acc = _accuracy_on(task, layout, have, acc, rank, margin, data)
        acc.update(interim={"missing": missing, "seeds": acc["seeds"]}, next=FINISH,
                   reason=f"interim, not decided: evaluations still to run for {', '.join(missing)}; on the seeds "
                          f"evaluated so far ({acc['seeds']['full']} full, {acc['seeds']['lora']} LoRA) the rule "
                          f"gives {acc['status']}: {acc['reason']}")
        acc["status"] = INCONCLUSIVE
        return acc
    return _accuracy_on(task, layout, files, acc, rank, margin, data)


def _references(task: str, layout: RunLayout, eval_file: Path, acc: dict[str, Any]
                ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """What a model must beat to have learned the task, per example: the best trivial baseline (scored on the
    questions of `eval_file`) and the zero-shot base model; their means go into `acc`. Also the baselines."""
    metric, _ = primary(task)
    base_file = layout.eval(task, "base")
    refs: dict[str, dict[str, float]] = {}
    bl = baseline_scores(task, eval_file)
    if bl:
        ev_bl = (_load(base_file) or {}).get("baselines", {})
        name = max(bl, key=lambda k: ev_bl.get(k, {}).get(metric, statistics.fmean(bl[k].values())))
        refs[f"baseline: {name.replace('_', ' ')}"] = bl[name]
        acc["best_baseline"] = {"name": name.replace("_", " "), "value": statistics.fmean(bl[name].values())}
    base_scores = per_example_scores(task, base_file)
    if base_scores:
        refs["zero-shot base model"] = base_scores
        acc["base"] = _load(base_file)["metrics"][metric]
    return refs, bl


def _learned_check(scores: list[dict[str, float]], refs: dict[str, dict[str, float]], groups) -> dict[str, Any]:
    """One method's differences (its seeds) to each reference, bootstrap and t interval; learned when all of
    them exclude 0 and both references were there."""
    out = {"vs": {ref: hierarchical_bootstrap(scores, [s], groups=groups, seed=1) for ref, s in refs.items()},
           "vs_t": {ref: t_interval(scores, [s], groups=groups) for ref, s in refs.items()}}
    out["learned"] = (len(refs) == 2 and all(c["ci_low"] is not None and c["ci_low"] > 0
                                             for v in ("vs", "vs_t") for c in out[v].values()))
    return out


def _accuracy_on(task: str, layout: RunLayout, files: dict[str, list[Path]], acc: dict[str, Any], rank: int,
                 margin: float, data=None) -> dict[str, Any]:
    """Criterion (1) and the 'learned' check on the evaluations `files` ({method: one file per seed}), under the
    task's measure and, where the task has a second one (Task.alternative_measure), under that too: a decision
    stands only where both give it."""
    acc["diff"] = acc["lora"] - acc["full"]
    scores = {m: [per_example_scores(task, f) for f in files[m]] for m in files}
    if not all(s for ss in scores.values() for s in ss):
        acc.update(status=INCONCLUSIVE, reason="per-example predictions missing: no interval can be computed",
                   next="rerun the eval stages (`lorascope run CONFIG --force eval`)")
        return acc
    groups, unit = clusters(task, files["full"][0])
    acc["unit"] = unit
    refs, bl = _references(task, layout, files["full"][0], acc)
    acc.update(_decide(scores, refs, bl, groups, rank, margin))
    acc["beats_baseline"] = {m: acc["learned"][m]["learned"] for m in acc["learned"]}  # kept for older readers
    _second_measure(task, layout, files, acc, refs, groups, rank, margin, data)
    n_seeds = min(len(fs) for fs in files.values())
    counts = {m: len(fs) for m, fs in files.items()}
    if max(counts.values()) < 2:
        acc["reason"] += " (1 seed: the interval covers evaluation examples only, not seed variance)"
    elif n_seeds < 2:  # a study in parts: one method has its seeds evaluated, the other not yet
        many = "LoRA" if counts["lora"] >= 2 else "full fine-tuning"
        acc["reason"] += (f" (full fine-tuning {counts['full']} seed(s), LoRA {counts['lora']}: the interval covers "
                          f"evaluation examples and the seed variance of {many} only)")
    return acc


def _decide(scores: dict[str, list[dict[str, float]]], refs: dict[str, dict[str, float]], bl: dict, groups,
            rank: int, margin: float) -> dict[str, Any]:
    """The 'learned' check of both methods and criterion (1) on one measure's per-example scores."""
    out: dict[str, Any] = {"bootstrap": hierarchical_bootstrap(scores["lora"], scores["full"], groups=groups),
                           "t_interval": t_interval(scores["lora"], scores["full"], groups=groups)}
    learned = {m: _learned_check(scores[m], refs, groups) for m in ("full", "lora")}
    out["learned"] = learned
    not_learned = []
    for m in ("full", "lora"):
        if learned[m]["learned"]:
            continue
        if len(refs) < 2:
            not_learned.append(f"{m}: no {'baseline' if not bl else 'zero-shot base'} scores to compare with")
            continue
        worst = min(learned[m]["vs"].items(), key=lambda kv: kv[1]["ci_low"])
        who = "full fine-tuning" if m == "full" else f"LoRA r={rank}"
        if worst[1]["ci_low"] > 0:  # the bootstrap excludes 0 everywhere, a t interval does not
            worst = min(learned[m]["vs_t"].items(), key=lambda kv: kv[1]["ci_low"])
            not_learned.append(f"{who} - {worst[0].removeprefix('baseline: ')} = {_interval(worst[1])} "
                               f"(t interval; the bootstrap's excludes 0)")
            continue
        not_learned.append(f"{who} - {worst[0].removeprefix('baseline: ')} = {_interval(worst[1])}")
    if not_learned:
        out.update(status=INCONCLUSIVE, reason="the models have not learned the task: " + "; ".join(not_learned)
                   + " (the interval must exclude 0)",
                   next=f"`lorascope run {REFERENCE_PRESET}` (learning-rate search, more training examples and "
                        f"seeds), or raise data.max_train_examples and set study.tune_lr: true")
        return out
    ci, ct = out["bootstrap"], out["t_interval"]
    status, reason = _margin_rule(ci, margin)
    status_t, _ = _margin_rule(ct, margin)
    t_ci = f"[{ct['ci_low']:+.1f}, {ct['ci_high']:+.1f}]"
    if status == status_t:
        out.update(status=status, reason=f"{reason} (t interval {t_ci} agrees)")
    else:  # the two estimates of the uncertainty disagree: too few seeds or examples to decide
        out.update(status=INCONCLUSIVE, reason=f"{reason} by the bootstrap ({status}), but the t interval (unbiased "
                                               f"seed variance, Student t) {t_ci} gives {status_t}: the two must agree")
    if out["status"] == INCONCLUSIVE:
        out["next"] = "more evaluation examples (data.max_eval_examples) and seeds (train.seed)"
    return out


def _second_measure(task: str, layout: RunLayout, files: dict[str, list[Path]], acc: dict[str, Any],
                    refs: dict[str, dict[str, float]], groups, rank: int, margin: float, data) -> None:
    """The same decisions under the task's second measure (SQuAD v2: greedy abstention beside the fitted
    no-answer rule). Recorded in acc["measure_check"]; where it decides otherwise, criterion (1) is INCONCLUSIVE
    and a model counts as having learned the task only if it has under both."""
    t = _task(task)
    if t.alternative_measure is None:
        return
    alt: dict[str, list[dict[str, float]]] = {}
    why = ""
    for m, fs in files.items():
        alt[m] = []
        for f in fs:
            pred = _load(f.with_suffix(".predictions.json")) or {}
            sc, why = t.alternative_scores(pred, data)
            if sc is None:
                acc["measure_check"] = {"measure": t.alternative_measure, "status": None,
                                        "reason": f"not checked ({f.stem}): {why}"}
                return
            alt[m].append(sc)
    alt_refs = {k: v for k, v in refs.items() if k.startswith("baseline")}  # the baseline does not depend on it
    base = _load(layout.eval(task, "base").with_suffix(".predictions.json"))
    if "zero-shot base model" in refs and base is not None:
        # (the base model's own evaluation rule may already be the second measure: then its scores are the same)
        sc, why_base = t.alternative_scores(base, data, same_ok=True)
        if sc is None:
            acc["measure_check"] = {"measure": t.alternative_measure, "status": None,
                                    "reason": f"not checked (base): {why_base}"}
            return
        alt_refs["zero-shot base model"] = sc
    second = _decide(alt, alt_refs, {k: v for k, v in refs.items() if k.startswith("baseline")}, groups, rank, margin)
    check = {"measure": why, "status": second["status"], "reason": second["reason"],
             "bootstrap": second["bootstrap"], "t_interval": second["t_interval"],
             "learned": {m: second["learned"][m]["learned"] for m in second["learned"]},
             "vs": {m: second["learned"][m]["vs"] for m in second["learned"]},
             "means": {m: statistics.fmean(statistics.fmean(s.values()) for s in alt[m]) for m in alt}}
    acc["measure_check"] = check
    for m, lm in acc["learned"].items():
        lm["learned_primary"] = lm["learned"]
        lm["learned"] = lm["learned"] and check["learned"][m]
    if second["status"] != acc["status"]:
        acc["reason"] = (f"the decision depends on the measure: {t.primary_measure} gives "
                         f"{acc['status']} ({acc['reason']}); {why.split(':')[0]} gives {second['status']} "
                         f"({second['reason']}); a decision stands only where both give it")
        acc["status"] = INCONCLUSIVE
        acc["next"] = "more seeds and evaluation examples, so that both measures decide alike"


def _margin_rule(ci: dict, margin: float) -> tuple[str, str]:
    """Criterion (1) on one interval of LoRA - full: PASS all above -margin, FAIL all below, else INCONCLUSIVE."""
    if ci["ci_low"] >= -margin:
        return PASS, f"LoRA - full = {_interval(ci)}, all above -{margin:g}"
    if ci["ci_high"] < -margin:
        return FAIL, f"LoRA - full = {_interval(ci)}, all below -{margin:g}"
    return INCONCLUSIVE, f"LoRA - full = {_interval(ci)} straddles -{margin:g}"


def drift_criterion(drift: dict[str, Any], rank: int, reduction: float, learned: bool) -> dict[str, Any]:
    """Criterion 2a for LoRA rank `rank` against full fine-tuning, from a drift.json.

    The judgement over measures is :func:`lorascope.drift.criterion.judge_drift` (seeds of a
    method pooled); here it is re-applied at this study's threshold, and models that have not
    learned the task are not judged at all.
    """
    from lorascope.drift.criterion import criterion_from_drift, judge_drift

    lora, full = f"lora_r{rank}", "full"
    summary = drift.get("summary", {})
    entry = next((m for m in summary.get("method_ratios", []) if m.get("lora") == lora and m.get("full") == full),
                 None)
    c = criterion_from_drift(drift, lora, full)
    if entry is None or c is None:
        models = summary.get("per_model") or {}
        absent = [name for m, name in ((lora, f"LoRA r={rank}"), (full, "full fine-tuning"))
                  if not any(v.get("method") == m for v in models.values())]
        seeds = None
        if absent and models:  # a study in parts: one method's drift is measured, the other's not yet
            reason = (f"no drift of {' or '.join(absent)} measured yet (drift.json holds "
                      f"{', '.join(sorted(models))})")
            seeds = {k: sum(v.get("method") == m for v in models.values()) for k, m in (("lora", lora), ("full", full))}
        else:
            reason = (f"drift.json has no content-token comparison {lora} / {full} (written by an older "
                      f"lorascope?); rerun the drift stage")
        return {"status": INCONCLUSIVE, "pass": False, "ratio": None, "reason": reason, "measured": "-",
                "seeds": seeds}
    tokens = (drift.get("selection") or {}).get("tokens", "content")
    c.update(judge_drift(entry, threshold=1 - reduction, tokens=tokens))
    p = entry.get(c["primary"]) or {}
    if c["ratio"] is None:
        measured = "ratio undefined"
    elif c["ci_low"] is None or c["ci_high"] is None:
        measured = f"ratio {c['ratio']:.3f} [undefined]"
    else:
        measured = f"ratio {c['ratio']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"
    if p.get("lora_drift") is not None and p.get("full_drift") is not None:
        measured += f" (drift {p['lora_drift']:.2e} vs {p['full_drift']:.2e})"
    c["measured"] = measured
    c["seeds"] = {"lora": p.get("seeds_lora"), "full": p.get("seeds_full")}
    if not learned:
        c["status"], c["reason"] = INCONCLUSIVE, ("drift is judged only between models that learned the task "
                                                  "(see criterion 1)")
    c["pass"] = c["confident"] = c["status"] == PASS
    return c


def serving_2b(serve: dict[str, Any], task: str, max_overhead: float) -> dict[str, Any] | None:
    """Criterion 2b from a serve.json: the unmerged overhead at every batch size.

    Decided by each batch size's interval of the median paired overhead (rounds paired in
    time): PASS when every upper end is within `max_overhead`, FAIL when some lower end is
    above it, INCONCLUSIVE otherwise. A serve.json without intervals (older lorascope) is
    judged on the medians, and the reason says so.
    """
    rows = [x for x in serve["summary"]["rows"] if x["config"] == f"unmerged:{task}" and x["overhead"] is not None]
    if not rows:
        return None
    worst = max(rows, key=lambda x: x["overhead"])
    out = {"engine": serve["settings"]["engine"], "overheads": {x["batch_size"]: x["overhead"] for x in rows},
           "max": worst["overhead"], "max_at_batch": worst["batch_size"], "min": min(x["overhead"] for x in rows),
           "flop_limit": worst["expected_overhead_flops"]}
    mem = serve["summary"].get("memory") or {}
    if mem.get("multi_vs_merged_alternative") is not None:  # one engine, every adapter, vs a merged copy per task
        out["multi_memory"] = {"ratio": mem["multi_vs_merged_alternative"], "multi_mib": (
            mem["multi"].get("peak_pss_mib") or mem["multi"].get("peak_rss_mib")),
            "merged_alternative_mib": mem["merged_alternative_mib"]}
    where = f"worst median {worst['overhead']:+.0%} at batch {worst['batch_size']}"
    if all(x.get("overhead_ci_low") is not None and x.get("overhead_ci_high") is not None for x in rows):
        cov = min((x.get("overhead_ci_coverage") or 0.0) for x in rows)
        note = "" if cov >= 0.95 else f" (intervals from few rounds: coverage {cov:.0%}, not 95%)"
        above = [x for x in rows if x["overhead_ci_low"] > max_overhead]
        if above:
            status, reason = FAIL, (f"at batch {', '.join(str(x['batch_size']) for x in above)} the whole interval "
                                    f"is above {max_overhead:.0%}; {where}")
        elif all(x["overhead_ci_high"] <= max_overhead for x in rows):
            status, reason = PASS, f"every interval within {max_overhead:.0%}; {where}"
        else:
            straddle = [x for x in rows if x["overhead_ci_high"] > max_overhead]
            status, reason = INCONCLUSIVE, (f"the interval at batch {', '.join(str(x['batch_size']) for x in straddle)}"
                                            f" straddles {max_overhead:.0%}; {where}")
        if note and status != INCONCLUSIVE:  # a min-max interval of a few rounds cannot carry a 95 % claim
            status, reason = INCONCLUSIVE, (f"{'PASS' if status == PASS else 'FAIL'} on intervals of too few rounds "
                                            f"(coverage {cov:.0%}; 6 rounds give 95 %): {reason}")
        else:
            reason += note
    else:
        ok = worst["overhead"] <= max_overhead
        status = PASS if ok else FAIL
        reason = (f"{where} {'within' if ok else 'above'} {max_overhead:.0%} (medians only: this serve.json has "
                  f"no intervals)")
    out.update(status=status, reason=reason, **{"pass": status == PASS})
    split = [x for x in serve["summary"].get("time_split") or []
             if x["config"] == f"unmerged:{task}" and x["overhead"] is not None]
    if split:  # where the unmerged time goes (--profile): arithmetic or implementation
        out["time_split"] = [{k: x[k] for k in ("batch_size", "phase", "overhead", "lora_share", "flop_limit")}
                             for x in split]
    return out


def study_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the verdict reads of study.json's config: the three thresholds and what was served. Run folders
    written before study.drift and study.serve became sections (2026-11-29) have them as flat fields."""
    if isinstance(cfg.get("serve"), dict):
        drift, serve = cfg["drift"], cfg["serve"]
        return {"accuracy_margin": cfg["accuracy_margin"], "drift_reduction": drift["reduction"],
                "max_serving_overhead": serve["max_overhead"], "serve": serve["enabled"], "serve_tasks": serve["tasks"],
                "drift": drift["enabled"], "drift_tasks": drift.get("tasks")}
    return {"accuracy_margin": cfg["accuracy_margin"], "drift_reduction": cfg["drift_reduction"],
            "max_serving_overhead": cfg["max_serving_overhead"], "serve": cfg.get("serve", True),
            "serve_tasks": cfg.get("serve_tasks"), "drift": cfg.get("drift", True), "drift_tasks": None}


def seeds_of(study: dict[str, Any], task: str) -> list[int]:
    """The seeds `task` trained with (study.json's task_seeds; run folders without it: the study's seeds)."""
    return (study.get("task_seeds") or {}).get(task, study["seeds"])


NOT_YET = {"drift": "not measured: no drift result for this task",
           "serving": "not measured: no serving result for this task's adapter"}


def _drift_absent(cfg: dict[str, Any], task: str) -> str:
    if not cfg["drift"]:
        return "not measured: drift is off in this study (study.drift)"
    if cfg["drift_tasks"] is not None and task not in cfg["drift_tasks"]:
        return (f"not measured: {task}'s drift is not measured in this study "
                f"(study.drift.tasks: {', '.join(cfg['drift_tasks'])})")
    return NOT_YET["drift"]


def _serving_absent(cfg: dict[str, Any], task: str) -> str:
    if not cfg["serve"]:
        return "not measured: serving is off in this study (study.serve)"
    if cfg["serve_tasks"] is not None and task not in cfg["serve_tasks"]:
        return (f"not measured: {task}'s adapter is not served in this study "
                f"(study.serve.tasks: {', '.join(cfg['serve_tasks'])})")
    return NOT_YET["serving"]


def and3(*xs: str) -> str:
    return FAIL if FAIL in xs else (PASS if all(x == PASS for x in xs) else INCONCLUSIVE)


def or3(*xs: str) -> str:
    return PASS if PASS in xs else (FAIL if xs and all(x == FAIL for x in xs) else INCONCLUSIVE)


def _data_config(study: dict[str, Any]):
    """The study's data settings (study.json's base_config.data), to read gold labels from; None if unreadable."""
    import dataclasses

    from lorascope.config import DataConfig

    d = (study.get("base_config") or {}).get("data") or {}
    known = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        return DataConfig(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError):
        return None


def judge(run_dir: str | Path, layout: RunLayout | None = None) -> dict[str, Any]:
    """The verdict of a run folder. `layout`: where to read it (default: the run folder's own layout; the report
    of a study run in parts passes :class:`lorascope.report.interim.InterimLayout`, whose drift of a task pooled
    from the parts finished so far is shown but not decided on)."""
    from lorascope.report.interim import interim_of

    run_dir = Path(run_dir)
    layout = layout or RunLayout(run_dir)
    study = _load(layout.study_file)
    if study is None:
        raise FileNotFoundError(f"{run_dir}: no study.json; not a `lorascope run` directory")
    tasks_run, cfg = study["config"]["tasks"], study_settings(study["config"])
    data = _data_config(study)
    rank, seeds = study["primary_rank"], study["seeds"]
    tasks = {}
    for task in tasks_run:
        metric, label = primary(task)
        t: dict[str, Any] = {"metric": metric, "label": label, "seeds": seeds_of(study, task)}
        acc = accuracy_criterion(task, run_dir, t["seeds"], rank, cfg["accuracy_margin"], data)
        if acc is not None:
            t["accuracy"] = acc
        else:  # say why (1) is missing rather than leave its row out
            t["accuracy_absent"] = "not measured: no tuned model of this task has been evaluated yet"
        both_learned = bool(acc and all((acc.get("learned") or {}).get(m, {}).get("learned") for m in ("full", "lora")))
        drift = _load(layout.drift(task) / "drift.json")
        if drift:
            t["drift"] = drift_criterion(drift, rank, cfg["drift_reduction"], both_learned)
            parts = interim_of(layout, task, "drift")
            todo = ([f"drift still to run for {', '.join(parts['missing'])}"] if parts else []) + (
                ["evaluations still to run (criterion 1)"] if acc and acc.get("interim") else [])
            if todo:  # measured so far, not decided: the study's models are not all in it
                c = t["drift"]
                c["interim"] = parts or {"done": [], "missing": []}
                c["reason"] = (f"interim, not decided: {'; '.join(todo)}; on what was measured so far"
                               + (f" ({', '.join(parts['done'])})" if parts else "")
                               + f" the rule gives {c['status']}: {c['reason']}")
                c["status"], c["pass"], c["confident"] = INCONCLUSIVE, False, False
        else:  # say why (2a) is missing rather than leave its row out
            t["drift_absent"] = _drift_absent(cfg, task)
            if t["drift_absent"] == NOT_YET["drift"]:
                t.setdefault("pending", []).append("2a")
        serve = _load(layout.serve(rank) / "serve.json")
        if serve:
            sv = serving_2b(serve, task, cfg["max_serving_overhead"])
            if sv:
                t["serving"] = sv
        if "serving" not in t:  # say why (2b) is missing rather than leave its row out
            t["serving_absent"] = _serving_absent(cfg, task)
            if t["serving_absent"] == NOT_YET["serving"]:
                t.setdefault("pending", []).append("2b")
        c1 = t.get("accuracy", {}).get("status", INCONCLUSIVE)
        # a criterion this study measures but has not yet (a study in parts) could still decide the "or": it
        # counts as INCONCLUSIVE there; one the study leaves out (off, or not this task) is left out
        alt = [t[k]["status"] for k in ("drift", "serving") if k in t] + [INCONCLUSIVE] * len(t.get("pending", []))
        t["verdict"] = and3(c1, or3(*alt)) if alt else INCONCLUSIVE
        t["reason"], t["next"] = _task_reason(t)
        tasks[task] = t
    return {"tasks": tasks, "overall": headline(tasks), "recommendation": recommend(tasks, rank, cfg), "rank": rank,
            "seeds": seeds, "criteria": {
        "accuracy_margin": cfg["accuracy_margin"], "drift_reduction": cfg["drift_reduction"],
        "max_serving_overhead": cfg["max_serving_overhead"]}}


def _task_reason(t: dict[str, Any]) -> tuple[str, str | None]:
    acc = t.get("accuracy")
    if acc is None:
        return "no evaluation of the tuned models", FINISH
    if acc["status"] == INCONCLUSIVE:  # the first thing to fix, whatever else was measured
        return f"(1) {acc['reason']}", acc.get("next")
    pending = t.get("pending", [])
    if "drift" not in t and "serving" not in t and not pending:
        return "neither drift (2a) nor serving (2b) was measured", "rerun with study.drift or study.serve on"
    if t["verdict"] == INCONCLUSIVE:  # (1) decided: the undecided one(s) of (2a), (2b), and what more could decide
        parts, nexts = [], []
        for k, n in (("2a", "drift"), ("2b", "serving")):
            c = t.get(n)
            if c is None:
                if k in pending:  # the study measures it, but has not yet
                    parts.append(f"({k}) not measured yet")
                    nexts.append(FINISH)
                continue
            if c["status"] != INCONCLUSIVE:
                parts.append(f"({k}) {c['status']}")
                continue
            parts.append(f"({k}) {c['reason']}")
            if c.get("interim"):
                nexts.append(FINISH)
            elif n == "drift":
                nexts.append(c.get("next"))  # judge_drift's: more seeds or prompts; None where more cannot decide
            else:
                nexts.append("more serving rounds (study.serve.batches)")
        nexts = list(dict.fromkeys(x for x in nexts if x))
        return "; ".join(parts), "; ".join(nexts) or None
    parts = [f"(1) {acc['status']}"] + [f"({k}) {t[n]['status']}" for k, n in (("2a", "drift"), ("2b", "serving"))
                                         if n in t]
    return ", ".join(parts), None


def headline(tasks: dict[str, Any]) -> str:
    """One line: each task's verdict, why, and what to run when it is INCONCLUSIVE."""
    parts, nexts = [], []
    for name, t in tasks.items():
        if t["verdict"] == PASS:
            parts.append(f"{name} PASS (LoRA meets the criteria: {t['reason']})")
        elif t["verdict"] == FAIL:
            parts.append(f"{name} FAIL (LoRA does not meet the criteria: {t['reason']})")
        else:
            parts.append(f"{name} INCONCLUSIVE ({t['reason']})")
            if t.get("next") and t["next"] not in nexts:
                nexts.append(t["next"])
    line = "; ".join(parts)
    return line + (f". To decide, run: {'; '.join(nexts)}" if nexts else "")


def _memory_clause(serving: dict[str, Any]) -> str:
    """What keeping adapters unmerged saves in memory, as measured (the multi mode), or that it was not."""
    m = next((s["multi_memory"] for s in serving.values() if s.get("multi_memory")), None)
    if m is None:
        return ("; what unmerged adapters save in memory (every task's adapter on one base model) was not measured "
                "here (study.serve.modes without multi)")
    took = f"; one engine with every task's adapter took {m['multi_mib']:.0f} MiB"
    alt = f"{m['merged_alternative_mib']:.0f} MiB for a merged copy per task ({m['ratio']:.2f}x)"
    if m["ratio"] < 1:
        return f"{took} against {alt}: keep them unmerged where that memory matters more"
    return f"{took}, no less than {alt}"


def recommend(tasks: dict[str, Any], rank: int, cfg: dict[str, Any]) -> str:
    """A plain-language recommendation that claims no more than the criteria decided."""
    parts = []
    absent = [k for k, t in tasks.items() if "accuracy" not in t]
    undecided = [k for k, t in tasks.items() if t.get("accuracy", {}).get("status") == INCONCLUSIVE]
    if absent:
        parts.append(f"no recommendation on accuracy or drift for {', '.join(absent)}: criterion (1) is not "
                     f"measured there yet")
    if undecided:
        parts.append(f"no recommendation on accuracy or drift for {', '.join(undecided)}: criterion (1) is "
                     f"INCONCLUSIVE there")
    passed = [k for k, t in tasks.items() if t.get("accuracy", {}).get("status") == PASS]
    failed = [k for k, t in tasks.items() if t.get("accuracy", {}).get("status") == FAIL]
    if passed:  # the criterion bounds how far LoRA falls behind, not how far ahead it may be
        open_ = [f"{tasks[k].get('verdict', INCONCLUSIVE)} on {k}" for k in passed
                 if tasks[k].get("verdict", INCONCLUSIVE) != PASS]
        parts.append(f"LoRA r={rank} is at most {cfg['accuracy_margin']:g} points below full fine-tuning on "
                     f"{', '.join(passed)} (criterion 1"
                     + (f"; the task's overall verdict is {', '.join(open_)}: see (2a) and (2b)" if open_ else "")
                     + ")")
    if failed:
        parts.append(f"LoRA r={rank} falls more than {cfg['accuracy_margin']:g} points behind full fine-tuning on "
                     f"{', '.join(failed)}: prefer full fine-tuning there, or try a higher rank")
    for status, words in ((PASS, "it moves the hidden states much less than full fine-tuning"),
                          (FAIL, "its drift is not clearly lower than full fine-tuning's")):
        ks = [k for k, t in tasks.items() if t.get("drift", {}).get("status") == status]
        if ks:
            parts.append(f"on {', '.join(ks)} {words} ("
                         + ", ".join(f"{k} {tasks[k]['drift']['measured'].split(' (')[0]}" for k in ks) + ")")
    serving = {k: t["serving"] for k, t in tasks.items() if "serving" in t}
    if serving:
        worst = max(s["max"] for s in serving.values())
        engine = next(iter(serving.values()))["engine"]
        splits = [x for s in serving.values() for x in s.get("time_split", []) if x["flop_limit"] is not None]
        if splits:
            x = max(splits, key=lambda x: x["lora_share"] - x["flop_limit"])
            kind = ("implementation, not arithmetic" if x["lora_share"] > 2 * x["flop_limit"] + 0.01
                    else "close to the arithmetic")
            parts.append(f"where the unmerged time goes ({engine}, {x['phase']} at batch {x['batch_size']}): the LoRA "
                         f"operations take {x['lora_share']:.0%} of the step against a FLOP-count limit of "
                         f"{x['flop_limit']:.1%}, so the overhead is {kind}")
        if worst <= cfg["max_serving_overhead"]:
            parts.append(f"serving adapters unmerged costs at most {worst:.0%} in {engine}: keep one base model and "
                         f"choose the adapter per request")
        else:
            parts.append(f"serving adapters unmerged costs up to {worst:.0%} in {engine} on this hardware: merge them "
                         f"where latency or throughput matters" + _memory_clause(serving))
    return "; ".join(parts) + "." if parts else "not enough results for a recommendation."

