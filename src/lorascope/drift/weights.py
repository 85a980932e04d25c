"""The weights stage: what fine-tuning changed in each adapted weight matrix.

For every adapted matrix W (base) of every tuned checkpoint, the update dW is

- full fine-tuning: ``W_tuned - W_base``;
- LoRA: ``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` for
  rsLoRA; per-module ``rank_pattern`` / ``alpha_pattern`` honoured), read from
  ``adapter_config.json`` and ``adapter_model.safetensors``.

Per matrix (float64): Frobenius norm, spectral norm (largest singular value), the
Frobenius norm relative to ``||W_base||_F``, numerical rank, effective rank (Roy &
Vetterli 2007: ``exp`` of the entropy of the singular values normalised to sum to 1),
stable rank ``||dW||_F^2 / ||dW||_2^2``, the share of energy (sum of squared singular
values) in the top 8 singular values, and intruder dimensions (Shuttleworth et al.
2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): among the top ``top_k``
left singular vectors of the tuned matrix ``W + dW``, the number whose largest absolute
cosine similarity with *any* left singular vector of ``W`` is below
``intruder_threshold`` (defaults k = 10, threshold 0.5). Matrices analysed: the LoRA
target modules of the decoder layers; for a full checkpoint the same module types as
the LoRA adapters given alongside it, or all seven projections (q, k, v, o, gate, up,
down) when there is none.

Outputs in ``output_dir``: ``weights.json`` (config, models, one record per matrix,
a summary per tuned model and module type, provenance), ``weights.csv`` (one row per
tuned model, layer and module) and ``weight_spectra.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from lorascope import LorascopeError
from lorascope.config import ALL_PROJECTIONS
from lorascope.modelinfo import ModelDir, check_adapter_weights, read_model_dir, require_lora
from lorascope.runinfo import atomic_path, provenance, write_json

log = logging.getLogger(__name__)

TOP_ENERGY = 8
SPECTRUM_POINTS = 64
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
METRICS = ("fro_norm", "spectral_norm", "relative_fro_norm", "numerical_rank", "effective_rank", "stable_rank",
           f"top{TOP_ENERGY}_energy", "intruders", "min_max_cosine")


def run_weights(base: str, tuned, output_dir: str | os.PathLike, *, top_k: int = 10,
                intruder_threshold: float = 0.5, plots: bool = True) -> dict[str, Any]:
    """Analyse the weight updates of each tuned checkpoint against `base`; write JSON, CSV and a PNG.

    Parameters
    ----------
    base : the base model (Hub id, local directory, or 'smollm2-135m').
    tuned : {name: checkpoint} or ['name=checkpoint', ...]: full model directories or PEFT
        LoRA adapter directories.
    top_k, intruder_threshold : intruder dimensions are counted among the top_k singular
        vectors of W + dW, with a largest |cosine| to W's singular vectors below the threshold.

    Returns
    -------
    The content of weights.json, with ``output_dir``.
    """
    from lorascope.drift.measure import parse_tuned
    from lorascope.models import model_fingerprint, resolve_model

    tuned = parse_tuned(tuned)
    if top_k < 1:
        raise LorascopeError(f"--top-k: must be a positive integer, got {top_k}")
    if not 0.0 < intruder_threshold < 1.0:
        raise LorascopeError(f"--intruder-threshold: must be between 0 and 1, got {intruder_threshold}")
    base_dir = Path(resolve_model(base))
    base_cfg = _read_config(base_dir)
    fp = model_fingerprint(base_cfg)
    base_w = SafetensorsDir(base_dir)

    sources, infos = {}, {}
    for name, path in tuned.items():
        sources[name], infos[name] = _open_tuned(name, path, base, base_cfg, fp)
    lora_types = sorted({t for s in sources.values() if s["kind"] == "lora" for t in s["module_types"]})
    full_types = lora_types or list(ALL_PROJECTIONS)
    for name, s in sources.items():
        if s["kind"] == "full":
            infos[name]["module_types"] = full_types

    keys = sorted({k for s in sources.values() for k in _keys_of(s, base_w, full_types)}, key=_sort_key)
    if not keys:
        raise LorascopeError(f"weights: no adapted matrix found in {', '.join(tuned.values())}")
    records, spectra = _analyse(keys, base_w, sources, base_cfg.num_hidden_layers, top_k, intruder_threshold)
    result = {
        "config": {
            "base": base,
            "tuned": tuned,
            "top_k": top_k,
            "intruder_threshold": intruder_threshold,
            "top_energy": TOP_ENERGY,
        },
        "models": {"base": {"path": str(base_dir), "fingerprint": fp}, **infos},
        "methods": _methods(top_k, intruder_threshold),
        "matrices": records,
        "summary": summarise_weights(records),
        "provenance": provenance(),
    }
    return _write(result, spectra, Path(output_dir), plots)


SPECTRA_FILE = "weights.spectra.json"


def _write(result: dict[str, Any], spectra: dict, out: Path, plots: bool) -> dict[str, Any]:
    write_json(out / "weights.json", result)
    write_json(out / SPECTRA_FILE, spectra)  # what the figure shows; combine_weights redraws it from these
    _write_csv(out / "weights.csv", result["matrices"])
    if plots:
        from lorascope.drift.plots import plot_spectra

        plot_spectra(spectra, out / "weight_spectra.png")
    result["output_dir"] = str(out)
    return result


def combine_weights(parts: dict[str, str | os.PathLike], output_dir: str | os.PathLike, *,
                    plots: bool = True) -> dict[str, Any]:
    """weights.json of several tuned models from runs of :func:`run_weights` with one model each (a study run
    in parts analyses each model as soon as it is trained): the records, summary and figure of one run over
    every model, except that a full model analysed alone covers every projection (one run beside a LoRA
    adapter restricts it to the adapter's module types; the same set with lora.target_modules' default).
    The runs must share the base model and settings (checked)."""
    if not parts:
        raise LorascopeError("combine_weights: no weight analyses to pool")
    runs, spectra = {}, {}
    for name, d in parts.items():
        f, sf = Path(d) / "weights.json", Path(d) / SPECTRA_FILE
        for need in (f, sf):
            if not need.is_file():
                raise LorascopeError(f"{need}: missing; each pooled analysis needs weights.json and {SPECTRA_FILE}")
        runs[name] = json.loads(f.read_text(encoding="utf-8"))
        if list(runs[name]["config"]["tuned"]) != [name]:
            raise LorascopeError(f"{f}: analyses {', '.join(runs[name]['config']['tuned'])}, expected only {name}")
        # JSON keys are strings: the layers back to numbers, so the figure orders them as run_weights does
        spectra[name] = {mt: {int(k): v for k, v in per.items()}
                         for mt, per in json.loads(sf.read_text(encoding="utf-8"))[name].items()}
    first_name = next(iter(runs))
    first = runs[first_name]
    for name, r in runs.items():
        for key in ("base", "top_k", "intruder_threshold", "top_energy"):
            if r["config"].get(key) != first["config"].get(key):
                raise LorascopeError(f"{Path(parts[name]) / 'weights.json'}: config.{key} {r['config'].get(key)!r} "
                                     f"differs from {first_name}'s {first['config'].get(key)!r}")
        if r["models"]["base"] != first["models"]["base"]:
            raise LorascopeError(f"{Path(parts[name]) / 'weights.json'}: another base model than {first_name}'s")
    records = [m for r in runs.values() for m in r["matrices"]]
    result = {
        "config": {**first["config"], "tuned": {n: r["config"]["tuned"][n] for n, r in runs.items()},
                   "pooled_from": {n: str(d) for n, d in parts.items()}},
        "models": {"base": first["models"]["base"], **{n: r["models"][n] for n, r in runs.items()}},
        "methods": first["methods"],
        "matrices": records,
        "summary": summarise_weights(records),
        "provenance": provenance(),
    }
    return _write(result, spectra, Path(output_dir), plots)


def _analyse(keys: list[str], base_w, sources: dict, n_layers: int, top_k: int,
             threshold: float) -> tuple[list[dict], dict]:
    """One record per (tuned model, matrix), and the singular-value spectra of representative layers."""
    import torch
    from tqdm.auto import tqdm

    records, spectra = [], {name: {} for name in sources}
    reps = _representative_layers(n_layers)
    for key in tqdm(keys, desc="weights", unit="matrix"):
        w = base_w.get(key).to(torch.float64)
        u_base = None
        for name, s in sources.items():
            dw = _delta(s, key, w)
            if dw is None:
                continue
            if u_base is None:
                u_base = torch.linalg.svd(w, full_matrices=False).U
            m, sv = update_metrics(w, dw, u_base=u_base, top_k=top_k, threshold=threshold)
            layer = int(LAYER_RE.search(key).group(1)) if LAYER_RE.search(key) else -1
            mtype = key.rsplit(".", 2)[-2]
            records.append({"model": name, "kind": s["kind"], "key": key, "layer": layer, "module": mtype,
                            "shape": list(w.shape), **m})
            if layer in reps:
                spectra[name].setdefault(mtype, {})[layer] = [v for v in sv[:SPECTRUM_POINTS] if v > sv[0] * 1e-12] \
                    if sv[0] > 0 else []
    return records, spectra


def _methods(top_k: int, intruder_threshold: float) -> dict[str, str]:
    return {
        "update": "full: W_tuned - W_base; lora: scale * B @ A, scale = lora_alpha / r (rsLoRA: / sqrt(r))",
        "effective_rank": "exp of the entropy of the singular values of dW normalised to sum to 1 "
                          "(Roy & Vetterli 2007)",
        "stable_rank": "||dW||_F^2 / ||dW||_2^2",
        f"top{TOP_ENERGY}_energy": f"sum of the top {TOP_ENERGY} squared singular values / sum of all",
        "numerical_rank": "singular values above sigma_1 * max(shape) * float64 eps",
        "intruders": f"among the top {top_k} left singular vectors of W + dW, how many have a largest |cosine| "
        f"with any left singular vector of W below {intruder_threshold} (Shuttleworth et al. 2024)",
        "min_max_cosine": f"the smallest of those largest |cosines| over the top {top_k}",
    }


def update_metrics(
    w, dw, *, u_base=None, top_k: int = 10, threshold: float = 0.5
) -> tuple[dict[str, Any], list[float]]:
    """Metrics of one update `dw` of the base matrix `w` (torch tensors); also its singular values.

    `u_base` (the left singular vectors of `w`) can be passed to share one SVD between
    several updates of the same matrix.
    """
    import torch

    w, dw = w.to(torch.float64), dw.to(torch.float64)
    s = torch.linalg.svdvals(dw)
    energy = s**2
    total = float(energy.sum())
    spec = float(s[0]) if s.numel() else 0.0
    out: dict[str, Any] = {"fro_norm": math.sqrt(total), "spectral_norm": spec,
                           "relative_fro_norm": math.sqrt(total) / float(torch.linalg.norm(w))}
    if total > 0:
        p = s / s.sum()
        p = p[p > 0]
        out["numerical_rank"] = int((s > spec * max(dw.shape) * torch.finfo(torch.float64).eps).sum())
        out["effective_rank"] = float(torch.exp(-(p * torch.log(p)).sum()))
        out["stable_rank"] = total / spec**2
        out[f"top{TOP_ENERGY}_energy"] = float(energy[:TOP_ENERGY].sum()) / total
    else:
        out.update({"numerical_rank": 0, "effective_rank": 0.0, "stable_rank": None, f"top{TOP_ENERGY}_energy": None})
    if u_base is None:
        u_base = torch.linalg.svd(w, full_matrices=False).U
    u_tuned = torch.linalg.svd(w + dw, full_matrices=False).U[:, :top_k]
    best = (u_base.T @ u_tuned).abs().max(dim=0).values
    out["intruders"] = int((best < threshold).sum())
    out["min_max_cosine"] = float(best.min())
    return out, s.tolist()


def lora_updates(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """{base weight key: dW} of a PEFT LoRA adapter (float64 tensors), dW = scale * B @ A."""
    src = _lora_source(Path(adapter_dir))
    return {key: _lora_delta(src, key) for key in src["pairs"]}


def summarise_weights(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per tuned model and module type: mean and median over layers of each metric, total intruders."""
    out: dict[str, Any] = {}
    for r in records:
        out.setdefault(r["model"], {}).setdefault(r["module"], []).append(r)
    summary: dict[str, Any] = {}
    for model, per in out.items():
        summary[model] = {}
        for mtype, rows in sorted(per.items()):
            d: dict[str, Any] = {"matrices": len(rows), "intruders_total": int(sum(r["intruders"] for r in rows))}
            for k in METRICS:
                vals = [r[k] for r in rows if r[k] is not None]
                d[f"{k}_mean"] = float(np.mean(vals)) if vals else None
                d[f"{k}_median"] = float(np.median(vals)) if vals else None
            summary[model][mtype] = d
    return summary


# ---------------------------------------------------------------------------
# reading checkpoints
# ---------------------------------------------------------------------------


class SafetensorsDir:
    """Lazy access to the tensors of every *.safetensors file in a directory."""

    def __init__(self, d: Path):
        from safetensors import safe_open

        from lorascope.checkpoint import check_safetensors

        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise LorascopeError(f"{d}: has no *.safetensors weights; lorascope reads safetensors only")
        for f in files:
            problem = check_safetensors(f)
            if problem:
                raise LorascopeError(f"{f}: not a readable safetensors file: {problem}")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str):
        return self._where[key].get_tensor(key)

    def __contains__(self, key: str) -> bool:
        return key in self._where


def _read_config(d: Path) -> SimpleNamespace:
    f = d / "config.json"
    try:
        return SimpleNamespace(**json.loads(f.read_text()))
    except (OSError, ValueError) as exc:
        raise LorascopeError(f"{f}: cannot read the model config ({exc})") from None


def _open_tuned(name: str, path: str, base: str, base_cfg, fp: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from lorascope.models import architecture_diff, model_fingerprint

    where = f"--tuned {name}={path}"
    info = read_model_dir(path, where)
    d, meta = info.path, info.meta
    if info.kind == "lora":
        if meta.get("base_fingerprint") and meta["base_fingerprint"] != fp:
            raise LorascopeError(f"{where}: the adapter was trained on a base with a different "
                                 f"architecture than {base} (fingerprint {meta['base_fingerprint']} vs {fp})")
        src = _lora_source(d, info, where)
        info_out = {"kind": "lora", "path": str(d), "base_model": info.base_model, "r": src["r"],
                    "lora_alpha": src["alpha"], "use_rslora": src["rslora"], "module_types": src["module_types"]}
        return src, info_out
    cfg = _read_config(d)
    if model_fingerprint(cfg) != fp:
        diff = architecture_diff(cfg, base_cfg)
        raise LorascopeError(f"{where}: a different architecture than the base model {base} ({diff})")
    return {"kind": "full", "weights": SafetensorsDir(d), "dir": d}, {
        "kind": info.method, "path": str(d), "base_model": info.base_model}


def _lora_source(d: Path, info: ModelDir | None = None, where: str | None = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    where = where or f"adapter {d}"
    info = info or read_model_dir(d, where, expected="a PEFT adapter directory")
    if info.kind != "lora":
        raise LorascopeError(f"{where}: no adapter_config.json; expected a PEFT LoRA adapter directory")
    require_lora(info, where, dora=False)
    check_adapter_weights(d, where)  # pickled, truncated or corrupt weights: one line naming the file
    acfg = info.adapter_config
    f = d / "adapter_model.safetensors"
    tensors = load_file(str(f))
    pairs = {}
    for k in tensors:
        if k.endswith(".lora_A.weight"):
            prefix = k[: -len(".lora_A.weight")]
            if prefix + ".lora_B.weight" not in tensors:
                raise LorascopeError(f"adapter {d}: {k} has no matching lora_B weight")
            module = prefix.removeprefix("base_model.model.")
            pairs[module + ".weight"] = (tensors[k], tensors[prefix + ".lora_B.weight"], module)
    if not pairs:
        raise LorascopeError(f"adapter {d}: no lora_A / lora_B weights in {f.name}")
    return {"kind": "lora", "pairs": pairs, "r": acfg.get("r"), "alpha": acfg.get("lora_alpha"),
            "rslora": bool(acfg.get("use_rslora")), "alpha_pattern": acfg.get("alpha_pattern") or {},
            "module_types": sorted({m.rsplit(".", 1)[-1] for _, _, m in pairs.values()}), "dir": d}


def _lora_delta(src: dict[str, Any], key: str):
    import torch

    a, b, module = src["pairs"][key]
    r = a.shape[0]  # the saved shapes give the rank, rank_pattern included
    alpha = src["alpha"]
    for pattern, value in src["alpha_pattern"].items():  # as peft.utils.other.get_pattern_key
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    scale = alpha / (math.sqrt(r) if src["rslora"] else r)
    return scale * (b.to(torch.float64) @ a.to(torch.float64))


def _delta(src: dict[str, Any], key: str, w):
    import torch

    if src["kind"] == "lora":
        if key not in src["pairs"]:
            return None
        dw = _lora_delta(src, key)
    else:
        if key not in src["weights"]:
            return None
        dw = src["weights"].get(key).to(torch.float64) - w
    if tuple(dw.shape) != tuple(w.shape):
        raise LorascopeError(f"{src.get('dir', 'checkpoint')}: the update of {key} has shape {tuple(dw.shape)}, "
                             f"the base matrix {tuple(w.shape)}; it does not fit this base model")
    return dw


def _keys_of(src: dict[str, Any], base_w: SafetensorsDir, full_types: list[str]) -> Iterator[str]:
    if src["kind"] == "lora":
        for key in src["pairs"]:
            if key not in base_w:
                raise LorascopeError(f"adapter {src['dir']}: adapts {key}, which the base model does not have")
            yield key
        return
    for key in base_w.keys():
        if LAYER_RE.search(key) and key.endswith(".weight") and key.rsplit(".", 2)[-2] in full_types:
            yield key


def _sort_key(key: str):
    m = LAYER_RE.search(key)
    return (int(m.group(1)) if m else -1, key)


def _representative_layers(n_layers: int) -> set[int]:
    return {0, n_layers // 2, n_layers - 1}


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    header = ["model", "kind", "layer", "module", "key", "rows", "cols", *METRICS]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in records:
                w.writerow([r["model"], r["kind"], r["layer"], r["module"], r["key"], *r["shape"],
                            *["" if r[k] is None else r[k] for k in METRICS]])
