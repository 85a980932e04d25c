"""Training throughput: lorascope vs a stock Hugging Face Trainer + PEFT setup, same run.

Both arms train the same model on the same tokenised MRPC examples with the same
hyperparameters (effective batch, learning rate, warm-up, linear decay, AdamW, clipping)
for the same number of steps. The baseline is what most users write first: Trainer,
DataCollatorForSeq2Seq padding to the longest sequence in each batch, and the model's own
loss, which computes vocabulary logits at every position. Printed: real (non-padding)
tokens per second of each arm, the ratio, the final training loss, and dev accuracy on a
fixed subset after training.

    python benchmarks/train_throughput.py [--steps 8] [--eval-examples 100] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def lorascope_arm(method: str, args, workdir: Path) -> dict:
    from lorascope.config import load_config
    from lorascope.train import train

    out = workdir / f"lorascope-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, _sets(args), **{"train.method": method, "train.output_dir": str(out),
                                           "model.name": args.model})
    model_dir = train(cfg)
    info = json.loads((out / "lorascope-train.json").read_text())
    return {"tokens_per_s": info["tokens_per_s"], "final_loss": info["final_loss"],
            "train_seconds": info["train_seconds_this_invocation"], "model_dir": model_dir}


def trainer_arm(method: str, args, workdir: Path) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lorascope.config import load_config
    from lorascope.models import load_model, load_tokenizer, resolve_model
    from lorascope.tasks import get_task
    from lorascope.train import _add_lora

    cfg = load_config(None, _sets(args), **{"train.method": method, "model.name": args.model})
    path = resolve_model(cfg.model.name)
    tok, model = load_tokenizer(path), load_model(path)
    if method == "lora":
        model = _add_lora(model, cfg, fast=False)  # stock PEFT layers
    task = get_task("mrpc")
    feats = task.features(tok, task.examples("train", cfg.data, limit=cfg.data.max_train_examples), cfg.data.max_seq_len)
    rows = [{"input_ids": f.input_ids, "labels": [-100] * f.answer_start + f.input_ids[f.answer_start:]} for f in feats]
    seen = {"tokens": 0, "padded": 0}
    base_collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(batch):
        out = base_collate(batch)
        seen["tokens"] += int(out["attention_mask"].sum())
        seen["padded"] += out["attention_mask"].numel()
        return out

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.time()

        def on_train_end(self, *a, **k):
            clock["end"] = time.time()

    t = cfg.train
    targs = TrainingArguments(
        output_dir=str(workdir / f"trainer-{method}"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size, learning_rate=t.peak_lr,
        weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * args.steps), lr_scheduler_type="linear",
        max_steps=args.steps, max_grad_norm=t.max_grad_norm, seed=t.seed, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    result = trainer.train()
    secs = clock["end"] - clock["start"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = workdir / f"trainer-{method}" / "model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if method == "lora":  # so that lorascope's loader finds the base
        (out / "lorascope-model.json").write_text(json.dumps({"base_model": args.model}))
    return {"tokens_per_s": seen["tokens"] / secs, "final_loss": losses[-1] if losses else result.training_loss,
            "train_seconds": secs, "padding_share": 1 - seen["tokens"] / max(1, seen["padded"]), "model_dir": out}


def dev_accuracy(model_dir: Path, args) -> float | None:
    if not args.eval_examples:
        return None
    from lorascope.config import load_config
    from lorascope.models import load_checkpoint
    from lorascope.tasks import get_task

    cfg = load_config(None, [], **{"model.name": args.model})
    model, tok, _ = load_checkpoint(str(model_dir), cfg.model)
    task = get_task("mrpc")
    exs = task.examples("eval", cfg.data, limit=args.eval_examples)
    return task.evaluate(model, tok, exs, batch_size=16, max_new_tokens=1, max_len=1024)[0]["accuracy"]


def _sets(args) -> list[str]:
    return ["train.task=mrpc", "train.batch_size=16", "train.micro_batch_size=8", f"train.max_steps={args.steps}",
            "train.save_every=0", f"data.max_train_examples={16 * args.steps}", "data.max_seq_len=256",
            "lora.dropout=0.05"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per arm (16 examples each)")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--eval-examples", type=int, default=100, help="MRPC dev examples scored after training (0: skip)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not os.environ.get("LORASCOPE_DATA_DIR"):
        sys.exit("set LORASCOPE_DATA_DIR to the data folder (make bench does)")
    import torch

    print(f"torch threads: {torch.get_num_threads()}, steps per arm: {args.steps}, model: {args.model}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for arm, fn in (("trainer+peft" if method == "lora" else "trainer", trainer_arm), ("lorascope", lorascope_arm)):
                r = fn(method, args, Path(tmp))
                r["dev_accuracy"] = dev_accuracy(r.pop("model_dir"), args)
                results[(method, arm)] = r
                print(f"{method:5s} {arm:13s} {r['tokens_per_s']:8.1f} tokens/s  loss {r['final_loss']:.4f}  "
                      f"dev acc {r['dev_accuracy']}", flush=True)
    print("\nmethod  baseline tok/s  lorascope tok/s  ratio  baseline padding  loss (base / ours)  dev acc (base / ours)")
    for method in args.methods.split(","):
        b = next(v for (m, a), v in results.items() if m == method and a != "lorascope")
        o = results[(method, "lorascope")]
        print(f"{method:6s}  {b['tokens_per_s']:14.1f}  {o['tokens_per_s']:15.1f}  {o['tokens_per_s'] / b['tokens_per_s']:5.2f}"
              f"  {100 * b['padding_share']:15.1f}%  {b['final_loss']:.3f} / {o['final_loss']:.3f}"
              f"       {b['dev_accuracy']} / {o['dev_accuracy']}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}/{a}": v for (m, a), v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
