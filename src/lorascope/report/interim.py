"""A study run in parts, reported before it has finished: the drift and weight analyses pooled so far.

With ``study.drift.per_model`` each model's drift and weight space are measured as soon as it is trained
(``drift:TASK:MODEL``, ``weights:TASK:MODEL``) and pooled only when every model of the task has been
(``drift:TASK``, ``weights:TASK``). Until then `lorascope report RUN` pools the parts that have finished, with
the same :func:`~lorascope.drift.measure.combine_drift` and :func:`~lorascope.drift.weights.combine_weights`
the pooled stages use, into a folder of the report (never into the run's own ``drift/`` or ``weights/``, whose
files mean the pooled stage has run). The verdict then shows what was measured so far and does not decide on it
(criterion 2a is INCONCLUSIVE while parts are missing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorascope.layout import RunLayout

KINDS = ("drift", "weights")


@dataclass(frozen=True)
class InterimLayout(RunLayout):
    """A run folder whose pooled drift and weight folders are replaced, per task, by interim ones."""

    drift_dirs: dict[str, Path] = field(default_factory=dict)
    weights_dirs: dict[str, Path] = field(default_factory=dict)
    interim: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict)

    def drift(self, task: str) -> Path:
        return self.drift_dirs.get(task) or super().drift(task)

    def weights(self, task: str) -> Path:
        return self.weights_dirs.get(task) or super().weights(task)


def _finished(layout: RunLayout, stage: str) -> bool:
    f = layout.stage_record(stage)
    try:
        return bool(json.loads(f.read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError):
        return False


def parts_status(run_dir: str | Path) -> dict[str, dict[str, dict[str, list[str]]]]:
    """{task: {kind: {"done": [labels], "missing": [labels]}}} for each task and kind (drift, weights) whose
    pooled stage has not finished but some of its parts have. Empty for a study without per-model parts."""
    layout = RunLayout(Path(run_dir))
    study = json.loads(layout.study_file.read_text(encoding="utf-8"))
    stages = study.get("stages", [])
    out: dict[str, dict[str, dict[str, list[str]]]] = {}
    for task in study["config"]["tasks"]:
        for kind in KINDS:
            planned = [s.split(":", 2)[2] for s in stages if s.startswith(f"{kind}:{task}:")]
            if not planned or _finished(layout, f"{kind}:{task}"):
                continue
            part = layout.drift_part if kind == "drift" else layout.weights_part
            done = [lab for lab in planned if _finished(layout, f"{kind}:{task}:{lab}")
                    and (part(task, lab) / f"{kind}.json").is_file()]
            if done:
                out.setdefault(task, {})[kind] = {"done": done, "missing": [x for x in planned if x not in done]}
    return out


def pool_parts(run_dir: str | Path, out_dir: str | Path) -> InterimLayout | None:
    """Pool the finished parts of every unfinished pooled stage into ``out_dir/KIND/TASK`` (figures included).

    Returns the run's layout with those folders in place of the pooled ones, or None when nothing is to be
    pooled (no per-model parts, or every pooled stage has finished)."""
    from lorascope.drift.measure import combine_drift
    from lorascope.drift.weights import combine_weights

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    status = parts_status(run_dir)
    if not status:
        return None
    layout = RunLayout(run_dir)
    dirs: dict[str, dict[str, Path]] = {"drift": {}, "weights": {}}
    for task, kinds in status.items():
        for kind, st in kinds.items():
            part = layout.drift_part if kind == "drift" else layout.weights_part
            combine = combine_drift if kind == "drift" else combine_weights
            dirs[kind][task] = out_dir / kind / task
            combine({lab: part(task, lab) for lab in st["done"]}, dirs[kind][task])
    return InterimLayout(run_dir, drift_dirs=dirs["drift"], weights_dirs=dirs["weights"], interim=status)


def interim_of(layout: RunLayout, task: str, kind: str) -> dict[str, list[str]] | None:
    """{"done": [...], "missing": [...]} when `layout` holds an interim pooling of `task`'s `kind`, else None."""
    return (getattr(layout, "interim", None) or {}).get(task, {}).get(kind)


def interim_note(layout: RunLayout, task: str, kind: str) -> str | None:
    """One sentence for a task's section: what was pooled so far and what is missing."""
    st = interim_of(layout, task, kind)
    if not st:
        return None
    return (f"Interim: the study's {kind}:{task} stage has not run yet; pooled here from the {len(st['done'])} "
            f"part(s) finished so far ({', '.join(st['done'])}); still to run: {', '.join(st['missing']) or 'none'}.")
