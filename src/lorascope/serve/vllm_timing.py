"""Timers inside vLLM's engine process: where one forward pass spends its time.

vLLM runs its model in an engine process of its own. This class is mixed into vLLM's worker
through the engine argument `worker_extension_cls` (a dotted name, imported there like any
installed module: no code or pickle crosses the process boundary), and its methods are called
by name through `LLM.collective_rpc`. Installed, it wraps, per instance:

- the model's `forward` and `compute_logits`: one record per forward pass, from the start of
  `forward` to the end of `compute_logits` (the logits included, sampling not), with the
  number of tokens the pass computed;
- every linear layer's `quant_method.apply` (the base model's matrix products, the LM head
  included): "base";
- every LoRA layer's `_apply_lora_to_output` (vLLM's punica ops: the shrink and expand
  products and the add into the base output): "lora".

Wall-clock timers are exact on a CPU (every op runs synchronously) and, on a GPU, are
synchronised before each reading; the engine runs eagerly in both arms on CPU, so the wrapped
methods are really called (compiled graphs would bypass them: the caller checks that LoRA
time was recorded when an adapter was in the batch).
"""

from __future__ import annotations

import time
from typing import Any


class LoraTimingExtension:
    """Methods for vLLM's worker; `self` is the worker (its `model_runner` holds the model)."""

    def lorascope_timers_install(self) -> dict[str, int]:
        import torch
        from vllm.lora.layers import BaseLayerWithLoRA

        if getattr(self, "_lorascope_timing", None) is not None:
            return self._lorascope_timing["counts"]
        model = self.model_runner.get_model()
        cuda = next(model.parameters()).device.type == "cuda"
        st: dict[str, Any] = {"records": [], "cur": None, "undo": [], "counts": {"base": 0, "lora": 0}}

        def now() -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def timed(obj, attr: str, bucket: str):
            orig = getattr(obj, attr)

            def wrapper(*args, **kwargs):
                cur = st["cur"]
                if cur is None:
                    return orig(*args, **kwargs)
                t = now()
                try:
                    return orig(*args, **kwargs)
                finally:
                    cur[bucket] += now() - t

            setattr(obj, attr, wrapper)
            st["undo"].append((obj, attr))

        seen: set[int] = set()
        for m in model.modules():
            if isinstance(m, BaseLayerWithLoRA) and hasattr(m, "_apply_lora_to_output"):
                timed(m, "_apply_lora_to_output", "lora")
                st["counts"]["lora"] += 1
            qm = getattr(m, "quant_method", None)
            if qm is not None and hasattr(qm, "apply") and hasattr(m, "weight") and id(qm) not in seen:
                seen.add(id(qm))
                timed(qm, "apply", "base")
                st["counts"]["base"] += 1
        fwd, logits = model.forward, model.compute_logits

        def forward(input_ids=None, *args, **kwargs):
            ref = input_ids if input_ids is not None else kwargs.get("positions")
            n = int(ref.shape[-1]) if ref is not None else None
            st["cur"] = {"tokens": n, "base": 0.0, "lora": 0.0, "start": now()}
            return fwd(input_ids, *args, **kwargs)

        def compute_logits(*args, **kwargs):
            try:
                return logits(*args, **kwargs)
            finally:
                cur = st["cur"]
                if cur is not None:
                    cur["total"] = now() - cur.pop("start")
                    st["records"].append(cur)
                    st["cur"] = None

        model.forward, model.compute_logits = forward, compute_logits
        st["undo"] += [(model, "forward"), (model, "compute_logits")]
        self._lorascope_timing = st
        return st["counts"]

    def lorascope_timers_take(self) -> list[dict[str, float]]:
        """The records of the forward passes since the last call, oldest first."""
        st = self._lorascope_timing
        out, st["records"] = st["records"], []
        return out

    def lorascope_timers_remove(self) -> None:
        st = getattr(self, "_lorascope_timing", None)
        if st is None:
            return
        for obj, attr in reversed(st["undo"]):
            # the wrappers are instance attributes: deleting one uncovers the class's method again
            obj.__dict__.pop(attr, None)
        self._lorascope_timing = None
