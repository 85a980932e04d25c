"""Learning-rate selection for one task and method: a grid of rates, scored on a validation split.

Each trial trains the method at one learning rate on the training side minus a validation
share (`data.validation_share`; whole paragraphs for SQuAD v2), with the study's first seed
and the same steps as the final model, then scores the validation split with the task's
primary metric: MRPC accuracy; SQuAD v2 F1 under the no-answer rule its final evaluation
uses (signal and threshold fitted on held-out questions), fitted on one half of the
validation paragraphs and scored on the other, both ways (`Task.selection_score`; greedy
decoding's own abstention, which can score every rate alike, is kept in the record as
`value_as_evaluated`). The evaluation, calibration and drift examples are never seen. Full fine-tuning and LoRA get
the same budget: as many trials each (the study checks that their grids are equally long).

Epochs (optional, `epochs`): at the selected rate, the method trains once more for each other
epoch count of the list, scored the same way; the best count is selected (ties: fewer epochs).
The list is the same for both methods, so the budget stays equal; the count the rates were
searched at (train.epochs) reuses that rate's trial.

Every trial is recorded in OUT/tune.json, with the selected rate (best validation score;
ties: the smaller rate) and epochs. A trial's record (OUT/lr_RATE/validation.json) is written when it
finishes, so an interrupted search resumes at the next trial; a trial's weights are deleted
once it is scored. A finished trial is reused only while what it measured is unchanged: the
hash of its training config (`lorascope.train.config_hash`) and the evaluation settings that
score it are in its record, and a trial whose config differs is trained again. So a grid
can grow (or shrink) without repeating the trials it keeps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.config import Config
from lorascope.runinfo import atomic_path, provenance, write_json

log = logging.getLogger(__name__)

def check_grid(lrs: list[float], field: str) -> list[str]:
    """Problems with a learning-rate grid, naming `field`."""
    if not lrs:
        return [f"{field}: the search budget is zero (an empty list); accepted: one or more positive learning rates, "
                f"e.g. [1e-4, 3e-4, 1e-3]"]
    bad = [x for x in lrs if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)]
    if bad:
        return [f"{field}: learning rates must be positive numbers, got {bad}"]
    if len(set(lrs)) != len(lrs):
        return [f"{field}: a learning rate is listed twice ({sorted(lrs)}); each trial must differ"]
    return []


def check_epochs(epochs: Any, field: str) -> list[str]:
    """Problems with an epoch grid, naming `field`."""
    if not isinstance(epochs, list) or not epochs:
        return [f"{field}: expected a non-empty list of epoch counts, e.g. [1, 2], got {epochs!r}"]
    bad = [x for x in epochs if isinstance(x, bool) or not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)]
    if bad:
        return [f"{field}: epoch counts must be positive numbers, got {bad}"]
    if len({float(x) for x in epochs}) != len(epochs):
        return [f"{field}: an epoch count is listed twice ({sorted(epochs)}); each trial must differ"]
    return []


#: the evaluation settings a trial's validation score depends on
SCORING = ("batch_size", "max_new_tokens")


def _still_valid(record: Path, chash: str, scoring: dict[str, Any]) -> bool:
    """Whether a finished trial measured what this trial would: the same training config hash and scoring
    settings. Records written before these were stored (2026-11-29) take the hash from the trial's training
    record and are taken to have been scored with the current settings."""
    rec = json.loads(record.read_text())
    if "train_config_hash" not in rec:
        done = record.parent / "train" / "lorascope-train.json"  # where the trial trained (the run folder may move)
        if not done.is_file():
            return False
        rec["train_config_hash"] = json.loads(done.read_text()).get("config_hash")
        rec.setdefault("scoring", scoring)
    return rec["train_config_hash"] == chash and rec["scoring"] == scoring


def tune_lr(cfg: Config, lrs: list[float], validation_share: float, out_dir: str | Path,
            epochs: list[float] | None = None) -> dict[str, Any]:
    """Train and score cfg.train.method on cfg.train.task at each rate of `lrs` (then, with `epochs`, at the
    selected rate for each epoch count); write OUT/tune.json."""
    problems = check_grid(lrs, "learning rates")
    if epochs is not None:
        problems += check_epochs(epochs, "epochs")
    if not 0.0 < validation_share < 1.0:
        problems.append(f"validation share: must be between 0 and 1 (exclusive), got {validation_share}")
    if problems:
        raise LorascopeError("; ".join(problems))
    out = Path(out_dir)
    task, method = cfg.train.task, cfg.train.method
    from lorascope.tasks import get_task

    task_def = get_task(task)
    metric = task_def.primary_metric
    scoring = {k: cfg.to_dict()["eval"][k] for k in SCORING}
    if task_def.selection_rule is not None:
        scoring["selection"] = task_def.selection_rule
        scoring["no_answer_signal"] = cfg.eval.no_answer_signal  # the signal(s) the rule may fit

    def trial(lr: float, n_epochs: float, tdir: Path) -> dict[str, Any]:
        c = copy.deepcopy(cfg)
        c.train.lr = lr
        if n_epochs != c.train.epochs:
            c.train.epochs = n_epochs
        c.data.validation_share = validation_share
        c.train.output_dir = str(tdir / "train")
        rec = _trial(c, task_def, tdir, scoring, cfg.eval)
        rec.setdefault("epochs", n_epochs)  # records written before epochs were searched (2026-11-30)
        log.info("tune %s/%s: lr %.2e, %g epoch(s) -> validation %s %s", task, method, lr, n_epochs, metric,
                 rec["value"])
        return rec

    base_epochs = float(cfg.train.epochs)
    trials = [trial(lr, base_epochs, out / f"lr_{lr:.2e}") for lr in sorted(lrs)]
    scored = [t for t in trials if t["value"] is not None]
    if not scored:
        raise LorascopeError(f"tune {task}/{method}: every trial diverged ({', '.join(f'{x:.1e}' for x in lrs)}); "
                             f"try smaller learning rates")
    best = max(scored, key=lambda t: (round(t["value"], 9), -t["lr"]))
    edge = best["lr"] in (min(lrs), max(lrs)) and len(lrs) > 1
    result = {"task": task, "method": method, "metric": metric, "trials": trials, "best_lr": best["lr"],
              "best_value": best["value"], "budget": len(lrs), "validation_share": validation_share,
              "seed": cfg.train.seed, "selected_at_grid_edge": edge, "epochs": base_epochs,
              "rule": "best validation score; ties: the smaller learning rate",
              "score": task_def.selection_rule or f"{metric} of the validation split as evaluated",
              "score_label": f"validation {metric}" + (" (selection rule)" if task_def.selection_rule else ""),
              "config": cfg.to_dict(),
              "provenance": provenance()}
    if edge:
        log.warning("tune %s/%s: the best rate %.2e is at the edge of the grid; the optimum may lie beyond it",
                    task, method, best["lr"])
    if epochs is not None:
        grid = sorted(float(e) for e in epochs)
        etrials = [dict(best, reused_from=f"lr_{best['lr']:.2e}") if e == base_epochs
                   else trial(best["lr"], e, out / f"lr_{best['lr']:.2e}_epochs_{e:g}") for e in grid]
        escored = [t for t in etrials if t["value"] is not None] or [best]
        ebest = max(escored, key=lambda t: (round(t["value"], 9), -t["epochs"]))
        result.update({
            "epochs_grid": grid, "epoch_trials": etrials, "best_epochs": ebest["epochs"],
            "best_epochs_value": ebest["value"],
            "epochs_at_grid_edge": len(grid) > 1 and ebest["epochs"] in (grid[0], grid[-1]),
            "epochs_rule": f"at the selected learning rate ({best['lr']:.2e}, searched at {base_epochs:g} epoch(s)): "
                           f"best validation score; ties: fewer epochs"})
        if result["epochs_at_grid_edge"] and ebest["epochs"] == grid[-1]:
            log.warning("tune %s/%s: the most epochs tried (%g) scored best; more may help", task, method, grid[-1])
    plot_lr_curve(result, out / "lr_curve.png")
    write_json(out / "tune.json", result)  # last: its presence means the search completed
    return result


def _trial(c: Config, task_def, tdir: Path, scoring: dict[str, Any], eval_cfg) -> dict[str, Any]:
    """Train one trial config and score it on the validation split; reuse its record while still valid.
    `eval_cfg`: the study's eval section, whose no-answer settings the selection rule may fit."""
    from lorascope.evaluate import evaluate
    from lorascope.train import config_hash, train

    task, metric = c.train.task, task_def.primary_metric
    result_file = tdir / "validation.json"
    if result_file.is_file() and not _still_valid(result_file, config_hash(c), scoring):
        log.info("tune %s/%s: the trial in %s was made with another config; training it again", task,
                 c.train.method, tdir.name)
        shutil.rmtree(tdir)
    if not result_file.is_file():
        state = "complete"
        try:
            model_dir = train(c)
        except LorascopeError as exc:  # a rate so high that training diverges is a result, not a crash
            if "loss became" not in str(exc) and "gradient norm became" not in str(exc):
                raise
            state, model_dir = f"diverged ({exc})", None
        value, n, extra = None, 0, {}
        if model_dir is not None:
            c.eval.task, c.eval.split = task, "validation"  # the trained task's validation split, always
            c.eval.checkpoint = str(model_dir)
            c.eval.output = str(tdir / "eval.json")
            # SQuAD v2: greedy decoding's own abstention here (calibration questions come from the evaluation
            # side); its selection rule then refits the no-answer rule on the validation paragraphs
            c.eval.calibration_examples = 0
            c.eval.no_answer_signal, c.eval.no_answer_threshold = "first_token", 0.0
            ev = evaluate(c)
            value, n = ev["metrics"][metric], ev["n_examples"]
            if task_def.selection_rule is not None:
                extra["value_as_evaluated"] = value
                examples = task_def.examples("validation", c.data, limit=c.data.max_train_examples)
                sel = task_def.selection_score(examples, json.loads(Path(ev["predictions_file"]).read_text()),
                                               eval_cfg)
                if sel is not None:
                    value = sel["value"]
                extra["selection"] = sel or {"note": "fewer than 2 validation paragraphs: scored as evaluated"}
        write_json(result_file, {"lr": c.train.lr, "epochs": c.train.epochs, "value": value, "metric": metric,
                                 "state": state, "n_validation": n, "train_dir": str(tdir / "train"), **extra,
                                 "train_config_hash": config_hash(c), "scoring": scoring})
        shutil.rmtree(tdir / "train" / "model", ignore_errors=True)  # weights are not kept
        shutil.rmtree(tdir / "train" / "checkpoints", ignore_errors=True)
    return {k: v for k, v in json.loads(result_file.read_text()).items() if k not in ("train_config_hash", "scoring")}


def plot_lr_curve(result: dict[str, Any], path: Path) -> None:
    """Validation score vs learning rate; with an epoch search, a second panel: score vs epochs at the chosen rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etrials = result.get("epoch_trials")
    fig, axes = plt.subplots(1, 2 if etrials else 1, figsize=(10 if etrials else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    pts = [(t["lr"], t["value"]) for t in result["trials"] if t["value"] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=result["method"])
    ax.plot([result["best_lr"]], [result["best_value"]], "r*", markersize=14, label="selected")
    for t in result["trials"]:
        if t["value"] is None:
            ax.axvline(t["lr"], color="grey", linestyle=":", label="diverged")
    ax.set_xscale("log")
    ax.set_xlabel(f"peak learning rate ({result.get('epochs', 1):g} epoch(s))")
    ax.set_ylabel(result.get("score_label", f"validation {result['metric']}"))
    ax.set_title(f"{result['task']} / {result['method']}: {result['budget']} trials")
    ax.legend()
    ax.grid(alpha=0.3)
    if etrials:
        ax = axes[0][1]
        pts = [(t["epochs"], t["value"]) for t in etrials if t["value"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"at {result['best_lr']:.1e}")
        ax.plot([result["best_epochs"]], [result["best_epochs_value"]], "r*", markersize=14, label="selected")
        ax.set_xlabel("epochs")
        ax.set_xticks(result["epochs_grid"])
        ax.set_title(f"epochs at the selected rate: {len(etrials)} trials")
        ax.legend()
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
