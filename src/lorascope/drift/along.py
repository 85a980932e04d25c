"""Drift along training: drift and the validation metric at the snapshots a training run saved.

``lorascope train --set train.drift_snapshots=N`` saves the tuned weights at N evenly spaced
steps (the last included) into ``OUTPUT/snapshots/step-K``. :func:`run_drift_along` measures,
for every snapshot of every run, the drift from the base model (:func:`run_drift`, all
measures, the same held-out prompts for every snapshot) and the task's validation metric
(:func:`lorascope.evaluate.evaluate` on the held-out split), so LoRA and full fine-tuning can
be compared at matched accuracy, not only at their last step.

Outputs in ``output_dir``: ``along.json`` (one point per run and snapshot), one drift folder
per snapshot (``RUN/step-K/drift.json``) and ``drift_along.png`` (primary drift against step
and against the validation metric).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.runinfo import provenance, write_json

log = logging.getLogger(__name__)



def snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete snapshot of a training run, by step."""
    d = Path(run_dir) / "snapshots"
    found = sorted((int(p.name.split("-", 1)[1]), p) for p in d.glob("step-*")
                   if p.is_dir() and p.name.split("-", 1)[1].isdigit()) if d.is_dir() else []
    if not found:
        raise LorascopeError(f"{run_dir}: no snapshots/step-* folders; train with --set train.drift_snapshots=N "
                             f"(N evenly spaced snapshots)")
    return found


def run_drift_along(task: str, base: str, runs, output_dir: str | os.PathLike, *, max_examples: int = 200,
                    batch_size: int = 8, data=None, data_dir: str | None = None, eval_examples: int = 200,
                    eval_batch_size: int = 16, plots: bool = True, **drift_kwargs: Any) -> dict[str, Any]:
    """Drift from `base` and validation metric at every snapshot of every run.

    Parameters
    ----------
    runs : {name: training output folder} or ['name=folder', ...]; names as for
        :func:`run_drift` (full_s0, lora_r8_s0, ...); each folder holds ``snapshots/step-K``.
    max_examples : held-out prompts for drift (the same for every snapshot).
    eval_examples : held-out examples for the validation metric (0: no metric).
    drift_kwargs : passed to :func:`run_drift` (tokens, jackknife_groups, ...).
    """
    from lorascope.config import Config, DataConfig
    from lorascope.drift.measure import PRIMARY, parse_tuned, run_drift
    from lorascope.evaluate import evaluate
    from lorascope.tasks import get_task

    runs = parse_tuned(runs)
    if eval_examples < 0:
        raise LorascopeError(f"--eval-examples: must be >= 0, got {eval_examples}")
    data = dataclasses.replace(data) if data is not None else DataConfig()
    if data_dir is not None:
        data.dir = data_dir
    plan = {name: snapshots(d) for name, d in runs.items()}
    out = Path(output_dir)
    points = []
    for name, snaps in plan.items():
        for step, snap in snaps:
            log.info("drift along training: %s step %d", name, step)
            d = run_drift(task, base, {name: str(snap)}, out / name / f"step-{step:07d}", max_examples=max_examples,
                          batch_size=batch_size, data=data, plots=False, diagnostic_examples=0, **drift_kwargs)
            pm = d["summary"]["per_model"][name]
            point: dict[str, Any] = {"run": name, "kind": pm["kind"], "method": pm["method"], "step": step,
                                     "checkpoint": str(snap),
                                     "drift": {k[:-len("_drift")]: v for k, v in pm.items() if k.endswith("_drift")}}
            if eval_examples:
                cfg = Config()
                cfg.model.name = base
                cfg.data = dataclasses.replace(data, max_eval_examples=eval_examples)
                cfg.eval.task, cfg.eval.checkpoint = task, str(snap)
                cfg.eval.batch_size = eval_batch_size
                cfg.eval.output = str(out / name / f"step-{step:07d}" / "eval.json")
                ev = evaluate(cfg.validate("drift along training"))
                metric = get_task(task).primary_metric
                point["metric"] = {"name": metric, "value": ev["metrics"][metric], "n": ev["n_examples"]}
            points.append(point)
    result = {"config": {"task": task, "base": base, "runs": runs, "max_examples": max_examples,
                         "eval_examples": eval_examples, "data": dataclasses.asdict(data), **drift_kwargs},
              "primary": PRIMARY, "points": points, "provenance": provenance()}
    write_json(out / "along.json", result)
    if plots:
        plot_along(result, out / "drift_along.png")
    result["output_dir"] = str(out)
    return result


def plot_along(result: dict[str, Any], path: Path) -> Path:
    """Primary drift against step, and against the validation metric, one line per run."""
    from lorascope.drift.plots import _pyplot, _save

    plt = _pyplot()
    primary = result["primary"]
    has_metric = any("metric" in p for p in result["points"])
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(11 if has_metric else 6, 4.2), squeeze=False)
    runs = list(dict.fromkeys(p["run"] for p in result["points"]))
    for i, run in enumerate(runs):
        pts = sorted((p for p in result["points"] if p["run"] == run), key=lambda p: p["step"])
        style = "-" if pts[0]["kind"] == "lora" else "--"
        y = [p["drift"][primary]["value"] for p in pts]
        lo = [p["drift"][primary]["ci_low"] for p in pts]
        hi = [p["drift"][primary]["ci_high"] for p in pts]
        err = None
        if all(v is not None for v in lo + hi + y):
            err = [[v - a for v, a in zip(y, lo)], [b - v for v, b in zip(y, hi)]]
        axes[0, 0].errorbar([p["step"] for p in pts], y, yerr=err, fmt=style, marker="o", color=f"C{i}",
                            capsize=3, label=run)
        if has_metric:
            axes[0, 1].errorbar([p["metric"]["value"] for p in pts], y, yerr=err, fmt=style, marker="o",
                                color=f"C{i}", capsize=3, label=run)
    axes[0, 0].set_xlabel("optimizer step")
    axes[0, 0].set_ylabel(f"drift: 1 - {primary} (mean over layers)")
    if has_metric:
        m = next(p["metric"] for p in result["points"] if "metric" in p)
        axes[0, 1].set_xlabel(f"validation {m['name']} ({m['n']} held-out examples)")
        axes[0, 1].set_ylabel(f"drift: 1 - {primary}")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['config']['task']}: drift along training ({result['config']['max_examples']} held-out "
                 f"prompts; bars: 95% jackknife over prompts)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
