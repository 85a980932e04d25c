"""torch.compile on a training step: does it speed LoRA up more than full fine-tuning? (It is not in lorascope.)

SmolLM2-135M-Instruct (de-quantised from Q4_1; its weights, so its shapes), one optimizer step of
--micro-batches micro-batches of 8 sequences (random token ids, lengths cycling over MRPC-like
113, 120, 117, 109 tokens, loss on the last 2 positions as lorascope's `AnswerLoss` computes it:
vocabulary logits at answer positions only), fused AdamW, as `lorascope.train` builds them.
Arms, set up once each, then timed in turns (a rotating order), --rounds rounds after 3 warm-up
steps that also see every length (so compilation is done before timing):

- full, eager (lorascope today) and full, compiled: every decoder layer `layer.compile(dynamic=True)`
  (regional compilation: one compiled layer reused by all 30);
- LoRA r=8 on all 7 projections, eager, lorascope's fast path (`use_fast_lora`, grouped q/k/v and
  gate/up: lorascope today);
- LoRA compiled, single-projection fast path: the same `LoraLinearFn` reached through a subclass
  of PEFT's Linear, so that every layer runs the same code and one compiled layer serves all
  (the grouped path keeps per-module Python state that dynamo guards per layer: it recompiles
  past its cache limit);
- LoRA compiled, PEFT's own layers.

Prints each arm's step time, median [min, max] over the rounds, and within-round ratios, median
[min, max]: compiled over eager per method, and LoRA over full (tokens/s) for the eager pair and for
the compiled pair.

    python benchmarks/compile_step.py [--rounds 6] [--micro-batches 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

LENGTHS = (113, 120, 117, 109)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _class_swapped_fast_lora(model) -> None:
    from peft.tuners.lora.layer import Linear as PeftLinear

    from lorascope.fastlora import LoraLinearFn, _plain_lora

    class FastLinear(PeftLinear):
        def forward(self, x, *args, **kwargs):
            state = None if args or kwargs else _plain_lora(self)
            if state is None:
                return PeftLinear.forward(self, x, *args, **kwargs)
            name, p = state
            base = self.get_base_layer()
            return LoraLinearFn.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                      self.lora_B[name].weight, float(self.scaling[name]), p)

    for m in model.modules():
        if type(m) is PeftLinear:
            m.__class__ = FastLinear


def make_arm(path: str, method: str, compiled: bool, lora_path: str, micro_batches: int):
    from peft import LoraConfig, get_peft_model

    from lorascope.fastlora import use_fast_lora
    from lorascope.models import load_model
    from lorascope.train import AnswerLoss, build_optimizer

    torch.manual_seed(0)
    model = load_model(path)
    base = model
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        if lora_path == "grouped":
            use_fast_lora(model)
        elif lora_path == "single":
            _class_swapped_fast_lora(model)
    model.train()
    if compiled:
        for layer in base.model.layers:
            layer.compile(dynamic=True)
    loss_fn = AnswerLoss(model)

    class Args:
        peak_lr, weight_decay = 1e-4, 0.0

    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], Args)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def step(i: int) -> int:
        tokens = 0
        for j in range(micro_batches):
            n = LENGTHS[(micro_batches * i + j) % len(LENGTHS)]
            ids = torch.randint(0, vocab, (8, n), generator=gen)
            labels = torch.full_like(ids, -100)
            labels[:, -2:] = ids[:, -2:]
            loss_fn(ids, torch.ones_like(ids), labels).backward()
            tokens += ids.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens

    return step


def _spread(xs):
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--micro-batches", type=int, default=2)
    o = ap.parse_args()
    from lorascope.models import resolve_model

    path = resolve_model(o.model)
    arms = {"full, eager": ("full", False, ""), "full, compiled": ("full", True, ""),
            "lora, eager, fast path (grouped)": ("lora", False, "grouped"),
            "lora, compiled, fast path (single)": ("lora", True, "single"),
            "lora, compiled, PEFT layers": ("lora", True, "peft")}
    steps = {}
    for name, (method, compiled, lora_path) in arms.items():
        t = time.perf_counter()
        steps[name] = make_arm(path, method, compiled, lora_path, o.micro_batches)
        for i in range(3):
            steps[name](i)
        print(f"{name}: set-up and 3 warm-up steps {time.perf_counter() - t:.1f} s", flush=True)
    times = {n: [] for n in arms}
    names = list(arms)
    for r in range(o.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            steps[n](r)
            times[n].append(time.perf_counter() - t)
    print(f"\ntorch threads {torch.get_num_threads()}; seconds per optimizer step, "
          f"median [min, max] over {o.rounds} rounds")
    for n, t in times.items():
        print(f"  {n:36s} {_spread(t)}")

    def ratio(a, b):  # time of b over time of a, within each round: tokens/s of a over b
        return [y / x for x, y in zip(times[a], times[b])]

    print("\nwithin-round ratios of tokens/s, median [min, max]:")
    print(f"  full: compiled / eager                               {_spread(ratio('full, compiled', 'full, eager'))}")
    for n in ("lora, compiled, fast path (single)", "lora, compiled, PEFT layers"):
        print(f"  lora: {n[6:]} / eager fast path  {_spread(ratio(n, 'lora, eager, fast path (grouped)'))}")
    print(f"  lora / full, both eager                              "
          f"{_spread(ratio('lora, eager, fast path (grouped)', 'full, eager'))}")
    for n in ("lora, compiled, fast path (single)", "lora, compiled, PEFT layers"):
        print(f"  lora / full, both compiled ({n[16:]:18s})     {_spread(ratio(n, 'full, compiled'))}")


if __name__ == "__main__":
    main()
