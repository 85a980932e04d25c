from pathlib import Path

import pytest

from lorascope import LorascopeError
from lorascope.config import Config, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    if "study" in (yaml.safe_load(path.read_text()) or {}):  # a `lorascope run` config
        from lorascope.pipeline import load_study

        study = load_study(path)
        for task in study.study.tasks:
            assert isinstance(study.task_config(task), Config)
    else:
        assert isinstance(load_config(path), Config)


def test_yaml_then_overrides_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  task: squad_v2\nlora:\n  rank: 4\n")
    cfg = load_config(f, ["lora.rank=16", "lora.target_modules=[q_proj,v_proj]"], **{"train.method": "full"})
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; accepted as a number
    assert cfg.train.task == "squad_v2"
    assert cfg.lora.rank == 16
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.method == "full"
    assert cfg.train.peak_lr == pytest.approx(1e-4)


def test_default_learning_rate_depends_on_method():
    assert load_config(**{"train.method": "full"}).train.peak_lr < load_config(**{"train.method": "lora"}).train.peak_lr


def test_unknown_field_names_section_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n")
    with pytest.raises(LorascopeError, match=r"c.yaml: unknown field train.learning_rate.*accepted: .*lr"):
        load_config(f)
    with pytest.raises(LorascopeError, match=r"unknown section 'lroa'.*did you mean 'lora'"):
        load_config(None, ["lroa.rank=4"])


def test_bad_values_are_all_reported_at_once():
    with pytest.raises(LorascopeError) as err:
        load_config(None, ["lora.rank=0", "train.schedule=exp", "train.task=mrcp"])
    msg = str(err.value)
    assert "lora.rank: must be a positive integer, got 0" in msg
    assert "train.schedule: unknown schedule 'exp'" in msg
    assert "did you mean 'mrpc'" in msg


def test_type_errors_name_the_field():
    with pytest.raises(LorascopeError, match=r"lora.rank: expected an integer, got 'eight'"):
        load_config(None, ["lora.rank=eight"])
    with pytest.raises(LorascopeError, match="expected section.field=value"):
        parse_override("rank=8")


def test_broken_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(LorascopeError, match="bad.yaml: not valid YAML"):
        load_config(f)
    with pytest.raises(LorascopeError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
