"""Where one training step's time goes: torch profiler over one optimizer step of each method.

Each method trains the real model through `lorascope.train.train` (the code path users run)
for --steps optimizer steps on MRPC; the last step is profiled (forward and backward of every
micro-batch, clipping and the optimizer). Printed per method: the operators by self CPU time,
and the step's time split into the big matrix products (frozen or trained weights), the rank-r
products of the LoRA adapters (any dimension equal to the rank), attention, the optimizer, and
everything else (element-wise ops, copies, norms, the loss, Python).

    python benchmarks/profile_train_step.py [--methods lora,full] [--steps 3] [--json F]
        [--set lora.dropout=0.0 ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::addmm_", "aten::linear"}
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention", "attention_math")
OPTIMIZER = ("adam", "foreach", "clip_grad", "_amp_foreach")


def classify(name: str, shapes, rank: int) -> str:
    low = name.lower()
    if name in MATMUL:
        dims = [d for s in (shapes or []) for d in (s or [])]
        return "rank-r products (LoRA)" if rank in dims else "big matrix products"
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in OPTIMIZER):
        return "optimizer and clipping"
    return "everything else"


def profile_method(method: str, args, workdir: str, queue) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lorascope.config import load_config
    from lorascope.train import train

    sets = ["train.task=mrpc", "train.batch_size=16", "train.micro_batch_size=8", f"train.max_steps={args.steps}",
            "train.save_every=0", f"data.max_train_examples={16 * args.steps}", "data.max_seq_len=256",
            "train.log_every=1", *args.set]
    cfg = load_config(None, sets, **{"train.method": method, "train.output_dir": str(Path(workdir) / method),
                                     "model.name": args.model})
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    state: dict = {}

    def on_step(rec):
        if rec["step"] == args.steps - 1:
            prof.start()
        elif rec["step"] == args.steps:
            prof.stop()
            state["tokens"] = rec["tokens"]

    train(cfg, on_step=on_step)
    rows, groups = [], {}
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        us = e.self_cpu_time_total
        total += us
        g = classify(e.key, e.input_shapes, cfg.lora.rank if method == "lora" else -1)
        groups[g] = groups.get(g, 0.0) + us
        rows.append({"op": e.key, "shapes": str(e.input_shapes)[:80], "self_ms": us / 1e3, "calls": e.count,
                     "group": g})
    rows.sort(key=lambda r: -r["self_ms"])
    by_time = sorted(groups.items(), key=lambda x: -x[1])
    queue.put({"method": method, "threads": torch.get_num_threads(), "tokens": state.get("tokens"),
               "total_ms": total / 1e3, "groups_ms": {k: v / 1e3 for k, v in by_time},
               "top": rows[:args.top], "dropout": cfg.lora.dropout})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps; the last one is profiled (default 3)")
    ap.add_argument("--top", type=int, default=15, help="operators listed per method (default 15)")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.steps < 2:
        sys.exit("--steps: at least 2 (one to warm up, the last one profiled)")
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods.split(","):
            q = ctx.Queue()
            p = ctx.Process(target=profile_method, args=(method, args, work, q))
            p.start()
            res = q.get()
            p.join()
            results.append(res)
            print(f"\n== {method} (dropout {res['dropout']}): one optimizer step, {res['tokens']} tokens, "
                  f"{res['total_ms'] / 1e3:.2f} s of operator self time on the main thread "
                  f"({res['threads']} torch threads)")
            for g, ms in res["groups_ms"].items():
                print(f"  {g:28s} {ms / 1e3:7.2f} s  {ms / res['total_ms']:6.1%}")
            print(f"  {'operator':28s} {'self s':>7s} {'calls':>6s}  input shapes")
            for r in res["top"]:
                print(f"  {r['op'][:28]:28s} {r['self_ms'] / 1e3:7.3f} {r['calls']:6d}  {r['shapes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
