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
    prepared = task.prepare_eval(model, tok, cfg, examples, kwargs)  # SQuAD v2: the no-answer rule
    metrics, predictions = task.evaluate(model, tok, examples, **kwargs)
    task.finish_eval(examples, predictions, metrics, prepared)
    seconds = time.time() - t0
    ids = "\n".join(x.id for x in examples)
    out = default_output(cfg)
    scored = task.scored(examples, predictions)
    result = {
        "task": e.task, "split": e.split, "checkpoint": info, "metrics": metrics,
        # the baselines on the examples the model was scored on (SQuAD v2 skips prompts too long)
        "baselines": task.baselines(scored), "n_examples": len(examples), "n_scored": len(scored),
        "example_ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
        "data_source": cfg.data.resolved_dir() or "huggingface-hub", "eval_seconds": seconds,
        "config": cfg.to_dict(), "provenance": provenance(),
        "predictions_file": str(out.with_suffix(".predictions.json")),
    }
    write_json(out.with_suffix(".predictions.json"), predictions)
    write_json(out, result)  # written last: its presence means the evaluation completed
    log.info("wrote %s", out)
    return result
