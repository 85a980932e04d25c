"""SQuAD v2.0: extractive question answering with unanswerable questions.

The model generates a short answer, or the fixed string "unanswerable" (scored as the
empty prediction). Metrics are the official SQuAD v2 ones (see squad_metric.py).

Data: the Hugging Face Hub (`rajpurkar/squad_v2`) or local official JSON files. Without
`train-v2.0.json` (as on machines that only have the dev file) the train and eval sets
are both drawn from `dev-v2.0.json`, split by article so that no article, and so no
context paragraph, is on both sides.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from lorascope import LorascopeError
from lorascope.tasks import squad_metric
from lorascope.tasks.base import Example, Feature, Task, answer_ids, prompt_ids, register

log = logging.getLogger(__name__)

NO_ANSWER = "unanswerable"


def make_prompt(context: str, question: str) -> str:
    return (f"Context: {context}\nQuestion: {question}\n"
            f"Answer with a short span copied from the context, or with \"{NO_ANSWER}\" "
            "if the context does not contain the answer.")


def to_prediction(text: str) -> str:
    """Generated text -> official prediction: first line, stripped; the no-answer string -> ''."""
    line = text.strip().split("\n", 1)[0].strip()
    return "" if line.strip(" .\"'").lower() == NO_ANSWER else line


def split_articles(articles: list[dict], eval_share: float) -> tuple[list[dict], list[dict]]:
    """Deterministic split of one file's articles into (train, eval) by article.

    Articles are ordered by the SHA-256 of their title and assigned to eval until it holds
    at least `eval_share` of the questions; the rest go to train.
    """
    def n_q(a):
        return sum(len(p["qas"]) for p in a["paragraphs"])

    ordered = sorted(articles, key=lambda a: hashlib.sha256(a.get("title", "").encode()).hexdigest())
    total = sum(n_q(a) for a in articles)
    ev, tr, seen = [], [], 0
    for a in ordered:
        if seen < eval_share * total:
            ev.append(a)
            seen += n_q(a)
        else:
            tr.append(a)
    if not tr or not ev:
        raise LorascopeError(f"squad_v2: cannot split {len(articles)} article(s) by article into train and eval; "
                             "provide train-v2.0.json or a file with more articles")
    return tr, ev


def articles_to_examples(articles: list[dict]) -> list[Example]:
    out = []
    for a in articles:
        for p in a["paragraphs"]:
            for qa in p["qas"]:
                answers = qa["answers"]
                out.append(Example(
                    qa["id"], make_prompt(p["context"], qa["question"]),
                    answers[0]["text"] if answers else NO_ANSWER,
                    {"title": a.get("title", ""), "context": p["context"], "question": qa["question"],
                     "answers": [{"text": x["text"], "answer_start": x.get("answer_start", -1)} for x in answers]}))
    return out


def examples_to_articles(examples: list[Example]) -> list[dict]:
    """The official JSON structure for a list of examples, so the official scorer applies."""
    return [{"title": "subset", "paragraphs": [
        {"context": e.meta["context"], "qas": [{"id": e.id, "question": e.meta["question"],
                                                "answers": e.meta["answers"]}]} for e in examples]}]


@register
class SquadV2(Task):
    name = "squad_v2"
    description = "SQuAD v2.0 extractive QA with unanswerable questions (official exact / F1, HasAns / NoAns)"

    def load_split(self, split: str, data) -> list[Example]:
        if split not in ("train", "eval"):
            raise LorascopeError(f"squad_v2: unknown split {split!r}; accepted: train, eval")
        root = data.resolved_dir()
        if root is None:
            return self._hub(split)
        d = Path(root) / "squad_v2" if (Path(root) / "squad_v2").is_dir() else Path(root)
        dev, train = d / "dev-v2.0.json", d / "train-v2.0.json"
        if not dev.is_file():
            raise LorascopeError(f"squad_v2: {dev} not found; expected the official dev-v2.0.json "
                                 f"(and optionally train-v2.0.json) in {d}")
        if train.is_file():
            arts = _load(train if split == "train" else dev)
            return articles_to_examples(arts)
        tr, ev = split_articles(_load(dev), data.squad_eval_share)
        exs = articles_to_examples(tr if split == "train" else ev)
        log.info("squad_v2: no %s; split %s by article: %d train articles (%d questions), "
                 "%d eval articles (%d questions); using the %s side",
                 train.name, dev.name, len(tr), sum(len(p["qas"]) for a in tr for p in a["paragraphs"]),
                 len(ev), sum(len(p["qas"]) for a in ev for p in a["paragraphs"]), split)
        return exs

    def _hub(self, split: str) -> list[Example]:
        from datasets import load_dataset

        try:
            ds = load_dataset("rajpurkar/squad_v2", split="train" if split == "train" else "validation")
        except Exception as exc:
            raise LorascopeError(f"squad_v2: could not load rajpurkar/squad_v2 from the Hugging Face Hub "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                 f"set data.dir or LORASCOPE_DATA_DIR to a folder with dev-v2.0.json") from None
        out = []
        for r in ds:
            answers = [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
            out.append(Example(r["id"], make_prompt(r["context"], r["question"]),
                               answers[0]["text"] if answers else NO_ANSWER,
                               {"title": r["title"], "context": r["context"], "question": r["question"],
                                "answers": answers}))
        return out

    def features(self, tok, examples, max_len):
        """Like Task.features, but a context too long is cut to a window around the answer."""
        out, cut, skipped = [], 0, 0
        for ex in examples:
            p = prompt_ids(tok, ex.prompt)
            a = answer_ids(tok, ex.answer)
            if len(p) + len(a) > max_len:
                p = self._truncated_prompt(tok, ex, max_len - len(a))
                if p is None:
                    skipped += 1
                    continue
                cut += 1
            out.append(Feature(ex.id, p + a, len(p)))
        if cut or skipped:
            log.warning("squad_v2: %d of %d training contexts cut to a window around the answer; %d skipped "
                        "(answer window does not fit in %d tokens)", cut, len(examples), skipped, max_len)
        return out

    def _truncated_prompt(self, tok, ex: Example, budget: int) -> list[int] | None:
        ctx = ex.meta["context"]
        if ex.meta["answers"]:
            a0 = ex.meta["answers"][0]
            start = a0["answer_start"] if a0["answer_start"] >= 0 else ctx.find(a0["text"])
            if start < 0:
                return None
            end = start + len(a0["text"])
        else:
            start = end = 0  # nothing to keep: cut from the end
        enc = tok(ctx, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        overhead = len(prompt_ids(tok, make_prompt("", ex.meta["question"])))
        keep = budget - overhead - 4  # a few tokens of slack: re-tokenising a substring can differ
        if keep < 8:
            return None
        first = next((i for i, (s, e) in enumerate(offsets) if e > start), 0)
        last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), first)
        if last - first + 1 > keep:
            return None
        lo = max(0, min(first - (keep - (last - first + 1)) // 2, len(offsets) - keep))
        for shrink in range(0, keep, 4):
            hi = min(len(offsets), lo + keep - shrink)
            window = ctx[offsets[lo][0]:offsets[hi - 1][1]]
            p = prompt_ids(tok, make_prompt(window, ex.meta["question"]))
            if len(p) <= budget:
                return p
        return None

    def evaluate(self, model, tok, examples, *, batch_size, max_new_tokens=32, max_len=1024):
        import torch
        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        prompts = {e.id: prompt_ids(tok, e.prompt) for e in examples}
        kept = [e for e in examples if len(prompts[e.id]) + max_new_tokens <= max_len]
        skipped = len(examples) - len(kept)
        if skipped:
            log.warning("squad_v2: skipped %d of %d questions whose prompt exceeds %d tokens", skipped,
                        len(examples), max_len)
        stop = [tok.eos_token_id]
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        if len(nl) == 1:
            stop.append(nl[0])
        order = sorted(kept, key=lambda e: len(prompts[e.id]))
        raw: dict[str, str] = {}
        model.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="squad_v2 eval", unit="batch"):
                batch = order[start:start + batch_size]
                width = max(len(prompts[e.id]) for e in batch)
                ids = torch.tensor([[tok.pad_token_id] * (width - len(prompts[e.id])) + prompts[e.id]
                                    for e in batch], device=device)
                mask = torch.tensor([[0] * (width - len(prompts[e.id])) + [1] * len(prompts[e.id])
                                     for e in batch], device=device)
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
                for e, row in zip(batch, gen[:, width:]):
                    raw[e.id] = tok.decode(row, skip_special_tokens=True)
        preds = {e.id: to_prediction(raw[e.id]) for e in kept}
        arts = examples_to_articles(kept)
        metrics = dict(squad_metric.score_predictions(arts, preds))
        metrics["skipped_too_long"] = skipped
        _, f1 = squad_metric.raw_scores(arts, preds)  # per question, for paired comparisons of models
        return metrics, {"predictions": preds, "generated": raw, "scores": f1}

    def baselines(self, examples):
        arts = examples_to_articles(examples)
        return {"always_no_answer": dict(squad_metric.score_predictions(arts, {e.id: "" for e in examples}))}


def _load(path: Path) -> list[dict]:
    try:
        return squad_metric.load_squad_json(path)
    except ValueError as exc:
        raise LorascopeError(str(exc)) from None
