"""Two ways to cut the adapter's passes over the activations, timed against lorascope's fast path.

lorascope.fastlora computes a LoRA projection as `y = x W^T` then `y += s (x A^T) B^T` (`addmm_`),
and its input gradient as `g W` then `+= (g B) A`. Each rank-r update is a pass over a
tokens x d tensor. Two alternatives, per SmolLM2-135M projection shape (`x` of --tokens rows):

- order: the small product first, then the big one accumulating into it (`addmm_` with beta 1),
  so that BLAS reads the output once inside the big product instead of a separate pass;
- fold: the rank-r products carried inside the big ones by weights concatenated once
  (`[W; A]` for the forward, giving `x W^T` and `x A^T` in one product; `[W | B]` for the input
  gradient, giving `g W` and `g B`), so x and g are read once. (The concatenation would have to
  be kept in step with A and B after every optimizer step, and costs a second copy of W.)

Prints microseconds per call, median [min, max] over --repeats interleaved timings (each the
median of --reps calls), per shape and per training step (each shape's count per layer x layers x
micro-batches), and the ratio of each alternative to the fast path's order (above 1: faster).

    python benchmarks/adapter_passes.py [--tokens 904] [--rank 8] [--layers 30] [--micro-batches 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# SmolLM2-135M: (d_in, d_out, projections of this shape per decoder layer)
SHAPES = ((576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1))


def _median_us(f, reps: int) -> float:
    for _ in range(3):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def arms(x, w, a, b, g, s: float = 2.0):
    d_in, d_out = w.shape[1], w.shape[0]
    wa = torch.cat([w, a]).contiguous()
    wb = torch.cat([w, b], 1).contiguous()

    def fwd_fast():
        y = torch.nn.functional.linear(x, w)
        y.addmm_(x @ a.t(), b.t(), alpha=s)
        return y

    def fwd_order():
        y = torch.mm(x @ a.t(), b.t() * s)
        y.addmm_(x, w.t())
        return y

    def fwd_fold():
        o = torch.nn.functional.linear(x, wa)
        y = o[:, :d_out]
        y.addmm_(o[:, d_out:], b.t(), alpha=s)
        return y

    def bwd_fast():
        gxa = (b.t() @ g.t()).t() * s
        gx = g @ w
        gx.addmm_(gxa, a)
        return gx

    def bwd_order():
        gxa = (b.t() @ g.t()).t() * s
        gx = gxa @ a
        gx.addmm_(g, w)
        return gx

    def bwd_fold():
        o = g @ wb
        gx = o[:, :d_in]
        gx.addmm_(o[:, d_in:] * s, a)
        return gx

    return {"forward": (fwd_fast, fwd_order, fwd_fold), "input gradient": (bwd_fast, bwd_order, bwd_fold)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=904)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    o = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, tokens {o.tokens}, rank {o.rank}; microseconds per call, "
          f"median [min, max] over {o.repeats} interleaved timings of {o.reps} calls")
    per_step = {(p, v): 0.0 for p in ("forward", "input gradient") for v in range(3)}
    names = ("fast path", "order", "fold")
    for d_in, d_out, count in SHAPES:
        x, g = torch.randn(o.tokens, d_in), torch.randn(o.tokens, d_out)
        w, a, b = torch.randn(d_out, d_in), torch.randn(o.rank, d_in) / 10, torch.randn(d_out, o.rank) / 10
        for part, fs in arms(x, w, a, b, g).items():
            ref = fs[0]()
            for f in fs[1:]:  # the same maths, to float rounding
                torch.testing.assert_close(f(), ref, rtol=1e-4, atol=1e-3)
            times = [[] for _ in fs]
            for _ in range(o.repeats):
                for i, f in enumerate(fs):
                    times[i].append(_median_us(f, o.reps))
            meds = [statistics.median(t) for t in times]
            for i, m in enumerate(meds):
                per_step[(part, i)] += m * count * o.layers * o.micro_batches
            cells = "   ".join(f"{n} {statistics.median(t):7.0f} [{min(t):.0f}, {max(t):.0f}]"
                               for n, t in zip(names, times))
            print(f"{d_in:4d} -> {d_out:4d} x{count} {part:15s} {cells}")
    print(f"\nper training step ({o.layers} layers x {o.micro_batches} micro-batches), seconds; "
          "ratio fast path / alternative:")
    for part in ("forward", "input gradient"):
        base = per_step[(part, 0)]
        print(f"  {part:15s} " + "   ".join(
            f"{n} {per_step[(part, i)] / 1e6:.3f}" + ("" if i == 0 else f" ({base / per_step[(part, i)]:.3f})")
            for i, n in enumerate(names)))


if __name__ == "__main__":
    main()
