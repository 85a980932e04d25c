"""The shared padding helper against a plain list-based construction."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_matches_a_plain_loop(side):
    from lorascope.lm import pad_batch

    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, mask = pad_batch(seqs, 0, side=side)
    want_ids, want_mask = [], []
    for s in seqs:
        pad = [0] * (3 - len(s))
        want_ids.append(s + pad if side == "right" else pad + s)
        want_mask.append([1] * len(s) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(s))
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert str(ids.dtype) == "torch.int64" and str(mask.dtype) == "torch.int64"
    with pytest.raises(ValueError, match="side must be"):
        pad_batch(seqs, 0, side="middle")
