"""Flags generated from settings dataclasses: the parser and the code share every default."""

import argparse
import dataclasses

import pytest

from lorascope import LorascopeError
from lorascope.cli import build_parser
from lorascope.cliargs import settings_from_args
from lorascope.pipeline import StudyArgs
from lorascope.serve.bench import ServeSettings


def _serve(*flags):
    return build_parser().parse_args(["serve-bench", "--adapter", "a=x", "--output-dir", "o", *flags])


def test_no_flags_is_the_dataclass_default():
    assert settings_from_args(ServeSettings, _serve()) == ServeSettings()


def test_every_setting_has_a_flag_with_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["serve-bench"]._actions}
    for f in dataclasses.fields(ServeSettings):
        if f.metadata.get("cli", True):
            assert f.name in actions and actions[f.name].help, f.name
    assert "seed" not in actions and actions["timeout_seconds"].option_strings == ["--timeout"]


def test_flags_typed_from_the_fields():
    s = settings_from_args(ServeSettings, _serve("--batch-sizes", "1, 4", "--rates", "0.5,2", "--modes", "merged",
                                                 "--kv-cache-gib", "2.5", "--natural-lengths", "--no-enforce-eager",
                                                 "--timeout", "9", "--max-lora-rank", "16"))
    assert s.batch_sizes == [1, 4] and s.rates == [0.5, 2.0] and s.modes == ["merged"] and s.kv_cache_gib == 2.5
    assert s.natural_lengths is True and s.enforce_eager is False and s.timeout_seconds == 9 and s.max_lora_rank == 16
    assert settings_from_args(ServeSettings, _serve("--enforce-eager")).enforce_eager is True
    assert settings_from_args(ServeSettings, _serve()).enforce_eager is None  # neither: as deployed
    with pytest.raises(LorascopeError, match=r"^--batch-sizes '1,x': expected comma-separated integers, e\.g\. 1,2"):
        settings_from_args(ServeSettings, _serve("--batch-sizes", "1,x"))
    with pytest.raises(LorascopeError, match=r"^--rates 'fast': expected comma-separated request rates"):
        settings_from_args(ServeSettings, _serve("--rates", "fast"))


def test_the_study_s_serve_section_is_serve_settings_plus_three_fields():
    study = StudyArgs()
    assert study.serve.settings() == ServeSettings()
    own = {f.name for f in dataclasses.fields(ServeSettings)}
    assert {f.name for f in dataclasses.fields(study.serve)} - own == {"enabled", "tasks", "max_overhead"}
    for f in dataclasses.fields(ServeSettings):  # the same defaults and help, written once
        assert getattr(study.serve, f.name) == getattr(ServeSettings(), f.name), f.name
        assert dict(type(study.serve).__dataclass_fields__[f.name].metadata) == dict(f.metadata)


def test_problems_one_line_each():
    assert ServeSettings().problems() == []
    bad = ServeSettings(engine="tgi", batches=0, rates=[1.0, -2.0], output_tokens=1).problems()
    assert [p.split(":")[0] for p in bad] == ["--engine 'tgi'", "--batches 0", "--output-tokens 1", "--rates 1,-2"]


def test_drift_flags_and_the_study_s_drift_settings_come_from_drift_settings():
    from lorascope.drift.measure import DriftSettings

    ns = build_parser().parse_args(["drift", "--tuned", "a=x", "--output-dir", "o"])
    assert settings_from_args(DriftSettings, ns) == DriftSettings()
    ns = build_parser().parse_args(["drift", "--tuned", "a=x", "--output-dir", "o", "--tokens", "all",
                                    "--max-examples", "30", "--float32-products", "--reduction", "0.3"])
    s = settings_from_args(DriftSettings, ns)
    assert (s.tokens, s.max_examples, s.float32_products, s.reduction) == ("all", 30, True, 0.3)
    study = StudyArgs()
    assert study.drift.settings() == DriftSettings() and study.drift.enabled
    study.drift.max_examples, study.drift.reduction = 1, 1.5
    assert [p.split(":")[0] for p in study.problems()] == ["study.drift.max_examples", "study.drift.reduction"]
    study.serve.batch_sizes = [0]
    assert "study.serve.batch_sizes: [0]: expected positive integers, e.g. 1,2,4,8,16" in study.problems()


def test_study_sections_in_yaml_false_for_off_and_the_old_flat_names(tmp_path, caplog):
    from lorascope.pipeline import load_study

    f = tmp_path / "s.yaml"
    f.write_text("study:\n  tasks: [mrpc]\n  drift: {max_examples: 30, jackknife_groups: 4}\n  serve: false\n")
    s = load_study(f).study
    assert (s.drift.enabled, s.drift.max_examples, s.drift.jackknife_groups, s.serve.enabled) == (True, 30, 4, False)
    f.write_text("study:\n  tasks: [mrpc]\n  drift_examples: 30\n  serve_batch_sizes: [2]\n"
                 "  max_serving_overhead: 0.5\n")
    with caplog.at_level("WARNING"):
        s = load_study(f).study
    assert (s.drift.max_examples, s.serve.batch_sizes, s.serve.max_overhead) == (30, [2], 0.5)
    assert "study.drift_examples is now study.drift.max_examples" in caplog.text
    for text, msg in (("  serve: {batch_size: [2]}", r"unknown field study\.serve\.batch_size; .*did you mean "
                                                     r"'batch_sizes'"),
                      ("  drift: 3", r"study\.drift: expected a mapping of its settings, or true / false; got 3"),
                      ("  serve: {tasks: [x]}", r"study\.serve\.tasks: 'x' is not one of study\.tasks"),
                      ("  drift: false\n  drift_examples: 5", r"study\.drift_examples is now study\.drift\."
                                                             r"max_examples, but study\.drift is False here")):
        f.write_text("study:\n  tasks: [mrpc]\n" + text + "\n")
        with pytest.raises(LorascopeError, match=msg):
            load_study(f)
