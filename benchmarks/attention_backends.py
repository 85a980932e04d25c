"""Attention's forward and backward on training-shaped inputs, per scaled_dot_product_attention backend.

SmolLM2-135M's attention (9 heads of 64; 3 key/value heads, expanded) on a micro-batch of
--batch sequences of --seq tokens: the flash and math kernels of
`torch.nn.functional.scaled_dot_product_attention`, each with a padding mask (as training passes
it) and causal without one, and a plain eager version (matmul, mask, softmax, matmul). Prints
milliseconds per forward + backward, median [min, max] over --repeats interleaved timings
(each the median of --reps calls).

    python benchmarks/attention_backends.py [--batch 8] [--seq 120] [--reps 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=120)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    o = ap.parse_args()
    torch.manual_seed(0)
    shape = (o.batch, o.heads, o.seq, o.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    causal = torch.ones(o.seq, o.seq, dtype=torch.bool).tril()
    mask = causal.expand(o.batch, 1, o.seq, o.seq).clone()
    mask[1::2, :, :, o.seq - o.seq // 10:] = False  # every other sequence ends in padding
    mask |= torch.eye(o.seq, dtype=torch.bool)  # padded rows still see themselves (no all -inf row)

    def sdpa(backend, masked):
        def f():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None, is_causal=not masked)
            out.backward(grad)
        return f

    def eager():
        s = (q @ k.transpose(-1, -2)) / o.head_dim ** 0.5
        (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v).backward(grad)

    arms = {"flash, padding mask": sdpa(SDPBackend.FLASH_ATTENTION, True),
            "flash, causal": sdpa(SDPBackend.FLASH_ATTENTION, False),
            "math, padding mask": sdpa(SDPBackend.MATH, True),
            "math, causal": sdpa(SDPBackend.MATH, False),
            "eager, padding mask": eager}
    times = {n: [] for n in arms}
    for _ in range(o.repeats):
        for n, f in arms.items():
            for _ in range(3):
                f()
            ts = []
            for _ in range(o.reps):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            times[n].append(statistics.median(ts) * 1e3)
    print(f"torch threads {torch.get_num_threads()}; q, k, v {list(shape)}; ms per forward + backward, "
          f"median [min, max] over {o.repeats} interleaved timings of {o.reps} calls")
    first = statistics.median(times["flash, padding mask"])
    for n, t in times.items():
        m = statistics.median(t)
        print(f"  {n:22s} {m:7.2f} [{min(t):.2f}, {max(t):.2f}]   flash with mask / this: {first / m:.2f}")


if __name__ == "__main__":
    main()
