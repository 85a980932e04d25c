"""The shared padding helper and the training loss on padded batches, each against a plain loop."""

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


def test_training_loss_and_gradients_on_a_padded_batch_equal_a_loop_over_unpadded_examples(tiny_model):
    """AnswerLoss on a right-padded micro-batch against a plain loop that runs each example alone
    (no padding, no mask): the same summed answer-token loss and gradients. The model
    runs in float64; the loss, like AnswerLoss's, takes float32 logits, hence float32 tolerances."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lorascope.train import AnswerLoss, collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    lengths, starts = [9, 5, 7, 3], [6, 2, 5, 1]
    feats = [SimpleNamespace(input_ids=torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist(),
                             answer_start=a) for n, a in zip(lengths, starts)]
    ids, mask, labels = collate(feats, 0, "cpu")
    assert mask.sum(1).tolist() == lengths  # padded, so the mask matters if anything reads padding

    loss = AnswerLoss(model)(ids, mask, labels)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    want_loss = torch.zeros(())
    for f in feats:
        x = torch.tensor([f.input_ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        target = x[0, 1:]
        keep = torch.arange(1, len(f.input_ids)) >= f.answer_start
        want_loss = want_loss + F.cross_entropy(logits[keep], target[keep], reduction="sum")
    want_loss.backward()
    assert torch.allclose(loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7), n
