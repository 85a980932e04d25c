"""What every task shares: the example record, prompt formatting, training features."""

from __future__ import annotations

import difflib
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from lorascope import LorascopeError

log = logging.getLogger(__name__)

TASKS: dict[str, type["Task"]] = {}



def register(cls: type["Task"]) -> type["Task"]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> "Task":
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LorascopeError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}{hint}")
    return TASKS[name]()


@dataclass
class Example:
    id: str
    prompt: str  # the user's message: instruction and inputs
    answer: str | None  # training target; None when the split has no labels
    meta: dict[str, Any] = field(default_factory=dict)
    # character spans [start, end) of `prompt` that are the example's own content (MRPC: the two
    # sentences; SQuAD: context and question), as opposed to instruction text shared by every prompt
    content: list[tuple[int, int]] = field(default_factory=list)


def build_prompt(*pieces: tuple[str, bool]) -> tuple[str, list[tuple[int, int]]]:
    """Join (text, is_content) pieces into the user message; return it and its content spans."""
    text, spans = "", []
    for piece, is_content in pieces:
        if is_content and piece:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


@dataclass
class Feature:
    """A tokenised training example: loss on input_ids[answer_start:] only."""
    id: str
    input_ids: list[int]
    answer_start: int


class Task:
    name: str = ""
    description: str = ""

    def load_split(self, split: str, data) -> list[Example]:
        """Examples of `split` ("train", "eval", or task-specific extras), before subsetting."""
        raise NotImplementedError

    def examples(self, split: str, data, *, limit: int | None = None) -> list[Example]:
        """A deterministic subset (seeded by data.subset_seed) of a split, in the split's order."""
        exs = self.load_split(split, data)
        if not exs:
            raise LorascopeError(f"task {self.name}: the {split} split is empty")
        if limit is not None and limit < len(exs):
            keep = sorted(random.Random(f"{data.subset_seed}-{self.name}-{split}").sample(range(len(exs)), limit))
            exs = [exs[i] for i in keep]
        return exs

    def features(self, tok, examples: list[Example], max_len: int) -> list[Feature]:
        """Prompt + answer + end-of-sequence; examples that do not fit are skipped and counted."""
        out, skipped = [], 0
        for ex in examples:
            p = prompt_ids(tok, ex.prompt)
            a = answer_ids(tok, ex.answer)
            if len(p) + len(a) > max_len:
                skipped += 1
                continue
            out.append(Feature(ex.id, p + a, len(p)))
        if skipped:
            log.warning("%s: skipped %d of %d training examples longer than %d tokens", self.name, skipped,
                        len(examples), max_len)
        return out

    def evaluate(self, model, tok, examples: list[Example], *, batch_size: int, max_new_tokens: int,
                 max_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (metrics, predictions) on `examples`."""
        raise NotImplementedError

    def baselines(self, examples: list[Example]) -> dict[str, Any]:
        return {}


def uses_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_text(tok, user: str) -> str:
    """The prompt as the model sees it: its chat template when it has one, else plain text.

    No system message of our own: the template's default is what the model was tuned
    with (a short custom one made SmolLM2-135M answer "What is the capital of France?"
    in broken French).
    """
    if uses_chat_template(tok):
        msgs = [{"role": "user", "content": user}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{user}\nAnswer:"


def prompt_ids(tok, user: str) -> list[int]:
    ids = tok(prompt_text(tok, user), add_special_tokens=False)["input_ids"]
    if not uses_chat_template(tok) and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def answer_ids(tok, answer: str | None, *, eos: bool = True) -> list[int]:
    """Answer tokens as they follow the prompt (plain prompts put a space after 'Answer:')."""
    if answer is None:
        raise LorascopeError("cannot train on an example without an answer")
    text = answer if uses_chat_template(tok) else " " + answer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if eos else ids


# ---------------------------------------------------------------------------
# which prompt tokens are the example's own content
# ---------------------------------------------------------------------------

#: kinds of prompt tokens: position 0 (an attention sink in Llama-family models, whatever the
#: token), template (chat template, system prompt, role tags, instruction text, generation
#: prompt: the same in every prompt) and content (the example's own text)
TOKEN_KINDS = ("first_position", "template", "content")


def prompt_token_kinds(tok, ex: Example, *, model: str = "the model") -> tuple[list[int], list[str]]:
    """The prompt's token ids (as :func:`prompt_ids`) and the kind of each token (:data:`TOKEN_KINDS`).

    A token is content when one of its non-blank characters lies in a content span of
    ``ex.content``, located in the rendered prompt through the tokenizer's character offsets.
    Position 0 is always ``first_position``. Raises a LorascopeError naming `model` when the
    template does not contain the user message verbatim or the tokenizer gives no offsets.
    """
    if not ex.content:
        raise LorascopeError(f"example {ex.id}: the prompt builder marked no content span; content-token "
                             f"drift needs them (or include all tokens: --tokens all)")
    text = prompt_text(tok, ex.prompt)
    at = text.find(ex.prompt)
    if at < 0:
        raise LorascopeError(f"the chat template of {model} does not contain the prompt verbatim, so its content "
                             f"tokens cannot be located (example {ex.id}); include all tokens instead (--tokens all)")
    if not getattr(tok, "is_fast", False):
        raise LorascopeError(f"the tokenizer of {model} is not a fast tokenizer and gives no character offsets, so "
                             f"content tokens cannot be located; include all tokens instead (--tokens all)")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if not uses_chat_template(tok) and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids, offsets = [tok.bos_token_id] + ids, [(0, 0)] + offsets
    solid = [False] * (len(text) + 1)
    for a, b in ex.content:
        for c in range(at + a, at + b):
            solid[c] = not text[c].isspace()
    kinds = []
    for i, (a, b) in enumerate(offsets):
        if i == 0:
            kinds.append("first_position")
        else:
            kinds.append("content" if any(solid[a:b]) else "template")
    return ids, kinds
