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


def test_the_study_takes_its_serving_defaults_from_serve_settings():
    study, serve = StudyArgs(), ServeSettings()
    linked = [f for f in dataclasses.fields(StudyArgs) if "serve" in f.metadata]
    assert len(linked) == 13
    for f in linked:
        assert getattr(study, f.name) == getattr(serve, f.metadata["serve"]), f.name
        assert f.metadata["help"] == dict(ServeSettings.__dataclass_fields__[f.metadata["serve"]].metadata)["help"]


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
    linked = {f.name: f.metadata["drift"] for f in dataclasses.fields(StudyArgs) if "drift" in f.metadata}
    assert linked == {"drift_examples": "max_examples", "drift_batch_size": "batch_size", "drift_tokens": "tokens",
                      "drift_reduction": "reduction"}
    assert study.drift_settings() == DriftSettings()
    assert [p.split(":")[0] for p in StudyArgs(drift_examples=1, drift_reduction=1.5).problems()] == [
        "study.drift_examples", "study.drift_reduction"]
