"""Task metrics of a checkpoint (the base model, a full model, or a LoRA adapter)."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from lorascope.config import Config
from lorascope.runinfo import provenance, write_json

log = logging.getLogger(__name__)


def default_output(cfg: Config) -> Path:
    e = cfg.eval
    if e.output:
        return Path(e.output)
    if e.checkpoint == "base":
        safe = cfg.model.name.replace("/", "__")
        return Path("runs") / "eval" / f"base-{safe}-{e.task}.json"
    return Path(e.checkpoint) / f"eval-{e.task}-{e.split}.json"


def calibrate_no_answer(task, model, tok, cfg: Config, examples, kwargs) -> dict:
    """Tune the SQuAD v2 no-answer threshold on held-out questions disjoint from `examples`' paragraphs.

    With eval.no_answer_signal 'best', each signal gets its own best threshold and the one
    with the better calibration F1 is kept (ties: first_token, greedy decoding's own signal).
    Nothing is chosen by looking at the evaluated questions.
    """
    from lorascope.tasks import squad_metric
    from lorascope.tasks.squad_v2 import NO_ANSWER_SIGNALS, best_threshold, examples_to_articles, predictions_at

    calib = task.calibration_examples(cfg.data, examples, cfg.eval.calibration_examples)
    task.check_held_out(cfg.data, calib, "calibration")
    log.info("squad_v2: tuning the no-answer threshold on %d calibration questions", len(calib))
    _, pred = task.evaluate(model, tok, calib, **kwargs)
    kept = [x for x in calib if x.id in pred["answers"]]
    arts = examples_to_articles(kept)
    wanted = cfg.eval.no_answer_signal
    names = list(NO_ANSWER_SIGNALS) if wanted == "best" else [wanted]
    per_signal = {n: best_threshold(pred[NO_ANSWER_SIGNALS[n]], pred["answers"], arts) for n in names}
    signal = max(names, key=lambda n: (round(per_signal[n]["f1"], 9), -names.index(n)))
    out = dict(per_signal[signal])
    out["signal"] = signal
    if wanted == "best":
        out["per_signal"] = per_signal
    greedy = predictions_at(pred["no_answer_margin"], pred["answers"], 0.0)
    out["f1_greedy"] = squad_metric.score_predictions(arts, greedy)["f1"]  # f1_at_0 is this signal's 0
    out["asked"], out["skipped_too_long"] = len(calib), len(calib) - len(kept)
    out["example_ids_sha256"] = hashlib.sha256("\n".join(x.id for x in kept).encode()).hexdigest()
    out["rule"] = (f"abstain when the {signal} score exceeds the threshold; "
                   + ("signal and threshold" if wanted == "best" else "threshold")
                   + " chosen for the best F1 on the calibration questions (held-out, sharing no paragraph "
                     "with the evaluated questions)")
    for n in names:
        log.info("squad_v2: %s: best threshold %.3f, calibration F1 %.2f", n, per_signal[n]["threshold"],
                 per_signal[n]["f1"])
    log.info("squad_v2: no-answer signal %s, threshold %.3f (calibration F1 %.2f; %.2f with greedy decoding's "
             "choice, %.2f always abstaining)", signal, out["threshold"], out["f1"], out["f1_greedy"],
             out["f1_always_no_answer"])
    return out


def evaluate(cfg: Config) -> dict:
    """Evaluate cfg.eval.checkpoint on cfg.eval.task; write metrics and predictions JSON."""
    import torch

    from lorascope.models import load_checkpoint
    from lorascope.tasks import get_task

    e = cfg.eval
    task = get_task(e.task)
    limit = cfg.data.max_eval_examples if e.split == "eval" else cfg.data.max_train_examples
    examples = task.examples(e.split, cfg.data, limit=limit)
    if e.split == "eval":
        task.check_held_out(cfg.data, examples, "evaluation")
    model, tok, info = load_checkpoint(e.checkpoint, cfg.model)
    if info["kind"] == "lora":
        # same function up to float rounding, and no per-layer adapter overhead while scoring
        model = model.merge_and_unload()
        info["adapter_merged_for_eval"] = True
    if torch.cuda.is_available():
        model = model.to("cuda")
    t0 = time.time()
    kwargs = dict(batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, max_len=cfg.data.eval_len)
    calibration = None
    if e.task == "squad_v2":
        threshold, signal = e.no_answer_threshold, e.no_answer_signal
        if e.calibration_examples:
            calibration = calibrate_no_answer(task, model, tok, cfg, examples, kwargs)
            threshold, signal = calibration["threshold"], calibration["signal"]
        kwargs["no_answer_threshold"], kwargs["no_answer_signal"] = threshold, signal
    elif e.calibration_examples or e.no_answer_threshold or e.no_answer_signal != "first_token":
        log.info("%s has no no-answer option: eval.calibration_examples, eval.no_answer_signal and "
                 "eval.no_answer_threshold are ignored", e.task)
    metrics, predictions = task.evaluate(model, tok, examples, **kwargs)
    if calibration is not None:
        from lorascope.tasks import squad_metric
        from lorascope.tasks.squad_v2 import examples_to_articles, predictions_at

        kept = [x for x in examples if x.id in predictions["answers"]]
        greedy = predictions_at(predictions["no_answer_margin"], predictions["answers"], 0.0)
        metrics["greedy"] = dict(squad_metric.score_predictions(examples_to_articles(kept), greedy))
        metrics["calibration"] = calibration
    seconds = time.time() - t0
    ids = "\n".join(x.id for x in examples)
    out = default_output(cfg)
    result = {
        "task": e.task, "split": e.split, "checkpoint": info, "metrics": metrics,
        "baselines": task.baselines(examples), "n_examples": len(examples),
        "example_ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
        "data_source": cfg.data.resolved_dir() or "huggingface-hub", "eval_seconds": seconds,
        "config": cfg.to_dict(), "provenance": provenance(),
        "predictions_file": str(out.with_suffix(".predictions.json")),
    }
    write_json(out.with_suffix(".predictions.json"), predictions)
    write_json(out, result)  # written last: its presence means the evaluation completed
    log.info("wrote %s", out)
    return result
