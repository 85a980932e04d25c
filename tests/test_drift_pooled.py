"""Drift and weight space measured one model at a time and pooled (study.drift.per_model): the same
numbers as one run over every model, and clear errors when the runs did not measure alike."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_CORPUS
from lorascope import LorascopeError
from lorascope.drift import run_drift, run_weights
from lorascope.drift.measure import combine_drift
from lorascope.drift.weights import combine_weights


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """A 3-layer tiny Llama and four tuned versions: two 'full' seeds (perturbed weights) and two LoRA seeds
    (adapters with random, non-zero B)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorascope.models import build_tiny_llama

    root = tmp_path_factory.mktemp("four")
    base = build_tiny_llama(root / "base", corpus=TINY_CORPUS, vocab_size=400, layers=3)
    tuned = {}
    for seed in (0, 1):
        out = root / f"full_s{seed}"
        shutil.copytree(base, out)
        w = load_file(out / "model.safetensors")
        g = torch.Generator().manual_seed(10 + seed)
        for k in w:
            if ".mlp." in k or ".self_attn." in k:
                w[k] = w[k] + 0.04 * torch.randn(w[k].shape, generator=g)
        save_file(w, out / "model.safetensors", metadata={"format": "pt"})
        tuned[f"full_s{seed}"] = str(out)
    for seed in (0, 1):
        torch.manual_seed(20 + seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False))
        out = root / f"lora_r4_s{seed}"
        model.save_pretrained(out)
        tuned[f"lora_r4_s{seed}"] = str(out)
    return str(base), tuned


def _close(a, b, path=""):
    """Every number in `a` equals the one in `b` up to rounding (1e-9 relative); the rest is equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_pooled_runs_give_the_numbers_of_one_run_over_every_model(four, small_data, tmp_path):
    base, tuned = four
    kw = {"max_examples": 20, "batch_size": 6, "data_dir": str(small_data), "plots": False}
    whole = run_drift("mrpc", base, tuned, tmp_path / "whole", **kw)
    w = json.loads(json.dumps(whole["summary"], default=float))

    def run(*names):
        out = tmp_path / "parts" / "+".join(names)
        if not out.exists():
            run_drift("mrpc", base, {n: tuned[n] for n in names}, out, values=True, **kw)
        return out

    # the two seeds of each method measured together: everything equals the one run, noise floors included
    pooled = combine_drift({"f": run("full_s0", "full_s1"), "l": run("lora_r4_s0", "lora_r4_s1")},
                           tmp_path / "pooled")
    p = json.loads((tmp_path / "pooled" / "drift.json").read_text())["summary"]
    assert w["noise_floor"]["full"]["pairs"] == p["noise_floor"]["full"]["pairs"] == 1
    _close(w, p)
    assert [c["status"] for c in p["criterion_2a"]] == [c["status"] for c in w["criterion_2a"]]
    for pair in ("base-full_s0", "base-lora_r4_s1", "full_s0-full_s1", "lora_r4_s0-lora_r4_s1"):
        _close(json.loads(json.dumps(whole["pairs"][pair], default=float)), pooled["pairs"][pair], pair)
    assert "full_s0-lora_r4_s0" in whole["pairs"] and "full_s0-lora_r4_s0" not in pooled["pairs"]
    # the method ratio really pools two seeds (the seed term is in its interval), and the models moved
    ratio = p["method_ratios"][0]["token_cka"]
    assert ratio["seeds_lora"] == ratio["seeds_full"] == 2 and ratio["seed_variance_included"]
    assert all(p["per_model"][n]["token_cka_drift"]["value"] > 1e-4 for n in tuned)

    # LoRA's seeds measured one by one: the same drifts and ratios, and no LoRA noise floor (the pair was never
    # measured), which drift.json says
    alone = combine_drift({"f": run("full_s0", "full_s1"), "l0": run("lora_r4_s0"), "l1": run("lora_r4_s1")},
                          tmp_path / "alone")
    a = alone["summary"]
    assert set(a["noise_floor"]) == {"full"} and "full_s0-full_s1" in alone["methods"]["pooled"]
    _close(w["per_model"], a["per_model"])
    _close(w["method_ratios"][0]["token_cka"], a["method_ratios"][0]["token_cka"])
    assert "none (no seed noise floor)" in combine_drift({"l0": run("lora_r4_s0"), "f0": run("full_s0")},
                                                         tmp_path / "bare")["methods"]["pooled"]


def test_pooled_runs_must_have_measured_alike(four, small_data, tmp_path):
    base, tuned = four
    kw = {"batch_size": 6, "data_dir": str(small_data), "plots": False, "values": True}
    run_drift("mrpc", base, {"full_s0": tuned["full_s0"]}, tmp_path / "a", max_examples=20, **kw)
    run_drift("mrpc", base, {"lora_r4_s0": tuned["lora_r4_s0"]}, tmp_path / "b", max_examples=16, **kw)
    with pytest.raises(LorascopeError, match=r"b/drift.json: config.max_examples 16 differs from a's 20"):
        combine_drift({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "o")
    run_drift("mrpc", base, {"lora_r4_s0": tuned["lora_r4_s0"], "full_s0": tuned["full_s0"]}, tmp_path / "c",
              max_examples=20, **kw)
    with pytest.raises(LorascopeError, match=r"measures lora_r4_s0 against full_s0, but full_s0 comes first"):
        combine_drift({"a": tmp_path / "a", "c": tmp_path / "c"}, tmp_path / "o")
    run_drift("mrpc", base, {"full_s0": tuned["full_s0"]}, tmp_path / "d", max_examples=20,
              **{**kw, "values": False})
    with pytest.raises(LorascopeError, match=r"d/drift.values.json: missing"):
        combine_drift({"d": tmp_path / "d"}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_pooled_weight_analyses_equal_one_analysis(four, tmp_path):
    base, tuned = four
    pick = {n: tuned[n] for n in ("full_s0", "lora_r4_s0")}
    whole = run_weights(base, pick, tmp_path / "whole", plots=False)
    parts = {n: tmp_path / n for n in pick}
    for n, p in pick.items():
        run_weights(base, {n: p}, parts[n], plots=False)
    pooled = combine_weights(parts, tmp_path / "pooled")
    # one analysis restricts a full model to the LoRA's module types; alone it reads every projection
    lora_types = {r["module"] for r in whole["matrices"] if r["model"] == "lora_r4_s0"}
    keep = {(r["model"], r["key"]): r for r in pooled["matrices"]
            if r["model"] == "lora_r4_s0" or r["module"] in lora_types}
    _close(json.loads(json.dumps({f"{r['model']} {r['key']}": r for r in whole["matrices"]}, default=float)),
           {f"{m} {k}": r for (m, k), r in keep.items()})
    assert len(pooled["matrices"]) > len(keep)  # alone, the full model's other projections are analysed too
    assert (tmp_path / "pooled" / "weight_spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert set(pooled["summary"]) == {"full_s0", "lora_r4_s0"}
    assert np.isfinite(pooled["summary"]["full_s0"]["down_proj"]["stable_rank_mean"])
    with pytest.raises(LorascopeError, match="expected only lora_r4_s0"):
        combine_weights({"lora_r4_s0": parts["full_s0"]}, tmp_path / "o")

