"""What the padding mask costs a training step: forward + backward with it vs causal attention alone.

Training right-pads each micro-batch and its loss reads real positions only, so the padding
mask could be dropped: causal attention already keeps every real token from the padding after
it, and attention could run its causal kernel instead of the masked one. This times one forward
and backward of `lorascope.train.AnswerLoss` (which passes the mask) and of the same loss without
the mask, on the same real MRPC micro-batches (8 examples each, as training batches them), for
full fine-tuning and LoRA (lorascope's fast path), in interleaved rounds. Printed: the time per
micro-batch as median [min, max] over the rounds, the ratio within each round (above 1: the mask
costs time) and the largest difference in the loss between the two ways.

    python benchmarks/padding_mask.py [--rounds 7] [--micro-batches 6] [--methods full,lora]
"""

from __future__ import annotations

import argparse
import statistics
import time


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--micro-batches", type=int, default=6, help="micro-batches of 8 MRPC training pairs per round")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from accelerate import Accelerator

    from lorascope.config import load_config
    from lorascope.tasks import get_task
    from lorascope.train import AnswerLoss, _load_for_training, batch_plan, collate

    torch.set_num_threads(args.threads)

    class CausalOnly(AnswerLoss):
        """AnswerLoss without the padding mask (right padding only: it checks)."""

        def forward(self, input_ids, attention_mask, labels):
            right = bool(attention_mask[:, 0].all()) and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
            assert right, "this arm is only valid for right padding"
            return super().forward(input_ids, None, labels)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
    for method in args.methods.split(","):
        cfg = load_config(None, ["train.task=mrpc", "data.max_seq_len=256", "lora.dropout=0.0"],
                          **{"train.method": method, "model.name": args.model})
        _, tok, model = _load_for_training(cfg, Accelerator(cpu=True))
        model.train()
        examples = get_task("mrpc").examples("train", cfg.data, limit=8 * args.micro_batches * 4)
        feats = get_task("mrpc").features(tok, examples, cfg.data.max_seq_len)
        # batches as training forms them (grouped by length), cut into micro-batches of 8
        plan = batch_plan([len(f.input_ids) for f in feats], 8, 1, 0)[:args.micro_batches]
        batches = [collate([feats[i] for i in b], tok.pad_token_id, "cpu") for b in plan]
        padded = sum(ids.numel() for ids, _, _ in batches)
        real = sum(int(m.sum()) for _, m, _ in batches)
        arms = {"with mask": AnswerLoss(model), "causal only": CausalOnly(model)}
        times: dict[str, list[float]] = {k: [] for k in arms}
        losses: dict[str, list[float]] = {k: [] for k in arms}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, arm in (arms.items() if r % 2 else reversed(arms.items())):
                t0 = time.perf_counter()
                total = []
                for ids, mask, labels in batches:
                    loss = arm(ids, mask, labels)
                    loss.backward()
                    total.append(loss.item())
                dt = (time.perf_counter() - t0) / len(batches)
                model.zero_grad(set_to_none=True)
                if r:
                    times[name].append(dt)
                    losses[name] = total
        ratios = [a / b for a, b in zip(times["with mask"], times["causal only"])]
        diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["with mask"], losses["causal only"]))
        print(f"\n{method}: {len(batches)} micro-batches of 8, {real} real tokens of {padded} "
              f"({args.rounds} rounds, s per micro-batch forward + backward, median [min, max])")
        for name in arms:
            print(f"  {name:12s} {_spread(times[name])}")
        print(f"  with mask / causal only within a round: {_spread(ratios)}")
        print(f"  largest relative difference in a micro-batch's loss: {diff:.2e}")
        del model, arms


if __name__ == "__main__":
    main()
