"""Full and LoRA fine-tuning with Hugging Face Accelerate.

`accelerate launch --num_processes N -m lorascope train ...` (or torchrun) trains
data-parallel with no code change; an Accelerate config with FSDP shards the model.

Why it is faster than a stock Trainer loop on the same data: examples are grouped by
length so batches carry little padding, and vocabulary logits are computed only at the
positions that carry loss (the answer tokens), not at every prompt position.

Determinism: the order of examples is a pure function of the seed, and every optimizer
step's loss is normalised by the number of answer tokens in the whole global batch, so
1 process and N processes compute the same update, and a run resumed from a checkpoint
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lorascope import LorascopeError
from lorascope.config import Config, TrainArgs
from lorascope.fastlora import use_fast_lora
from lorascope.runinfo import append_jsonl, atomic_path, provenance, write_json

log = logging.getLogger(__name__)

DONE_FILE = "lorascope-train.json"


def config_hash(cfg: Config) -> str:
    """Hash of everything that changes the trained model (not output_dir, logging or trackers)."""
    d = cfg.to_dict()
    d.pop("eval")
    d["data"]["dir"] = cfg.data.resolved_dir()  # $LORASCOPE_DATA_DIR counts too
    for k in ("output_dir", "log_every", "save_every", "trackers", "drift_snapshots"):
        d["train"].pop(k, None)
    if d["train"]["method"] == "full":
        d.pop("lora")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train(cfg: Config, on_step=None) -> Path:
    """Fine-tune cfg.model on cfg.train.task with cfg.train.method; return the saved model directory.

    The output folder is locked for the whole call (by the first process of a distributed run):
    a second train on the same folder stops with a line naming the process that holds it.
    on_step, if given, is called after every optimizer step with a dict: step, loss, tokens (non-padding
    tokens of the global batch), answer_tokens and lengths (of the batch's sequences); benchmarks use it.
    """
    from lorascope.locking import folder_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return _train(cfg, on_step)
    with folder_lock(cfg.train.output_dir, "train.output_dir"):
        return _train(cfg, on_step)


def _train(cfg: Config, on_step=None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    args, out, chash = cfg.train, Path(cfg.train.output_dir), config_hash(cfg)
    done = out / DONE_FILE
    if done.is_file() and json.loads(done.read_text()).get("config_hash") == chash:
        log.info("%s already holds a finished run of this config; nothing to do", out)
        return out / "model"
    _claim_output_dir(out, cfg, chash)

    # cpu=True when there is no GPU: otherwise Accelerate ignores a torchrun / accelerate launch
    # world on the CPU and every process trains alone
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=_mixed_precision(args.mixed_precision),
                              log_with=args.trackers or None, project_dir=str(out))
    world = accelerator.num_processes
    set_seed(args.seed)
    model_path, tok, model = _load_for_training(cfg, accelerator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    examples, feats, plan = _training_plan(cfg, tok, world)
    total_steps = len(plan)
    if accelerator.is_main_process:
        log.info("train %s/%s: %d examples (%d features), %d steps of %d examples on %d process(es); %d of %d "
                 "parameters trainable", args.task, args.method, len(examples), len(feats), total_steps,
                 args.batch_size, world, trainable, total_params)

    wrapper, params, optimizer, scheduler = _prepare(accelerator, model, args, total_steps)
    start_step = _resume(accelerator, wrapper, optimizer, scheduler, out)
    if accelerator.is_main_process:
        _check_disk(out, cfg, accelerator.unwrap_model(wrapper).model, start_step, total_steps)
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        _trim_metrics(metrics_path, start_step)  # steps after the checkpoint are redone and logged again
        if args.trackers:
            accelerator.init_trackers(f"lorascope-{args.task}-{args.method}", config=_flat(cfg.to_dict()))

    # wall time, and this process's CPU time: a run that was paused (SIGSTOP) or shared its cores still has
    # an honest tokens per CPU-second (both threads of an idle 2-core machine: ~2 CPU-seconds per second)
    t0, c0, tokens_seen, last_loss = time.time(), time.process_time(), 0, float("nan")
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {args.task}/{args.method}", unit="step",
               disable=not accelerator.is_local_main_process)
    wrapper.train()
    for step in range(start_step, total_steps):
        batch = plan[step]
        loss, grad_norm, n_tokens = _step(accelerator, wrapper, optimizer, scheduler, params, [feats[i] for i in batch],
                                          args, tok.pad_token_id, (step + 1, total_steps))
        tokens_seen += n_tokens
        last_loss = loss
        if on_step is not None:
            lengths = [len(feats[i].input_ids) for i in batch]
            on_step({"step": step + 1, "loss": loss, "tokens": sum(lengths),
                     "answer_tokens": sum(len(feats[i].input_ids) - feats[i].answer_start for i in batch),
                     "lengths": lengths})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        done_steps = step + 1
        if done_steps % args.log_every == 0 or done_steps == total_steps:
            elapsed = time.time() - t0
            _log_step(accelerator, metrics_path, {
                "step": done_steps, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens_per_s_this_process": tokens_seen / elapsed if elapsed else None, "elapsed_s": elapsed,
                "cpu_s": time.process_time() - c0})
        _save_points(accelerator, wrapper, optimizer, scheduler, tok, cfg, done_steps, total_steps)
    bar.close()
    train_s, cpu_s = time.time() - t0, time.process_time() - c0

    accelerator.wait_for_everyone()
    _save_model(accelerator, wrapper, tok, cfg, out / "model", model_path)
    if accelerator.is_main_process:
        write_json(done, {  # written last: its presence marks a finished run of this config
            "config": cfg.to_dict(), "config_hash": chash, "seed": args.seed, "steps": total_steps,
            "resumed_from_step": start_step, "train_examples": len(examples), "train_features": len(feats),
            "final_loss": last_loss, "train_seconds_this_invocation": train_s, "processes": world,
            "tokens_per_s": tokens_seen * world / train_s if train_s and start_step < total_steps else None,
            "cpu_seconds_this_invocation": cpu_s,  # of the main process
            "tokens_per_cpu_s": tokens_seen / cpu_s if cpu_s and start_step < total_steps else None,
            "trainable_parameters": trainable, "total_parameters": total_params,
            "model_dir": str(out / "model"), "provenance": provenance()})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "model"


def _training_plan(cfg: Config, tok, world: int) -> tuple[list, list, list[list[int]]]:
    """(training examples, their features, the global batches of every step) of this config."""
    from lorascope.tasks import get_task

    args = cfg.train
    examples = get_task(args.task).examples("train", cfg.data, limit=cfg.data.max_train_examples)
    feats = get_task(args.task).features(tok, examples, cfg.data.max_seq_len)
    if not feats:
        raise LorascopeError(f"train: no {args.task} training example fits in data.max_seq_len={cfg.data.max_seq_len}")
    plan = batch_plan([len(f.input_ids) for f in feats], args.batch_size, args.epochs, args.seed, world)
    return examples, feats, plan if args.max_steps is None else plan[:args.max_steps]


def _load_for_training(cfg: Config, accelerator):
    """(resolved model path, tokenizer, model ready to train: LoRA added for method lora)."""
    from lorascope.models import load_model, load_tokenizer, resolve_model

    with accelerator.main_process_first():
        model_path = resolve_model(cfg.model.name, cfg.model.revision)
    tok = load_tokenizer(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(model_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    model.config.use_cache = False
    if cfg.train.method == "lora":
        model = _add_lora(model, cfg)
    return model_path, tok, model


def _prepare(accelerator, model, args: TrainArgs, total_steps: int):
    """(the loss wrapper, its trainable parameters, optimizer, scheduler), prepared by Accelerate."""
    import torch

    wrapper = accelerator.prepare(AnswerLoss(model))
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(build_optimizer(params, args))
    # not prepared: Accelerate would step a prepared scheduler once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    return wrapper, params, optimizer, scheduler


def _check_disk(out: Path, cfg: Config, model, start_step: int, total_steps: int) -> None:
    """Refuse to start a training whose checkpoints and model would not fit on the output folder's disk.

    What it still writes, at most: checkpoints (trainable weights and AdamW's two moments; two are kept
    and a third is written before the oldest goes), the model, and drift snapshots. A disk that fills
    later (other writers) still stops the run cleanly: checkpoints appear complete or not at all.
    """
    args = cfg.train
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = trainable if args.method == "lora" else sum(p.numel() * p.element_size() for p in model.parameters())
    ckpt = 3 * trainable
    planned = sum(1 for s in range(start_step + 1, total_steps) if args.save_every and s % args.save_every == 0)
    existing = len(list((out / "checkpoints").glob("step-*"))) if (out / "checkpoints").is_dir() else 0
    n_ckpt = max(0, min(existing + planned, 3) - existing)
    n_snap = sum(1 for s in snapshot_steps(total_steps, args.drift_snapshots) if s > start_step)
    need = n_ckpt * ckpt + weights + n_snap * weights
    free = shutil.disk_usage(out).free
    if free < need:
        gib = 2 ** 30
        parts = [f"{n_ckpt} checkpoint(s) of {ckpt / gib:.2f} GiB (weights and optimizer state)"] if n_ckpt else []
        parts.append(f"the model, {weights / gib:.2f} GiB")
        if n_snap:
            parts.append(f"{n_snap} drift snapshot(s) of {weights / gib:.2f} GiB")
        from lorascope.checkpoint import DiskError  # not the user's input: exit 1, as a full disk later would

        raise DiskError(f"train.output_dir {out}: {free / gib:.2f} GiB free on its disk, but this training "
                             f"writes up to {need / gib:.2f} GiB ({', '.join(parts)}); free space, raise "
                             f"train.save_every (0: no checkpoints) or use another folder")


def _save_points(accelerator, wrapper, optimizer, scheduler, tok, cfg: Config, done: int, total: int) -> None:
    """After optimizer step `done`: the resumable checkpoint and drift snapshot when due."""
    args, out = cfg.train, Path(cfg.train.output_dir)
    if args.save_every and done % args.save_every == 0 and done < total:
        _checkpoint(accelerator, wrapper, optimizer, scheduler, out, done)
    if done in snapshot_steps(total, args.drift_snapshots):
        save_snapshot(accelerator, wrapper, tok, out, done, cfg)
    if done == int(os.environ.get("LORASCOPE_FAULT_AFTER_STEP", "0")):  # tests: simulate a kill
        os._exit(137)


def _log_step(accelerator, metrics_path: Path, rec: dict) -> None:
    if accelerator.is_main_process:
        append_jsonl(metrics_path, rec)
    accelerator.log({k: v for k, v in rec.items() if v is not None}, step=rec["step"])


def _step(accelerator, wrapper, optimizer, scheduler, params, batch: list, args, pad_id: int,
          at: tuple[int, int]) -> tuple[float, float | None, int]:
    """One optimizer step on the global `batch` (this process takes its share, in micro-batches).

    The update is the gradient of the summed answer-token loss over the whole batch divided
    by its answer tokens, whatever the split into processes and micro-batches. Returns the
    loss per answer token, the gradient norm before clipping (None without clipping) and
    this process's non-padding tokens.
    """
    import torch

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    n_answer = sum(len(f.input_ids) - f.answer_start for f in batch)
    mine = batch[rank::world]
    micro = [mine[i:i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]
    loss_sum, tokens = torch.zeros((), device=device), 0
    for k, mb in enumerate(micro):
        ids, mask, labels = collate(mb, pad_id, device)
        ctx = accelerator.no_sync(wrapper) if k < len(micro) - 1 else contextlib.nullcontext()
        with ctx, accelerator.autocast():
            s = wrapper(ids, mask, labels)
            # DDP averages gradients over processes: scale so the update is sum / n_answer
            accelerator.backward(s * (world / n_answer))
        loss_sum += s.detach().float()
        tokens += int(mask.sum())
    loss = accelerator.reduce(loss_sum, reduction="sum").item() / n_answer
    if not math.isfinite(loss):
        raise LorascopeError(f"train: loss became {loss} at step {at[0]} of {at[1]}; lower "
                             f"train.lr (now {args.peak_lr}) or check the data")
    grad_norm = None
    if args.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(params, args.max_grad_norm))
        if not math.isfinite(grad_norm):
            raise LorascopeError(f"train: gradient norm became {grad_norm} at step {at[0]}; lower train.lr")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, tokens


def _save_model(accelerator, wrapper, tok, cfg: Config, target: Path, model_path) -> None:
    """The trained weights (safetensors), tokenizer and lorascope-model.json, written atomically."""
    from lorascope.models import model_fingerprint

    unwrapped = accelerator.unwrap_model(wrapper).model
    state = accelerator.get_state_dict(wrapper)
    if not accelerator.is_main_process:
        return
    state = {k.removeprefix("model."): v for k, v in state.items()}
    with atomic_path(target, is_dir=True) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "lorascope-model.json", {
            "base_model": cfg.model.name, "base_revision": cfg.model.revision, "resolved_base": model_path,
            "base_fingerprint": model_fingerprint(unwrapped.config), "method": cfg.train.method,
            "task": cfg.train.task, "lora": cfg.to_dict()["lora"] if cfg.train.method == "lora" else None})


class AnswerLoss(torch.nn.Module):
    """Sum of answer-token cross-entropy; vocabulary logits only where labels are set."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        import torch.nn.functional as F

        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        # position t predicts token t+1
        target = labels[:, 1:]
        where = target != -100
        h = hidden[:, :-1][where]
        logits = self.model.get_output_embeddings()(h).float()
        return F.cross_entropy(logits, target[where], reduction="sum")


def collate(feats, pad_id: int, device):
    """Right-pad to the longest in the micro-batch; labels are -100 outside the answer."""
    import torch

    from lorascope.lm import pad_batch

    ids, mask = pad_batch([f.input_ids for f in feats], pad_id)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(feats):
        n = len(f.input_ids)
        labels[i, f.answer_start:n] = ids[i, f.answer_start:n]
    return ids.to(device), mask.to(device), labels.to(device)


def batch_plan(lengths: list[int], batch_size: int, epochs: float, seed: int, world: int = 1,
               group: int = 32) -> list[list[int]]:
    """Global batches of example indices for the whole run, a pure function of its arguments.

    Each epoch shuffles the examples, sorts windows of `group` batches by length (so each
    batch holds examples of similar length and carries little padding) and shuffles the
    order of the batches. A last batch with fewer examples than processes is dropped.
    """
    n = len(lengths)
    if n < world:
        raise LorascopeError(f"train: {n} training examples cannot be spread over {world} processes")
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * per_epoch))
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < total:
        rng = random.Random(f"{seed}-{epoch}")
        idx = list(range(n))
        rng.shuffle(idx)
        batches = []
        for w in range(0, n, batch_size * group):
            window = sorted(idx[w:w + batch_size * group], key=lambda i: lengths[i], reverse=True)
            batches += [window[j:j + batch_size] for j in range(0, len(window), batch_size)]
        batches = [b for b in batches if len(b) >= world]
        rng.shuffle(batches)
        plan += batches
        epoch += 1
    return plan[:total]


def build_optimizer(params, args, fused: bool | None = None):
    """AdamW over the trainable parameters only (frozen weights get neither gradients nor state).

    Fused AdamW (one kernel for all parameters, CPU and CUDA) unless a parameter lives on
    another device; it computes the same update as the per-tensor loop, to float rounding.
    """
    params = list(params)
    if fused is None:
        fused = FUSED_ADAMW and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=args.peak_lr, weight_decay=args.weight_decay, fused=fused or None)


FUSED_ADAMW = True  # tests switch it off to compare with the per-tensor AdamW


def lr_lambda(args, total_steps: int):
    warmup = int(args.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


def _add_lora(model, cfg: Config, fast: bool = True):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ == "Linear" and n != "lm_head"})
        raise LorascopeError(f"lora.target_modules: {missing} not found in {cfg.model.name}; "
                             f"its linear modules are {linear}")
    lcfg = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lcfg)
    if fast:
        use_fast_lora(model)
    return model


def _mixed_precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _claim_output_dir(out: Path, cfg: Config, chash: str) -> None:
    """Record the config at the start; refuse to resume a different config into the same folder."""
    marker = out / "run-config.json"
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = {}
        # nothing trained yet (e.g. the last try stopped on bad data): the folder is free to take
        nothing_yet = not (out / "checkpoints").exists() and not (out / "model").exists()
        if old.get("config_hash") != chash and nothing_yet:
            old = {"config_hash": chash}
            write_json(marker, {"config": cfg.to_dict(), "config_hash": chash})
        if old.get("config_hash") != chash:
            diff = _diff(old.get("config", {}), cfg.to_dict())
            raise LorascopeError(f"train.output_dir {out}: holds a run of a different config (differs in "
                                 f"{', '.join(diff) or 'its hash'}); use another --output-dir or delete it")
        return
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        if (out / "checkpoints").exists() or (out / "model").exists():
            raise LorascopeError(f"train.output_dir {out}: holds files of an unknown run; use another --output-dir")
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(marker, {"config": cfg.to_dict(), "config_hash": chash})


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k) and k not in ("output_dir", "log_every", "save_every", "trackers", "drift_snapshots"):
            out.append(f"{prefix}{k}")
    return out


def _checkpoint(accelerator, wrapper, optimizer, scheduler, out: Path, step: int) -> None:
    """Save trainable weights, optimizer, scheduler and RNG state (no pickles); keep the last two."""
    from lorascope import checkpoint

    checkpoint.save(accelerator, accelerator.unwrap_model(wrapper), optimizer, scheduler, out, step)


def _resume(accelerator, wrapper, optimizer, scheduler, out: Path) -> int:
    """Step of the newest checkpoint that verifies (0 if none), with its state loaded."""
    from lorascope import checkpoint

    return checkpoint.resume(accelerator, accelerator.unwrap_model(wrapper), optimizer, scheduler, out)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows after `step` (and a torn last line), so a resumed run logs each step once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def snapshot_steps(total_steps: int, n: int) -> set[int]:
    """N evenly spaced optimizer steps ending with the last: round(k * total / N), k = 1..N."""
    if n <= 0 or total_steps <= 0:
        return set()
    n = min(n, total_steps)
    return {max(1, round(k * total_steps / n)) for k in range(1, n + 1)}


def save_snapshot(accelerator, wrapper, tok, out: Path, step: int, cfg: Config) -> None:
    """The tuned weights at `step` as a loadable checkpoint in OUT/snapshots/step-K (safetensors).

    LoRA: the PEFT adapter; full: the whole model. `lorascope drift --along` reads them.
    The folder appears complete or not at all.
    """
    state = accelerator.get_state_dict(wrapper)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(wrapper).model
    state = {k.removeprefix("model."): v for k, v in state.items()}
    with atomic_path(out / "snapshots" / f"step-{step:07d}", is_dir=True) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "lorascope-model.json", {
            "base_model": cfg.model.name, "base_revision": cfg.model.revision, "method": cfg.train.method,
            "task": cfg.train.task, "step": step, "seed": cfg.train.seed,
            "lora": cfg.to_dict()["lora"] if cfg.train.method == "lora" else None})
