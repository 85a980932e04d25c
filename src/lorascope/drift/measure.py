"""The drift stage: how far each tuned model's hidden states moved from the base model's.

``run_drift`` loads the base model and every tuned checkpoint at once, runs them in
lockstep over the same held-out prompts, and compares every pair (base-full,
base-lora, full-lora, ...) at the embedding output and the output of every decoder
layer (the last one *before* the final norm: ``"final_norm_included": false``).

Examples: ``max_examples`` prompts (only the prompt, as the model sees it at inference)
that training did not use: for MRPC the dev split (408 pairs), filled up from the test
split when more are asked for; for SQuAD v2 the held-out ("eval") questions. Asking
for more than exist is an error that says how many there are.

Tokens: by default the examples' own content tokens only (MRPC: the two sentences; SQuAD:
context and question; see :func:`select_tokens`): position 0 (an attention sink) and every
chat-template / instruction token are left out of every measure; ``tokens="all"`` keeps
every real token for comparison. ``drift.json["selection"]`` records the counts by kind.

Measures, per layer and pair (reference = the first model of the pair):

- ``token_cka`` (the primary): linear CKA over the selected tokens (padding excluded),
  exact and streaming: each batch's co-moments are folded into
  :class:`~lorascope.similarity.StreamingCKA` accumulators (float64, Chan merge), so
  memory does not grow with the number of examples.
- ``token_cka_std``: the same on per-feature standardised states; the standard deviations
  are the diagonals of the accumulated co-moments, so this needs no second pass (see
  :func:`~lorascope.drift.stats.zscore_state`).
- ``example_cka`` / ``example_cka_debiased``: linear CKA of the mean-pooled states (mean
  over the selected tokens of each prompt), plug-in and debiased (Song et al. 2012).
- ``cosine``: cosine similarity of each token's state in the two models; ``mean`` and
  quantiles ``q05``..``q95`` (quantiles from a histogram of 1 - cosine on log-spaced
  bins 1 % wide, see :data:`~lorascope.drift.stats.HIST_EDGES`).
- ``relative_change``: ``||h_other - h_ref|| / ||h_ref||`` per token; mean and quantiles.

Pairs whose states are bitwise identical in every batch get similarity exactly 1 (drift 0).

Intervals (95 %): delete-a-group jackknife over groups of whole prompts (see
:mod:`lorascope.drift.stats`): ``jackknife_groups`` groups (default 5) for the
token-level measures, whose per-group co-moments cost
``groups x (layers + 1) x (models + pairs) x hidden^2 x 8`` bytes (SmolLM2-135M, 3 models,
5 groups: 2.5 GB); up to 100 groups (one prompt each when there are fewer) for the
example-level CKA, computed from Gram matrices with exact downdates. Summary (see
:func:`summarise`): per measure, drift averaged over the layer states per tuned model, the
ratio lora / full per checkpoint pair and per layer, per method pooled over seeds (with the
seed variance in the interval), the seed-to-seed noise floor, and criterion 2a
(:func:`lorascope.drift.criterion.judge_drift`). Diagnostics of the base model's Gram
energy by token kind: :mod:`lorascope.drift.diagnostics`.

Outputs in ``output_dir`` (each written atomically): ``drift.json`` (config, models,
number of examples and tokens, sha256 of the example ids, ``layers``, ``pairs``
(per-layer tables), ``summary``, ``methods``, ``timing``, ``provenance``), ``drift.csv``
(one row per pair and layer), ``cka_vs_layer.png``, ``cosine_vs_layer.png`` and
``diagnostics.png``.

Distributed: under ``torchrun`` every process takes every ``world``-th batch; the
accumulators are gathered (gloo) and merged on rank 0, which writes the outputs. The
batches do not depend on the number of processes, so the result equals the
single-process one up to float rounding in the merges (~1e-12).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorascope import LorascopeError
from lorascope.drift import stats
from lorascope.naming import parse_named_paths
from lorascope.runinfo import atomic_path, provenance, write_json
from lorascope.similarity import StreamingCKA, fold_comoment, fold_mean, linear_cka

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXAMPLE_GROUPS = 100
TOKEN_MODES = ("content", "all")
PRIMARY = "token_cka"
#: measure -> (how a layer's value becomes a drift, the measure's range); drift averages over layers
MEASURES = {"token_cka": "1 - CKA", "token_cka_std": "1 - CKA", "example_cka": "1 - CKA",
            "example_cka_debiased": "1 - CKA", "cosine": "1 - cosine", "relative_change": "relative change"}


def parse_tuned(values) -> dict[str, str]:
    """['full=runs/f/model', 'lora=runs/l/model'] (or a dict) -> {'full': ..., 'lora': ...}, checked
    (lorascope.naming: letters, digits, '_' and '.', unique, not 'base')."""
    return dict(parse_named_paths(values, "--tuned", "CHECKPOINT", "lora=runs/mrpc-lora/model", reserved=("base",)))


def _opt(default=None, **meta):
    """A DriftSettings field: its default and its flag's help (lorascope.cliargs makes the flags)."""
    return field(default=default, metadata=meta)


@dataclass
class DriftSettings:
    """What drift measures and how: `lorascope drift`'s flags are generated from these fields, and the
    study's drift_* settings take their defaults from them."""

    max_examples: int = _opt(1000, help="held-out prompts to compare (an error if the data has fewer)")
    batch_size: int = _opt(8, help="prompts per forward pass")
    tokens: str = _opt("content", help="content: only the example's own tokens (MRPC: the sentences; SQuAD: context "
                                       "and question), never position 0 or template tokens; all: every real token, "
                                       "for comparison")
    drop_first_position: bool = _opt(False, help="with --tokens all: leave out each prompt's first token (an "
                                                 "attention sink)")
    max_tokens: int | None = _opt(None, help="truncate prompts to this many tokens; prompts left with no content "
                                             "token are skipped and counted")
    diagnostic_examples: int = _opt(128, help="prompts on which the base model's Gram-energy diagnostics are "
                                              "computed (0: none)")
    reduction: float = _opt(0.20, help="criterion 2a: LoRA's drift at least this much below full fine-tuning's")
    jackknife_groups: int = _opt(5, help="groups of prompts for the token-level intervals; memory grows with it")
    float32_products: bool = _opt(False, help="form each batch's co-moments in float32 (faster on CPUs, CKA within "
                                              "~1e-6; merging stays float64)")

    def problems(self) -> list[str]:
        """What is wrong, one line each naming the option and what is accepted."""
        out = []
        if self.max_examples < 2:
            out.append(f"--max-examples: must be at least 2, got {self.max_examples}")
        if self.batch_size < 1:
            out.append(f"--batch-size: must be a positive integer, got {self.batch_size}")
        if self.jackknife_groups < 2:
            out.append(f"--jackknife-groups: must be at least 2, got {self.jackknife_groups}")
        if self.tokens not in TOKEN_MODES:
            out.append(f"--tokens: got {self.tokens!r}; accepted: {', '.join(TOKEN_MODES)}")
        if self.max_tokens is not None and self.max_tokens < 2:
            out.append(f"--max-tokens: must be at least 2 (or unset), got {self.max_tokens}")
        if self.diagnostic_examples < 0:
            out.append(f"--diagnostic-examples: must be >= 0, got {self.diagnostic_examples}")
        if not 0.0 < self.reduction < 1.0:
            out.append(f"--reduction: must be between 0 and 1, got {self.reduction}")
        return out


def accumulate(models, names: list[str], tok, token_ids: list[list[int]], select: list[list[bool]], batches,
               groups: int, pairs: list[tuple[int, int]], device, *, float32_products: bool = False,
               show_progress: bool = True) -> Accumulators:
    """Run every model over `batches` in lockstep and fold the selected tokens' states into accumulators."""
    from tqdm.auto import tqdm

    from lorascope.drift.capture import LayerCapture, collate, forward_lockstep

    captures = [LayerCapture(m) for m in models]
    n_states = captures[0].n_states
    for name, cap in zip(names, captures):
        if cap.n_states != n_states:
            raise LorascopeError(f"drift: {name} has {cap.n_states - 1} decoder layers, the base model "
                                 f"{n_states - 1}; layer-by-layer comparison needs the same count")
    hidden = models[0].get_decoder().embed_tokens.weight.shape[1]
    acc = Accumulators(len(names), pairs, n_states, groups, len(token_ids), hidden, float32_products)
    bar = tqdm(total=sum(len(b.examples) for b in batches), desc="drift", unit="prompt", disable=not show_progress)
    with contextlib.ExitStack() as hooks, bar:
        for c in captures:
            hooks.enter_context(c)
        for b in batches:
            batch = collate([token_ids[i] for i in b.examples], tok.pad_token_id,
                            select=[select[i] for i in b.examples], device=device)
            states = forward_lockstep(models, captures, batch)
            acc.add(states, b, batch["counts"], names)
            bar.update(len(b.examples))
    return acc


def write_outputs(result: dict[str, Any], out: Path, plots: bool) -> None:
    """drift.json (NaN as null), drift.csv and, with `plots`, the figures."""
    write_json(out / "drift.json", _nan_to_none(result))
    write_csv(out / "drift.csv", result)
    if plots:
        from lorascope.drift.plots import plot_diagnostics, plot_drift, plot_ratio_by_layer

        plot_drift(result, out)
        plot_ratio_by_layer(result, out / "ratio_vs_layer.png")
        if result["diagnostics"]:
            plot_diagnostics(result, out / "diagnostics.png")


def run_drift(task: str, base: str, tuned, output_dir: str | os.PathLike, settings: DriftSettings | None = None, *,
              data_dir: str | None = None, data=None, plots: bool = True, seed: int = 0, values: bool = False,
              **options: Any) -> dict[str, Any] | None:
    """Compare the hidden states of `base` and each tuned checkpoint, layer by layer.

    One straight pass, kept whole because it reads as the recipe: check the settings
    (:func:`drift_problems`), load the prompts and models, select the tokens, fold every
    batch into the accumulators (:func:`accumulate`), finalise the tables and intervals
    (:func:`finalise`, :func:`summarise`), write them (:func:`write_outputs`).

    Parameters
    ----------
    task : registered task name (mrpc, squad_v2).
    base : the base model (Hub id, local directory, or 'smollm2-135m').
    tuned : {name: checkpoint} or ['name=checkpoint', ...]; full model directories or
        PEFT adapter directories of the same architecture and tokenizer as `base`. Names
        ending in ``_s<seed>`` (full_s0, full_s1, lora_r8_s0, ...) are seeds of one method:
        the method ratio pools them and two seeds of a method give its noise floor.
    output_dir : where drift.json, drift.csv and the figures go.
    settings : a :class:`DriftSettings` (default: its defaults); keyword `options` named like its
        fields (max_examples=200, tokens="all", ...) override it. What they mean:

        max_examples : prompts to compare (an error if the held-out data has fewer).
        batch_size : prompts per forward pass.
        tokens : ``content`` (default): only the example's own tokens (MRPC: the two
            sentences; SQuAD: context and question), never position 0 or template tokens;
            ``all``: every real token (for comparison; minus position 0 with `drop_first_position`).
        max_tokens : truncate prompts to this many tokens (None: no truncation); a prompt left
            with no content token is skipped and counted.
        jackknife_groups : groups of prompts for the token-level intervals (memory grows with it).
        float32_products : form each batch's co-moment matrices in float32 (about twice as
            fast on CPUs, CKA within ~1e-6); merging and everything else stay float64.
        diagnostic_examples : prompts (the first ones) on which the base model's Gram-energy
            diagnostics are computed over all tokens by kind (0: none).
        reduction : criterion 2a: LoRA's drift at least this much below full fine-tuning's.
    data_dir : local data folder (default: $LORASCOPE_DATA_DIR, else the Hub).
    data : the study's :class:`~lorascope.config.DataConfig` (subset seed, SQuAD eval share,
        ...), so that the held-out prompts are those training did not see; `data_dir`, when
        given, overrides its folder.
    plots : write the PNG figures.
    seed : seed of the random split of the prompts into jackknife groups.
    values : also write drift.values.json, the per-layer values and leave-one-group-out values
        behind every interval, so that :func:`combine_drift` can pool runs of one model each.

    Returns
    -------
    The content of drift.json (with ``output_dir``) on rank 0; None on other ranks.
    """
    import dataclasses

    import torch

    from lorascope.config import DataConfig
    from lorascope.drift import criterion
    from lorascope.drift.capture import assign_groups, make_batches

    t_start = time.time()
    tuned = parse_tuned(tuned)
    st = dataclasses.replace(settings or DriftSettings(), **options)
    problems = st.problems()
    if problems:
        raise LorascopeError(problems[0])
    max_examples, batch_size, tokens, max_tokens = st.max_examples, st.batch_size, st.tokens, st.max_tokens
    drop_first_position, diagnostic_examples, reduction = st.drop_first_position, st.diagnostic_examples, st.reduction
    jackknife_groups, float32_products = st.jackknife_groups, st.float32_products
    world, rank, pg, created = _distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() \
        else torch.device("cpu")
    data = dataclasses.replace(data) if data is not None else DataConfig()
    if data_dir is not None:
        data.dir = data_dir
    examples, splits = drift_examples(task, data, max_examples)
    names, models, tok, infos, warnings = load_models(base, tuned, device)
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    t_loaded = time.time()

    sel = select_tokens(tok, examples, tokens=tokens, drop_first_position=drop_first_position,
                        max_tokens=max_tokens, model=base)
    if sel["skipped"]:
        warnings.append(f"{len(sel['skipped'])} of {len(examples)} prompt(s) have no token left to measure "
                        f"after truncation to {max_tokens} tokens and are skipped (e.g. {sel['skipped'][0]})")
        log.warning(warnings[-1])
    keep = sel["kept"]
    examples = [examples[i] for i in keep]
    token_ids = [sel["ids"][i] for i in keep]
    select = [sel["select"][i] for i in keep]
    kinds = [sel["kinds"][i] for i in keep] if sel["kinds"] is not None else None
    n = len(examples)
    groups = min(jackknife_groups, n)
    group_of = assign_groups(n, groups, f"lorascope-drift-{seed}")
    ex_groups = min(EXAMPLE_GROUPS, n)
    ex_group_of = assign_groups(n, ex_groups, f"lorascope-drift-examples-{seed}")
    batches = make_batches([len(t) for t in token_ids], group_of, batch_size)

    acc = accumulate(models, names, tok, token_ids, select, batches[rank::world], groups, pairs, device,
                     float32_products=float32_products, show_progress=rank == 0)
    t_loop = time.time()
    diagnostics = None
    if rank == 0 and kinds is not None and diagnostic_examples:
        from lorascope.drift.diagnostics import kind_diagnostics

        k = min(diagnostic_examples, n)
        diagnostics = kind_diagnostics(models[0], token_ids[:k], kinds[:k], tok.pad_token_id, batch_size, device)
    del models
    t_diag = time.time()

    gathered = acc.gather(world, rank, pg)
    if gathered is None:  # not rank 0: done once rank 0 has written the results
        acc.close()
        _leave_world(created)
        return None

    layers = ["embedding"] + [f"layer_{i}" for i in range(acc.n_states - 1)]
    try:
        tables, loo = finalise(acc, names, pairs, layers, np.asarray(ex_group_of), ex_groups)
    finally:
        acc.close()
    summary = summarise(tables, loo, names, infos, pairs, layers)
    summary["criterion_2a"] = [criterion.judge_drift(m, threshold=1.0 - reduction, primary=PRIMARY, tokens=tokens)
                               for m in summary["method_ratios"]]
    t_done = time.time()

    out = Path(output_dir)
    ids = [e.id for e in examples]
    result = {
        "config": {"task": task, "base": base, "tuned": tuned, "max_examples": max_examples,
                   "batch_size": batch_size, "data_dir": data.resolved_dir(), "data": dataclasses.asdict(data),
                   "tokens": tokens, "drop_first_position": drop_first_position, "max_tokens": max_tokens,
                   "jackknife_groups": groups, "example_jackknife_groups": ex_groups,
                   "float32_products": float32_products, "diagnostic_examples": diagnostic_examples,
                   "reduction": reduction, "seed": seed, "processes": world, "confidence": stats.CONFIDENCE},
        "models": {name: info for name, info in zip(names, infos)},
        "n_examples": n, "example_splits": splits, "n_tokens": int(acc.n_tokens.sum()),
        "n_tokens_per_group": acc.n_tokens.tolist(),
        "selection": {"tokens": tokens, "kept_by_kind": sel["kept_by_kind"], "dropped_by_kind": sel["dropped_by_kind"],
                      "truncated_prompts": sel["truncated"], "skipped_prompts": len(sel["skipped"]),
                      "skipped_ids": sel["skipped"][:20]},
        "example_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "layers": layers, "final_norm_included": False,
        "pairs": {f"{names[a]}-{names[b]}": {"reference": names[a], "other": names[b], "layers": tables[p]}
                  for p, (a, b) in enumerate(pairs)},
        "summary": summary,
        "diagnostics": diagnostics,
        "methods": methods(groups, ex_groups, tokens, drop_first_position),
        "warnings": warnings,
        "timing": {"load_s": t_loaded - t_start, "measure_s": t_loop - t_loaded, "diagnostics_s": t_diag - t_loop,
                   "finalise_s": t_done - t_diag, "measure_and_finalise_s": (t_loop - t_loaded) + (t_done - t_diag)},
        "provenance": provenance(),
    }
    write_outputs(result, out, plots)
    if values:
        write_values(out / VALUES_FILE, names, pairs, loo)
    result["output_dir"] = str(out)
    _leave_world(created)
    return result


VALUES_FILE = "drift.values.json"


def write_values(path: Path, names: list[str], pairs, values: dict[str, Any]) -> None:
    """Per pair, measure and layer: the value and its leave-one-group-out values (NaN as null)."""
    write_json(path, _nan_to_none({
        "names": names, "pairs": [list(p) for p in pairs],
        "value": {k: v.tolist() for k, v in values["value"].items()},
        "loo": {k: v.tolist() for k, v in values["loo"].items()}}))


def _read_values(path: Path) -> dict[str, Any]:
    d = json.loads(path.read_text(encoding="utf-8"))
    return {"names": d["names"], "pairs": [tuple(p) for p in d["pairs"]],
            "value": {k: np.array(v, dtype=float) for k, v in d["value"].items()},
            "loo": {k: np.array(v, dtype=float) for k, v in d["loo"].items()}}


#: config fields that must agree between the runs :func:`combine_drift` pools
SAME_CONFIG = ("task", "base", "max_examples", "tokens", "drop_first_position", "max_tokens", "jackknife_groups",
               "example_jackknife_groups", "float32_products", "reduction", "seed", "data")


def combine_drift(runs: dict[str, str | os.PathLike], output_dir: str | os.PathLike, *,
                  plots: bool = True) -> dict[str, Any]:
    """drift.json of several tuned models pooled from runs of :func:`run_drift` over one or two models each.

    A study run in parts measures each model against the base model as soon as it is trained (its
    weights need not survive until the last model of the task is trained), and two seeds of a method
    together when both are trained in the same part (their seed-to-seed drift is the method's noise
    floor). This pools those runs into the drift.json that one run over every model would write: the
    same summary (drifts, ratios, intervals, criterion) and per-layer tables, except that pairs of tuned
    models no run measured together (full vs LoRA, or seeds measured apart) have no table, and a method's
    noise floor rests on the seed pairs some run measured together (none: no noise floor, and drift.json
    and the criterion say so). Each run
    must have been written with ``values=True`` on the same prompts and settings (checked: settings,
    the prompts' ids, token counts per jackknife group).

    Parameters
    ----------
    runs : {label: folder of a run_drift run}; the tuned models are the union of theirs, in this order;
        each model's comparison with the base model is read from the first run that has it.
    output_dir : where drift.json, drift.csv and the figures go.
    plots : write the PNG figures.

    Returns
    -------
    The content of drift.json, with ``output_dir``.
    """
    from lorascope.drift import criterion

    if not runs:
        raise LorascopeError("combine_drift: no drift runs to pool")
    loaded, vals = {}, {}
    for label, d in runs.items():
        f, vf = Path(d) / "drift.json", Path(d) / VALUES_FILE
        for need in (f, vf):
            if not need.is_file():
                raise LorascopeError(f"{need}: missing; each pooled run needs drift.json and {VALUES_FILE} "
                                     f"(run_drift(..., values=True))")
        loaded[label], vals[label] = json.loads(f.read_text(encoding="utf-8")), _read_values(vf)
    first_label = next(iter(loaded))
    first = loaded[first_label]
    for label, r in loaded.items():
        for key in SAME_CONFIG:
            if r["config"].get(key) != first["config"].get(key):
                raise LorascopeError(f"{Path(runs[label]) / 'drift.json'}: config.{key} {r['config'].get(key)!r} "
                                     f"differs from {first_label}'s {first['config'].get(key)!r}; pooled runs must "
                                     f"measure alike")
        for key in ("example_ids_sha256", "layers", "n_tokens_per_group"):
            if r.get(key) != first.get(key):
                raise LorascopeError(f"{Path(runs[label]) / 'drift.json'}: {key} differs from {first_label}'s: the "
                                     f"runs did not measure the same prompts and tokens, so their intervals cannot "
                                     f"be pooled")
    names = ["base"]
    for r in loaded.values():
        names += [n for n in r["models"] if n not in names]
    infos = [first["models"]["base"]] + [next(r["models"][n] for r in loaded.values() if n in r["models"])
                                         for n in names[1:]]
    pairs, tables, taken = [], [], {}
    value = {k: [] for k in MEASURES}
    loo = {k: [] for k in MEASURES}
    for label, r in loaded.items():
        v = vals[label]
        for p, (ia, ib) in enumerate(v["pairs"]):
            a, b = v["names"][ia], v["names"][ib]
            pair = (names.index(a), names.index(b))
            if pair in taken:
                continue
            if pair[0] > pair[1]:
                raise LorascopeError(f"{Path(runs[label]) / 'drift.json'}: measures {a} against {b}, but {b} comes "
                                     f"first among the pooled models ({', '.join(names[1:])}); list the runs so that "
                                     f"their models come in one order")
            taken[pair] = label
            pairs.append(pair)
            tables.append(r["pairs"][f"{a}-{b}"]["layers"])
            for k in MEASURES:
                value[k].append(v["value"][k][p])
                loo[k].append(v["loo"][k][p])
    arrays = {"value": {k: np.array(v) for k, v in value.items()}, "loo": {k: np.array(v) for k, v in loo.items()}}
    layers = first["layers"]
    summary = summarise(tables, arrays, names, infos, pairs, layers)
    cfg = first["config"]
    summary["criterion_2a"] = [criterion.judge_drift(m, threshold=1.0 - cfg["reduction"], primary=PRIMARY,
                                                     tokens=cfg["tokens"]) for m in summary["method_ratios"]]
    timing = {k: sum(r["timing"][k] for r in loaded.values()) for k in first["timing"]}
    seed_pairs = [f"{names[a]}-{names[b]}" for a, b in pairs if a > 0]
    result = {
        **{k: first[k] for k in ("n_examples", "example_splits", "n_tokens", "n_tokens_per_group", "selection",
                                 "example_ids_sha256", "layers", "final_norm_included", "diagnostics")},
        "config": {**cfg, "tuned": {n: next(r["config"]["tuned"][n] for r in loaded.values() if n in r["models"])
                                    for n in names[1:]},
                   "pooled_from": {label: str(d) for label, d in runs.items()}},
        "models": dict(zip(names, infos)),
        "pairs": {f"{names[a]}-{names[b]}": {"reference": names[a], "other": names[b], "layers": tables[p]}
                  for p, (a, b) in enumerate(pairs)},
        "summary": summary,
        "methods": {**first["methods"], "pooled": (
            "the models were measured in runs of one or two models each, on the same prompts, tokens and jackknife "
            "groups, and pooled; pairs of tuned models measured together: "
            + (", ".join(seed_pairs) if seed_pairs else "none (no seed noise floor)"))},
        "warnings": sorted({w for r in loaded.values() for w in r.get("warnings", [])}),
        "timing": timing,
        "provenance": provenance(),
    }
    out = Path(output_dir)
    write_outputs(result, out, plots)
    result["output_dir"] = str(out)
    return result


def select_tokens(tok, examples, *, tokens: str = "content", drop_first_position: bool = False,
                  max_tokens: int | None = None, model: str = "the model") -> dict[str, Any]:
    """Token ids, the tokens to measure and the kind of every token, per example.

    Returns a dict: ``ids``, ``select`` (bools per token), ``kinds`` (per token, see
    :data:`~lorascope.tasks.base.TOKEN_KINDS`; None when the kinds cannot be located and
    ``tokens == "all"``), ``kept`` (indices of the examples with at least one token to
    measure), ``skipped`` (ids of the others), ``truncated`` (count), ``kept_by_kind`` and
    ``dropped_by_kind`` (token counts over the kept examples).
    """
    from lorascope.tasks.base import TOKEN_KINDS, prompt_ids, prompt_token_kinds

    ids, kinds, select = [], [], []
    located = True
    for e in examples:
        try:
            i, k = prompt_token_kinds(tok, e, model=model)
        except LorascopeError:
            if tokens == "content":
                raise
            located = False
            i, k = prompt_ids(tok, e.prompt), None
        ids.append(i)
        kinds.append(k)
    truncated = 0
    if max_tokens is not None:
        truncated = sum(len(i) > max_tokens for i in ids)
        ids = [i[:max_tokens] for i in ids]
        kinds = [k[:max_tokens] if k is not None else None for k in kinds]
    for i, k in zip(ids, kinds):
        if tokens == "content":
            select.append([x == "content" for x in k])
        else:
            select.append([not (drop_first_position and j == 0) for j in range(len(i))])
    kept = [j for j, s in enumerate(select) if any(s)]
    skipped = [examples[j].id for j, s in enumerate(select) if not any(s)]
    if not kept:
        raise LorascopeError(f"drift: none of the {len(examples)} prompts has a token left to measure"
                             + (f" after truncation to {max_tokens} tokens" if max_tokens else "")
                             + (" (no content token)" if tokens == "content" else ""))
    kept_by_kind = {k: 0 for k in TOKEN_KINDS}
    dropped_by_kind = {k: 0 for k in TOKEN_KINDS}
    if located:
        for j in kept:
            for kind, s in zip(kinds[j], select[j]):
                (kept_by_kind if s else dropped_by_kind)[kind] += 1
    else:
        kept_by_kind = {"all": sum(sum(select[j]) for j in kept)}
        dropped_by_kind = {"first_position": sum(len(select[j]) - sum(select[j]) for j in kept)}
    return {"ids": ids, "select": select, "kinds": kinds if located else None, "kept": kept, "skipped": skipped,
            "truncated": truncated, "kept_by_kind": kept_by_kind, "dropped_by_kind": dropped_by_kind}


# ---------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------


def drift_examples(task_name: str, data, max_examples: int):
    """`max_examples` held-out examples of a task (ids prefixed with their split) and the count per split.

    Splits are used in order (MRPC: eval, then test) and a later one is read only when the
    earlier ones hold too few examples.
    """
    from lorascope.tasks import get_task

    task = get_task(task_name)
    out, used, available, unreadable = [], {}, {}, {}
    for s in task.drift_splits:
        need = max_examples - len(out)
        if need == 0:
            break
        try:
            exs = task.examples(s, data)
        except LorascopeError as exc:
            if not out:
                raise
            unreadable[s] = str(exc)
            continue
        available[s] = len(exs)
        if need < len(exs):
            exs = task.examples(s, data, limit=need)
        task.check_held_out(data, exs, f"drift ({s} split)")
        for e in exs:
            e.id = f"{s}:{e.id}"
        out += exs
        used[s] = len(exs)
    if len(out) < max_examples:
        detail = " + ".join(f"{c} in {s}" for s, c in available.items())
        extra = "".join(f"; the {s} split could not be read ({msg})" for s, msg in unreadable.items())
        raise LorascopeError(f"drift: {task_name} has only {len(out)} held-out examples ({detail}), fewer than the "
                             f"{max_examples} asked for; pass --max-examples {len(out)} or less{extra}")
    return out, used


def load_models(base: str, tuned: dict[str, str], device):
    """Load the base and every tuned checkpoint; check architecture and tokenizer against the base."""
    from lorascope.config import ModelConfig
    from lorascope.models import architecture_diff, load_checkpoint, model_fingerprint, resolve_model

    cfg = ModelConfig(name=base)
    base_model, tok, info = load_checkpoint("base", cfg)
    base_cfg = _config_of(base_model)
    fp = model_fingerprint(base_cfg)
    names, models, infos, warnings = ["base"], [base_model], [], []
    infos.append({"kind": "base", "path": info["path"], "fingerprint": fp})
    vocab = tok.get_vocab()
    for name, path in tuned.items():
        model, ttok, tinfo = load_checkpoint(path, cfg)
        mcfg = _config_of(model)
        if model_fingerprint(mcfg) != fp:
            diff = architecture_diff(mcfg, base_cfg)
            raise LorascopeError(f"--tuned {name}={path}: a different architecture than the base model {base} "
                                 f"({diff}); drift compares fine-tuned versions of the same model")
        tvocab = ttok.get_vocab()
        if tvocab != vocab:
            moved = next((t for t, i in vocab.items() if tvocab.get(t) != i), None)
            raise LorascopeError(f"--tuned {name}={path}: its tokenizer vocabulary differs from the base model's "
                                 f"({len(tvocab)} vs {len(vocab)} tokens"
                                 + (f"; token {moved!r} has id {tvocab.get(moved)} vs {vocab[moved]}" if moved else "")
                                 + "); both must read the same token ids")
        kind = tinfo["kind"] if tinfo["kind"] in ("lora", "full") else "full"
        tbase = tinfo.get("base_model")
        if kind == "lora" and tbase and tbase != base:
            try:
                same = resolve_model(tbase) == resolve_model(base)
            except LorascopeError:
                same = False
            if not same:
                warnings.append(f"{name}: the adapter was trained on {tbase}, not on --base {base}; it is "
                                f"applied to {tbase}")
                log.warning(warnings[-1])
        names.append(name)
        models.append(model)
        infos.append({"kind": kind, "path": tinfo["path"], "base_model": tbase,
                      "fingerprint": model_fingerprint(mcfg)})
    for m in models:
        m.to(device).eval()
    return names, models, tok, infos, warnings


def _config_of(model):
    get_base = getattr(model, "get_base_model", None)
    return (get_base() if callable(get_base) else model).config


def _leave_world(created: bool) -> None:
    """Leave the torchrun world this process joined, together with the other processes.

    A rank that has sent its last data must not tear its process group down and exit while rank 0 is
    still receiving, finalising and writing: one that did was seen to abort with SIGABRT ("terminate
    called without an active exception", rank 1, once in CI). So every rank waits at a barrier, rank
    0 after writing its files, and only then destroys the group. If rank 0 fails before the barrier,
    its exit (or torchrun) ends the others' wait.
    """
    if created:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _distributed():
    """(world, rank, gloo group, created): joins a torchrun world if there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, None, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        created = True
    pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return dist.get_world_size(), dist.get_rank(), pg, created


# ---------------------------------------------------------------------------
# accumulation
# ---------------------------------------------------------------------------


class Accumulators:
    """Everything kept between batches. Its size does not depend on the number of examples
    or tokens:

    - token-level co-moments per jackknife group and layer state, float64: each model's
      running mean and centred self co-moment (shared by every pair the model is in) and
      each pair's centred cross co-moment, folded batch by batch with the Chan et al.
      update (the same arithmetic as :class:`~lorascope.similarity.StreamingCKA`);
    - histograms and sums for cosine and relative change;
    - the mean-pooled state of every example (for example-level CKA) is written to an
      unnamed temporary file as batches go and read back by :meth:`pooled_states`.
    """

    def __init__(self, n_models: int, pairs: list[tuple[int, int]], n_states: int, groups: int, n_examples: int,
                 hidden: int, float32_products: bool = False):
        import tempfile

        self.pairs, self.n_states, self.groups = pairs, n_states, groups
        self.n_models, self.n_examples, self.hidden = n_models, n_examples, hidden
        self.float32_products = float32_products
        P, L, G, M, B, d = len(pairs), n_states, groups, n_models, stats.HIST_EDGES.size - 1, hidden
        # np.zeros maps untouched pages lazily: a group's memory is used once it sees a batch
        self.mean = np.zeros((G, L, M, d))
        self.self_s = np.zeros((G, L, M, d, d))
        self.cross_s = np.zeros((G, L, P, d, d))
        self.fmin = np.full((G, L, M, d), np.inf)
        self.fmax = np.full((G, L, M, d), -np.inf)
        self.seen = np.zeros(n_examples, bool)
        self.cos_hist = np.zeros((P, L, B), np.int64)  # of 1 - cosine
        self.rel_hist = np.zeros((P, L, B), np.int64)
        self.cos_sum = np.zeros((G, P, L))
        self.cos_n = np.zeros((G, P, L))
        self.rel_sum = np.zeros((G, P, L))
        self.rel_n = np.zeros((G, P, L))
        self.n_tokens = np.zeros(G, np.int64)
        # pairs whose states were bitwise equal in every batch: their similarities are exactly 1
        self.identical = np.ones((P, L), bool)
        self._spill = tempfile.TemporaryFile(prefix="lorascope-pooled-")
        self._spilled: list[np.ndarray] = []  # example indices, in the order their rows were written

    def add(self, states: list[list[Any]], batch, counts: list[int], names: list[str]) -> None:
        g, idx = batch.group, np.asarray(batch.examples)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        nb, na = int(sum(counts)), int(self.n_tokens[g])
        pooled = np.empty((len(idx), self.n_models, self.n_states, self.hidden), np.float32)
        for layer in range(self.n_states):
            xs, xcs, means, selfs, ext = [], [], [], [], []
            for m, per_model in enumerate(states):
                x = per_model[layer].detach().cpu().numpy().astype(np.float64)
                mean = x.mean(axis=0)
                if not np.isfinite(mean).all():  # NaN and inf reach the mean
                    raise LorascopeError(f"drift: {names[m]} produced NaN or infinite hidden states at layer state "
                                         f"{layer}; the checkpoint is broken")
                xc = x - mean
                pooled[:, m, layer] = np.add.reduceat(x, starts, axis=0) / np.asarray(counts)[:, None]
                xs.append(x)
                xcs.append(xc)
                means.append(mean)
                selfs.append(self._product(xc, xc))
                ext.append((x.min(axis=0), x.max(axis=0)))
            crosses = [self._product(xcs[a], xcs[b]) for a, b in self.pairs]
            self._fold(g, layer, na, nb, means, selfs, crosses, ext)
            sq = [np.einsum("ij,ij->i", x, x) for x in xs]  # squared row norms: float32 data cannot overflow here
            for p, (a, b) in enumerate(self.pairs):
                if self.identical[p, layer] and not np.array_equal(xs[a], xs[b]):
                    self.identical[p, layer] = False
                with np.errstate(divide="ignore", invalid="ignore"):
                    den = np.sqrt(sq[a] * sq[b])
                    cos = np.where(den > 0, np.clip(np.einsum("ij,ij->i", xs[a], xs[b]) / den, -1.0, 1.0), np.nan)
                    diff = xs[b] - xs[a]
                    rel = np.where(sq[a] > 0, np.sqrt(np.einsum("ij,ij->i", diff, diff) / sq[a]), np.nan)
                ok_c, ok_r = np.isfinite(cos), np.isfinite(rel)
                self.cos_sum[g, p, layer] += cos[ok_c].sum()
                self.cos_n[g, p, layer] += ok_c.sum()
                self.rel_sum[g, p, layer] += rel[ok_r].sum()
                self.rel_n[g, p, layer] += ok_r.sum()
                self.cos_hist[p, layer] += stats.histogram(np.clip(1.0 - cos, 0.0, None))
                self.rel_hist[p, layer] += stats.histogram(rel)
        self.n_tokens[g] += nb
        self.seen[idx] = True
        self._spill.write(np.ascontiguousarray(pooled).tobytes())
        self._spilled.append(idx)

    def _fold(self, g: int, layer: int, na: int, nb: int, means, selfs, crosses, ext) -> None:
        """Chan et al. update of group `g`'s co-moments at `layer` (na rows so far) with nb new rows."""
        if nb == 0:
            return
        deltas = [fold_mean(self.mean[g, layer, m], mb, na, nb) for m, mb in enumerate(means)]
        for m, (s, (lo, hi)) in enumerate(zip(selfs, ext)):
            fold_comoment(self.self_s[g, layer, m], s, na, nb, deltas[m], deltas[m])
            np.minimum(self.fmin[g, layer, m], lo, out=self.fmin[g, layer, m])
            np.maximum(self.fmax[g, layer, m], hi, out=self.fmax[g, layer, m])
        for p, ((a, b), c) in enumerate(zip(self.pairs, crosses)):
            fold_comoment(self.cross_s[g, layer, p], c, na, nb, deltas[a], deltas[b])

    def _product(self, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
        if self.float32_products:
            return (xc.astype(np.float32).T @ yc.astype(np.float32)).astype(np.float64)
        return xc.T @ yc

    def token_state(self, g: int, p: int, layer: int) -> StreamingCKA:
        """Group `g`'s token-level CKA accumulator of pair `p` at `layer`."""
        a, b = self.pairs[p]
        d = self.hidden
        n = int(self.n_tokens[g])
        if n == 0:
            return StreamingCKA(d, d)
        return StreamingCKA.from_state_dict({
            "n": n, "dim_x": d, "dim_y": d, "mean_x": self.mean[g, layer, a], "mean_y": self.mean[g, layer, b],
            "sxx": self.self_s[g, layer, a], "syy": self.self_s[g, layer, b], "sxy": self.cross_s[g, layer, p],
            "min_x": self.fmin[g, layer, a], "max_x": self.fmax[g, layer, a], "min_y": self.fmin[g, layer, b],
            "max_y": self.fmax[g, layer, b]})

    def pooled_states(self) -> np.ndarray:
        """(models, layer states, examples, hidden) float32: the mean-pooled states read back."""
        out = np.zeros((self.n_models, self.n_states, self.n_examples, self.hidden), np.float32)
        self._spill.flush()
        self._spill.seek(0)
        per_example = self.n_models * self.n_states * self.hidden
        for idx in self._spilled:
            rows = np.frombuffer(self._spill.read(4 * per_example * len(idx)), np.float32)
            out[:, :, idx] = rows.reshape(len(idx), self.n_models, self.n_states, self.hidden).transpose(1, 2, 0, 3)
        return out

    def close(self) -> None:
        self._spill.close()

    def gather(self, world: int, rank: int, pg) -> Accumulators | None:
        """Merge every process's accumulators on rank 0 (returns None elsewhere)."""
        if world == 1:
            return self
        import torch.distributed as dist

        def gather(obj):
            got = [None] * world if rank == 0 else None
            dist.gather_object(obj, got, dst=0, group=pg)
            return got

        # one group and layer state at a time: a whole set can be gigabytes
        for g in range(self.groups):
            n_here = int(self.n_tokens[g])
            for layer in range(self.n_states):
                got = gather((n_here, self.mean[g, layer], self.self_s[g, layer], self.cross_s[g, layer],
                              self.fmin[g, layer], self.fmax[g, layer]))
                if rank == 0:
                    na = n_here
                    for nb, means, selfs, crosses, lo, hi in got[1:]:
                        # rank 0's own rows are already in; centred moments of the others fold in
                        self._fold(g, layer, na, nb, list(means), list(selfs), list(crosses), list(zip(lo, hi)))
                        na += nb
        pooled = self.pooled_states()
        rows = np.flatnonzero(self.seen)
        got = gather((rows, pooled[:, :, rows]))
        del pooled
        sums = ("cos_hist", "rel_hist", "cos_sum", "cos_n", "rel_sum", "rel_n", "n_tokens")
        got_sums = gather({**{k: getattr(self, k) for k in sums}, "identical": self.identical})
        if rank != 0:
            return None
        self._spill.seek(0, os.SEEK_END)
        for r, arrays in got[1:]:
            if len(r):
                self._spill.write(np.ascontiguousarray(arrays.transpose(2, 0, 1, 3)).tobytes())
                self._spilled.append(r)
                self.seen[r] = True
        for k in sums:
            setattr(self, k, sum(d[k] for d in got_sums))
        self.identical = np.logical_and.reduce([d["identical"] for d in got_sums])
        return self


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


def _token_cka(acc: StreamingCKA, zscore: bool) -> float:
    state = acc.state_dict()
    if zscore:
        state = stats.zscore_state(state)
    try:
        return StreamingCKA.from_state_dict(state).value()
    except ValueError:
        return float("nan")


def _merged(parts: list[StreamingCKA]) -> StreamingCKA:
    out = StreamingCKA()
    for p in parts:
        out.merge(p)
    return out


def finalise(acc: Accumulators, names, pairs, layers, ex_group_of: np.ndarray, ex_groups: int):
    """Per-pair, per-layer tables and the leave-one-group-out values behind every interval."""
    P, L, G = len(pairs), len(layers), acc.groups
    loo = {k: np.full((P, L, G if k.startswith(("token", "cosine", "relative")) else ex_groups), np.nan)
           for k in MEASURES}
    value = {k: np.full((P, L), np.nan) for k in loo}
    w = stats.leave_group_out_weights(ex_group_of, ex_groups)
    all_pooled = acc.pooled_states()
    for layer in range(L):
        for p in range(P):
            parts = [acc.token_state(g, p, layer) for g in range(G)]
            merged = _merged(parts)
            value["token_cka"][p, layer] = _token_cka(merged, False)
            value["token_cka_std"][p, layer] = _token_cka(merged, True)
            for g in range(G):
                rest = _merged(parts[:g] + parts[g + 1:])
                loo["token_cka"][p, layer, g] = _token_cka(rest, False)
                loo["token_cka_std"][p, layer, g] = _token_cka(rest, True)
        pooled = [all_pooled[m, layer].astype(np.float64) for m in range(len(names))]
        grams = [stats.centred_gram(x) for x in pooled]
        self_terms = {}
        for m in sorted({i for pair in pairs for i in pair}):
            self_terms[m] = stats.subset_hsic(grams[m], grams[m], w)
        for p, (a, b) in enumerate(pairs):
            kl = stats.subset_hsic(grams[a], grams[b], w)
            for j, key in enumerate(("example_cka", "example_cka_debiased")):
                try:
                    value[key][p, layer] = linear_cka(pooled[a], pooled[b], debiased=j == 1)
                except ValueError:
                    pass
                loo[key][p, layer] = stats.cka_from_hsic(kl[j], self_terms[a][j], self_terms[b][j])
    for key, s, c in (("cosine", acc.cos_sum, acc.cos_n), ("relative_change", acc.rel_sum, acc.rel_n)):
        total_s, total_c = s.sum(axis=0), c.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            value[key] = total_s / total_c
            loo[key] = np.moveaxis((total_s[None] - s) / (total_c[None] - c), 0, -1)
    for p, layer in zip(*np.nonzero(acc.identical)):  # the same states: exactly 1, whatever the rounding
        for key in ("token_cka", "token_cka_std", "example_cka", "example_cka_debiased", "cosine"):
            value[key][p, layer] = 1.0
            loo[key][p, layer] = 1.0
    bounds = {"token_cka": (0.0, 1.0), "token_cka_std": (0.0, 1.0), "example_cka": (0.0, 1.0),
              "example_cka_debiased": None, "cosine": (-1.0, 1.0), "relative_change": (0.0, np.inf)}
    tables = []
    for p in range(P):
        rows = []
        for layer in range(L):
            row: dict[str, Any] = {"index": layer, "layer": layers[layer]}
            for key in ("token_cka", "token_cka_std", "example_cka", "example_cka_debiased"):
                row[key] = stats.jackknife_interval(value[key][p, layer], loo[key][p, layer], bounds=bounds[key])
            for key, hist, flip in (("cosine", acc.cos_hist, True), ("relative_change", acc.rel_hist, False)):
                r = stats.jackknife_interval(value[key][p, layer], loo[key][p, layer], bounds=bounds[key])
                r["mean"] = r.pop("value")
                qs = stats.hist_quantiles(hist[p, layer], tuple(1 - q for q in QUANTILES) if flip else QUANTILES)
                for q, v in zip(QUANTILES, qs):
                    r[f"q{round(q * 100):02d}"] = None if v is None else (1.0 - v if flip else v)
                n_tok = int(acc.n_tokens.sum())
                r["n_undefined"] = n_tok - int(hist[p, layer].sum())
                row[key] = r
            row["n_tokens"] = int(acc.n_tokens.sum())
            rows.append(row)
        tables.append(rows)
    return tables, {"value": value, "loo": loo}


SEED_RE = re.compile(r"^(.+)_s\d+$")
DRIFT_BOUNDS = {"token_cka": (0.0, 1.0), "token_cka_std": (0.0, 1.0), "example_cka": (0.0, 1.0),
                "example_cka_debiased": None, "cosine": (0.0, 2.0), "relative_change": (0.0, np.inf)}


def method_of(name: str) -> str:
    """'full_s1' -> 'full', 'lora_r8_s0' -> 'lora_r8': the seeds of one method share it."""
    m = SEED_RE.match(name)
    return m.group(1) if m else name


def layer_drift(key: str, v):
    """A measure's per-layer value as a drift (0: no change): 1 - similarity, or the relative change itself."""
    return v if key == "relative_change" else 1.0 - v


def summarise(tables, values, names, infos, pairs, layers) -> dict[str, Any]:
    """Per measure: drift averaged over layer states per tuned model vs base, LoRA / full ratios
    (per checkpoint pair, per layer, and per method pooled over seeds, seed variance included),
    and the seed-to-seed noise floor of every method with two or more seeds."""
    value, loo = values["value"], values["loo"]
    index = {pair: p for p, pair in enumerate(pairs)}
    per_model: dict[str, Any] = {}
    drift, drift_loo, per_layer, per_layer_loo = {}, {}, {}, {}
    for b in range(1, len(names)):
        name, p = names[b], index[(0, b)]
        per_model[name] = {"kind": infos[b]["kind"], "method": method_of(name)}
        for key in MEASURES:
            d, d_loo = layer_drift(key, value[key][p]), layer_drift(key, loo[key][p])
            per_layer[name, key], per_layer_loo[name, key] = d, d_loo
            drift[name, key], drift_loo[name, key] = d.mean(), d_loo.mean(axis=0)
            per_model[name][f"{key}_drift"] = stats.jackknife_interval(drift[name, key], drift_loo[name, key],
                                                                       bounds=DRIFT_BOUNDS[key])
    loras = [names[i] for i in range(1, len(names)) if infos[i]["kind"] == "lora"]
    fulls = [names[i] for i in range(1, len(names)) if infos[i]["kind"] == "full"]
    ratios = []
    for lo in loras:
        for fu in fulls:
            entry: dict[str, Any] = {"lora": lo, "full": fu, "per_layer": {}}
            for key in MEASURES:
                entry[key] = _ratio_interval(drift[lo, key], drift_loo[lo, key], drift[fu, key], drift_loo[fu, key], fu)
                entry["per_layer"][key] = [
                    _ratio_interval(per_layer[lo, key][i], per_layer_loo[lo, key][i], per_layer[fu, key][i],
                                    per_layer_loo[fu, key][i], fu) for i in range(len(layers))]
            ratios.append(entry)

    groups: dict[str, list[str]] = {}
    for name in loras + fulls:
        groups.setdefault(method_of(name), []).append(name)
    noise = {}
    for method, members in groups.items():
        if len(members) < 2:
            continue
        measured = [(a, b) for i, a in enumerate(members) for b in members[i + 1:]
                    if (names.index(a), names.index(b)) in index]  # pooled runs: the pairs some part measured
        if not measured:
            continue
        within = [index[(names.index(a), names.index(b))] for a, b in measured]
        noise[method] = {"seeds": sorted({x for pair in measured for x in pair}, key=members.index),
                         "pairs": len(within)}
        for key in MEASURES:
            d = np.mean([layer_drift(key, value[key][p]).mean() for p in within])
            d_loo = np.mean([layer_drift(key, loo[key][p]).mean(axis=0) for p in within], axis=0)
            noise[method][key] = stats.jackknife_interval(d, d_loo, bounds=DRIFT_BOUNDS[key])
    method_ratios = []
    lora_methods = [m for m in groups if infos[names.index(groups[m][0])]["kind"] == "lora"]
    full_methods = [m for m in groups if infos[names.index(groups[m][0])]["kind"] == "full"]
    for lm in lora_methods:
        for fm in full_methods:
            entry = {"lora": lm, "full": fm, "lora_seeds": groups[lm], "full_seeds": groups[fm],
                     "noise_floor": {m: noise[m] for m in (lm, fm) if m in noise}}
            for key in MEASURES:
                entry[key] = _method_ratio([drift[x, key] for x in groups[lm]], [drift_loo[x, key] for x in groups[lm]],
                                           [drift[x, key] for x in groups[fm]], [drift_loo[x, key] for x in groups[fm]])
            method_ratios.append(entry)
    return {"definition": "drift = per-layer drift averaged over the layer states (embedding and every decoder "
                          "layer): 1 - CKA for the CKA measures, 1 - mean cosine, mean relative change; ratio = "
                          "lora drift / full drift; 95% intervals: delete-a-group jackknife over prompts, plus the "
                          "between-seed variance when a method has two or more seeds; a ratio's lower bound is "
                          "clipped at 0 when every drift in it is non-negative",
            "primary": PRIMARY, "measures": list(MEASURES), "per_model": per_model, "ratios": ratios,
            "noise_floor": noise, "method_ratios": method_ratios}


def _ratio_interval(lo, lo_loo, fu, fu_loo, full_name: str) -> dict[str, Any]:
    lo_loo, fu_loo = np.asarray(lo_loo, float), np.asarray(fu_loo, float)
    if not (abs(fu) > 0 and np.all(np.abs(fu_loo) > 0)):
        return {"value": None, "ci_low": None, "ci_high": None, "se": None,
                "note": f"the full model's drift is 0 ({full_name} equals the base here)"}
    nonneg = lo >= 0 and fu > 0 and np.all(lo_loo >= 0) and np.all(fu_loo > 0)
    return stats.jackknife_interval(lo / fu, lo_loo / fu_loo, bounds=(0.0, math.inf) if nonneg else None)


def _method_ratio(lora: list[float], lora_loo: list, full: list[float], full_loo: list) -> dict[str, Any]:
    """Ratio of the mean drift over LoRA seeds to the mean over full seeds, with a 95 % interval.

    Variance = the delete-a-group jackknife variance over prompts (the same deletions in
    every model) + the between-seed variance of each method's mean (delta method:
    r^2 (s_L^2 / (k_L L^2) + s_F^2 / (k_F F^2))); Student t with Welch-Satterthwaite
    degrees of freedom. With one seed per method the seed term is absent and the interval
    covers prompt sampling only (``seed_variance_included: false``). When every drift that
    enters is non-negative (so is the ratio), a lower bound below 0 is clipped to 0
    (``clipped_at_zero: true``); a debiased CKA can exceed 1, and then nothing is clipped.
    """
    L, F = float(np.mean(lora)), float(np.mean(full))
    Lg, Fg = np.mean(np.asarray(lora_loo, float), axis=0), np.mean(np.asarray(full_loo, float), axis=0)
    out: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None, "se": None, "lora_drift": L,
                           "full_drift": F, "seeds_lora": len(lora), "seeds_full": len(full),
                           "seed_variance_included": len(lora) > 1 or len(full) > 1}
    if not (abs(F) > 0 and np.all(np.abs(Fg) > 0)) or not np.isfinite(L):
        out["note"] = "the full models' drift is 0 or undefined"
        return out
    r = L / F
    jk = stats.jackknife_interval(r, Lg / Fg)
    out["value"] = r
    if jk["se"] is None:
        return out
    g = jk["groups"]
    parts = [(jk["se"] ** 2, g - 1)]
    for vals, mean in ((lora, L), (full, F)):
        if len(vals) > 1 and mean != 0:
            parts.append((r**2 * float(np.var(vals, ddof=1)) / len(vals) / mean**2, len(vals) - 1))
    var = sum(v for v, _ in parts)
    den = sum(v**2 / df for v, df in parts)
    df = var**2 / den if den > 0 else g - 1
    se = math.sqrt(var)
    half = stats.t975(max(1, int(math.floor(df)))) * se
    low = r - half
    nonneg = all(v >= 0 for v in (*lora, *full)) and bool(np.all(Lg >= 0) and np.all(Fg > 0))
    out.update(ci_low=max(low, 0.0) if nonneg else low, ci_high=r + half, se=se, se_prompts=jk["se"],
               se_seeds=math.sqrt(max(var - jk["se"] ** 2, 0.0)), df=df, clipped_at_zero=nonneg and low < 0)
    return out


def methods(groups: int, ex_groups: int, tokens: str, drop_first: bool) -> dict[str, str]:
    what = ("the example's own content tokens (MRPC: the two sentences; SQuAD v2: context and question); "
            "position 0 and every template token (system prompt, role tags, instruction text, generation "
            "prompt) left out" if tokens == "content"
            else "all non-padding prompt tokens" + (" except position 0" if drop_first else ""))
    return {
        "states": "output of the token embedding and of every decoder layer; the last is before the final norm",
        "tokens": what,
        "token_cka": "primary: exact streaming linear CKA over the selected tokens (float64, Chan merge)",
        "token_cka_std": "linear CKA of per-feature standardised token states (global standard deviations, "
                         "from the same co-moments)",
        "example_cka": "linear CKA of mean-pooled states (mean over the selected tokens of each prompt), plug-in "
                       "estimator",
        "example_cka_debiased": "as example_cka with the unbiased HSIC estimator (Song et al. 2012)",
        "cosine": f"cosine similarity of each selected token's state in the two models; quantiles from "
                  f"a histogram of 1 - cosine with {stats.HIST_RESOLUTION}",
        "relative_change": f"||h_other - h_reference|| / ||h_reference|| per selected token; quantiles from a "
                           f"histogram with {stats.HIST_RESOLUTION}",
        "intervals": f"95% delete-a-group jackknife over random groups of whole prompts, t quantile with G-1 "
                     f"degrees of freedom: G={groups} for the token-level measures, cosine and relative_change, "
                     f"G={ex_groups} for example-level CKA; clipped to the measure's range. Per-checkpoint "
                     f"intervals describe sampling variation over prompts for these fixed checkpoints; the "
                     f"method ratios add the between-seed variance when a method has two or more seeds.",
        "diagnostics": "base model, all tokens of the first diagnostic_examples prompts: share of the centred "
                       "Gram energy ||K||_F^2 (K = Xc Xc^T, the quantity CKA is built from) carried by the rows "
                       "of each token kind, sum_{i in kind} sum_j K_ij^2 / ||K||_F^2 = tr(S C_kind) / tr(S^2), "
                       "and the feature dimensions with the largest share of the variance",
    }


CSV_MEASURES = {"token_cka": ("value", "ci_low", "ci_high"), "token_cka_std": ("value", "ci_low", "ci_high"),
                "example_cka": ("value", "ci_low", "ci_high"),
                "example_cka_debiased": ("value", "ci_low", "ci_high"),
                "cosine": ("mean", "ci_low", "ci_high", "q05", "q25", "q50", "q75", "q95"),
                "relative_change": ("mean", "ci_low", "ci_high", "q05", "q25", "q50", "q75", "q95")}


def write_csv(path: Path, result: dict[str, Any]) -> None:
    """One row per pair and layer state."""
    header = ["pair", "reference", "other", "layer_index", "layer", "n_tokens"]
    for key, fields in CSV_MEASURES.items():
        header += [key if f == "value" else f"{key}_{f}" for f in fields]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for pair, d in result["pairs"].items():
                for row in d["layers"]:
                    out = [pair, d["reference"], d["other"], row["index"], row["layer"], row["n_tokens"]]
                    for key, fields in CSV_MEASURES.items():
                        out += ["" if row[key][f] is None else repr(float(row[key][f])) for f in fields]
                    w.writerow(out)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj
