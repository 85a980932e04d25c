"""Tests for lorascope.tasks.squad_metric (port of the official SQuAD v2.0 scorer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorascope.tasks.squad_metric import (
    compute_exact,
    compute_f1,
    get_tokens,
    gold_answers,
    load_predictions_json,
    load_squad_json,
    normalize_answer,
    raw_scores,
    score_predictions,
)

# --------------------------------------------------------------------------- helpers


def _qa(qid: str, answers: list[str], question: str = "q?") -> dict:
    return {
        "id": qid,
        "question": question,
        "answers": [{"text": t, "answer_start": 0} for t in answers],
        "is_impossible": not answers,
    }


def _dataset(*qas: dict) -> list:
    return [{"title": "T", "paragraphs": [{"context": "ctx", "qas": list(qas)}]}]


# Hand-made dataset: 3 answerable (q1, q2, q5), 2 unanswerable (q3, q4).
SMALL = [
    {
        "title": "A",
        "paragraphs": [
            {"context": "c1", "qas": [_qa("q1", ["the cat sat", "a dog"]), _qa("q2", ["Paris"])]},
            {"context": "c2", "qas": [_qa("q3", [])]},
        ],
    },
    {
        "title": "B",
        "paragraphs": [{"context": "c3", "qas": [_qa("q4", []), _qa("q5", ["blue whale"])]}],
    },
]
SMALL_PREDS = {
    "q1": "cat sat down",  # exact 0, f1 max(0.8, 0) = 0.8
    "q2": "paris.",  # exact 1, f1 1
    "q3": "",  # exact 1, f1 1
    "q4": "London",  # exact 0, f1 0
    "q5": "whale",  # exact 0, p=1 r=1/2 -> f1 2/3
}


# --------------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The  Cat!", "cat"),
        ("A cat, an owl and THE dog.", "cat owl and dog"),
        ("  multiple\t\nspaces   here ", "multiple spaces here"),
        ("Hello, World!!", "hello world"),
        ("theatre", "theatre"),  # 'the' only as a whole word
        ("an", ""),
        ("the", ""),
        ("", ""),
        ("U.S.A.", "usa"),
        ("rock-n-roll", "rocknroll"),  # punctuation removed, not replaced by a space
        ("the-cat", "thecat"),  # punctuation removed first, so 'the' is no longer a word
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_order_punctuation_before_articles():
    # "a.b" -> remove_punc -> "ab" (no article left); "a. b" -> "a b" -> " b" -> "b".
    assert normalize_answer("a.b") == "ab"
    assert normalize_answer("a. b") == "b"


def test_normalize_keeps_non_ascii_punctuation():
    # string.punctuation is ASCII only, as in the official script.
    assert normalize_answer("«Café»") == "«café»"


def test_get_tokens():
    assert get_tokens("") == []
    assert get_tokens("The quick, brown fox.") == ["quick", "brown", "fox"]
    assert get_tokens("the a an") == []


# -------------------------------------------------------------------------- exact/F1


def test_compute_exact():
    assert compute_exact("The Cat", "cat!") == 1
    assert compute_exact("cat", "cats") == 0
    assert compute_exact("", "") == 1
    assert compute_exact("", "the") == 1
    assert compute_exact("", "x") == 0
    assert isinstance(compute_exact("a", "a"), int)


def test_compute_f1_hand_values():
    # precision 2/3, recall 1 -> 2*(2/3)/(5/3) = 0.8
    assert compute_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    # precision 1, recall 1/2 -> 2/3
    assert compute_f1("blue whale", "whale") == pytest.approx(2 / 3)
    # identical after normalization
    assert compute_f1("The Cat.", "cat") == 1.0
    # no overlap
    assert compute_f1("cat", "dog") == 0
    # repeated tokens: multiset intersection. gold 'x x y', pred 'x x x'
    # common = {x: 2}; p = 2/3, r = 2/3 -> f1 = 2/3
    assert compute_f1("x x y", "x x x") == pytest.approx(2 / 3)


def test_compute_f1_empty_sides():
    assert compute_f1("", "") == 1
    assert compute_f1("", "the") == 1  # prediction normalizes to empty
    assert compute_f1("", "cat") == 0
    assert compute_f1("cat", "") == 0
    assert compute_f1("the", "an") == 1  # both normalize to no tokens


def test_gold_answers():
    assert gold_answers(_qa("x", ["The Cat", "dog"])) == ["The Cat", "dog"]
    assert gold_answers(_qa("x", [])) == [""]
    # answers that normalize to empty are dropped
    assert gold_answers(_qa("x", ["the", "!!", "cat"])) == ["cat"]
    assert gold_answers(_qa("x", ["the"])) == [""]


def test_f1_and_exact_take_max_over_gold_answers():
    data = _dataset(_qa("q", ["blue whale", "the largest blue whale ever", "whale"]))
    exact, f1 = raw_scores(data, {"q": "whale"})
    assert exact == {"q": 1}
    assert f1 == {"q": 1.0}
    exact, f1 = raw_scores(data, {"q": "large blue whale"})
    # vs 'blue whale': p=2/3 r=1 -> 0.8; vs 'largest blue whale ever': p=2/3 r=2/3 -> 2/3;
    # vs 'whale': p=1/3 r=1 -> 0.5
    assert exact == {"q": 0}
    assert f1["q"] == pytest.approx(0.8)


# ---------------------------------------------------------------------- unanswerable


@pytest.mark.parametrize(
    "pred, expected", [("", 1), ("the", 1), ("  A. ", 1), ("no answer", 0), ("cat", 0)]
)
def test_unanswerable_correct_only_for_empty_prediction(pred, expected):
    data = _dataset(_qa("u", []))
    exact, f1 = raw_scores(data, {"u": pred})
    assert exact == {"u": expected}
    assert f1 == {"u": expected}


def test_empty_prediction_on_answerable_scores_zero():
    data = _dataset(_qa("a", ["cat"]))
    assert raw_scores(data, {"a": ""}) == ({"a": 0}, {"a": 0})


def test_answerable_whose_answers_normalize_to_empty():
    # has-answer is bool(qa['answers']) (so it is counted in HasAns), but its
    # only gold answer is '' after dropping the empty-normalized texts.
    data = _dataset(_qa("a", ["the"]))
    res = score_predictions(data, {"a": ""})
    assert res["HasAns_total"] == 1 and "NoAns_total" not in res
    assert res["exact"] == 100.0 and res["f1"] == 100.0


# ------------------------------------------------------------------------ breakdown


def test_small_dataset_breakdown_hand_computed():
    res = score_predictions(SMALL, SMALL_PREDS)
    assert list(res) == [
        "exact", "f1", "total",
        "HasAns_exact", "HasAns_f1", "HasAns_total",
        "NoAns_exact", "NoAns_f1", "NoAns_total",
    ]  # fmt: skip
    # per question exact: q1 0, q2 1, q3 1, q4 0, q5 0
    # per question f1:    q1 0.8, q2 1, q3 1, q4 0, q5 2/3
    assert res["total"] == 5
    assert res["exact"] == pytest.approx(100 * 2 / 5)
    assert res["f1"] == pytest.approx(100 * (0.8 + 1 + 1 + 0 + 2 / 3) / 5)  # 69.33...
    assert res["HasAns_total"] == 3
    assert res["HasAns_exact"] == pytest.approx(100 * 1 / 3)
    assert res["HasAns_f1"] == pytest.approx(100 * (0.8 + 1 + 2 / 3) / 3)  # 82.22...
    assert res["NoAns_total"] == 2
    assert res["NoAns_exact"] == pytest.approx(50.0)
    assert res["NoAns_f1"] == pytest.approx(50.0)
    for k, v in res.items():
        assert isinstance(v, int if k.endswith("total") else float), k


def test_raw_scores_small_dataset():
    exact, f1 = raw_scores(SMALL, SMALL_PREDS)
    assert list(exact) == ["q1", "q2", "q3", "q4", "q5"]
    assert exact == {"q1": 0, "q2": 1, "q3": 1, "q4": 0, "q5": 0}
    assert f1 == pytest.approx({"q1": 0.8, "q2": 1, "q3": 1, "q4": 0, "q5": 2 / 3})


def test_only_answerable_has_no_noans_keys():
    res = score_predictions(_dataset(_qa("a", ["cat"]), _qa("b", ["dog"])), {"a": "cat", "b": "x"})
    assert list(res) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"]
    assert res["exact"] == 50.0 and res["total"] == 2 and res["HasAns_total"] == 2


def test_only_unanswerable_has_no_hasans_keys():
    res = score_predictions(_dataset(_qa("a", []), _qa("b", [])), {"a": "", "b": "x"})
    assert list(res) == ["exact", "f1", "total", "NoAns_exact", "NoAns_f1", "NoAns_total"]
    assert res["NoAns_exact"] == 50.0 and res["NoAns_f1"] == 50.0


def test_extra_predictions_are_ignored():
    preds = dict(SMALL_PREDS, unknown_id="whatever", other=123)
    assert score_predictions(SMALL, preds) == score_predictions(SMALL, SMALL_PREDS)


# ---------------------------------------------------------------------------- errors


def test_missing_predictions_raise():
    preds = {"q2": "paris"}
    with pytest.raises(ValueError) as ei:
        score_predictions(SMALL, preds)
    msg = str(ei.value)
    assert "4" in msg and "no prediction" in msg
    for qid in ("q1", "q3", "q4", "q5"):
        assert qid in msg


def test_missing_predictions_message_names_first_five():
    data = _dataset(*[_qa(f"id{i}", ["x"]) for i in range(8)])
    with pytest.raises(ValueError, match=r"\b8\b") as ei:
        score_predictions(data, {})
    msg = str(ei.value)
    for i in range(5):
        assert f"id{i}" in msg
    for i in range(5, 8):
        assert f"id{i}" not in msg


def test_non_string_prediction_raises():
    preds = dict(SMALL_PREDS, q4=None)
    with pytest.raises(ValueError, match=r"q4.*NoneType"):
        score_predictions(SMALL, preds)
    with pytest.raises(ValueError, match=r"q2.*list"):
        raw_scores(SMALL, dict(SMALL_PREDS, q2=["paris"]))


def test_empty_dataset_raises():
    with pytest.raises(ValueError, match="no question"):
        score_predictions([], {})


# ------------------------------------------------------------------------ JSON files


def _write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


def test_load_squad_json_roundtrip(tmp_path):
    p = _write(tmp_path, "d.json", {"version": "v2.0", "data": SMALL})
    data = load_squad_json(p)
    assert data == SMALL
    pp = _write(tmp_path, "p.json", SMALL_PREDS)
    res = score_predictions(load_squad_json(p), load_predictions_json(pp))
    assert res["total"] == 5 and res["exact"] == pytest.approx(40.0)


def test_load_squad_json_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        load_squad_json(p)


def test_load_squad_json_invalid_json_reports_line_and_column(tmp_path):
    p = _write(tmp_path, "bad.json", '{\n  "data": [\n    {"paragraphs": [,]}\n  ]\n}')
    with pytest.raises(ValueError) as ei:
        load_squad_json(p)
    msg = str(ei.value)
    assert "bad.json" in msg and "line 3" in msg and "column" in msg


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ([], "top level"),
        ({"version": "v2.0"}, '"data"'),
        ({"data": {"x": 1}}, '"data"'),
        ({"data": [{"title": "T"}]}, '"paragraphs"'),
        ({"data": [{"paragraphs": [{"qas": []}]}]}, '"context"'),
        ({"data": [{"paragraphs": [{"context": "c"}]}]}, '"qas"'),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": []}]}]}]}, '"id"'),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "i", "answers": []}]}]}]}, '"question"'),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "i", "question": "q"}]}]}]}, '"answers"'),
        (
            {"data": [{"paragraphs": [{"context": "c", "qas": [
                {"id": "i", "question": "q", "answers": [{"answer_start": 0}]}]}]}]},
            '"text"',
        ),
    ],
)  # fmt: skip
def test_load_squad_json_structure_errors(tmp_path, obj, fragment):
    p = _write(tmp_path, "ds.json", obj)
    with pytest.raises(ValueError) as ei:
        load_squad_json(p)
    msg = str(ei.value)
    assert "ds.json" in msg
    assert fragment in msg


def test_load_predictions_json(tmp_path):
    p = _write(tmp_path, "preds.json", {"a": "x", "b": ""})
    assert load_predictions_json(p) == {"a": "x", "b": ""}


@pytest.mark.parametrize(
    "content, fragments",
    [
        ('["a", "b"]', ["preds.json", "object"]),
        ('{"a": "x", "qid7": 3}', ["preds.json", "qid7", "int"]),
        ('{"a": null}', ["preds.json", "'a'"]),
        ('{"a": "x",}', ["preds.json", "line 1", "column"]),
    ],
)
def test_load_predictions_json_errors(tmp_path, content, fragments):
    p = _write(tmp_path, "preds.json", content)
    with pytest.raises(ValueError) as ei:
        load_predictions_json(p)
    for frag in fragments:
        assert frag in str(ei.value)


def test_load_predictions_json_missing_file(tmp_path):
    with pytest.raises(ValueError, match="absent.json"):
        load_predictions_json(tmp_path / "absent.json")


# ------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def dev_v2():
    root = os.environ.get("LORASCOPE_DATA_DIR")
    if not root:
        pytest.skip("LORASCOPE_DATA_DIR is not set (needs squad_v2/dev-v2.0.json under it)")
    path = Path(root) / "squad_v2" / "dev-v2.0.json"
    if not path.is_file():
        pytest.skip(f"LORASCOPE_DATA_DIR is set but {path} does not exist")
    return load_squad_json(path)


def _all_qas(articles):
    return [qa for a in articles for p in a["paragraphs"] for qa in p["qas"]]


def test_real_dev_v2_counts_and_empty_predictions(dev_v2):
    qas = _all_qas(dev_v2)
    assert len(qas) == 11873
    assert len({qa["id"] for qa in qas}) == 11873
    assert sum(1 for qa in qas if not qa["answers"]) == 5945

    res = score_predictions(dev_v2, {qa["id"]: "" for qa in qas})
    expected = 100.0 * 5945 / 11873
    assert res["total"] == 11873
    assert res["exact"] == pytest.approx(expected)
    assert res["f1"] == pytest.approx(expected)
    assert round(res["exact"], 2) == 50.07
    assert res["HasAns_total"] == 11873 - 5945
    assert res["HasAns_exact"] == 0.0 and res["HasAns_f1"] == 0.0
    assert res["NoAns_total"] == 5945
    assert res["NoAns_exact"] == 100.0 and res["NoAns_f1"] == 100.0


def test_real_dev_v2_oracle_predictions(dev_v2):
    preds = {
        qa["id"]: (qa["answers"][0]["text"] if qa["answers"] else "") for qa in _all_qas(dev_v2)
    }
    res = score_predictions(dev_v2, preds)
    assert res["exact"] == pytest.approx(100.0)
    assert res["f1"] == pytest.approx(100.0)
    assert res["HasAns_exact"] == pytest.approx(100.0)
    assert res["NoAns_exact"] == pytest.approx(100.0)
