"""The proposal's authors' drift measure beside lorascope's, on the same models and prompts.

The authors' implementation of this study (github.com/benc61116/NLP, read at commit eef92c5,
docs/prior-study.md) measures a model's drift at each decoder layer as 1 - "CKA" between the base
and the fine-tuned model, where

- each example's hidden states are mean-pooled over *every* position of a batch padded to the longest
  example of the whole set, without the attention mask (scripts/phase4/analyze_drift.py:173-178;
  shared/data_preparation.py:154-160 pads the whole split at once), so padding, the first position
  and the prompt format are all in the average;
- "CKA" is ||Xc^T Yc||_F^2 / (||Xc||_F^2 ||Yc||_F^2) on those pooled vectors
  (shared/metrics.py:791-814), not linear CKA (whose denominator is ||Xc^T Xc||_F ||Yc^T Yc||_F):
  a representation compared with itself scores sum(s^4) / (sum(s^2))^2 over its singular values, not 1;
- drift is averaged over the decoder layers and "% less drift" is (full - LoRA) / full.

This script computes, for the base model and each tuned model on the same held-out prompts (lorascope's
chat-template prompts, right-padded to the longest prompt, as the SmolLM2 tokenizer pads), the mean over
decoder layers of:

  A  the authors' measure: unmasked mean over all padded positions, their formula;
  B  the same pooling, linear CKA (what the formula alone changes);
  C  mean over the real tokens (attention mask), linear CKA (what the padding changes);
  D  mean over the content tokens (no first position, no chat-template token), linear CKA: lorascope's
     example-level measure (what the first position and the template change);

with a 95 % delete-a-group jackknife interval over prompts (as lorascope's drift stage: a bootstrap
that repeats rows biases CKA upwards when prompts are fewer than hidden dimensions) for each drift, for
LoRA / full and for "% less drift", and measure A of the base model against itself (its floor; 0 for
a similarity that is 1 on equal inputs).
lorascope's primary measure (content-token CKA over tokens, not examples) is the drift stage's.

    python benchmarks/authors_drift_measure.py --tuned full=RUN/train/mrpc/full_s0/model \\
        --tuned lora=RUN/train/mrpc/lora_r8_s0/model --json out.json

One model pair per run, so the intervals cover the prompts, not the training seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

EXAMPLE_GROUPS = 100  # as lorascope.drift.measure (one prompt per group when there are fewer)
POOLINGS = ("all_positions", "real_tokens", "content_tokens")
MEASURES = {  # name: (pooling, formula, what it is)
    "A": ("all_positions", "authors", "the authors' measure: unmasked mean over padded positions, their formula"),
    "B": ("all_positions", "linear_cka", "the same pooling, linear CKA"),
    "C": ("real_tokens", "linear_cka", "mean over real tokens (attention mask), linear CKA"),
    "D": ("content_tokens", "linear_cka", "mean over content tokens, linear CKA (lorascope's example-level)"),
}


def authors_cka(x: np.ndarray, y: np.ndarray) -> float:
    """shared/metrics.py:791-814 of benc61116/NLP at eef92c5, transcribed (float64)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    yc = y - y.mean(axis=0, keepdims=True)
    numerator = np.trace(yc.T @ xc @ xc.T @ yc)
    den = np.sqrt(np.trace(xc.T @ xc) * np.trace(yc.T @ yc))
    return 0.0 if den == 0 else float(numerator / den ** 2)


def centre(k: np.ndarray) -> np.ndarray:
    """H K H for H = I - 11^T/n."""
    return k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()


def similarity_from_grams(kx: np.ndarray, ky: np.ndarray, formula: str) -> float:
    """Both similarities from the uncentred Gram matrices X X^T and Y Y^T of the same rows.

    With centred Grams Kc and Lc: ||Xc^T Yc||_F^2 = <Kc, Lc>, ||Xc||_F^2 = tr Kc, ||Xc^T Xc||_F = ||Kc||_F.
    """
    kc, lc = centre(kx), centre(ky)
    num = float(np.vdot(kc, lc))
    if formula == "authors":
        den = float(np.trace(kc)) * float(np.trace(lc))
    else:
        den = float(np.linalg.norm(kc) * np.linalg.norm(lc))
    return num / den if den > 0 else float("nan")


def pool(states: np.ndarray, mask: np.ndarray, content: np.ndarray) -> dict[str, np.ndarray]:
    """(batch, positions, hidden) states -> one (batch, hidden) vector per pooling."""
    def masked(m: np.ndarray) -> np.ndarray:
        w = m.astype(np.float64)
        return (states * w[:, :, None]).sum(axis=1) / w.sum(axis=1, keepdims=True)

    return {"all_positions": states.mean(axis=1, dtype=np.float64), "real_tokens": masked(mask),
            "content_tokens": masked(content)}


def drifts(grams: dict, idx: np.ndarray, layers: int, names: list[str]) -> dict[str, dict[str, float]]:
    """Mean over layers of 1 - similarity(base, model) for every measure and tuned model, on rows `idx`."""
    sub = np.ix_(idx, idx)
    per_layer: dict[str, dict[str, list[float]]] = {m: {name: [] for name in names} for m in MEASURES}
    for pooling in POOLINGS:
        for layer in range(layers):
            kc = centre(grams["base"][pooling][layer][sub])
            tr_k, norm_k = float(np.trace(kc)), float(np.linalg.norm(kc))
            for name in names:
                lc = centre(grams[name][pooling][layer][sub])
                num = float(np.vdot(kc, lc))
                for m, (p, formula, _) in MEASURES.items():
                    if p != pooling:
                        continue
                    den = tr_k * float(np.trace(lc)) if formula == "authors" else norm_k * float(np.linalg.norm(lc))
                    per_layer[m][name].append(1.0 - (num / den if den > 0 else float("nan")))
    return {m: {name: float(np.mean(v)) for name, v in d.items()} for m, d in per_layer.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--tuned", action="append", required=True, help="full=PATH and lora=PATH")
    ap.add_argument("--examples", type=int, default=408, help="held-out prompts (MRPC: the 408 dev pairs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--groups", type=int, default=EXAMPLE_GROUPS, help="jackknife groups of prompts")
    ap.add_argument("--data-dir", default=None, help="default: $LORASCOPE_DATA_DIR")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from lorascope.config import DataConfig
    from lorascope.drift.capture import assign_groups
    from lorascope.drift.measure import drift_examples, load_models, parse_tuned, select_tokens
    from lorascope.drift.stats import jackknife_interval
    from lorascope.runinfo import provenance, write_json

    tuned = parse_tuned(args.tuned)
    if sorted(tuned) != ["full", "lora"]:
        print(f"--tuned: give exactly full=PATH and lora=PATH, got {', '.join(tuned) or 'none'}", file=sys.stderr)
        return 2
    t0 = time.time()
    data = DataConfig()
    if args.data_dir:
        data.dir = args.data_dir
    examples, splits = drift_examples(args.task, data, args.examples)
    names, models, tok, infos, _ = load_models(args.base, tuned, torch.device("cpu"))
    sel = select_tokens(tok, examples, tokens="content", model=args.base)
    ids, content = sel["ids"], sel["select"]
    width = max(len(i) for i in ids)  # the whole set padded to its longest prompt, as the authors' tokenizer call
    pad = tok.pad_token_id
    n = len(ids)
    layers = len(models[0].get_decoder().layers)
    pooled = {name: {p: [[] for _ in range(layers)] for p in POOLINGS} for name in names}
    for start in range(0, n, args.batch_size):
        chunk = range(start, min(n, start + args.batch_size))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        cont = np.zeros((len(chunk), width), bool)
        for r, j in enumerate(chunk):
            input_ids[r, :len(ids[j])] = torch.tensor(ids[j])
            mask[r, :len(ids[j])] = 1
            cont[r, :len(ids[j])] = content[j]
        for name, model in zip(names, models):
            states: list = [None] * layers

            def hook(i, states=states):
                def f(module, inputs, output):
                    states[i] = (output[0] if isinstance(output, tuple) else output).float().numpy()
                return f

            handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.get_decoder().layers)]
            try:
                with torch.inference_mode():
                    model.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            for i, s in enumerate(states):
                for p, v in pool(s, mask.numpy().astype(bool), cont).items():
                    pooled[name][p][i].append(v)
        print(f"\r{min(n, start + args.batch_size)}/{n} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t_forward = time.time() - t0
    grams = {name: {p: [(lambda x: x @ x.T)(np.concatenate(pooled[name][p][i])) for i in range(layers)]
                    for p in POOLINGS} for name in names}
    del pooled
    everything = np.arange(n)
    point = drifts(grams, everything, layers, ["full", "lora"])
    floor = float(np.mean([1.0 - similarity_from_grams(grams["base"]["all_positions"][i],
                                                       grams["base"]["all_positions"][i], "authors")
                           for i in range(layers)]))
    group_of = np.array(assign_groups(n, min(args.groups, n), "lorascope-authors-measure"))
    loo = [drifts(grams, np.flatnonzero(group_of != g), layers, ["full", "lora"]) for g in range(group_of.max() + 1)]

    def row(m: str) -> dict:
        def ci(value: float, of) -> list[float]:
            j = jackknife_interval(value, [of(x[m]["full"], x[m]["lora"]) for x in loo])
            return [j["ci_low"], j["ci_high"]]

        pooling, formula, what = MEASURES[m]
        f, lo = point[m]["full"], point[m]["lora"]

        def less(full: float, lora: float) -> float:
            return 100 * (full - lora) / full

        return {"what": what, "pooling": pooling, "formula": formula,
                "full": f, "full_ci": ci(f, lambda full, lora: full),
                "lora": lo, "lora_ci": ci(lo, lambda full, lora: lora),
                "lora_over_full": lo / f, "lora_over_full_ci": ci(lo / f, lambda full, lora: lora / full),
                "percent_less_drift": less(f, lo), "percent_less_drift_ci": ci(less(f, lo), less)}

    rows = {m: row(m) for m in MEASURES}
    pad_share = 1.0 - sum(len(i) for i in ids) / (n * width)
    result = {"task": args.task, "splits": splits, "prompts": n, "padded_width": width,
              "padding_share_of_positions": pad_share, "decoder_layers": layers,
              "jackknife_groups": int(group_of.max() + 1),
              "models": infos, "authors_measure_base_vs_itself": floor, "measures": rows,
              "seconds": {"forward_passes": t_forward, "total": time.time() - t0}, "provenance": provenance()}
    print(f"{args.task}: {n} prompts padded to {width} positions ({100 * pad_share:.0f} % padding); mean over "
          f"{layers} decoder layers; 95 % jackknife over {group_of.max() + 1} groups of prompts; one seed per method")
    print(f"measure A, base model against itself: {floor:.4f} (0 for a similarity that is 1 on equal inputs)")
    print(f"{'':3} {'drift, full':>26} {'drift, LoRA':>26} {'LoRA / full':>22} {'% less drift':>24}  measure")
    for m, r in rows.items():
        print(f"{m:3} {r['full']:8.4f} [{r['full_ci'][0]:.4f}, {r['full_ci'][1]:.4f}] "
              f"{r['lora']:8.4f} [{r['lora_ci'][0]:.4f}, {r['lora_ci'][1]:.4f}] "
              f"{r['lora_over_full']:6.2f} [{r['lora_over_full_ci'][0]:.2f}, {r['lora_over_full_ci'][1]:.2f}] "
              f"{r['percent_less_drift']:7.1f} [{r['percent_less_drift_ci'][0]:.1f}, "
              f"{r['percent_less_drift_ci'][1]:.1f}]  {r['what']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
