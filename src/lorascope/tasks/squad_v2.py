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
from lorascope.lm import greedy_generate
from lorascope.tasks import squad_metric
from lorascope.tasks.base import Example, Feature, Task, answer_ids, build_prompt, prompt_ids, register

log = logging.getLogger(__name__)

NO_ANSWER = "unanswerable"


def make_prompt(context: str, question: str) -> str:
    return prompt_and_content(context, question)[0]


def prompt_and_content(context: str, question: str) -> tuple[str, list[tuple[int, int]]]:
    """The user message and the character spans of the context and the question in it."""
    return build_prompt(("Context: ", False), (context, True), ("\nQuestion: ", False), (question, True),
                        (f"\nAnswer with a short span copied from the context, or with \"{NO_ANSWER}\" "
                         "if the context does not contain the answer.", False))


def to_prediction(text: str) -> str:
    """Generated text -> official prediction: first line, stripped; the no-answer string -> ''."""
    line = text.strip().split("\n", 1)[0].strip()
    return "" if line.strip(" .\"'").lower() == NO_ANSWER else line


def no_answer_first_tokens(tok) -> list[int]:
    """First token ids of the no-answer string as the answer may start ("unanswerable", "Unanswerable", ...)."""
    out = []
    for text in (NO_ANSWER, NO_ANSWER.capitalize(), " " + NO_ANSWER, " " + NO_ANSWER.capitalize()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in out:
            out.append(ids[0])
    return out


# Per-question scores that say how much the model leans to "no answer" (higher: abstain sooner).
#   first_token: logit of the no-answer string's first token minus the best other first token
#                (> 0 exactly when greedy decoding would begin the no-answer string)
#   answer_nll:  negative log-likelihood (nats) of the model's own answer span, stop token
#                included, under the model's unsuppressed distribution: low confidence in the
#                answer it would give (the generative counterpart of extractive systems'
#                span score)
NO_ANSWER_SIGNALS = {"first_token": "no_answer_margin", "answer_nll": "answer_nll"}


def predictions_at(margins: dict[str, float], answers: dict[str, str], threshold: float) -> dict[str, str]:
    """Official predictions: no answer ('') where the no-answer score exceeds `threshold`, else the answer."""
    return {q: "" if margins[q] > threshold else answers[q] for q in answers}


def best_threshold(margins: dict[str, float], answers: dict[str, str], articles: list[dict]) -> dict:
    """The no-answer threshold with the best F1 on these questions (ties: the one nearest 0).

    Abstaining on the k questions of largest margin, for every k: F1(k) is exact, so the
    search is over every distinct decision, as in the official script's best_f1_thresh.
    """
    import numpy as np

    _, f1_answer = squad_metric.raw_scores(articles, answers)
    _, f1_abstain = squad_metric.raw_scores(articles, {q: "" for q in answers})
    qs = sorted(answers, key=lambda q: -margins[q])
    m = np.array([margins[q] for q in qs])
    gain = np.array([f1_abstain[q] - f1_answer[q] for q in qs])  # of abstaining instead of answering
    base = sum(f1_answer[q] for q in qs)
    totals = base + np.concatenate([[0.0], np.cumsum(gain)])  # abstain on the first k, k = 0..n
    # threshold for "abstain on the first k": between m[k-1] and m[k]; ends 1 beyond the extremes
    cuts = np.concatenate([[m[0] + 1.0], (m[:-1] + m[1:]) / 2, [m[-1] - 1.0]])
    distinct = np.concatenate([[True], m[:-1] != m[1:], [True]])  # ties in margin cannot be split
    best = max(np.flatnonzero(distinct), key=lambda k: (round(totals[k], 9), -abs(cuts[k])))
    greedy = predictions_at(margins, answers, 0.0)
    _, f1_greedy = squad_metric.raw_scores(articles, greedy)
    return {"threshold": float(cuts[best]), "n": len(qs), "abstained": int(best),
            "f1": 100.0 * totals[best] / len(qs), "f1_at_0": 100.0 * sum(f1_greedy.values()) / len(qs),
            "f1_always_no_answer": 100.0 * sum(f1_abstain.values()) / len(qs)}


def paragraph_key(context: str) -> str:
    """A short stable id of a context paragraph (the unit a bootstrap over SQuAD questions resamples)."""
    return hashlib.sha256(context.encode()).hexdigest()[:16]


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
                     "answers": [{"text": x["text"], "answer_start": x.get("answer_start", -1)} for x in answers],
                     # unanswerable questions' plausible answers: only to place training windows (see features)
                     "plausible_answers": [{"text": x["text"], "answer_start": x.get("answer_start", -1)}
                                           for x in qa.get("plausible_answers") or []]},
                    content=prompt_and_content(p["context"], qa["question"])[1]))
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
    primary_metric, primary_label = "f1", "SQuAD v2 F1"
    report_columns = (("exact", "exact"), ("f1", "F1"), ("HasAns_f1", "HasAns F1"), ("NoAns_f1", "NoAns F1"))
    long_prompt_rule = ("cut to a window at a random offset that keeps the answer, or for an unanswerable question "
                        "its plausible answer, inside")

    def clusters(self, pred):
        """Questions cluster by context paragraph (recorded by the evaluation)."""
        if "paragraph" in pred:
            return pred["paragraph"], "paragraph"
        return None, "question (this evaluation recorded no paragraphs: the interval is too narrow)"

    def baseline_scores(self, pred):
        if "no_answer_f1" in pred:  # the official F1 of an empty prediction, per question, as evaluated
            return {"always_no_answer": {k: 100.0 * v for k, v in pred["no_answer_f1"].items()}}
        if "has_answer" not in pred:
            return {}
        # files written before no_answer_f1 was recorded: 1 on unanswerable questions, 0 on answerable ones (the
        # official score too, unless every gold answer of a question normalises to nothing: none in SQuAD v2 dev)
        return {"always_no_answer": {k: 0.0 if has else 100.0 for k, has in pred["has_answer"].items()}}

    primary_measure = "the evaluation's no-answer rule (fitted on held-out calibration questions)"
    alternative_measure = ("greedy abstention: abstain where greedy decoding would begin the no-answer string "
                           "(first-token margin > 0)")

    def alternative_scores(self, pred, data=None, *, same_ok=False):
        """Each question's F1 (0-100) under greedy decoding's own abstention, when the evaluation's no-answer rule
        is another (a signal and threshold fitted on calibration questions): the verdict's decisions must not
        hinge on that rule.

        Needs the F1 each question's answer would score (`answer_f1`, recorded by evaluations since
        2026-12-01). For a file written before, it is recomputed from the gold answers of the eval-side
        questions of `data`, and used only if, with the file's `no_answer_f1`, it reproduces the evaluation's
        own score of every question under its rule: the gold answers are then the evaluated ones.
        """
        need = ("predictions", "answers", "no_answer_margin", "no_answer_f1", "scores")
        if any(k not in pred for k in need):
            return None, "this evaluation recorded no per-question answers and margins"
        if pred.get("no_answer_signal", "first_token") == "first_token" and pred.get("no_answer_threshold") == 0.0:
            if same_ok:
                return {q: 100.0 * v for q, v in pred["scores"].items()}, self.alternative_measure
            return None, "the evaluation's no-answer rule is greedy abstention itself"
        answer_f1 = pred.get("answer_f1")
        if answer_f1 is None:
            if data is None or data.resolved_dir() is None:
                return None, ("this evaluation predates answer_f1 and no local SQuAD v2 data (LORASCOPE_DATA_DIR or "
                              "data.dir) to recompute it from")
            try:
                exs = {e.id: e for e in self.load_split("eval", data)}
            except LorascopeError as exc:
                return None, f"this evaluation predates answer_f1, and its gold answers could not be read: {exc}"
            kept = [exs[q] for q in pred["answers"] if q in exs]
            if len(kept) != len(pred["answers"]):
                return None, (f"this evaluation predates answer_f1, and {len(pred['answers']) - len(kept)} of its "
                              f"questions are not among the eval-side questions of {data.resolved_dir()}")
            _, answer_f1 = squad_metric.raw_scores(examples_to_articles(kept), pred["answers"])
            bad = [q for q, v in pred["scores"].items()
                   if abs((pred["no_answer_f1"][q] if pred["predictions"][q] == "" else answer_f1[q]) - v) > 1e-9]
            if bad:
                return None, (f"this evaluation predates answer_f1, and the gold answers in {data.resolved_dir()} "
                              f"do not reproduce its scores ({len(bad)} questions differ, e.g. {bad[0]})")
        greedy = predictions_at(pred["no_answer_margin"], pred["answers"], 0.0)
        return {q: 100.0 * (pred["no_answer_f1"][q] if greedy[q] == "" else answer_f1[q]) for q in greedy}, \
            self.alternative_measure

    def prepare_eval(self, model, tok, cfg, examples, kwargs):
        """The no-answer rule: eval.no_answer_threshold/signal, or tuned on calibration questions."""
        e = cfg.eval
        threshold, signal, calibration = e.no_answer_threshold, e.no_answer_signal, None
        if e.calibration_examples:
            calibration = self.calibrate_no_answer(model, tok, cfg, examples, kwargs)
            threshold, signal = calibration["threshold"], calibration["signal"]
        kwargs["no_answer_threshold"], kwargs["no_answer_signal"] = threshold, signal
        return calibration

    def finish_eval(self, examples, predictions, metrics, prepared):
        if prepared is None:
            return
        kept = [x for x in examples if x.id in predictions["answers"]]
        greedy = predictions_at(predictions["no_answer_margin"], predictions["answers"], 0.0)
        metrics["greedy"] = dict(squad_metric.score_predictions(examples_to_articles(kept), greedy))
        metrics["calibration"] = prepared

    selection_rule = ("F1 with the no-answer rule fitted on the other half: the validation paragraphs in two "
                      "halves, each scored with the signal and threshold best on the other (as the final "
                      "evaluation fits them on held-out calibration questions)")

    def selection_score(self, examples, pred, eval_cfg=None) -> dict | None:
        """Validation F1 under the no-answer rule the final evaluation uses, fitted without the scored questions.

        Greedy decoding's own abstention can score every rate alike (a model that abstains on every
        question scores always-no-answer at any rate), and the final models are evaluated with a
        signal and threshold tuned on held-out questions (`calibrate_no_answer`). So a trial is
        scored the same way, by 2-fold cross-fitting over paragraphs: the validation paragraphs,
        ordered by their key, alternate between two halves; each half is scored with the signal
        (eval_cfg.no_answer_signal; with 'best', the default, the first-token margin or the answer NLL,
        ties: first_token) and threshold that give the best F1 on the other half. `scores`: each
        question's F1 (0-100) under its half's rule, whose mean is `value`. None with fewer than
        2 paragraphs.
        """
        kept = [x for x in examples if x.id in pred["answers"]]
        para = {x.id: paragraph_key(x.meta["context"]) for x in kept}
        keys = sorted(set(para.values()))
        if len(keys) < 2:
            return None
        half = {k: i % 2 for i, k in enumerate(keys)}
        halves = [[x for x in kept if half[para[x.id]] == h] for h in (0, 1)]
        wanted = getattr(eval_cfg, "no_answer_signal", "best")
        names = list(NO_ANSWER_SIGNALS) if wanted == "best" else [wanted]
        total, folds, scores = 0.0, [], {}
        for h in (0, 1):
            fit, scored = halves[1 - h], halves[h]
            answers = {x.id: pred["answers"][x.id] for x in fit}
            per_signal = {n: best_threshold({x.id: pred[NO_ANSWER_SIGNALS[n]][x.id] for x in fit}, answers,
                                            examples_to_articles(fit)) for n in names}
            signal = max(names, key=lambda n: (round(per_signal[n]["f1"], 9), -names.index(n)))
            threshold = per_signal[signal]["threshold"]
            preds = predictions_at({x.id: pred[NO_ANSWER_SIGNALS[signal]][x.id] for x in scored},
                                   {x.id: pred["answers"][x.id] for x in scored}, threshold)
            _, f1 = squad_metric.raw_scores(examples_to_articles(scored), preds)
            total += sum(f1.values())
            scores.update({k: 100.0 * v for k, v in f1.items()})
            folds.append({"questions": len(scored), "paragraphs": sum(1 for k in keys if half[k] == h),
                          "signal": signal, "threshold": threshold, "fit_f1": per_signal[signal]["f1"],
                          "f1": 100.0 * sum(f1.values()) / len(scored)})
        # per question: its F1 under the rule fitted on the other half (what the report's intervals resample)
        return {"value": 100.0 * total / len(kept), "n": len(kept), "rule": self.selection_rule, "halves": folds,
                "scores": scores}

    def calibrate_no_answer(self, model, tok, cfg, examples, kwargs) -> dict:
        """Tune the no-answer threshold on held-out questions disjoint from `examples`' paragraphs.

        With eval.no_answer_signal 'best', each signal gets its own best threshold and the one
        with the better calibration F1 is kept (ties: first_token, greedy decoding's own signal).
        Nothing is chosen by looking at the evaluated questions.
        """
        calib = self.calibration_examples(cfg.data, examples, cfg.eval.calibration_examples)
        self.check_held_out(cfg.data, calib, "calibration")
        log.info("squad_v2: tuning the no-answer threshold on %d calibration questions", len(calib))
        _, pred = self.evaluate(model, tok, calib, **kwargs)
        kept = [x for x in calib if x.id in pred["answers"]]
        arts = examples_to_articles(kept)
        wanted = cfg.eval.no_answer_signal
        names = list(NO_ANSWER_SIGNALS) if wanted == "best" else [wanted]
        per_signal = {n: best_threshold(pred[NO_ANSWER_SIGNALS[n]], pred["answers"], arts) for n in names}
        signal = max(names, key=lambda n: (round(per_signal[n]["f1"], 9), -names.index(n)))
        out = dict(per_signal[signal])
        out["signal"] = signal
        if wanted == "best":
            out["per_signal"] = per_signal
        greedy = predictions_at(pred["no_answer_margin"], pred["answers"], 0.0)
        out["f1_greedy"] = squad_metric.score_predictions(arts, greedy)["f1"]  # f1_at_0 is this signal's 0
        out["asked"], out["skipped_too_long"] = len(calib), len(calib) - len(kept)
        out["example_ids_sha256"] = hashlib.sha256("\n".join(x.id for x in kept).encode()).hexdigest()
        out["rule"] = (f"abstain when the {signal} score exceeds the threshold; "
                       + ("signal and threshold" if wanted == "best" else "threshold")
                       + " chosen for the best F1 on the calibration questions (held-out, sharing no paragraph "
                         "with the evaluated questions)")
        for n in names:
            log.info("squad_v2: %s: best threshold %.3f, calibration F1 %.2f", n, per_signal[n]["threshold"],
                     per_signal[n]["f1"])
        log.info("squad_v2: no-answer signal %s, threshold %.3f (calibration F1 %.2f; %.2f with greedy decoding's "
                 "choice, %.2f always abstaining)", signal, out["threshold"], out["f1"], out["f1_greedy"],
                 out["f1_always_no_answer"])
        return out

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
            answers = [
                {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
            ]
            out.append(Example(r["id"], make_prompt(r["context"], r["question"]),
                               answers[0]["text"] if answers else NO_ANSWER,
                               {"title": r["title"], "context": r["context"], "question": r["question"],
                                "answers": answers}, content=prompt_and_content(r["context"], r["question"])[1]))
        return out

    def features(self, tok, examples, max_len):
        """Like Task.features, but a context too long is cut to a window at a random offset.

        The window keeps an anchor span inside: the answer for answerable questions, and for
        unanswerable ones SQuAD v2's plausible (but wrong) answer, or a random span when the
        data has none. Answerable and unanswerable questions thus get windows by the same
        rule, so where a window starts says nothing about whether the question has an answer
        (a window that always started at the paragraph start for unanswerable questions would
        be a shortcut the model could learn). The offset is drawn uniformly among the starts
        that keep the anchor inside, seeded by the question id, so features are reproducible.
        """
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
            log.warning("squad_v2: %d of %d training contexts cut to a window at a random offset keeping the answer "
                        "(or, if unanswerable, the plausible answer) inside; %d skipped (the window does not fit in "
                        "%d tokens)", cut, len(examples), skipped, max_len)
        return out

    def window_start(self, tok, ex: Example, budget: int) -> tuple[int, int] | None:
        """(first token, token count) of the context window `_truncated_prompt` keeps, or None if none fits."""
        import random

        ctx = ex.meta["context"]
        rng = random.Random(f"squad-window-{ex.id}")
        spans = ex.meta["answers"] or ex.meta.get("plausible_answers") or []
        start = end = -1
        if spans:
            a0 = spans[0]
            start = a0["answer_start"] if a0.get("answer_start", -1) >= 0 else ctx.find(a0["text"])
            end = start + len(a0["text"])
            if start < 0 and ex.meta["answers"]:
                return None  # an answer that is not in its context cannot be trained on
        enc = tok(ctx, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        overhead = len(prompt_ids(tok, make_prompt("", ex.meta["question"])))
        keep = budget - overhead - 4  # a few tokens of slack: re-tokenising a substring can differ
        if keep < 8:
            return None
        if keep >= n:
            return 0, n
        if start < 0:  # no span to keep: a random anchor token, as likely anywhere as an answer
            first = last = rng.randrange(n)
        else:
            first = next((i for i, (s, e) in enumerate(offsets) if e > start), 0)
            last = next((i for i in range(n - 1, -1, -1) if offsets[i][0] < end), first)
        if last - first + 1 > keep:
            return None
        lo_min, lo_max = max(0, last - keep + 1), min(first, n - keep)
        return rng.randint(lo_min, lo_max), keep

    def _truncated_prompt(self, tok, ex: Example, budget: int) -> list[int] | None:
        win = self.window_start(tok, ex, budget)
        if win is None:
            return None
        lo, keep = win
        ctx = ex.meta["context"]
        offsets = tok(ctx, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for shrink in range(0, keep, 4):
            hi = min(len(offsets), lo + keep - shrink)
            window = ctx[offsets[lo][0]:offsets[hi - 1][1]]
            p = prompt_ids(tok, make_prompt(window, ex.meta["question"]))
            if len(p) <= budget:
                return p
        return None

    def evaluate(self, model, tok, examples, *, batch_size, max_new_tokens=32, max_len=1024,
                 no_answer_threshold: float = 0.0, no_answer_signal: str = "first_token"):
        """Greedy answers, each question's no-answer scores, and the official metrics.

        One generation pass per batch with the first token of the no-answer string
        suppressed at the first step, so every question gets an answer span. The raw
        logits (before the suppression) give two scores per question (see
        NO_ANSWER_SIGNALS): the first-token margin
        ``logit(no-answer first token) - max(logit of any other token)`` and the answer's
        negative log-likelihood. The prediction is empty when the `no_answer_signal` score
        exceeds `no_answer_threshold`. With first_token and the default 0 that is greedy
        decoding's own choice: abstain when greedy would begin the no-answer string (one of
        :func:`no_answer_first_tokens`), otherwise greedy's answer. A threshold tuned
        elsewhere (:func:`best_threshold`) only moves this one decision, like the
        null-score threshold of extractive SQuAD v2 systems.
        """
        if no_answer_signal not in NO_ANSWER_SIGNALS:
            raise LorascopeError(f"no_answer_signal: got {no_answer_signal!r}; accepted: "
                                 + ", ".join(NO_ANSWER_SIGNALS))
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
        na_first = no_answer_first_tokens(tok)
        order = sorted(kept, key=lambda e: len(prompts[e.id]))
        raw: dict[str, str] = {}
        margins: dict[str, float] = {}
        nll: dict[str, float] = {}
        model.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="squad_v2 eval", unit="batch"):
                batch = order[start:start + batch_size]
                new, logits = greedy_generate(model, tok, [prompts[e.id] for e in batch], max_new_tokens, stop,
                                              device, begin_suppress_tokens=na_first)
                first = logits[0].float()
                na = first[:, na_first].max(dim=1).values
                other = first.clone()
                other[:, na_first] = float("-inf")
                margin = (na - other.max(dim=1).values).tolist()
                # log-probability of each generated token under the raw (unsuppressed) logits
                token_lp = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(1, new[:, t:t + 1])[:, 0]
                                        for t, step in enumerate(logits)], dim=1)
                for i, (e, row, m) in enumerate(zip(batch, new.tolist(), margin)):
                    end = next((t + 1 for t, x in enumerate(row) if x in stop), len(row))  # stop token counts
                    raw[e.id] = tok.decode(row, skip_special_tokens=True)
                    margins[e.id] = float(m)
                    nll[e.id] = -float(token_lp[i, :end].sum())
        answers = {e.id: to_prediction(raw[e.id]) for e in kept}
        scores = {"first_token": margins, "answer_nll": nll}
        preds = predictions_at(scores[no_answer_signal], answers, no_answer_threshold)
        arts = examples_to_articles(kept)
        metrics = dict(squad_metric.score_predictions(arts, preds))
        metrics["skipped_too_long"] = skipped
        metrics["no_answer_signal"] = no_answer_signal
        metrics["no_answer_threshold"] = no_answer_threshold
        _, f1 = squad_metric.raw_scores(arts, preds)  # per question, for paired comparisons of models
        _, f1_none = squad_metric.raw_scores(arts, {e.id: "" for e in kept})  # always-no-answer, officially scored
        _, f1_answer = squad_metric.raw_scores(arts, answers)  # had it answered: with no_answer_f1, any rule's score
        return metrics, {"predictions": preds, "generated": raw, "answers": answers, "no_answer_margin": margins,
                         "answer_nll": nll, "no_answer_signal": no_answer_signal,
                         "no_answer_threshold": no_answer_threshold, "scores": f1,
                         # for intervals: questions cluster by paragraph; the always-no-answer baseline per question
                         "paragraph": {e.id: paragraph_key(e.meta["context"]) for e in kept},
                         "article": {e.id: e.meta.get("title", "") for e in kept},
                         "has_answer": {e.id: bool(e.meta["answers"]) for e in kept}, "no_answer_f1": f1_none,
                         "answer_f1": f1_answer}

    def calibration_examples(self, data, evaluated: list[Example], n: int) -> list[Example]:
        """`n` held-out questions for tuning the no-answer threshold, sharing no paragraph with `evaluated`.

        Drawn (seeded by data.subset_seed) from the eval side's questions whose context
        paragraph holds none of the evaluated questions: never trained on, and no
        context in common with the questions the metrics are reported on.
        """
        import random

        used = {e.meta["context"] for e in evaluated}
        pool = [e for e in self.load_split("eval", data) if e.meta["context"] not in used]
        if len(pool) < n:
            raise LorascopeError(f"eval.calibration_examples: {n} asked for, but only {len(pool)} held-out "
                                 f"questions share no paragraph with the {len(evaluated)} evaluated ones; "
                                 f"lower eval.calibration_examples or data.max_eval_examples")
        keep = sorted(random.Random(f"{data.subset_seed}-squad_v2-calibration").sample(range(len(pool)), n))
        return [pool[i] for i in keep]

    leak_unit = "an article or a context paragraph"

    def group_key(self, ex):
        return paragraph_key(ex.meta["context"])

    def leak_keys(self, ex):
        # no article, and so no paragraph, on both sides (questions on one paragraph are near-duplicates)
        return {f"id:{ex.id}", f"article:{ex.meta.get('title', '')}", f"context:{paragraph_key(ex.meta['context'])}"}

    def scored(self, examples, predictions):
        kept = predictions["has_answer"]  # evaluate() records every scored question here, and only those
        return [e for e in examples if e.id in kept]

    def baselines(self, examples):
        arts = examples_to_articles(examples)
        return {"always_no_answer": dict(squad_metric.score_predictions(arts, {e.id: "" for e in examples}))}


def _load(path: Path) -> list[dict]:
    try:
        articles = squad_metric.load_squad_json(path)
    except ValueError as exc:
        raise LorascopeError(str(exc)) from None
    validate_articles(articles, path)
    return articles


def validate_articles(articles: list[dict], path) -> None:
    """What training and scoring rely on beyond the scorer's structure checks, one line per problem.

    Every question id is unique, and each answer's answer_start is an integer locating its
    text in the context (context[answer_start:answer_start + len(text)] == text). An answer
    that fails would otherwise be dropped as "too long" or train on the wrong span.
    """
    seen: dict[str, str] = {}
    for i, a in enumerate(articles):
        for j, p in enumerate(a["paragraphs"]):
            ctx = p["context"]
            for k, qa in enumerate(p["qas"]):
                where = f"{path}: data[{i}].paragraphs[{j}].qas[{k}] (id {qa['id']!r})"
                if qa["id"] in seen:
                    raise LorascopeError(f"{where}: duplicate question id, first at {seen[qa['id']]}; ids must be "
                                         f"unique")
                seen[qa["id"]] = f"data[{i}].paragraphs[{j}].qas[{k}]"
                imp = qa.get("is_impossible", False)
                if not isinstance(imp, bool):
                    raise LorascopeError(f"{where}: field is_impossible is {imp!r}; accepted: true or false")
                if imp and qa["answers"]:
                    raise LorascopeError(f"{where}: is_impossible is true but it has {len(qa['answers'])} answer(s); "
                                         f"an unanswerable question has an empty answers list")
                for m, ans in enumerate(qa["answers"]):
                    start, text = ans.get("answer_start"), ans["text"]
                    field = f"{where}: answers[{m}].answer_start"
                    if isinstance(start, bool) or not isinstance(start, int):
                        raise LorascopeError(f"{field} is {start!r} ({type(start).__name__}); accepted: an integer "
                                             f"character offset into the context")
                    if not 0 <= start <= len(ctx) - len(text):
                        raise LorascopeError(f"{field} is {start}, outside the context ({len(ctx)} characters) for "
                                             f"the answer {text!r} ({len(text)} characters); accepted: 0 to "
                                             f"{max(0, len(ctx) - len(text))}")
                    if ctx[start:start + len(text)] != text:
                        found = ctx.find(text)
                        hint = f" (the text occurs at {found})" if found >= 0 else " (the text is not in the context)"
                        raise LorascopeError(f"{field} is {start}, where the context reads "
                                             f"{ctx[start:start + len(text)]!r}, not the answer text {text!r}{hint}")
