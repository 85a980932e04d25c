"""The command line: help texts, the official scorer, and one-line errors with exit status 2."""

import json

import pytest

from helpers import run_cli


def test_every_subcommand_has_help():
    for cmd in ("train", "eval", "score", "prepare-model", "summary", "tasks", "drift", "drift-along", "weights"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and f"usage: lorascope {cmd}" in r.stdout
        assert len(r.stdout.split("options:")[0]) > 70  # a description, not just the usage line


def test_score_prints_the_official_keys(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "The cat sat.", "qas": [
        {"id": "a", "question": "Who sat?", "answers": [{"text": "The cat", "answer_start": 0}]},
        {"id": "b", "question": "Who stood?", "answers": []}]}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps({"a": "cat", "b": "the dog"}))
    r = run_cli("score", "squad_v2", "--data", str(tmp_path / "d.json"), "--predictions", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"exact": 50.0, "f1": 50.0, "total": 2, "HasAns_exact": 100.0, "HasAns_f1": 100.0,
                   "HasAns_total": 1, "NoAns_exact": 0.0, "NoAns_f1": 0.0, "NoAns_total": 1}


def test_score_on_real_dev_with_gold_answers(real_data, tmp_path):
    dev = real_data / "squad_v2" / "dev-v2.0.json"
    data = json.loads(dev.read_text())["data"]
    preds = {qa["id"]: (qa["answers"][0]["text"] if qa["answers"] else "")
             for a in data for p in a["paragraphs"] for qa in p["qas"]}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    out = json.loads(run_cli("score", "squad_v2", "--data", str(dev), "--predictions", str(tmp_path / "p.json")).stdout)
    assert out["exact"] == 100.0 and out["total"] == 11873 and out["NoAns_total"] == 5945


@pytest.mark.parametrize("args, message", [
    (["score", "squad_v2", "--data", "/nonexistent.json", "--predictions", "/x.json"], "/nonexistent.json"),
    (["train", "--task", "mrcp"], "unknown task 'mrcp'; accepted: mrpc, squad_v2 (did you mean 'mrpc'?)"),
    (["train", "--set", "train.learning_rate=1"], "unknown field train.learning_rate"),
    (["eval", "--model", "./no/such/model"], "model './no/such/model': no such directory"),
    (["eval", "--checkpoint", "/no/such/adapter"], "checkpoint '/no/such/adapter': no such directory"),
])
def test_bad_input_is_one_clear_line_and_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_method_is_rejected_by_the_parser():
    r = run_cli("train", "--method", "qlora")
    assert r.returncode == 2 and "invalid choice: 'qlora'" in r.stderr


def test_broken_predictions_file(tmp_path, small_data):
    (tmp_path / "p.json").write_text("{not json")
    r = run_cli("score", "squad_v2", "--data", str(small_data / "squad_v2" / "dev-v2.0.json"),
                "--predictions", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "p.json" in r.stderr and "Traceback" not in r.stderr


def test_empty_split_leaves_no_output(tiny_model, tmp_path):
    (tmp_path / "mrpc").mkdir()
    (tmp_path / "mrpc" / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
    out = tmp_path / "m.json"
    r = run_cli("eval", "--model", str(tiny_model), "--data-dir", str(tmp_path), "--task", "mrpc", "--output", str(out))
    assert r.returncode == 2 and "dev.tsv: the file has a header but no rows" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".m.json*"))


def test_eval_writes_metrics_with_provenance(tiny_model, small_data, tmp_path):
    out = tmp_path / "m.json"
    r = run_cli("eval", "--model", str(tiny_model), "--data-dir", str(small_data), "--task", "mrpc",
                "--output", str(out), "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n_examples"] == 20 and res["metrics"]["n"] == 20 and res["split"] == "eval"
    assert res["checkpoint"]["kind"] == "base" and res["config"]["eval"]["task"] == "mrpc"
    assert res["provenance"]["versions"]["transformers"] and len(res["example_ids_sha256"]) == 64
    preds = json.loads(out.with_suffix(".predictions.json").read_text())
    assert len(preds) == 20 and all(p["pred"] in (0, 1) for p in preds.values())
    table = run_cli("summary", str(out))
    assert table.returncode == 0 and f"accuracy {res['metrics']['accuracy']:.1f}" in table.stdout
    assert "majority_class (yes)" in table.stdout
