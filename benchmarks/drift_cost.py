"""Cost of the drift stage: measurement overhead, memory against examples, and an in-memory baseline.

Every arm runs in a fresh subprocess (so its peak RSS is its own) on the same prompts,
batches and models (the base and two tuned checkpoints, loaded at once):

1. forward   -- the forward passes alone: same batches, hooks installed but capturing nothing.
2. drift N   -- `run_drift` on N prompts (the default: co-moment products in float64): time of
                the measurement (forward passes, streaming accumulation and the final
                jackknife; not loading or writing), and peak RSS.
3. drift N, float32 products -- the same with `float32_products=True` (each batch's centred
                products formed in float32, merged in float64): time, and the largest
                difference from arm 2's token-level CKA.
4. drift n   -- arm 2 on n = N/4 prompts: peak RSS (streaming: should be within 5 % of arm 2).
5. baseline  -- stores every token's states of every layer and model, then `linear_cka` per layer
                and pair: its time and peak RSS, and the largest difference from the streaming
                token-level CKA of arm 4 on the same prompts.

Targets: drift time / forward time <= 1.25; peak RSS of N vs n prompts within 5 %.
Drift measures the examples' content tokens by default (`--tokens all` for every token); the
forward arm runs the same batches. The base model's Gram-energy diagnostics (an extra forward
pass of the base over `--diagnostic-examples` prompts) are timed separately and reported both
ways. `--repeats R` repeats the forward and drift arms interleaved and reports the spread.

    python benchmarks/drift_cost.py [--model smollm2-135m] [--examples 1000] [--small 250]
        [--baseline-examples 250] [--task mrpc] [--data-dir DIR] [--batch-size 8]
        [--tuned NAME=CHECKPOINT ...] [--skip-float32] [--output results.json]

Without --tuned, two synthetic checkpoints are made once in --workdir: "full" (every weight
plus 1 % of its tensor's standard deviation in Gaussian noise) and "lora" (a PEFT rank-8
adapter on all seven projections with random B). Smoke test on a tiny model:
`python benchmarks/drift_cost.py --model <tiny model dir> --examples 20`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="mrpc")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--small", type=int, help="the smaller prompt count for the memory comparison (default N/4)")
    p.add_argument("--baseline-examples", type=int, help="prompts for the in-memory baseline (default: --small); "
                                                         "it stores every token state, ~32 GB for 1000 MRPC "
                                                         "prompts and 3 SmolLM2 models")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=os.environ.get("LORASCOPE_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--tuned", action="append", default=[], metavar="NAME=CHECKPOINT")
    p.add_argument("--float32-products", action="store_true", help=argparse.SUPPRESS)  # per arm
    p.add_argument("--skip-float32", action="store_true", help="leave out arm 3")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lorascope-drift-cost"))
    p.add_argument("--tokens", choices=["content", "all"], default="content", help="tokens drift measures")
    p.add_argument("--diagnostic-examples", type=int, default=128,
                   help="prompts of the Gram-energy diagnostics in the drift arms (timed separately)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the forward and drift arms on N prompts this many times, interleaved; the ratio "
                        "is the median over repeats of drift / forward of the same repeat, with its range")
    p.add_argument("--output", help="also write the results as JSON here")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)))
        return

    small = args.small or max(5, args.examples // 4)
    n_base = args.baseline_examples or small
    tuned = args.tuned or synthetic_checkpoints(args.model, Path(args.workdir))
    common = ["--model", args.model, "--task", args.task, "--batch-size", str(args.batch_size),
              "--data-dir", args.data_dir, "--workdir", args.workdir, "--tokens", args.tokens,
              "--diagnostic-examples", str(args.diagnostic_examples),
              *[x for t in tuned for x in ("--tuned", t)]]
    res = {"model": args.model, "task": args.task, "tuned": tuned, "batch_size": args.batch_size,
           "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    N = args.examples
    arms = [("forward", N, []), ("drift", N, []), ("drift_f32", N, ["--float32-products"]), ("drift", small, []),
            ("baseline", n_base, [])]
    for arm, n, extra in arms:
        if arm == "drift_f32" and args.skip_float32:
            continue
        print(f"-- {arm} on {n} prompts ...", file=sys.stderr, flush=True)
        res[f"{arm}_{n}"] = subprocess_arm("drift" if arm == "drift_f32" else arm, n, common + extra)
    pairs = [(res[f"forward_{N}"], res[f"drift_{N}"])]
    for k in range(1, args.repeats):  # interleaved repeats: forward, drift, forward, drift, ...
        print(f"-- repeat {k + 1}: forward and drift on {N} prompts ...", file=sys.stderr, flush=True)
        pairs.append((subprocess_arm("forward", N, common), subprocess_arm("drift", N, common)))
    ratios = sorted(d["seconds"] / f["seconds"] for f, d in pairs)
    ratios_diag = sorted(d["seconds_with_diagnostics"] / f["seconds"] for f, d in pairs)
    res["repeats"] = [{"forward_s": f["seconds"], "drift_s": d["seconds"], "diagnostics_s": d["diagnostics_s"]}
                      for f, d in pairs]
    fwd, big, little, base = res[f"forward_{N}"], res[f"drift_{N}"], res[f"drift_{small}"], res[f"baseline_{n_base}"]
    res["summary"] = {
        "tokens": args.tokens, "selection": big["selection"],
        "ratio_median": float(np.median(ratios)), "ratio_min": ratios[0], "ratio_max": ratios[-1],
        "ratio_with_diagnostics_median": float(np.median(ratios_diag)), "repeats": len(pairs),
        "forward_s": fwd["seconds"], "drift_s": big["seconds"], "ratio": big["seconds"] / fwd["seconds"],
        "ratio_target": 1.25, f"peak_rss_mb_{N}": big["peak_rss_mb"], f"peak_rss_mb_{small}": little["peak_rss_mb"],
        "rss_growth": big["peak_rss_mb"] / little["peak_rss_mb"] - 1, "rss_growth_target": 0.05,
        f"baseline_s_{n_base}": base["seconds"], f"baseline_peak_rss_mb_{n_base}": base["peak_rss_mb"],
    }
    f32 = res.get(f"drift_f32_{N}")
    if f32:
        res["summary"].update(float32_products_s=f32["seconds"], float32_products_ratio=f32["seconds"] / fwd["seconds"],
                              float32_vs_float64_max_abs_cka_diff=max(
                                  abs(a - b) for a, b in zip(f32["token_cka"], big["token_cka"])))
    if n_base == small:
        diffs = [abs(a - b) for a, b in zip(base["token_cka"], little["token_cka"])]
        res["summary"]["baseline_vs_streaming_max_abs_diff"] = max(diffs)
        res["summary"][f"streaming_s_{small}"] = little["seconds"]
    s = res["summary"]
    print(f"\n{args.model}, {args.task}, batch {args.batch_size}, 3 models (base + {', '.join(tuned)})")
    print(f"forward passes alone, {N} prompts:  {s['forward_s']:9.2f} s")
    print(f"drift measurement,   {N} prompts:  {s['drift_s']:9.2f} s   ratio {s['ratio']:.3f} (target <= 1.25)")
    print(f"ratio over {len(pairs)} interleaved repeat(s): median {s['ratio_median']:.3f}, range "
          f"{s['ratio_min']:.3f}-{s['ratio_max']:.3f}; with the diagnostics pass ({args.diagnostic_examples} "
          f"prompts, base model only) {s['ratio_with_diagnostics_median']:.3f}")
    print(f"tokens measured ({args.tokens}): {big['selection']['kept_by_kind']}, left out "
          f"{big['selection']['dropped_by_kind']}")
    if f32:
        print(f"  with float32 products:           {s['float32_products_s']:9.2f} s   ratio "
              f"{s['float32_products_ratio']:.3f}, max |CKA diff| from float64 "
              f"{s['float32_vs_float64_max_abs_cka_diff']:.2e}")
    print(f"peak RSS, drift on {N} prompts:    {big['peak_rss_mb']:9.0f} MiB")
    print(f"peak RSS, drift on {small} prompts:    {little['peak_rss_mb']:9.0f} MiB   growth "
          f"{100 * s['rss_growth']:+.1f}% (target within 5%)")
    print(f"in-memory baseline, {n_base} prompts: {base['seconds']:9.1f} s, peak RSS {base['peak_rss_mb']:.0f} MiB"
          + (f", streaming on the same prompts {little['seconds']:.1f} s, max |CKA diff| "
             f"{s['baseline_vs_streaming_max_abs_diff']:.2e}" if n_base == small else ""))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")


def subprocess_arm(arm: str, n: int, common: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--arm", arm, "--n", str(n), *common], capture_output=True,
                       text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.exit(f"arm {arm} ({n} prompts) failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB (keys say "mb")


def run_arm(args) -> dict:
    if args.arm == "drift":
        from lorascope.drift import run_drift

        out = Path(args.workdir) / f"drift-{args.n}"
        r = run_drift(args.task, args.model, args.tuned, out, max_examples=args.n, batch_size=args.batch_size,
                      data_dir=args.data_dir, float32_products=args.float32_products, plots=False,
                      tokens=args.tokens, diagnostic_examples=args.diagnostic_examples)
        t = r["timing"]
        return {"seconds": t["measure_and_finalise_s"], "loop_s": t["measure_s"],
                "diagnostics_s": t["diagnostics_s"], "seconds_with_diagnostics": t["measure_and_finalise_s"]
                + t["diagnostics_s"], "selection": r["selection"],
                "peak_rss_mb": peak_rss_mb(), "n_tokens": r["n_tokens"],
                "token_cka": [row["token_cka"]["value"] for pair in r["pairs"].values() for row in pair["layers"]]}
    return forward_or_baseline(args, store=args.arm == "baseline")


def forward_or_baseline(args, *, store: bool) -> dict:
    """The drift stage's setup and batches; the forward passes alone, or storing every state (baseline)."""
    import numpy as np
    import torch

    from lorascope.config import DataConfig
    from lorascope.drift.capture import LayerCapture, assign_groups, collate, forward_lockstep, make_batches
    from lorascope.drift.measure import drift_examples, load_models, parse_tuned, select_tokens
    from lorascope.similarity import linear_cka

    examples, _ = drift_examples(args.task, DataConfig(dir=args.data_dir), args.n)
    names, models, tok, _, _ = load_models(args.model, parse_tuned(args.tuned), torch.device("cpu"))
    sel = select_tokens(tok, examples, tokens=args.tokens, model=args.model)
    ids = [sel["ids"][i] for i in sel["kept"]]
    select = [sel["select"][i] for i in sel["kept"]]
    batches = make_batches([len(t) for t in ids], assign_groups(len(ids), 5, "lorascope-drift-0"), args.batch_size)
    caps = [LayerCapture(m, enabled=store) for m in models]
    kept = [[[] for _ in range(caps[0].n_states)] for _ in models]
    t0 = time.time()
    with contextlib.ExitStack() as hooks:
        for c in caps:
            hooks.enter_context(c)
        for b in batches:
            batch = collate([ids[i] for i in b.examples], tok.pad_token_id, select=[select[i] for i in b.examples],
                            device=torch.device("cpu"))
            states = forward_lockstep(models, caps, batch)
            if store:
                for m, per in enumerate(states):
                    for layer, h in enumerate(per):
                        kept[m][layer].append(h.numpy())
    out = {"n_tokens": sum(sum(s) for s in select)}
    if store:
        cka = []
        for a in range(len(models)):
            for b in range(a + 1, len(models)):
                for layer in range(caps[0].n_states):
                    cka.append(linear_cka(np.concatenate(kept[a][layer]), np.concatenate(kept[b][layer])))
        out["token_cka"] = cka
    out.update(seconds=time.time() - t0, peak_rss_mb=peak_rss_mb())
    return out


def synthetic_checkpoints(model_name: str, workdir: Path) -> list[str]:
    """A noisy full copy and a random LoRA adapter of the base model, made once."""
    import hashlib

    import torch
    from peft import LoraConfig, get_peft_model

    from lorascope.config import ALL_PROJECTIONS
    from lorascope.models import load_model, load_tokenizer, resolve_model
    from lorascope.runinfo import write_json

    where = workdir / hashlib.sha256(str(model_name).encode()).hexdigest()[:12]  # one pair per base model
    full, lora = where / "full", where / "lora"
    if not (full / "done").is_file() or not (lora / "done").is_file():
        path = resolve_model(model_name)
        g = torch.Generator().manual_seed(0)
        model = load_model(path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
        model.save_pretrained(full, safe_serialization=True)
        load_tokenizer(path).save_pretrained(full)
        (full / "done").touch()
        model = get_peft_model(load_model(path), LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_PROJECTIONS)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(lora)
        write_json(lora / "lorascope-model.json", {"base_model": model_name, "method": "lora"})
        (lora / "done").touch()
    return [f"full={full}", f"lora={lora}"]


if __name__ == "__main__":
    main()
