import pytest

from lorascope import LorascopeError
from lorascope.config import DataConfig
from lorascope.tasks import get_task
from lorascope.tasks.mrpc import classification_metrics, read_tsv


def test_real_splits_have_the_published_sizes(real_data):
    task = get_task("mrpc")
    data = DataConfig(dir=str(real_data))
    train, dev, test = (task.load_split(s, data) for s in ("train", "eval", "test"))
    assert len(train) == 3668 and sum(e.answer == "yes" for e in train) == 2474
    assert len(dev) == 408 and sum(e.answer == "yes" for e in dev) == 279
    assert len(test) == 1725 and all(e.answer is None for e in test)
    # double quotes inside sentences must not merge rows (quoting off)
    assert any('"' in e.prompt for e in train)


def test_majority_baseline_on_real_dev(real_data):
    task = get_task("mrpc")
    dev = task.load_split("eval", DataConfig(dir=str(real_data)))
    base = task.baselines(dev)["majority_class (yes)"]
    assert base["accuracy"] == pytest.approx(100 * 279 / 408)  # 68.4
    assert base["f1"] == pytest.approx(100 * 2 * 279 / (2 * 279 + 129))


def test_msr_release_with_bom_and_crlf_reads_like_glue(tmp_path, real_data):
    glue = (real_data / "mrpc" / "dev.tsv").read_text(encoding="utf-8-sig")
    msr = tmp_path / "msr_paraphrase_train.txt"
    msr.write_bytes(b"\xef\xbb\xbf" + glue.replace("\n", "\r\n").encode("utf-8"))
    assert read_tsv(msr) == read_tsv(real_data / "mrpc" / "dev.tsv")
    data = DataConfig(dir=str(tmp_path))
    assert len(get_task("mrpc").load_split("train", data)) == 408


@pytest.mark.parametrize("content, message", [
    ("a\tb\tc\n1\t2\t3\n", "unexpected columns"),
    ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n", "no rows"),
    ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n2\t1\t2\tx\ty\n", "line 2: field Quality must be 0 or 1"),
    ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tonly four\n", "line 2: expected 5 tab-separated fields"),
    ("", "empty file"),
])
def test_malformed_files_name_the_problem(tmp_path, content, message):
    (tmp_path / "mrpc").mkdir()
    f = tmp_path / "mrpc" / "dev.tsv"
    f.write_text(content)
    with pytest.raises(LorascopeError, match=message) as err:
        get_task("mrpc").load_split("eval", DataConfig(dir=str(tmp_path)))
    assert "dev.tsv" in str(err.value)


def test_missing_split_file(tmp_path):
    (tmp_path / "mrpc").mkdir()
    with pytest.raises(LorascopeError, match="no file for the eval split.*dev.tsv"):
        get_task("mrpc").load_split("eval", DataConfig(dir=str(tmp_path)))


def test_classification_metrics_by_hand():
    preds = {"a": {"label": 1, "pred": 1}, "b": {"label": 1, "pred": 0}, "c": {"label": 0, "pred": 1},
             "d": {"label": 0, "pred": 0}, "e": {"label": 1, "pred": 1}}
    m = classification_metrics(preds)
    assert m["accuracy"] == pytest.approx(60.0)
    # tp=2 fp=1 fn=1 -> precision 2/3 recall 2/3
    assert m["f1"] == pytest.approx(100 * 2 / 3)


def test_subset_is_deterministic_and_seeded(small_data):
    task = get_task("mrpc")
    a = [e.id for e in task.examples("train", DataConfig(dir=str(small_data)), limit=10)]
    b = [e.id for e in task.examples("train", DataConfig(dir=str(small_data)), limit=10)]
    c = [e.id for e in task.examples("train", DataConfig(dir=str(small_data), subset_seed=7), limit=10)]
    assert a == b and len(a) == 10 and a != c


def test_answer_logprob_scoring_matches_full_forward(tiny_model, small_data):
    """The fast scorer (logits only at answer positions) equals log-softmax of a plain forward."""
    import torch

    from lorascope.lm import answer_logprobs, candidate_logprobs
    from lorascope.models import load_model, load_tokenizer
    from lorascope.tasks.base import answer_ids, prompt_ids

    model, tok = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    exs = get_task("mrpc").load_split("eval", DataConfig(dir=str(small_data)))[:3]
    prompts = [prompt_ids(tok, e.prompt) for e in exs]
    ans = answer_ids(tok, "yes", eos=False)
    fast = answer_logprobs(model, tok, prompts, ans, "cpu")
    two = answer_logprobs(model, tok, prompts, ans + ans, "cpu")  # a multi-token answer
    one_pass = candidate_logprobs(model, tok, prompts, [ans[:1], [5]], "cpu")  # single-token shortcut
    for p, got, got2, got1 in zip(prompts, fast, two, one_pass[0]):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + ans])).logits[0], -1)
        want = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(ans))
        assert got == pytest.approx(want, abs=1e-4)
        with torch.no_grad():
            logp2 = torch.log_softmax(model(torch.tensor([p + ans + ans])).logits[0], -1)
        want2 = sum(logp2[len(p) - 1 + k, t].item() for k, t in enumerate(ans + ans))
        assert got2 == pytest.approx(want2, abs=1e-4)
        assert got1 == pytest.approx(logp[len(p) - 1, ans[0]].item(), abs=1e-4)


def test_msr_train_release_loses_the_dev_and_test_pairs(tmp_path, real_data, caplog):
    """GLUE's dev pairs come from the MSR train release: beside dev.tsv they are removed and counted."""
    glue_train = (real_data / "mrpc" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()
    glue_dev = (real_data / "mrpc" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()
    d = tmp_path / "mrpc"
    d.mkdir()
    (d / "msr_paraphrase_train.txt").write_text("\r\n".join(glue_train + glue_dev[1:]) + "\r\n")
    (d / "dev.tsv").write_text("\n".join(glue_dev) + "\n")
    task = get_task("mrpc")
    with caplog.at_level("INFO"):
        train = task.load_split("train", DataConfig(dir=str(tmp_path)))
    assert len(train) == 3668 and task.removed_from_train == 408
    assert "removed 408 of 4076 pairs" in caplog.text
    dev = task.load_split("eval", DataConfig(dir=str(tmp_path)))
    assert task.check_held_out(DataConfig(dir=str(tmp_path)), dev, "evaluation") == 3668


def test_a_held_out_set_sharing_a_pair_with_training_is_refused(small_data):
    from lorascope import LorascopeError

    rows = (small_data / "mrpc" / "train.tsv").read_text().splitlines()
    dev = (small_data / "mrpc" / "dev.tsv").read_text().splitlines()
    (small_data / "mrpc" / "train.tsv").write_text("\n".join(rows + dev[3:4]) + "\n")  # one dev pair leaks
    data = DataConfig(dir=str(small_data))
    task = get_task("mrpc")
    with pytest.raises(LorascopeError, match=r"mrpc: 1 of the 20 evaluation examples share an example with the "
                                             r"training split"):
        task.check_held_out(data, task.examples("eval", data), "evaluation")
