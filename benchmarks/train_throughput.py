"""Training throughput: lorascope LoRA and full fine-tuning vs stock Trainer (+ PEFT), interleaved, same run.

Four arms train the same model on the same tokenised MRPC examples with the same
hyperparameters (effective batch, learning rate, warm-up, linear decay, AdamW, clipping,
LoRA dropout) for the same number of steps: lorascope LoRA, lorascope full fine-tuning, and
what most users write first for each method: Trainer (+ PEFT's own LoRA layers),
DataCollatorForSeq2Seq padding to the longest sequence in each batch, and the model's own
loss (vocabulary logits at every position). Trainer uses its default fused AdamW.

Each arm lives in its own process, set up once. After a warm-up step the arms take turns:
one timed window of --window optimizer steps each, in a rotating order, with a float32
matmul peak measurement in every round, so that the load that other users put on the
cores falls on every arm alike. Printed per arm: median and spread of its windows' tokens/s
(non-padding tokens), achieved GFLOP/s and its share of the peak measured in the same run,
peak memory (RSS) of its process, final loss and dev accuracy; and the ratios between arms:
the median over rounds of the ratio within a round, and the overall ratio (all tokens over all
seconds), each with a percentile-bootstrap 95 % interval over rounds.

FLOPs counted are those the arithmetic requires, on real tokens only (no padding, no
recomputation): per token 2 x the decoder's linear weights forward, 2 x backward through
them (input gradients), 2 x more for their weight gradients in full fine-tuning only,
6 x r x (in + out) per LoRA adapter, causal attention (2 x d x L^2 per layer and sequence
forward, 3 x that with backward), and the LM head (2 x d x vocab per answer token forward,
as many for its input gradient, as many for its weight gradient in full fine-tuning).
The baselines compute vocabulary logits at every position, which this count does not
credit: it is the same work budget for every arm of a method.

    python benchmarks/train_throughput.py [--steps 6] [--window 1] [--eval-examples 100] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ARMS = [("lora", "trainer+peft"), ("lora", "lorascope"), ("full", "trainer"), ("full", "lorascope")]


def _sets(args) -> list[str]:
    return ["train.task=mrpc", "train.batch_size=16", "train.micro_batch_size=8", f"train.max_steps={args.steps}",
            "train.save_every=0", f"data.max_train_examples={16 * args.steps}", "data.max_seq_len=256",
            "train.log_every=1"] + ([f"lora.dropout={args.lora_dropout}"] if args.lora_dropout is not None else [])


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Windows:
    """Step hook of a worker: after the warm-up, report every `window` steps and wait for the next turn."""

    def __init__(self, conn, window: int, flops_of):
        self.conn, self.window, self.flops_of = conn, window, flops_of
        self.n, self.tokens, self.flops, self.t0 = 0, 0, 0.0, None
        self.losses = []

    def step(self, tokens: int, flops: float, loss: float | None) -> None:
        self.n += 1
        self.losses.append(loss)
        if self.t0 is not None:
            self.tokens += tokens
            self.flops += flops
        if self.n == 1 or (self.n - 1) % self.window == 0:
            if self.t0 is not None:
                self.conn.send(("window", {"tokens": self.tokens, "flops": self.flops,
                                           "seconds": time.perf_counter() - self.t0, "peak_rss_mib": _rss_mib()}))
            else:
                self.conn.send(("ready", {"rss_after_setup_mib": _rss_mib()}))
            if self.conn.recv() != "go":
                raise SystemExit(0)
            self.tokens, self.flops, self.t0 = 0, 0.0, time.perf_counter()


def step_flops(method: str, dims: dict, lengths: list[int], answer_tokens: int) -> float:
    """FLOPs one optimizer step needs for these sequences (see the module docstring)."""
    tokens = sum(lengths)
    lin = dims["linear_params"]
    f = (6 if method == "full" else 4) * lin * tokens
    if method == "lora":
        f += 6 * dims["lora_rank"] * dims["lora_in_plus_out"] * tokens
    f += 3 * 2 * dims["hidden"] * dims["layers"] * sum(n * n for n in lengths)
    f += (6 if method == "full" else 4) * dims["hidden"] * dims["vocab"] * answer_tokens
    return float(f)


def model_dims(path: str, rank: int, targets: list[str]) -> dict:
    """Shapes that the FLOP count needs, from the model's config (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    adapted = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n and n.rsplit(".", 1)[-1] in targets]
    return {"linear_params": sum(m.in_features * m.out_features for m in layers), "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "lora_rank": rank,
            "lora_in_plus_out": sum(m.in_features + m.out_features for m in adapted)}


def worker(method: str, arm: str, args, workdir: str, conn) -> None:
    try:
        result = (lorascope_arm if arm == "lorascope" else trainer_arm)(method, args, Path(workdir), conn)
        model_dir = result.pop("model_dir")
        result["dev_accuracy"] = dev_accuracy(model_dir, args) if arm == "lorascope" or args.eval_baselines else None
        conn.send(("done", result))
    except SystemExit:
        pass
    except BaseException as exc:  # the coordinator reports it and stops the others
        import traceback

        conn.send(("error", f"{method}/{arm}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def lorascope_arm(method: str, args, workdir: Path, conn) -> dict:
    from lorascope.config import load_config
    from lorascope.models import resolve_model
    from lorascope.train import train

    out = workdir / f"lorascope-{method}"
    cfg = load_config(None, _sets(args), **{"train.method": method, "train.output_dir": str(out),
                                           "model.name": args.model})
    dims = model_dims(resolve_model(cfg.model.name), cfg.lora.rank, cfg.lora.target_modules)
    win = Windows(conn, args.window, None)
    peak = {}

    def on_step(rec):
        win.step(rec["tokens"], step_flops(method, dims, rec["lengths"], rec["answer_tokens"]), rec["loss"])
        peak["rss"] = _rss_mib()

    model_dir = train(cfg, on_step=on_step)
    info = json.loads((out / "lorascope-train.json").read_text())
    return {"final_loss": info["final_loss"], "losses": win.losses, "model_dir": model_dir,
            "peak_rss_mib": peak["rss"], "padding_share": None}


def trainer_arm(method: str, args, workdir: Path, conn) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lorascope.config import load_config
    from lorascope.models import load_model, load_tokenizer, resolve_model
    from lorascope.tasks import get_task
    from lorascope.train import _add_lora

    cfg = load_config(None, _sets(args), **{"train.method": method, "model.name": args.model})
    path = resolve_model(cfg.model.name)
    dims = model_dims(path, cfg.lora.rank, cfg.lora.target_modules)
    tok, model = load_tokenizer(path), load_model(path)
    if method == "lora":
        model = _add_lora(model, cfg, fast=False)  # stock PEFT layers
    task = get_task("mrpc")
    feats = task.features(
        tok, task.examples("train", cfg.data, limit=cfg.data.max_train_examples), cfg.data.max_seq_len
    )
    rows = [{"input_ids": f.input_ids, "labels": [-100] * f.answer_start + f.input_ids[f.answer_start:]} for f in feats]
    seen = {"tokens": 0, "padded": 0, "flops": 0.0}
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def count(module, args, kwargs):  # counted when the model runs, not when Trainer fetches batches
        if module.training:
            mask, labels = kwargs["attention_mask"], kwargs["labels"]
            lengths = mask.sum(1).tolist()
            seen["tokens"] += sum(lengths)
            seen["padded"] += mask.numel()
            seen["flops"] += step_flops(method, dims, lengths, int((labels[:, 1:] != -100).sum()))

    model.register_forward_pre_hook(count, with_kwargs=True)

    win = Windows(conn, args.window, None)
    last = {"tokens": 0, "flops": 0.0}
    peak = {}

    class Turns(TrainerCallback):
        def on_step_end(self, a, state, control, **k):
            loss = None
            win.step(seen["tokens"] - last["tokens"], seen["flops"] - last["flops"], loss)
            last.update(tokens=seen["tokens"], flops=seen["flops"])
            peak["rss"] = _rss_mib()

    t = cfg.train
    targs = TrainingArguments(
        output_dir=str(workdir / f"trainer-{method}"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size, learning_rate=t.peak_lr,
        weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * args.steps), lr_scheduler_type="linear",
        max_steps=args.steps, max_grad_norm=t.max_grad_norm, seed=t.seed, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Turns()])
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = workdir / f"trainer-{method}" / "model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if method == "lora":  # so that lorascope's loader finds the base
        (out / "lorascope-model.json").write_text(json.dumps({"base_model": args.model}))
    return {"final_loss": losses[-1] if losses else result.training_loss, "losses": losses, "model_dir": out,
            "peak_rss_mib": peak["rss"], "padding_share": 1 - seen["tokens"] / max(1, seen["padded"])}


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


def matmul_peak_gflops(n: int = 2048, reps: int = 3) -> float:
    """Float32 matrix-product rate of this machine now: best of `reps` n x n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def ratio_intervals(num: list[dict], den: list[dict], *, resamples: int = 10_000, seed: int = 0) -> dict:
    """The throughput ratio of two arms over the same rounds, with percentile-bootstrap 95 % intervals.

    `num` and `den` are the two arms' timed windows, round by round (dicts with "tokens" and
    "seconds"). Two statistics: the median over rounds of the within-round ratio, and the
    overall ratio (all tokens over all seconds, one arm over the other). The rounds are resampled
    with replacement, each round keeping both arms' windows, so that the interval covers which
    batches and which moments of the machine's load were drawn.
    """
    import numpy as np

    tn = np.array([w["tokens"] for w in num], float)
    sn = np.array([w["seconds"] for w in num], float)
    td = np.array([w["tokens"] for w in den], float)
    sd = np.array([w["seconds"] for w in den], float)
    per_round = (tn / sn) / (td / sd)
    idx = np.random.default_rng(seed).integers(0, len(per_round), size=(resamples, len(per_round)))
    medians = np.median(per_round[idx], axis=1)
    overall = (tn[idx].sum(1) / sn[idx].sum(1)) / (td[idx].sum(1) / sd[idx].sum(1))
    return {**_spread(per_round.tolist()),
            "median_ci95": [float(x) for x in np.percentile(medians, [2.5, 97.5])],
            "overall": float((tn.sum() / sn.sum()) / (td.sum() / sd.sum())),
            "overall_ci95": [float(x) for x in np.percentile(overall, [2.5, 97.5])],
            "resamples": resamples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per arm (16 examples each); the first "
                    "is warm-up, the others are timed")
    ap.add_argument("--window", type=int, default=1, help="optimizer steps per timed window")
    ap.add_argument("--eval-examples", type=int, default=100, help="MRPC dev examples scored after training (0: skip)")
    ap.add_argument("--eval-baselines", action="store_true", help="also score the Trainer arms' models on MRPC dev "
                    "(their training code is not lorascope's; off by default to save time on small machines)")
    ap.add_argument("--lora-dropout", type=float,
                    help="LoRA dropout of both LoRA arms (default: lorascope's default, lora.dropout)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not os.environ.get("LORASCOPE_DATA_DIR"):
        sys.exit("set LORASCOPE_DATA_DIR to the data folder (make bench does)")
    if args.steps < 2 or (args.steps - 1) % args.window:
        sys.exit(f"--steps {args.steps}: must be 1 (warm-up) plus a multiple of --window {args.window}")
    import torch

    from lorascope.runinfo import provenance

    rounds = (args.steps - 1) // args.window
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}, steps per arm: {args.steps} "
          f"(1 warm-up + {rounds} timed windows of {args.window}), model: {args.model}", flush=True)
    ctx = mp.get_context("spawn")
    windows = {a: [] for a in ARMS}
    peaks: list[float] = []
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        conns, procs = {}, []
        for arm in ARMS:
            here, there = ctx.Pipe()
            p = ctx.Process(target=worker, args=(*arm, args, tmp, there), daemon=True)
            p.start()
            conns[arm], procs = here, procs + [p]
        try:
            setup = {arm: _expect(conns[arm], "ready", arm) for arm in ARMS}
            for r in range(rounds):
                peaks.append(matmul_peak_gflops())
                order = ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]  # rotate: no arm always runs first
                for arm in order:
                    conns[arm].send("go")
                    windows[arm].append(_expect(conns[arm], "window", arm))
                if args.json:  # a killed run leaves its rounds so far, marked incomplete
                    _write_json(args.json, {"complete": False, "rounds_done": r + 1, "args": vars(args),
                                            "matmul_peaks": peaks,
                                            "windows": {f"{m}/{a}": w for (m, a), w in windows.items()}})
                print(f"round {r + 1}/{rounds}: peak {peaks[-1]:.1f} GFLOP/s; tokens/s "
                      + ", ".join(f"{m}/{a} {windows[(m, a)][-1]['tokens'] / windows[(m, a)][-1]['seconds']:.1f}"
                                  for m, a in ARMS), flush=True)
            peaks.append(matmul_peak_gflops())
            for arm in ARMS:  # finish: save, then dev accuracy (untimed, all arms at once)
                conns[arm].send("go")
            for arm in ARMS:
                results[arm] = _expect(conns[arm], "done", arm)
                results[arm]["rss_after_setup_mib"] = setup[arm]["rss_after_setup_mib"]
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()

    peak = _spread(peaks)
    rows = {}
    for arm in ARMS:
        ws = windows[arm]
        tps = [w["tokens"] / w["seconds"] for w in ws]
        gf = [w["flops"] / w["seconds"] / 1e9 for w in ws]
        util = [g / p for g, p in zip(gf, peaks)]  # share of the peak measured in the same round
        rows[arm] = {**results[arm], "tokens_per_s": _spread(tps), "gflops": _spread(gf), "peak_share": _spread(util),
                     "tokens_per_s_overall": sum(w["tokens"] for w in ws) / sum(w["seconds"] for w in ws),
                     "windows": ws}
    ratios = {}
    for name, (num, den) in {"lora/full (lorascope)": (("lora", "lorascope"), ("full", "lorascope")),
                             "lora: lorascope/trainer+peft": (("lora", "lorascope"), ("lora", "trainer+peft")),
                             "full: lorascope/trainer": (("full", "lorascope"), ("full", "trainer"))}.items():
        ratios[name] = ratio_intervals(windows[num], windows[den])

    print(f"\nfloat32 matmul peak (2048^3, best of 3, once per round): median {peak['median']:.1f} GFLOP/s "
          f"[{peak['min']:.1f}, {peak['max']:.1f}]")
    print(f"\n{'arm':20s} {'tokens/s median [min, max]':>28s} {'GFLOP/s':>8s} {'% of peak':>10s} "
          f"{'peak RSS MiB':>12s} {'final loss':>10s} {'dev acc':>8s}")
    for (m, a), r in rows.items():
        t = r["tokens_per_s"]
        print(f"{m + '/' + a:20s} {t['median']:10.1f} [{t['min']:7.1f}, {t['max']:7.1f}] {r['gflops']['median']:8.1f} "
              f"{100 * r['peak_share']['median']:9.1f}% {r['peak_rss_mib']:12.0f} {r['final_loss']:10.4f} "
              f"{r['dev_accuracy']!s:>8s}")
    print(f"\nratios over {rounds} rounds; 95 % intervals: percentile bootstrap over rounds")
    print(f"{'ratio':32s} {'median of within-round ratios [95 % CI] (min, max)':>52s} {'overall [95 % CI]':>22s}")
    for name, s in ratios.items():
        lo, hi = s["median_ci95"]
        olo, ohi = s["overall_ci95"]
        print(f"{name:32s} {s['median']:13.2f} [{lo:.2f}, {hi:.2f}] ({s['min']:.2f}, {s['max']:.2f}) "
              f"{s['overall']:13.2f} [{olo:.2f}, {ohi:.2f}]")
    pad = rows[("lora", "trainer+peft")]["padding_share"]
    print(f"\nTrainer batches: {100 * pad:.1f}% padding. Peak RSS: the arm's process at its last training step "
          f"(runtime, model, gradients, optimizer state, activations); after set-up it held "
          + ", ".join(f"{m}/{a} {r['rss_after_setup_mib']:.0f}" for (m, a), r in rows.items()) + " MiB.")
    if args.json:
        _write_json(args.json, {
            "complete": True, "args": vars(args), "matmul_peak_gflops": peak, "matmul_peaks": peaks, "ratios": ratios,
            "arms": {f"{m}/{a}": {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
                     for (m, a), r in rows.items()},
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "provenance": provenance()})


def _write_json(path: str, obj: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _expect(conn, kind: str, arm) -> dict:
    msg, payload = conn.recv()
    if msg == "error":
        raise SystemExit(f"arm failed: {payload}")
    if msg != kind:
        raise SystemExit(f"{arm}: expected {kind!r} from the worker, got {msg!r}")
    return payload


if __name__ == "__main__":
    main()
