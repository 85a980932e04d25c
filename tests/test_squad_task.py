import json

import pytest

from lorascope import LorascopeError
from lorascope.config import DataConfig
from lorascope.tasks import Example, get_task
from lorascope.tasks.squad_v2 import NO_ANSWER, make_prompt, split_articles, to_prediction


def test_real_dev_split_by_article_is_disjoint_and_deterministic(real_data, caplog):
    task = get_task("squad_v2")
    data = DataConfig(dir=str(real_data))
    with caplog.at_level("INFO"):
        train = task.load_split("train", data)
    ev = task.load_split("eval", data)
    assert "split dev-v2.0.json by article" in caplog.text  # sizes are logged
    assert len(train) + len(ev) == 11873
    assert len(train) >= 2000 and len(ev) >= 1000
    assert not {e.meta["title"] for e in train} & {e.meta["title"] for e in ev}
    assert not {e.meta["context"] for e in train} & {e.meta["context"] for e in ev}
    assert [e.id for e in task.load_split("eval", data)] == [e.id for e in ev]
    assert len(ev) >= 0.4 * 11873


def test_train_file_is_used_when_present(small_data):
    d = small_data / "squad_v2"
    arts = json.loads((d / "dev-v2.0.json").read_text())
    (d / "train-v2.0.json").write_text(json.dumps({"version": "v2.0", "data": arts["data"][:2]}))
    task = get_task("squad_v2")
    data = DataConfig(dir=str(small_data))
    assert len(task.load_split("train", data)) == 12
    assert len(task.load_split("eval", data)) == 60


def test_split_needs_two_articles():
    one = [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": []}]}]}]
    with pytest.raises(LorascopeError, match="cannot split 1 article"):
        split_articles(one, 0.4)


def test_broken_json_names_the_file(tmp_path):
    (tmp_path / "squad_v2").mkdir()
    (tmp_path / "squad_v2" / "dev-v2.0.json").write_text('{"data": [')
    with pytest.raises(LorascopeError, match="dev-v2.0.json"):
        get_task("squad_v2").load_split("eval", DataConfig(dir=str(tmp_path)))
    with pytest.raises(LorascopeError, match="dev-v2.0.json not found"):
        get_task("squad_v2").load_split("eval", DataConfig(dir=str(tmp_path / "nowhere")))


def test_to_prediction():
    assert to_prediction(" Paris\nmore text") == "Paris"
    assert to_prediction(f"{NO_ANSWER}.") == ""
    assert to_prediction("Unanswerable") == ""
    assert to_prediction("") == ""


def _long_example(answer_at_end: bool, answerable: bool = True):
    filler = " ".join(f"word{i}" for i in range(300))
    ctx = (filler + " The capital is Gondor. " + filler) if not answer_at_end else (filler + " The capital is Gondor.")
    answers = [{"text": "Gondor", "answer_start": ctx.index("Gondor")}] if answerable else []
    return Example("x", make_prompt(ctx, "What is the capital?"), "Gondor" if answerable else NO_ANSWER,
                   {"context": ctx, "question": "What is the capital?", "answers": answers, "title": "t"})


@pytest.mark.parametrize("at_end", [False, True])
def test_long_context_is_cut_around_the_answer(tiny_model, at_end):
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ex = _long_example(at_end)
    [feat] = get_task("squad_v2").features(tok, [ex], max_len=200)
    assert len(feat.input_ids) <= 200
    prompt = tok.decode(feat.input_ids[:feat.answer_start])
    assert "Gondor" in prompt  # the answer stays in the context
    assert tok.decode(feat.input_ids[feat.answer_start:], skip_special_tokens=True).strip() == "Gondor"


def test_unanswerable_long_context_is_cut_and_too_small_budget_is_skipped(tiny_model, caplog):
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    task = get_task("squad_v2")
    [feat] = task.features(tok, [_long_example(False, answerable=False)], max_len=150)
    assert len(feat.input_ids) <= 150
    with caplog.at_level("WARNING"):
        assert task.features(tok, [_long_example(False)], max_len=20) == []
    assert "1 skipped" in caplog.text


def test_evaluate_on_tiny_model_gives_official_keys(tiny_model, small_data):
    from lorascope.models import load_model, load_tokenizer

    task = get_task("squad_v2")
    exs = task.load_split("eval", DataConfig(dir=str(small_data)))
    model, tok = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    metrics, preds = task.evaluate(model, tok, exs, batch_size=8, max_new_tokens=4, max_len=512)
    assert list(metrics)[:9] == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                                 "NoAns_exact", "NoAns_f1", "NoAns_total"]
    assert metrics["total"] == len(exs) == len(preds["predictions"])
    base = task.baselines(exs)["always_no_answer"]
    assert base["NoAns_exact"] == 100.0 and base["HasAns_exact"] == 0.0
