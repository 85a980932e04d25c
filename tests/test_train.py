"""Training on the tiny random Llama: files written, learning, resume, data-parallel, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli
from lorascope import LorascopeError
from lorascope.config import load_config
from lorascope.train import batch_plan, train


def _cfg(tiny_model, data, out, method="lora", **extra):
    over = {"train.task": "mrpc", "train.method": method, "train.output_dir": str(out),
            "model.name": str(tiny_model), "data.dir": str(data)}
    sets = ["train.batch_size=8", "train.micro_batch_size=4", "train.save_every=2", "train.log_every=1",
            "train.max_steps=6", "lora.dropout=0.1", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, sets, **over)


def _weights(model_dir):
    f = model_dir / ("adapter_model.safetensors" if (model_dir / "adapter_model.safetensors").exists()
                     else "model.safetensors")
    return load_file(f)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_trains_and_writes_every_file(tiny_model, small_data, tmp_path, method):
    out = tmp_path / method
    model_dir = train(_cfg(tiny_model, small_data, out, method, **{"train.lr": "5e-3"}))
    assert model_dir == out / "model"
    if method == "lora":
        assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
        acfg = json.loads((model_dir / "adapter_config.json").read_text())
        assert acfg["r"] == 8 and set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"}
        # B starts at zero; after training it is not
        assert any(v.abs().sum() > 0 for k, v in _weights(model_dir).items() if "lora_B" in k)
    else:
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
        assert not list(model_dir.glob("*.bin"))
    info = json.loads((out / "lorascope-train.json").read_text())
    assert info["steps"] == 6 and info["seed"] == 0 and info["config"]["train"]["method"] == method
    assert info["provenance"]["versions"]["torch"] and "commit" in info["provenance"]["git"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    # throughput per wall second and per CPU second of the same tokens (the CPU figure survives pauses)
    tokens = rows[-1]["tokens_per_s_this_process"] * rows[-1]["elapsed_s"]
    assert tokens > 0 and info["tokens_per_s"] * info["train_seconds_this_invocation"] == pytest.approx(tokens)
    assert info["tokens_per_cpu_s"] * info["cpu_seconds_this_invocation"] == pytest.approx(tokens)
    assert 0 < rows[0]["cpu_s"] <= rows[-1]["cpu_s"] <= info["cpu_seconds_this_invocation"]
    assert not (out / "checkpoints").exists()  # cleaned up after the final save
    # rerunning a finished config does nothing and returns the same model
    before = (out / "lorascope-train.json").read_text()
    assert train(_cfg(tiny_model, small_data, out, method, **{"train.lr": "5e-3"})) == model_dir
    assert (out / "lorascope-train.json").read_text() == before


def test_killed_run_resumes_to_the_same_weights(tiny_model, small_data, tmp_path):
    args = ["train", "--model", str(tiny_model), "--data-dir", str(small_data), "--task", "mrpc",
            "--method", "lora", "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4",
            "--set", "train.save_every=2", "--set", "train.max_steps=6", "--set", "lora.dropout=0.1",
            "--set", "train.lr=5e-3"]
    whole = run_cli(*args, "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = run_cli(*args, "--output-dir", str(tmp_path / "resumed"), env={"LORASCOPE_FAULT_AFTER_STEP": "5"})
    assert killed.returncode == 137
    assert not (tmp_path / "resumed" / "model").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000004" / "step.json").is_file()
    again = run_cli(*args, "--output-dir", str(tmp_path / "resumed"))
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    a, b = _weights(tmp_path / "whole" / "model"), _weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys()
    for k in a:  # same data order, optimizer state, schedule and dropout RNG: equal to float precision
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "resumed" / "lorascope-train.json").read_text())["resumed_from_step"] == 4


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tiny_model, small_data, tmp_path):
    import subprocess
    import sys

    common = ["--model", str(tiny_model), "--data-dir", str(small_data), "--task", "mrpc", "--method", "full",
              "--set", "train.batch_size=8", "--set", "train.micro_batch_size=2", "--set", "train.save_every=0",
              "--set", "train.max_steps=3", "--set", "train.lr=1e-3"]
    one = run_cli("train", *common, "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lorascope",
                          "train", *common, "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "lorascope-train.json").read_text())["processes"] == 2
    a, b = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    moved = max((a[k] - load_file(tiny_model / "model.safetensors")[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training changed the weights, so equality below is not trivial
    for k in a:  # gradients are all-reduced in a different order: equal up to float32 rounding
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_divergence_stops_with_the_step(tiny_model, small_data, tmp_path):
    cfg = _cfg(tiny_model, small_data, tmp_path / "nan", "full", **{"train.lr": "1e30", "train.max_grad_norm": "null"})
    with pytest.raises(LorascopeError, match=r"(loss|gradient norm) became (nan|inf).* at step [2-6]"):
        train(cfg)
    assert not (tmp_path / "nan" / "model").exists()


def test_output_dir_of_another_config_is_refused(tiny_model, small_data, tmp_path):
    train(_cfg(tiny_model, small_data, tmp_path / "o", **{"train.max_steps": 2}))
    with pytest.raises(LorascopeError, match=r"different config \(differs in lora.rank"):
        train(_cfg(tiny_model, small_data, tmp_path / "o", **{"train.max_steps": 2, "lora.rank": 4}))


def test_unknown_target_module(tiny_model, small_data, tmp_path):
    with pytest.raises(LorascopeError, match=r"lora.target_modules: \['qkv'\] not found.*q_proj"):
        train(_cfg(tiny_model, small_data, tmp_path / "t", **{"lora.target_modules": "[qkv]"}))


def test_batch_plan_is_deterministic_grouped_and_complete():
    lengths = [(i * 37) % 101 + 5 for i in range(200)]
    a = batch_plan(lengths, 16, 1.0, seed=3)
    assert a == batch_plan(lengths, 16, 1.0, seed=3) != batch_plan(lengths, 16, 1.0, seed=4)
    assert sorted(i for b in a for i in b) == list(range(200))  # one epoch: every example once
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 30  # length grouping: far less than the 96 of random batches
    assert len(batch_plan(lengths, 16, 2.5, seed=3)) == 33


def test_adapter_on_wrong_base_is_a_clear_error(tiny_model, small_data, tmp_path):
    from lorascope.config import ModelConfig
    from lorascope.models import build_tiny_llama, load_checkpoint

    model_dir = train(_cfg(tiny_model, small_data, tmp_path / "a", **{"train.max_steps": 1}))
    other = build_tiny_llama(tmp_path / "other", hidden=32)
    meta = json.loads((model_dir / "lorascope-model.json").read_text())
    meta["base_model"] = str(other)
    (model_dir / "lorascope-model.json").write_text(json.dumps(meta))
    with pytest.raises(LorascopeError, match="different architecture"):
        load_checkpoint(str(model_dir), ModelConfig())
    (model_dir / "lorascope-model.json").unlink()  # no record: shapes decide
    with pytest.raises(LorascopeError, match="does not fit the base model"):
        load_checkpoint(str(model_dir), ModelConfig(name=str(other)))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_training_that_would_not_fit_on_the_disk_is_refused_before_it_starts(tiny_model, small_data, tmp_path,
                                                                                 monkeypatch, method):
    """6 steps, a checkpoint every 2: checkpoints at steps 2 and 4 (3 x the trainable bytes each: weights and
    AdamW's two moments), then the model. Bytes counted here from the model's shapes, not from lorascope."""
    import shutil
    from collections import namedtuple

    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_model)
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    if method == "lora":
        r = load_config(None, []).lora.rank
        trainable = n * sum(r * (a + b) for a, b in shapes.values()) * 4
        weights = trainable
    else:
        per_layer = sum(a * b for a, b in shapes.values()) + 2 * h  # two RMSNorm weights
        embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
        trainable = weights = (n * per_layer + h + embed) * 4
    need = 2 * 3 * trainable + weights
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 0, need - 1))
    from lorascope.checkpoint import DiskError

    with pytest.raises(DiskError, match=r"train.output_dir .*: 0.00 GiB free on its disk, but this training "
                                             r"writes up to 0.00 GiB \(2 checkpoint\(s\) of .* GiB \(weights and "
                                             r"optimizer state\), the model, .* GiB\); free space, raise "
                                             r"train.save_every"):
        train(_cfg(tiny_model, small_data, tmp_path / "d", method))
    assert not (tmp_path / "d" / "model").exists() and not (tmp_path / "d" / "checkpoints").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 0, need))
    assert train(_cfg(tiny_model, small_data, tmp_path / "d", method)).is_dir()  # exactly enough: it trains
