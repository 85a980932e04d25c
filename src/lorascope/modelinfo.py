"""What a trained model's folder holds, read in one place.

A folder that `lorascope train` writes (and that eval, drift, weights and serve-bench read) is
either a PEFT LoRA adapter or a whole model:

  lorascope-model.json        lorascope's record, written last at training time (optional: folders
                              from elsewhere have none): base_model, base_revision, resolved_base,
                              base_fingerprint (architecture of the base it was trained on),
                              method ("lora" / "full"), task, lora (rank, alpha, dropout,
                              target_modules; null for full)
  adapter_config.json         PEFT's config of an adapter (peft_type, r, lora_alpha, use_rslora,
                              use_dora, alpha_pattern, rank_pattern, target_modules, ...)
  adapter_model.safetensors   the adapter's A and B matrices (a pickled adapter_model.bin is refused)
  config.json + *.safetensors a whole model (full fine-tuning)

`read_model_dir` tells which it is and reads both JSON files, with one line naming the file for
anything unreadable; `check_adapter_weights` checks an adapter's weights before anything loads
them. Every reader of these folders goes through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import LorascopeError

META_FILE = "lorascope-model.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class ModelDir:
    """A trained model's folder: `kind` "lora" (a PEFT adapter) or "full" (a whole model)."""

    path: Path
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)  # lorascope-model.json ({} when absent)
    adapter_config: dict[str, Any] | None = None  # adapter_config.json (adapters only)

    @property
    def method(self) -> str:
        return self.meta.get("method") or ("lora" if self.kind == "lora" else "full")

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    @property
    def rank(self) -> int | None:
        return int(self.adapter_config["r"]) if self.adapter_config and self.adapter_config.get("r") else None


def _read_json(f: Path, where: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LorascopeError(f"{where}: {f.name} is not valid JSON ({exc}); expected {what}") from None
    if not isinstance(data, dict):
        raise LorascopeError(f"{where}: {f.name} holds a {type(data).__name__}, not an object; expected {what}")
    return data


def read_model_dir(path: str | Path, where: str,
                   expected: str = "a model directory or a PEFT adapter directory") -> ModelDir:
    """Which kind of folder `path` is, with its lorascope record and adapter config.

    `where` starts every error line (e.g. "--tuned lora=runs/x", "adapter mrpc (runs/x)").
    """
    d = Path(path)
    if not d.is_dir():
        raise LorascopeError(f"{where}: no such directory; expected {expected}")
    meta_file = d / META_FILE
    meta = _read_json(meta_file, where, "lorascope's training record") if meta_file.is_file() else {}
    if (d / ADAPTER_CONFIG).is_file():
        acfg = _read_json(d / ADAPTER_CONFIG, where, "a PEFT adapter config")
        return ModelDir(d, "lora", meta, acfg)
    if (d / "config.json").is_file():
        return ModelDir(d, "full", meta)
    raise LorascopeError(f"{where}: neither {ADAPTER_CONFIG} (PEFT adapter) nor config.json (model directory) found")


def require_lora(info: ModelDir, where: str, *, dora: bool = True) -> None:
    """A LoRA adapter with a positive rank (and, with dora=False, not DoRA), else one line."""
    acfg = info.adapter_config or {}
    if acfg.get("peft_type", "LORA") != "LORA":
        raise LorascopeError(f"{where}: peft_type {acfg.get('peft_type')!r}; only LoRA adapters are supported")
    if not dora and acfg.get("use_dora"):
        raise LorascopeError(f"{where}: DoRA adapters (use_dora: true) are not supported; their update is "
                             f"not scale * B @ A")
    r = acfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LorascopeError(f"{where}: {ADAPTER_CONFIG} field r={r!r}; expected a positive rank")


def check_adapter_weights(d: Path, where: str, base_shapes: dict[str, list[int]] | None = None,
                          base_name: str = "the base model") -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """Check a PEFT LoRA adapter folder's weights before anything loads them.

    Returns the tensors' shapes and, when `base_shapes` is given, the adapted matrices
    ({module, d_in, d_out, rank} each). One line for each problem: pickled weights
    (adapter_model.bin: refused, with how to convert), a missing, truncated or corrupt
    adapter_model.safetensors, no A/B pair, and A / B shapes that do not fit the base's matrices.
    """
    from lorascope.checkpoint import check_safetensors

    d = Path(d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            raise LorascopeError(
                f"{d / 'adapter_model.bin'}: pickled adapter weights, which lorascope refuses to load (unpickling can "
                f"run code); if you trust the file, convert it once with: python -c \"import torch, safetensors.torch "
                f"as st; st.save_file(torch.load('{d}/adapter_model.bin', weights_only=True), "
                f"'{d}/adapter_model.safetensors')\"")
        raise LorascopeError(f"{where}: no {ADAPTER_WEIGHTS} (lorascope loads safetensors only)")
    problem = check_safetensors(weights)  # the header alone does not show a truncated file
    if problem:
        raise LorascopeError(f"{where}: {weights.name} is unreadable: {problem}")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (OSError, ValueError) as exc:
        raise LorascopeError(f"{where}: {weights.name} is unreadable: {exc}") from None
    if not any(".lora_A." in k for k in shapes):
        raise LorascopeError(f"{where}: {weights.name} holds no lora_A / lora_B tensors")
    modules: list[dict[str, Any]] = []
    if base_shapes is None:
        return shapes, modules
    for key, a_shape in shapes.items():
        if ".lora_A." not in key:
            continue
        target = key.split(".lora_A.")[0]
        base_key = target.removeprefix("base_model.model.") + ".weight"
        b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if base_key not in base_shapes:
            raise LorascopeError(f"{where}: adapts {base_key}, which the base model {base_name} does not have; the "
                                 f"adapter was trained for another base model")
        d_out, d_in = base_shapes[base_key][:2]
        if len(a_shape) != 2 or a_shape[1] != d_in or b_shape is None or b_shape[0] != d_out:
            raise LorascopeError(f"{where}: does not fit the base model {base_name}: {target} has shapes A {a_shape} "
                                 f"/ B {b_shape}, but the base matrix is {d_out}x{d_in}; the adapter was trained for "
                                 f"another base model")
        modules.append({"module": base_key, "d_in": d_in, "d_out": d_out, "rank": a_shape[0]})
    return shapes, modules
