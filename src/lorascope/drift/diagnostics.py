"""Why raw token statistics mislead: where the centred Gram energy of the base model's states sits.

For one layer state with token rows ``x_i`` (all real tokens of the prompts), the centred
Gram matrix ``K = Xc Xc^T`` is what linear CKA is built from (``CKA = <K, L> / (|K| |L|)``).
The share of its energy ``|K|_F^2`` carried by the rows of one kind of token is ::

    sum_{i in kind} sum_j K_ij^2 / |K|_F^2 = tr(S C_kind) / tr(S^2)

with ``S = Xc^T Xc`` and ``C_kind = sum_{i in kind} (x_i - mu)(x_i - mu)^T`` (the kinds'
shares sum to 1). Both need only per-kind co-moments (d x d, float64, Chan merge), so
memory does not grow with the number of prompts. Also reported: the share of tokens of
each kind, their root-mean-square norm, and the feature dimensions with the largest share
of the variance (all tokens, and content tokens only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorascope.similarity import fold_comoment, fold_mean
from lorascope.tasks.base import TOKEN_KINDS

TOP_DIMS = 5


class KindMoments:
    """Running count, mean and centred co-moment per token kind, for one layer state."""

    def __init__(self, hidden: int):
        self.n = {k: 0 for k in TOKEN_KINDS}
        self.mean = {k: np.zeros(hidden) for k in TOKEN_KINDS}
        self.m2 = {k: np.zeros((hidden, hidden)) for k in TOKEN_KINDS}

    def add(self, kind: str, x: np.ndarray) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        na = self.n[kind]
        mb = x.mean(axis=0)
        xc = x - mb
        delta = fold_mean(self.mean[kind], mb, na, nb)
        fold_comoment(self.m2[kind], xc.T @ xc, na, nb, delta, delta)
        self.n[kind] = na + nb

    def summary(self) -> dict[str, Any]:
        total = sum(self.n.values())
        mu = sum(self.n[k] * self.mean[k] for k in TOKEN_KINDS) / total
        about = {}  # each kind's co-moment about the overall mean
        for k in TOKEN_KINDS:
            d = self.mean[k] - mu
            about[k] = self.m2[k] + self.n[k] * np.outer(d, d)
        s = sum(about.values())
        energy = float(np.sum(s * s))
        var = np.diag(s) / total
        content_var = np.diag(self.m2["content"]) / max(self.n["content"], 1)
        return {
            "tokens": {k: self.n[k] for k in TOKEN_KINDS},
            "token_share": {k: self.n[k] / total for k in TOKEN_KINDS},
            "gram_energy_share": {k: float(np.sum(s * about[k])) / energy if energy > 0 else None for k in TOKEN_KINDS},
            "rms_norm": {k: float(np.sqrt((np.trace(self.m2[k]) + self.n[k] * self.mean[k] @ self.mean[k]) / self.n[k]))
                         if self.n[k] else None for k in TOKEN_KINDS},
            "top_dims_all": _top(var),
            "top_dims_content": _top(content_var) if self.n["content"] > 1 else [],
        }


def _top(var: np.ndarray) -> list[list[float]]:
    total = float(var.sum())
    if total <= 0:
        return []
    order = np.argsort(-var)[:TOP_DIMS]
    return [[int(i), float(var[i] / total)] for i in order]


def kind_diagnostics(model, token_ids: list[list[int]], kinds: list[list[str]], pad_id: int, batch_size: int,
                     device) -> dict[str, Any]:
    """Gram-energy shares per token kind, token shares, RMS norms and top variance dimensions, per layer state."""
    from lorascope.drift.capture import LayerCapture, collate, forward_lockstep

    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    cap = LayerCapture(model)
    hidden = model.get_decoder().embed_tokens.weight.shape[1]
    moments = [KindMoments(hidden) for _ in range(cap.n_states)]
    with cap:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([token_ids[i] for i in idx], pad_id, device=device)
            states = forward_lockstep([model], [cap], batch)[0]
            flat = np.array([k for i in idx for k in kinds[i]])  # row-major, as the selection
            for layer, h in enumerate(states):
                x = h.detach().cpu().numpy().astype(np.float64)
                for kind in TOKEN_KINDS:
                    moments[layer].add(kind, x[flat == kind])
    return {"n_examples": len(token_ids), "model": "base", "top_dims": TOP_DIMS,
            "layers": [m.summary() for m in moments]}
