"""SQuAD v2.0 scoring: a faithful, stdlib-only port of the official evaluation script.

The scoring logic below reproduces ``evaluate-v2.0.py`` (the official SQuAD 2.0
evaluation script) without the no-answer-probability options: answer
normalization, tokenization, exact match, token-level F1, the max over the gold
answers, and the overall / ``HasAns`` / ``NoAns`` breakdown, with the same keys
in the same order and on the same 0-100 scale.

Deliberate differences from the official script, all of which concern inputs
the official script either crashes on or silently mishandles:

* a question of the dataset with no prediction raises :class:`ValueError`
  (the official script prints a warning, then crashes with ``KeyError`` in the
  ``HasAns`` / ``NoAns`` breakdown);
* a prediction that is not a string raises :class:`ValueError`;
* :func:`load_squad_json` and :func:`load_predictions_json` validate the file
  format and raise :class:`ValueError` naming the file and the problem.

Predictions for question ids that are not in the dataset are ignored, as in the
official script.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

__all__ = [
    "normalize_answer",
    "get_tokens",
    "compute_exact",
    "compute_f1",
    "gold_answers",
    "raw_scores",
    "score_predictions",
    "load_squad_json",
    "load_predictions_json",
]

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace.

    Same steps and order as the official script:
    ``white_space_fix(remove_articles(remove_punc(lower(s))))``. Punctuation is
    ``string.punctuation`` (ASCII only); articles ``a``/``an``/``the`` (whole
    words) are replaced by a space; whitespace runs collapse to one space and
    the ends are stripped.

    >>> normalize_answer("The  Cat!")
    'cat'
    """

    def remove_articles(text: str) -> str:
        return re.sub(_ARTICLES_RE, " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in _PUNCTUATION)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def get_tokens(s: str) -> list[str]:
    """Return the whitespace tokens of the normalized answer (``[]`` for an empty string)."""
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    """Return 1 if the normalized gold and predicted answers are equal, else 0."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """Token-level F1 between one gold answer and a prediction, as in the official script.

    If either side has no tokens after normalization (a no-answer), the score is
    ``int(gold_toks == pred_toks)``: 1 when both are empty, else 0. With no
    common token it is 0; otherwise the harmonic mean of precision (common /
    predicted tokens) and recall (common / gold tokens), where the common tokens
    are counted as a multiset intersection.

    >>> compute_f1("the cat sat", "cat sat down")
    0.8
    """
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def gold_answers(qa: dict) -> list[str]:
    """Return the gold answer texts of one question, as the official script scores them.

    Answers whose normalized text is empty are dropped; if none remain (an
    unanswerable question, or one whose answers all normalize to nothing) the
    only gold answer is ``''``, so only a prediction that normalizes to the
    empty string scores 1.
    """
    answers = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])]
    if not answers:
        # For unanswerable questions, only correct answer is empty string
        answers = [""]
    return answers


def _iter_qas(dataset_articles: list) -> Iterator[dict]:
    for article in dataset_articles:
        for p in article["paragraphs"]:
            yield from p["qas"]


def _qid_to_has_ans(dataset_articles: list) -> OrderedDict[str, bool]:
    # Official make_qid_to_has_ans: has-answer is bool(qa['answers']); a
    # repeated id keeps its first position and its last value, like a dict.
    qid_to_has_ans: OrderedDict[str, bool] = OrderedDict()
    for qa in _iter_qas(dataset_articles):
        qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    return qid_to_has_ans


def _check_predictions(dataset_articles: list, predictions: dict) -> None:
    if not isinstance(predictions, dict):
        raise ValueError(
            f"predictions must be a dict mapping question id to answer string, "
            f"got {type(predictions).__name__}"
        )
    missing: list[str] = []
    seen: set = set()
    for qa in _iter_qas(dataset_articles):
        qid = qa["id"]
        if qid in seen:
            continue
        seen.add(qid)
        if qid not in predictions:
            missing.append(qid)
            continue
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise ValueError(
                f"prediction for question id {qid!r} must be a string, "
                f"got {type(pred).__name__}"
            )
    if missing:
        first = ", ".join(repr(q) for q in missing[:5])
        more = ", ..." if len(missing) > 5 else ""
        raise ValueError(
            f"{len(missing)} of {len(seen)} question ids have no prediction "
            f"(first: {first}{more})"
        )


def raw_scores(
    dataset_articles: list, predictions: dict[str, str]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question scores: ``(exact, f1)``, each a dict from question id to score.

    Exact is 0 or 1 and F1 is in [0, 1], each the max over the question's gold
    answers (see :func:`gold_answers`). The dicts are in dataset order.

    Raises :class:`ValueError` if a question of the dataset has no prediction or a
    prediction is not a string. Predictions for unknown ids are ignored.
    """
    _check_predictions(dataset_articles, predictions)
    exact_scores: dict[str, int] = {}
    f1_scores: dict[str, float] = {}
    for qa in _iter_qas(dataset_articles):
        qid = qa["id"]
        golds = gold_answers(qa)
        a_pred = predictions[qid]
        # Take max over all gold answers
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in golds)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in golds)
    return exact_scores, f1_scores


def _make_eval_dict(
    exact_scores: dict, f1_scores: dict, qid_list: list | None = None
) -> OrderedDict[str, Any]:
    if not qid_list:
        total = len(exact_scores)
        return OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores.values()) / total),
                ("f1", 100.0 * sum(f1_scores.values()) / total),
                ("total", total),
            ]
        )
    total = len(qid_list)
    return OrderedDict(
        [
            ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
            ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
            ("total", total),
        ]
    )


def _merge_eval(main_eval: dict, new_eval: dict, prefix: str) -> None:
    for k in new_eval:
        main_eval[f"{prefix}_{k}"] = new_eval[k]


def score_predictions(
    dataset_articles: list, predictions: dict[str, str]
) -> OrderedDict[str, Any]:
    """Score predictions against a SQuAD v2.0 dataset, like the official script.

    ``dataset_articles`` is the list under the dataset JSON's ``"data"`` key and
    ``predictions`` maps question id to predicted answer text (``""`` for "no
    answer"). Returns an ordered dict with the official keys in the official
    order: ``exact``, ``f1``, ``total``; then ``HasAns_exact``, ``HasAns_f1``,
    ``HasAns_total`` if some question has answers; then ``NoAns_exact``,
    ``NoAns_f1``, ``NoAns_total`` if some question has none. Scores are floats on
    a 0-100 scale, totals are ints. A question has an answer when
    ``bool(qa['answers'])``, as in the official script.

    Raises :class:`ValueError` if the dataset has no question, a question has no
    prediction, or a prediction is not a string.
    """
    qid_to_has_ans = _qid_to_has_ans(dataset_articles)
    if not qid_to_has_ans:
        raise ValueError("the dataset contains no question")
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = raw_scores(dataset_articles, predictions)
    # The official no-answer threshold step is a no-op without a na_prob file
    # (every no-answer probability is 0.0, below the default threshold 1.0).
    out_eval = _make_eval_dict(exact_raw, f1_raw)
    if has_ans_qids:
        has_ans_eval = _make_eval_dict(exact_raw, f1_raw, qid_list=has_ans_qids)
        _merge_eval(out_eval, has_ans_eval, "HasAns")
    if no_ans_qids:
        no_ans_eval = _make_eval_dict(exact_raw, f1_raw, qid_list=no_ans_qids)
        _merge_eval(out_eval, no_ans_eval, "NoAns")
    return out_eval


def _read_json(path: Any, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} {str(path)!r} is not valid JSON: {e.msg} "
            f"(line {e.lineno}, column {e.colno})"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid UTF-8 text: {e}") from e
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e}") from e


def load_squad_json(path: Any) -> list:
    """Load a SQuAD (v1.1 or v2.0) dataset file and return its ``"data"`` articles.

    Validates the structure the scorer relies on and raises :class:`ValueError`
    naming the file and the problem when the file is unreadable or not JSON (with
    the JSON error's line and column), has no ``"data"`` list, or an article lacks
    ``"paragraphs"``, a paragraph lacks ``"context"`` or ``"qas"``, a question
    lacks ``"id"``, ``"question"`` or ``"answers"``, or an answer lacks a
    ``"text"`` string.
    """
    name = str(path)
    obj = _read_json(path, "SQuAD dataset file")

    def fail(problem: str) -> ValueError:
        return ValueError(f"SQuAD dataset file {name!r}: {problem}")

    if not isinstance(obj, dict):
        raise fail(f"top level must be a JSON object, got {type(obj).__name__}")
    data = obj.get("data")
    if not isinstance(data, list):
        if "data" not in obj:
            raise fail('missing "data" list')
        raise fail(f'"data" must be a list, got {type(data).__name__}')
    for i, article in enumerate(data):
        where = f"data[{i}]"
        if not isinstance(article, dict):
            raise fail(f"{where} must be an object, got {type(article).__name__}")
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            raise fail(f'article {where} has no "paragraphs" list')
        for j, p in enumerate(paragraphs):
            pwhere = f"{where}.paragraphs[{j}]"
            if not isinstance(p, dict):
                raise fail(f"{pwhere} must be an object, got {type(p).__name__}")
            if not isinstance(p.get("context"), str):
                raise fail(f'paragraph {pwhere} has no "context" string')
            qas = p.get("qas")
            if not isinstance(qas, list):
                raise fail(f'paragraph {pwhere} has no "qas" list')
            for k, qa in enumerate(qas):
                qwhere = f"{pwhere}.qas[{k}]"
                if not isinstance(qa, dict):
                    raise fail(f"{qwhere} must be an object, got {type(qa).__name__}")
                if not isinstance(qa.get("id"), str):
                    raise fail(f'question {qwhere} has no "id" string')
                qid = qa["id"]
                if not isinstance(qa.get("question"), str):
                    raise fail(f'question {qwhere} (id {qid!r}) has no "question" string')
                answers = qa.get("answers")
                if not isinstance(answers, list):
                    raise fail(f'question {qwhere} (id {qid!r}) has no "answers" list')
                for m, a in enumerate(answers):
                    if not isinstance(a, dict) or not isinstance(a.get("text"), str):
                        raise fail(
                            f'answer {m} of question {qwhere} (id {qid!r}) '
                            f'has no "text" string'
                        )
    return data


def load_predictions_json(path: Any) -> dict[str, str]:
    """Load a predictions file: a JSON object mapping question id to answer string.

    Raises :class:`ValueError` naming the file when it is unreadable or not JSON
    (with line and column), is not a JSON object, or maps a key to a value that
    is not a string (naming the offending key).
    """
    name = str(path)
    obj = _read_json(path, "predictions file")
    if not isinstance(obj, dict):
        raise ValueError(
            f"predictions file {name!r}: must be a JSON object mapping question id "
            f"to answer string, got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(value, str):
            raise ValueError(
                f"predictions file {name!r}: value for question id {key!r} must be "
                f"a string, got {type(value).__name__}"
            )
    return obj
