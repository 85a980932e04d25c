"""The one place that turns token lists into padded model inputs.

Training, evaluation, drift and the transformers serving engine all batch prompts of
different lengths: right padding where the states of real tokens are read (causal
attention keeps them independent of the padding), left padding where `generate`
appends new tokens after every prompt.
"""

from __future__ import annotations

from typing import Any


def pad_batch(seqs: list[list[int]], pad_id: int, *, side: str = "right", device: Any = None):
    """(ids, attention mask) as long tensors of shape (len(seqs), longest), padded on `side`."""
    import torch

    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        at = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, at] = torch.tensor(s, dtype=torch.long)
        mask[i, at] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
