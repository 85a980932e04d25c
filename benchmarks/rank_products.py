"""The LoRA adapter's rank-r products in both orientations BLAS can be handed them.

For a tall gradient g (tokens x d) and a thin B (d x r), `g @ B` and `(B^T @ g^T)^T` are the same
product, as are B's gradient `g^T @ xa` and `(xa^T @ g)^T`; BLAS sees "a long matrix times r
columns" one way and "r rows times a long matrix" the other. lorascope.fastlora uses the second.
Prints, per product and output width d, the median time of --reps calls, repeated --repeats times
(median [min, max] over the repeats), and the ratio. SmolLM2-135M's shapes by default.

    python benchmarks/rank_products.py [--tokens 904] [--rank 8] [--reps 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_us(f, reps: int) -> float:
    for _ in range(5):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=904, help="rows of the activation (tokens of a micro-batch)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--widths", default="576,1536", help="output widths d (SmolLM2-135M: 576 and 1536)")
    ap.add_argument("--reps", type=int, default=200, help="calls per timing (its median is kept)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per product and orientation")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, tokens {a.tokens}, rank {a.rank}; "
          f"microseconds, median [min, max] over {a.repeats} timings of {a.reps} calls")
    for d in (int(x) for x in a.widths.split(",")):
        g, xa, b = torch.randn(a.tokens, d), torch.randn(a.tokens, a.rank), torch.randn(d, a.rank)
        pairs = {"g @ B (gradient at the rank-r activation)": (lambda g=g, b=b: g @ b,
                                                               lambda g=g, b=b: (b.t() @ g.t()).t()),
                 "g^T @ xa (B's gradient)": (lambda g=g, xa=xa: g.t() @ xa, lambda g=g, xa=xa: (xa.t() @ g).t())}
        for name, (tall, wide) in pairs.items():
            slow, fast = [], []
            for _ in range(a.repeats):  # interleaved, so drifts of the machine fall on both
                slow.append(_median_us(tall, a.reps))
                fast.append(_median_us(wide, a.reps))
            ratio = [s / f for s, f in zip(slow, fast)]
            print(f"d={d:5d} {name:42s} as written {statistics.median(slow):7.0f} [{min(slow):.0f}, {max(slow):.0f}]"
                  f"   transposed {statistics.median(fast):7.0f} [{min(fast):.0f}, {max(fast):.0f}]"
                  f"   ratio {statistics.median(ratio):.2f} [{min(ratio):.2f}, {max(ratio):.2f}]")


if __name__ == "__main__":
    main()
