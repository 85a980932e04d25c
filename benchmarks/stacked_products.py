"""Would stacking the frozen weights of q/k/v (and of gate/up) into one matrix speed up LoRA's step?

A LoRA step spends ~70 % of its time in the frozen weights' products: the forward `x W_i^T` and the
input gradient `sum_i g_i W_i` of each projection. q/k/v read the same input, as do gate/up, so each
group could run as one product with the stacked weight `[W_1; ...; W_k]` (forward: one wider output,
split into views; backward: `[g_1 ... g_k] @ [W_1; ...; W_k]`, which needs the output gradients
side by side, a copy unless they already are). This times both ways on SmolLM2-135M's shapes:

- forward: k products `x W_i^T` vs one `x W_cat^T` (its outputs as column views, no copy);
- backward: `g_1 W_1` then `addmm_` of the others (what lorascope.fastlora does) vs `cat(g) @ W_cat`
  (with the copy) and vs `g_cat @ W_cat` (as if the gradients were already side by side).

Prints milliseconds, median [min, max] over --repeats timings (each the median of --reps calls),
interleaved, and the separate / stacked ratio per timing (above 1: stacking is faster).

    python benchmarks/stacked_products.py [--tokens 904] [--reps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(f, reps: int) -> float:
    for _ in range(3):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _fmt(xs: list[float], digits: int = 2) -> str:
    return f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}, {max(xs):.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=904, help="rows of the activation (tokens of a micro-batch)")
    ap.add_argument("--hidden", type=int, default=576, help="input width (SmolLM2-135M: 576)")
    ap.add_argument("--reps", type=int, default=30, help="calls per timing (its median is kept)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per variant")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, tokens {a.tokens}, input width {a.hidden}; milliseconds, "
          f"median [min, max] over {a.repeats} timings of {a.reps} calls")
    groups = {"q/k/v": [a.hidden, 192, 192], "gate/up": [1536, 1536]}  # SmolLM2-135M: 3 KV heads of 64
    for name, outs in groups.items():
        _time_group(name, outs, a)


def _time_group(name: str, outs: list[int], a: argparse.Namespace) -> None:
    ws = [torch.randn(o, a.hidden) for o in outs]
    w_cat = torch.cat(ws)
    x = torch.randn(a.tokens, a.hidden)
    gs = [torch.randn(a.tokens, o) for o in outs]
    g_cat = torch.cat(gs, 1)

    def fwd_sep():
        return [torch.nn.functional.linear(x, w) for w in ws]

    def fwd_cat():
        return torch.nn.functional.linear(x, w_cat).split(outs, 1)

    def bwd_sep():
        gx = gs[0] @ ws[0]
        for g, w in zip(gs[1:], ws[1:]):
            gx.addmm_(g, w)
        return gx

    def bwd_cat():
        return torch.cat(gs, 1) @ w_cat

    def bwd_cat_nocopy():
        return g_cat @ w_cat

    # check that the variants compute the same thing before timing them
    assert all(torch.allclose(s, c, rtol=1e-4, atol=1e-3) for s, c in zip(fwd_sep(), fwd_cat()))
    assert torch.allclose(bwd_sep(), bwd_cat(), rtol=1e-4, atol=1e-2)
    variants = {"fwd_sep": fwd_sep, "fwd_cat": fwd_cat, "bwd_sep": bwd_sep, "bwd_cat": bwd_cat,
                "bwd_cat_nocopy": bwd_cat_nocopy}
    t: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):  # interleaved, so drifts of the machine fall on every variant
        for k, f in variants.items():
            t[k].append(_median_ms(f, a.reps))
    r_f = [s / c for s, c in zip(t["fwd_sep"], t["fwd_cat"])]
    r_b = [s / c for s, c in zip(t["bwd_sep"], t["bwd_cat"])]
    r_n = [s / c for s, c in zip(t["bwd_sep"], t["bwd_cat_nocopy"])]
    print(f"{name:8s} outputs {outs}")
    print(f"  forward   separate {_fmt(t['fwd_sep'])}  stacked {_fmt(t['fwd_cat'])}  ratio {_fmt(r_f)}")
    print(f"  backward  separate {_fmt(t['bwd_sep'])}  stacked {_fmt(t['bwd_cat'])}  ratio {_fmt(r_b)}")
    print(f"  backward, gradients already side by side: stacked {_fmt(t['bwd_cat_nocopy'])}  ratio {_fmt(r_n)}")

if __name__ == "__main__":
    main()
