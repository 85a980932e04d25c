"""The thin model interface every caller shares: padded inputs, log-likelihood, greedy generation.

Training, evaluation, drift and the transformers serving engine all batch prompts of
different lengths: right padding where the states of real tokens are read (causal
attention keeps them independent of the padding), left padding where `generate`
appends new tokens after every prompt. Tasks score with :func:`candidate_logprobs` /
:func:`answer_logprobs` (MRPC's "yes" / "no") and :func:`greedy_generate` (SQuAD v2's
answers); what a task does with the scores stays in the task.
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


def candidate_logprobs(model, tok, prompts: list[list[int]], candidates: list[list[int]], device) -> list[list[float]]:
    """Log-probability of each candidate answer after each prompt: scores[c][i].

    When every candidate is a single token (as "yes" / "no" are for most tokenizers) one
    forward pass of the prompts gives them all; otherwise one pass per candidate.
    """
    if all(len(c) == 1 for c in candidates):
        import torch

        ids, mask = pad_batch(prompts, tok.pad_token_id, device=device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[
            torch.arange(len(prompts), device=device), torch.tensor([len(p) - 1 for p in prompts], device=device)
        ]
        logp = torch.log_softmax(model.get_output_embeddings()(last).float(), dim=-1)
        return [logp[:, c[0]].tolist() for c in candidates]
    return [answer_logprobs(model, tok, prompts, c, device) for c in candidates]


def answer_logprobs(model, tok, prompts: list[list[int]], answer: list[int], device) -> list[float]:
    """Sum of log-probabilities of `answer` after each prompt (one forward pass, right padding)."""
    import torch

    seqs = [p + answer for p in prompts]
    ids, mask = pad_batch(seqs, tok.pad_token_id, device=device)
    # logits only where answer tokens are predicted: positions len(p)-1 .. len(p)+len(a)-2
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = torch.arange(len(seqs), device=device).repeat_interleave(len(answer))
    cols = torch.tensor([len(p) - 1 + k for p in prompts for k in range(len(answer))], device=device)
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(answer * len(prompts), device=device)
    token_lp = logp.gather(1, target[:, None]).squeeze(1).view(len(prompts), len(answer))
    return token_lp.sum(1).tolist()


def greedy_generate(model, tok, prompts: list[list[int]], max_new_tokens: int, stop: list[int], device, **generate_kw):
    """Greedy continuations of a batch of prompts (left padding): (new token ids, the per-step logits).

    `generate_kw` passes generation options through (e.g. ``begin_suppress_tokens``); the logits are
    the raw ones, before any such processing, one (batch, vocab) tensor per generated step."""
    ids, mask = pad_batch(prompts, tok.pad_token_id, side="left", device=device)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop, pad_token_id=tok.pad_token_id, output_logits=True,
                         return_dict_in_generate=True, **generate_kw)
    return gen.sequences[:, ids.shape[1]:], gen.logits
