"""Hidden-state capture: forward hooks, batches, and lockstep forward passes.

The states compared are the output of the token embedding and of every decoder layer
(``num_hidden_layers + 1`` states), taken with forward hooks on
``model.get_decoder().embed_tokens`` and each of ``model.get_decoder().layers``. That
works unchanged for PEFT models (the hooks sit on the LoRA-wrapped modules). The last
state is the last decoder layer's output, *before* the final norm.

Every model sees the same token ids and the same attention mask; sequences are
right-padded, so with causal attention the states of real tokens do not depend on the
padding. Only the selected tokens (real tokens, optionally minus position 0) are kept,
as one ``(tokens, hidden)`` float32 tensor per state, example after example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass
class Batch:
    """A batch of examples from one jackknife group."""
    group: int
    examples: list[int]  # indices into the example list


def assign_groups(n: int, groups: int, seed: str) -> list[int]:
    """Group of each of `n` examples: a seeded random partition into `groups` near-equal parts."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    group = [0] * n
    for pos, i in enumerate(order):
        group[i] = pos % groups
    return group


def make_batches(lengths: list[int], group_of: list[int], batch_size: int) -> list[Batch]:
    """Batches of up to `batch_size` examples, each within one group, sorted by length (little padding).

    A pure function of its arguments: the same batches for any number of processes, so the
    hidden states, and the results, do not depend on how the work is sharded.
    """
    batches = []
    for g in sorted(set(group_of)):
        members = sorted((i for i, gi in enumerate(group_of) if gi == g), key=lambda i: (lengths[i], i))
        batches += [Batch(g, members[k:k + batch_size]) for k in range(0, len(members), batch_size)]
    return batches


def collate(token_ids: list[list[int]], pad_id: int, *, drop_first_position: bool = False,
            select: list[list[bool]] | None = None, device) -> dict[str, Any]:
    """Right-padded ids, attention mask, and the mask of tokens to measure.

    `select` (one bool per token of each prompt) picks the measured tokens, e.g. the
    content tokens; without it every real token is measured (minus position 0 with
    `drop_first_position`).
    """
    import torch

    from lorascope.lm import pad_batch

    ids, mask = pad_batch(token_ids, pad_id)
    width = ids.shape[1]
    if select is None:
        select = mask.bool()
        if drop_first_position:
            select[:, 0] = False
    else:
        chosen = torch.zeros((len(token_ids), width), dtype=torch.bool)
        for i, s in enumerate(select):
            chosen[i, :len(s)] = torch.tensor(s, dtype=torch.bool)
        select = chosen & mask.bool()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "select": select.to(device),
            "counts": select.sum(1).tolist()}


class LayerCapture:
    """Forward hooks that keep the selected tokens' states of the embedding and every decoder layer.

    Use as a context manager around one or more forward passes; set :attr:`select` (a
    ``(batch, seq)`` bool tensor) before each pass. After a pass, :attr:`states` holds
    ``num_hidden_layers + 1`` float32 tensors of shape ``(selected tokens, hidden)``.
    With ``enabled=False`` the hooks are installed but keep nothing (to time the
    forward passes alone).
    """

    def __init__(self, model, *, enabled: bool = True):
        decoder = model.get_decoder()
        self.modules = [decoder.embed_tokens, *decoder.layers]
        self.enabled = enabled
        self.select = None
        self.states: list[Any] = [None] * len(self.modules)
        self._handles: list[Any] = []

    @property
    def n_states(self) -> int:
        return len(self.modules)

    def __enter__(self) -> LayerCapture:
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not self.enabled:
                return None
            h = output[0] if isinstance(output, tuple) else output
            self.states[i] = h[self.select].float()
            return None
        return hook


def forward_lockstep(models: list, captures: list[LayerCapture], batch: dict[str, Any]) -> list[list[Any]]:
    """Run every model's decoder on the same batch; return each model's captured states.

    Only the decoder runs (no vocabulary logits): the states are all hooks need.
    """
    import torch

    out = []
    with torch.inference_mode():
        for model, cap in zip(models, captures):
            cap.select = batch["select"]
            model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False)
            out.append(list(cap.states))
            cap.states = [None] * cap.n_states
    return out
