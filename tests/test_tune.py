"""Learning-rate (and epoch) selection: the validation split, the search, its bad input, and the study stage."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import REPO
from lorascope import LorascopeError
from lorascope.config import DataConfig, load_config
from lorascope.tasks import get_task


@pytest.mark.parametrize("task", ["mrpc", "squad_v2"])
def test_validation_split_is_carved_from_the_training_side(small_data, task):
    t = get_task(task)
    data = DataConfig(dir=str(small_data), validation_share=0.3)
    fit, val = t.examples("train", data), t.examples("validation", data)
    whole = t.examples("train", DataConfig(dir=str(small_data)))
    assert {e.id for e in fit} | {e.id for e in val} == {e.id for e in whole}
    assert not {e.id for e in fit} & {e.id for e in val} and fit and val
    assert not {t.group_key(e) for e in fit} & {t.group_key(e) for e in val}  # SQuAD: whole paragraphs
    assert not {e.id for e in val} & {e.id for e in t.examples("eval", data)}
    with pytest.raises(LorascopeError, match="the validation split is carved from the training side"):
        t.examples("validation", DataConfig(dir=str(small_data)))


def test_validation_share_that_leaves_no_training_examples(small_data):
    data = DataConfig(dir=str(small_data), validation_share=0.999999)
    with pytest.raises(LorascopeError, match=r"data.validation_share: 0.999999 of 2 training examples leaves no "
                                             r"training examples"):
        get_task("mrpc").examples("train", data, limit=2)
    with pytest.raises(LorascopeError, match=r"data.validation_share: must be in \[0, 1\)"):
        load_config(None, ["data.validation_share=1.5"])


@pytest.mark.parametrize("study, message", [
    ({"tune_lr": True, "tune_lrs_full": [], "tune_lrs_lora": []},
     r"study.tune_lrs_full: the search budget is zero"),
    ({"tune_lr": True, "tune_lrs_full": [1e-4, -1e-3], "tune_lrs_lora": [1e-4, 1e-3]},
     r"study.tune_lrs_full: learning rates must be positive numbers, got \[-0.001\]"),
    ({"tune_lr": True, "tune_lrs_full": [1e-4], "tune_lrs_lora": [1e-4, 1e-3]},
     r"1 vs 2 rates; both methods must get the same search budget"),
    ({"tune_lr": True, "tune_validation_share": 1.0}, r"study.tune_validation_share: must be between 0 and 1"),
    ({"min_seeds": 3}, r"train.seed: 1 seed\(s\) given \(\[0\]\), but study.min_seeds asks for at least 3"),
    ({"tune_lr": True, "tune_epochs": []}, r"study.tune_epochs: expected a non-empty list of epoch counts"),
    ({"tune_lr": True, "tune_epochs": [1, 0]},
     r"study.tune_epochs: epoch counts must be positive numbers, got \[0(\.0)?\]"),
    ({"tune_lr": True, "tune_epochs": [1, 1.0]}, r"study.tune_epochs: an epoch count is listed twice"),
    ({"tune_lr": True, "per_task": {"mrpc": {"tune_epochs": 2}}},
     r"study.per_task.mrpc.tune_epochs: expected a non-empty list of epoch counts, e.g. \[1, 2\], got 2"),
    ({"tune_epochs": [1, 2]}, r"study.tune_epochs: searches epochs at the selected learning rate, so it needs "
                              r"study.tune_lr: true"),
])
def test_search_config_errors_name_the_field(tmp_path, study, message):
    from lorascope.pipeline import load_study

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc"], **study}}))
    with pytest.raises(LorascopeError, match=message):
        load_study(f)


def test_tune_records_every_trial_selects_the_best_and_resumes(tiny_model, small_data, tmp_path, monkeypatch):
    from lorascope.tune import tune_lr

    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=3",
                             "train.save_every=0", "eval.batch_size=8"],
                      **{"train.task": "mrpc", "train.method": "lora", "model.name": str(tiny_model),
                         "data.dir": str(small_data)})
    out = tmp_path / "tune"
    r = tune_lr(cfg, [1e-3, 1e-5], 0.25, out)
    assert [t["lr"] for t in r["trials"]] == [1e-5, 1e-3] and r["budget"] == 2
    for t in r["trials"]:
        val = json.loads((out / f"lr_{t['lr']:.2e}" / "eval.json").read_text())
        assert val["split"] == "validation" and t["value"] == val["metrics"]["accuracy"]
        assert t["n_validation"] == val["n_examples"] > 0
        assert not (out / f"lr_{t['lr']:.2e}" / "train" / "model").exists()  # weights not kept
        trained = json.loads((out / f"lr_{t['lr']:.2e}" / "train" / "lorascope-train.json").read_text())
        assert trained["config"]["train"]["lr"] == t["lr"] and trained["config"]["data"]["validation_share"] == 0.25
        # trials train on the training side minus the validation share
        assert trained["train_examples"] + val["n_examples"] == 48
    best = max(r["trials"], key=lambda t: (t["value"], -t["lr"]))
    assert r["best_lr"] == best["lr"] and (out / "lr_curve.png").stat().st_size > 1000
    saved = json.loads((out / "tune.json").read_text())
    assert saved["best_lr"] == r["best_lr"] and saved["trials"] == r["trials"]

    # a rerun reads the finished trials instead of training again
    import lorascope.train

    real_train = lorascope.train.train
    monkeypatch.setattr(lorascope.train, "train", lambda c: pytest.fail("retrained a finished trial"))
    assert tune_lr(cfg, [1e-3, 1e-5], 0.25, out)["trials"] == r["trials"]

    # a grown grid trains only the new rate; a trial made with another config is trained again
    trained = []
    monkeypatch.setattr(lorascope.train, "train", lambda c: trained.append(c.train.lr) or real_train(c))
    grown = tune_lr(cfg, [1e-3, 1e-5, 1e-4], 0.25, out)
    assert trained == [1e-4] and grown["trials"][0] == r["trials"][0] and grown["trials"][2] == r["trials"][1]
    record = out / "lr_1.00e-03" / "validation.json"
    legacy = {k: v for k, v in json.loads(record.read_text()).items() if k not in ("train_config_hash", "scoring")}
    record.write_text(json.dumps(legacy))  # a record from before trials stored their config: read from training
    tune_lr(cfg, [1e-3, 1e-5, 1e-4], 0.25, out)
    assert trained == [1e-4]
    cfg.train.max_steps = 2  # another training config: every trial is made again
    tune_lr(cfg, [1e-3, 1e-5], 0.25, out)
    assert trained == [1e-4, 1e-5, 1e-3]
    with pytest.raises(LorascopeError, match="the search budget is zero"):
        tune_lr(cfg, [], 0.25, out)


def test_an_epoch_search_at_the_selected_rate(tiny_model, small_data, tmp_path, monkeypatch):
    """With epochs, the selected rate trains once more per other epoch count; the count the rates were searched
    at reuses its trial; the best count is selected (ties: fewer) and a rerun trains nothing."""
    from lorascope.tune import tune_lr

    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=8", "train.save_every=0",
                             "eval.batch_size=8"],
                      **{"train.task": "mrpc", "train.method": "lora", "model.name": str(tiny_model),
                         "data.dir": str(small_data)})
    out = tmp_path / "tune"
    r = tune_lr(cfg, [1e-3, 1e-5], 0.25, out, epochs=[2, 1])
    best = r["best_lr"]
    assert r["epochs_grid"] == [1.0, 2.0] and [t["epochs"] for t in r["epoch_trials"]] == [1.0, 2.0]
    one, two = r["epoch_trials"]
    assert one["reused_from"] == f"lr_{best:.2e}" and one["value"] == r["best_value"]
    assert two["lr"] == best and "reused_from" not in two
    tdir = out / f"lr_{best:.2e}_epochs_2"
    trained2 = json.loads((tdir / "train" / "lorascope-train.json").read_text())
    trained1 = json.loads((out / f"lr_{best:.2e}" / "train" / "lorascope-train.json").read_text())
    assert trained2["config"]["train"]["epochs"] == 2.0 and trained2["config"]["train"]["lr"] == best
    assert trained2["steps"] == 2 * trained1["steps"] > 0
    val = json.loads((tdir / "eval.json").read_text())
    assert two["value"] == val["metrics"]["accuracy"] and val["split"] == "validation"
    want = max(r["epoch_trials"], key=lambda t: (t["value"], -t["epochs"]))
    assert (r["best_epochs"], r["best_epochs_value"]) == (want["epochs"], want["value"])
    assert r["epochs_at_grid_edge"] and "ties: fewer epochs" in r["epochs_rule"]
    assert all(t["epochs"] == 1.0 for t in r["trials"])  # the rates are searched at train.epochs
    saved = json.loads((out / "tune.json").read_text())
    assert saved["epoch_trials"] == r["epoch_trials"] and (out / "lr_curve.png").stat().st_size > 1000

    import lorascope.train

    monkeypatch.setattr(lorascope.train, "train", lambda c: pytest.fail("retrained a finished trial"))
    again = tune_lr(cfg, [1e-3, 1e-5], 0.25, out, epochs=[1, 2])
    assert again["epoch_trials"] == r["epoch_trials"] and again["best_epochs"] == r["best_epochs"]
    # without an epoch search, nothing about epochs is claimed and the same trials stand
    plain = tune_lr(cfg, [1e-3, 1e-5], 0.25, out)
    assert "best_epochs" not in plain and plain["trials"] == r["trials"]
    with pytest.raises(LorascopeError, match="epochs: epoch counts must be positive"):
        tune_lr(cfg, [1e-3], 0.25, out, epochs=[-1])


def test_the_final_models_train_for_the_selected_epochs(tmp_path, monkeypatch):
    """In a study with tune_epochs the train stages leave epochs to the search (and read them from tune.json);
    a study without it keeps its stage hashes."""
    import lorascope.train
    from lorascope.pipeline import _hash, _train, load_study, plan

    f = tmp_path / "s.yaml"
    study = {"tasks": ["mrpc", "squad_v2"], "tune_lr": True, "drift": False, "serve": False}
    f.write_text(yaml.safe_dump({"study": study}))
    before = {st.name: _hash(st.config) for st in plan(load_study(f), tmp_path / "run")}
    study["per_task"] = {"mrpc": {"tune_epochs": [1, 2, 3]}}
    f.write_text(yaml.safe_dump({"study": study}))
    s = load_study(f)
    assert s.tune_epochs("mrpc") == [1.0, 2.0, 3.0] and s.tune_epochs("squad_v2") is None
    stages = {st.name: st for st in plan(s, tmp_path / "run")}
    assert stages["tune:mrpc:lora"].config["epochs_grid"] == [1.0, 2.0, 3.0]
    assert "epochs" not in stages["train:mrpc:full_s0"].config["train"]
    assert stages["train:squad_v2:full_s0"].config["train"]["epochs"] == 1.0
    assert {n: _hash(st.config) for n, st in stages.items() if "squad_v2" in n} == \
        {n: h for n, h in before.items() if "squad_v2" in n}  # the other task's stages are untouched
    assert _hash(stages["tune:mrpc:lora"].config) != before["tune:mrpc:lora"]

    tj = tmp_path / "tune.json"
    tj.write_text(json.dumps({"best_lr": 3e-4, "best_epochs": 2.0}))
    seen = []
    monkeypatch.setattr(lorascope.train, "train", lambda c: seen.append((c.train.lr, c.train.epochs)))
    cfg = s.task_config("mrpc")
    _train(cfg, tj)
    tj.write_text(json.dumps({"best_lr": 1e-4}))
    _train(cfg, tj)
    assert seen == [(3e-4, 2.0), (1e-4, 1.0)] and cfg.train.epochs == 1.0


def test_squad_trials_are_scored_with_the_cross_fitted_no_answer_rule(tiny_model, small_data, tmp_path):
    from lorascope.tasks.squad_v2 import SquadV2
    from lorascope.tune import tune_lr

    cfg = load_config(None, ["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2",
                             "train.save_every=0", "eval.batch_size=8", "eval.max_new_tokens=4"],
                      **{"train.task": "squad_v2", "train.method": "lora", "model.name": str(tiny_model),
                         "data.dir": str(small_data)})
    out = tmp_path / "tune"
    r = tune_lr(cfg, [1e-3], 0.4, out)
    trial = r["trials"][0]
    record = json.loads((out / "lr_1.00e-03" / "validation.json").read_text())
    val = json.loads((out / "lr_1.00e-03" / "eval.json").read_text())
    # greedy decoding's own abstention is kept beside the score the search uses
    assert trial["value_as_evaluated"] == val["metrics"]["f1"]
    sel = trial["selection"]
    assert sel["rule"] == SquadV2.selection_rule and len(sel["halves"]) == 2 and sel["n"] == val["n_examples"]
    assert trial["value"] == sel["value"] == pytest.approx(
        sum(h["f1"] * h["questions"] for h in sel["halves"]) / sel["n"])
    assert record["scoring"]["selection"] == SquadV2.selection_rule
    assert record["scoring"]["no_answer_signal"] == cfg.eval.no_answer_signal
    assert r["score"] == SquadV2.selection_rule and "selection rule" in r["score_label"]
    # MRPC's trials are scored as before, so records made before the squad rule existed stay valid
    mcfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=1",
                              "train.save_every=0", "eval.batch_size=8"],
                       **{"train.task": "mrpc", "train.method": "lora", "model.name": str(tiny_model),
                          "data.dir": str(small_data)})
    m = tune_lr(mcfg, [1e-3], 0.25, tmp_path / "mtune")
    mrec = json.loads((tmp_path / "mtune" / "lr_1.00e-03" / "validation.json").read_text())
    assert set(mrec["scoring"]) == {"batch_size", "max_new_tokens"} and "selection" not in m["trials"][0]
    assert m["score"] == "accuracy of the validation split as evaluated"


def test_fixed_per_method_rates_and_tuned_stages_in_the_plan(tmp_path):
    from lorascope.pipeline import load_study, plan

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc"], "lr_full": 1e-4, "lr_lora": 2e-3,
                                           "drift": False, "serve": False}}))
    stages = {s.name: s for s in plan(load_study(f), tmp_path / "run")}
    assert stages["train:mrpc:full_s0"].config["train"]["lr"] == 1e-4
    assert stages["train:mrpc:lora_r8_s0"].config["train"]["lr"] == 2e-3
    assert not any(n.startswith("tune:") for n in stages)
    f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc"], "tune_lr": True, "drift": False, "serve": False}}))
    stages = {s.name: s for s in plan(load_study(f), tmp_path / "run")}
    assert stages["train:mrpc:full_s0"].deps == ["prepare", "tune:mrpc:full"]
    assert "lr" not in stages["train:mrpc:lora_r8_s0"].config["train"]  # the search decides it
    f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc", "squad_v2"], "serve": {"tasks": ["mrpc"]}}}))
    serve = next(s for s in plan(load_study(f), tmp_path / "run") if s.kind == "serve")
    assert serve.deps == ["train:mrpc:lora_r8_s0"] and serve.config["tasks"] == ["mrpc"]
    f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc", "squad_v2"], "drift": {"tasks": ["squad_v2"]}}}))
    kinds = [s.name for s in plan(load_study(f), tmp_path / "run") if s.kind in ("drift", "weights")]
    assert kinds == ["drift:squad_v2", "weights:squad_v2"]
    for section in ("serve", "drift"):
        for bad, msg in (([], "name at least one task"), (["squad"], "'squad' is not one of study.tasks")):
            f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc", "squad_v2"], section: {"tasks": bad}}}))
            with pytest.raises(LorascopeError, match=f"study.{section}.tasks: {msg}"):
                load_study(f)
    f.write_text(yaml.safe_dump({"study": {"tasks": ["mrpc"], "tune_lr": True, "lr_lora": 1e-3}}))
    with pytest.raises(LorascopeError, match="fixed rates contradict study.tune_lr"):
        load_study(f)


def test_reference_preset_is_the_issue_s_study():
    from lorascope.pipeline import load_study

    s = load_study(REPO / "configs" / "reference.yaml")
    assert s.study.tune_lr and len(s.study.tune_lrs_full) == len(s.study.tune_lrs_lora) >= 3
    assert len(s.seeds) >= 3 and s.study.drift.max_examples >= 1000 and s.study.serve.enabled
    assert s.study.serve.batches >= 20  # a p95 from 20 timed batches, not from 3
    mrpc, squad = s.task_config("mrpc"), s.task_config("squad_v2")
    assert mrpc.data.max_train_examples is None and mrpc.data.max_eval_examples is None
    assert squad.data.max_train_examples >= 4000 and squad.data.max_eval_examples == 1000
    assert s.tune_epochs("mrpc") == [1.0, 2.0]  # "more than one epoch if validation says so": validation decides
    # in parts: every model's drift as soon as it is trained; each task's seed noise floor (two seeds of a method
    # measured together), so that issue 11's rule is checked on both tasks
    assert s.study.drift.per_model and s.study.drift.noise_floor_tasks == ["mrpc", "squad_v2"]
    assert all(len(s.seeds_of(t)) >= 2 for t in s.study.drift.noise_floor_tasks)


def test_a_task_with_its_own_learning_rate_grids(tmp_path):
    """study.per_task.TASK.tune_lrs_full / tune_lrs_lora: a task searched over rates of its own, the same budget
    for both methods on each task."""
    from lorascope.pipeline import load_study, plan

    f = tmp_path / "s.yaml"
    study = {"tasks": ["mrpc", "squad_v2"], "tune_lr": True, "drift": False, "serve": False,
             "tune_lrs_full": [1e-5, 1e-4], "tune_lrs_lora": [1e-4, 1e-3],
             "per_task": {"squad_v2": {"tune_lrs_full": [3e-5, 1e-4, 3e-4], "tune_lrs_lora": [3e-4, 1e-3, 3e-3],
                                       "data": {"max_train_examples": 64}}}}
    f.write_text(yaml.safe_dump({"study": study}))
    s = load_study(f)
    stages = {st.name: st for st in plan(s, tmp_path / "run")}
    assert stages["tune:mrpc:full"].config["grid"] == [1e-5, 1e-4]
    assert stages["tune:mrpc:lora"].config["grid"] == [1e-4, 1e-3]
    assert stages["tune:squad_v2:full"].config["grid"] == [3e-5, 1e-4, 3e-4]
    assert stages["tune:squad_v2:lora"].config["grid"] == [3e-4, 1e-3, 3e-3]
    assert s.task_config("squad_v2").data.max_train_examples == 64  # the task's other overrides still apply
    # a change of one task's grid leaves the other task's search as it was
    study["per_task"]["squad_v2"]["tune_lrs_full"] = [3e-5, 1e-4, 1e-3]
    f.write_text(yaml.safe_dump({"study": study}))
    again = {st.name: st for st in plan(load_study(f), tmp_path / "run")}
    assert again["tune:mrpc:full"].config == stages["tune:mrpc:full"].config
    assert again["tune:squad_v2:full"].config != stages["tune:squad_v2:full"].config
    for own, message in (
            ({"tune_lrs_lora": [3e-4, 1e-3, 3e-3]},
             r"study.per_task.squad_v2: 2 rates for full fine-tuning vs 3 for LoRA on squad_v2; both methods must "
             r"get the same search budget"),
            ({"tune_lrs_full": [], "tune_lrs_lora": []}, r"study.per_task.squad_v2.tune_lrs_full: the search budget "
                                                         r"is zero"),
            ({"tune_lrs_full": [1e-4, -1.0], "tune_lrs_lora": [1e-4, 1e-3]},
             r"study.per_task.squad_v2.tune_lrs_full: learning rates must be positive numbers, got \[-1.0\]"),
            ({"tune_lrs_full": 1e-4, "tune_lrs_lora": [1e-4]},
             r"study.per_task.squad_v2.tune_lrs_full: expected a list of learning rates, got 0.0001")):
        study["per_task"] = {"squad_v2": own}
        f.write_text(yaml.safe_dump({"study": study}))
        with pytest.raises(LorascopeError, match=message):
            load_study(f)


def test_a_task_with_its_own_seeds(tmp_path):
    """study.per_task.TASK.train.seed: SQuAD v2 with 2 seeds beside MRPC's 3, in every stage that reads models."""
    from lorascope.pipeline import load_study, plan

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"train": {"seed": [0, 1, 2]}, "study": {
        "tasks": ["mrpc", "squad_v2"], "min_seeds": 2, "tune_lr": True, "forgetting": True,
        "per_task": {"squad_v2": {"train": {"seed": [3, 4]}}}}}))
    s = load_study(f)
    assert (s.seeds_of("mrpc"), s.seeds_of("squad_v2")) == ([0, 1, 2], [3, 4])
    stages = {st.name: st for st in plan(s, tmp_path / "run")}
    trained = sorted(n for n in stages if n.startswith("train:squad_v2:"))
    assert trained == ["train:squad_v2:full_s3", "train:squad_v2:full_s4", "train:squad_v2:lora_r8_s3",
                       "train:squad_v2:lora_r8_s4"]
    assert len([n for n in stages if n.startswith("train:mrpc:")]) == 6
    assert stages["tune:squad_v2:full"].config["train"]["seed"] == 3  # the search runs at the task's first seed
    assert "eval:mrpc:squad_v2.lora_r8_s4" in stages and "eval:mrpc:squad_v2.lora_r8_s2" not in stages
    assert stages["drift:squad_v2"].deps == [f"train:squad_v2:{m}" for m in ("full_s3", "lora_r8_s3", "full_s4",
                                                                          "lora_r8_s4")]
    assert stages["serve:r8"].deps == ["train:mrpc:lora_r8_s0", "train:squad_v2:lora_r8_s3"]
    f.write_text(yaml.safe_dump({"train": {"seed": [0, 1, 2]}, "study": {
        "tasks": ["mrpc", "squad_v2"], "min_seeds": 2, "per_task": {"squad_v2": {"train": {"seed": 3}}}}}))
    with pytest.raises(LorascopeError, match=r"study.per_task.squad_v2.train.seed: 1 seed\(s\) given \(\[3\]\) for "
                                             r"squad_v2, but study.min_seeds asks for at least 2"):
        load_study(f)
