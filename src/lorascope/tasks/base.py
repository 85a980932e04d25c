"""What every task shares: the example record, prompt formatting, training features."""

from __future__ import annotations

import difflib
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from lorascope import LorascopeError

log = logging.getLogger(__name__)

TASKS: dict[str, type[Task]] = {}



def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
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
    """A task: its data, prompts, metrics and everything the study needs to know about it.

    The verdict, the report, the learning-rate search, drift and `summary` read these
    attributes and methods instead of knowing task names.
    """
    name: str = ""
    description: str = ""
    #: the metric the verdict, the learning-rate search and drift-along judge by, and its label
    primary_metric: str = "accuracy"
    primary_label: str = ""
    #: (metric key, column title) of the report's and `summary`'s accuracy tables, in order
    report_columns: tuple[tuple[str, str], ...] = (("accuracy", "accuracy"),)
    #: held-out splits drift reads, in order; a later one only when the earlier hold too few examples
    drift_splits: tuple[str, ...] = ("eval",)
    #: how a training prompt longer than data.max_seq_len is handled (the report's length policy)
    long_prompt_rule: str = "skipped"

    # -- per-example scores from an evaluation's predictions file (the verdict's bootstrap) --

    def per_example_scores(self, pred: dict[str, Any]) -> dict[str, float] | None:
        """Example id -> primary-metric score (0-100), or None when the file has none."""
        if "scores" in pred:
            return {k: 100.0 * v for k, v in pred["scores"].items()}
        return None

    def clusters(self, pred: dict[str, Any]) -> tuple[dict[str, str] | None, str]:
        """Example id -> the unit the bootstrap resamples (None: each example), and the unit's name."""
        return None, "example"

    #: a second, equally defensible way to score the same predictions, that the verdict checks its decision
    #: on: a decision stands only where both give it (None: the task's metric leaves no such choice)
    alternative_measure: str | None = None
    #: the measure the verdict decides on, as the reason names it when the second one decides otherwise
    primary_measure: str = "the task's metric"

    def alternative_scores(self, pred: dict[str, Any], data=None, *,
                           same_ok: bool = False) -> tuple[dict[str, float] | None, str]:
        """Example id -> score (0-100) under `alternative_measure`, and the measure's description; or None and
        why not. `data` (a DataConfig): where gold labels a predictions file lacks can be read from. `same_ok`:
        also when the evaluation's own measure already is the alternative one (its scores, then)."""
        return None, "this task has no second measure"

    def baseline_scores(self, pred: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Per-example scores of the task's trivial baselines, recomputed from the gold labels."""
        return {}

    # -- evaluation settings decided at evaluation time --

    def prepare_eval(self, model, tok, cfg, examples: list[Example], kwargs: dict[str, Any]) -> dict | None:
        """Settle evaluation options before `evaluate` (in `kwargs`); return a record of it, or None."""
        e = cfg.eval
        if e.calibration_examples or e.no_answer_threshold or e.no_answer_signal != "first_token":
            log.info("%s has no no-answer option: eval.calibration_examples, eval.no_answer_signal and "
                     "eval.no_answer_threshold are ignored", self.name)
        return None

    def finish_eval(self, examples: list[Example], predictions: dict, metrics: dict, prepared: dict | None) -> None:
        """Add what `prepare_eval` decided to the metrics."""

    #: how a learning-rate search scores a trial on its validation split when not by the primary metric as
    #: evaluated (None); `selection_score` computes it
    selection_rule: str | None = None

    def selection_score(self, examples: list[Example], predictions: dict, eval_cfg) -> dict | None:
        """A search trial's validation score under `selection_rule` ({"value": ..., ...}), or None: the
        primary metric as evaluated. `eval_cfg`: the study's evaluation settings for the task."""
        return None

    def load_split(self, split: str, data) -> list[Example]:
        """Examples of `split` ("train", "eval", or task-specific extras), before subsetting."""
        raise NotImplementedError

    def examples(self, split: str, data, *, limit: int | None = None) -> list[Example]:
        """A deterministic subset (seeded by data.subset_seed) of a split, in the split's order.

        With data.validation_share > 0 the training subset is divided in two, by
        `group_key` (whole paragraphs for SQuAD): "validation" is that share of it, for
        choosing hyperparameters, and "train" is the rest. Nothing of the evaluation split
        is ever used for that choice.
        """
        side = "train" if split == "validation" else split
        exs = self.load_split(side, data)
        if not exs:
            raise LorascopeError(f"task {self.name}: the {side} split is empty")
        if limit is not None and limit < len(exs):
            keep = sorted(random.Random(f"{data.subset_seed}-{self.name}-{side}").sample(range(len(exs)), limit))
            exs = [exs[i] for i in keep]
        share = getattr(data, "validation_share", 0.0)
        if side == "train" and share > 0:
            import hashlib

            def in_validation(e: Example) -> bool:
                h = hashlib.sha256(f"{data.subset_seed}-validation-{self.group_key(e)}".encode()).digest()
                return int.from_bytes(h[:8], "big") < share * 2 ** 64

            n = len(exs)
            exs = [e for e in exs if in_validation(e) == (split == "validation")]
            if not exs:
                raise LorascopeError(
                    f"data.validation_share: {share} of {n} training examples leaves no "
                    f"{'validation' if split == 'validation' else 'training'} examples; accepted: a "
                    f"share between 0 and 1 that leaves both sides non-empty (or more training examples)"
                )
        elif split == "validation":
            raise LorascopeError(f"task {self.name}: the validation split is carved from the training side; "
                                 f"set data.validation_share between 0 and 1")
        return exs

    def group_key(self, ex: Example) -> str:
        """Examples with the same key go to the same side of a validation split."""
        return ex.id

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

    def scored(self, examples: list[Example], predictions: dict[str, Any]) -> list[Example]:
        """The examples `evaluate` scored (all of them unless the task skips some, e.g. prompts too long).

        The trivial baselines are computed on exactly these, so that a model and its baselines
        are always compared on the same examples.
        """
        return examples

    def leak_keys(self, ex: Example) -> set[str]:
        """What must not be shared between training and held-out examples: the id and the inputs."""
        return {f"id:{ex.id}", f"input:{ex.prompt}"}

    def check_held_out(self, data, held: list[Example], what: str) -> int:
        """Raise unless `held` shares nothing (see leak_keys) with the whole train split; return its size.

        Called at run time on every evaluation, calibration and drift set: a leak is an error,
        never a warning.
        """
        train = self.load_split("train", data)
        seen = set().union(*(self.leak_keys(e) for e in train)) if train else set()
        shared = [e.id for e in held if self.leak_keys(e) & seen]
        if shared:
            raise LorascopeError(
                f"{self.name}: {len(shared)} of the {len(held)} {what} examples share "
                f"{self.leak_unit} with the training split (first: {shared[0]}); the evaluation "
                f"would measure memorisation. Check the data files in {data.resolved_dir() or 'the Hub'}"
            )
        return len(train)

    leak_unit = "an example"


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
