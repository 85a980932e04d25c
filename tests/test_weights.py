"""The weights stage on a tiny random Llama: LoRA and full updates with known structure."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY_CORPUS, run_cli
from lorascope import LorascopeError
from lorascope.drift import run_weights
from lorascope.drift.weights import lora_updates, update_metrics

RANK, ALPHA = 4, 12.0
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_lora(tiny_model, tmp_path_factory):
    """A LoRA adapter whose A and B are known random matrices (B is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(out)
    return out


def _rank1_checkpoint(tiny_model, out, key, scale):
    shutil.copytree(tiny_model, out)
    w = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    u = torch.randn(w[key].shape[0], generator=g)
    v = torch.randn(w[key].shape[1], generator=g)
    u, v = u / u.norm(), v / v.norm()
    w[key] = w[key] + scale * torch.outer(u, v)
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_lora_update_is_scale_b_a_with_rank_at_most_r(tiny_model, random_lora, tmp_path):
    tensors = load_file(random_lora / "adapter_model.safetensors")
    updates = lora_updates(random_lora)
    assert len(updates) == 2 * len(TARGETS)  # 2 layers
    for key, dw in updates.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        want = ALPHA / RANK * tensors[prefix + ".lora_B.weight"].double() @ tensors[prefix + ".lora_A.weight"].double()
        torch.testing.assert_close(dw, want, rtol=0, atol=1e-12)

    r = run_weights(str(tiny_model), {"lora": str(random_lora)}, tmp_path / "w")
    recs = r["matrices"]
    assert {x["module"] for x in recs} == set(TARGETS) and {x["layer"] for x in recs} == {0, 1}
    for x in recs:
        assert x["numerical_rank"] == RANK
        assert 1.0 <= x["effective_rank"] <= RANK + 1e-9
        assert x["top8_energy"] == pytest.approx(1.0, abs=1e-12)  # r <= 8: all the energy
        assert x["fro_norm"] == pytest.approx(float(updates[x["key"]].norm()), rel=1e-10)
        assert 1.0 <= x["stable_rank"] <= RANK + 1e-9
    assert r["models"]["lora"]["r"] == RANK and r["models"]["lora"]["module_types"] == sorted(TARGETS)
    assert set(r["summary"]["lora"]) == set(TARGETS)
    assert r["summary"]["lora"]["q_proj"]["matrices"] == 2

    out = tmp_path / "w"
    saved = json.loads((out / "weights.json").read_text())
    assert {"config", "models", "methods", "matrices", "summary", "provenance"} <= set(saved)
    rows = list(csv.DictReader((out / "weights.csv").open()))
    assert len(rows) == len(recs) and {"effective_rank", "intruders", "top8_energy"} <= set(rows[0])
    assert (out / "weight_spectra.png").read_bytes()[:4] == b"\x89PNG"


def test_full_checkpoint_with_a_rank_one_update(tiny_model, random_lora, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    full = _rank1_checkpoint(tiny_model, tmp_path / "full", key, scale=0.5)
    # beside a LoRA adapter, a full checkpoint is analysed on the adapter's module types (up_proj is not one)
    r = run_weights(str(tiny_model), [f"full={full}", f"lora={random_lora}"], tmp_path / "w", plots=False)
    assert {x["module"] for x in r["matrices"] if x["model"] == "full"} == set(TARGETS)
    r = run_weights(str(tiny_model), {"full": str(full)}, tmp_path / "w2", plots=False)
    recs = {x["key"]: x for x in r["matrices"]}
    assert len(recs) == 2 * 7  # all seven projections when no LoRA adapter is given
    x = recs[key]
    assert x["spectral_norm"] == pytest.approx(0.5, rel=1e-5)
    assert x["stable_rank"] == pytest.approx(1.0, rel=1e-4)
    assert x["top8_energy"] == pytest.approx(1.0, abs=1e-8)
    for k, other in recs.items():
        if k != key:
            assert other["fro_norm"] == 0.0 and other["effective_rank"] == 0.0 and other["intruders"] == 0


def test_intruder_dimensions():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    tiny = 1e-6 * torch.randn(48, 32, generator=g, dtype=torch.float64)
    m, _ = update_metrics(w, tiny, top_k=10, threshold=0.5)
    assert m["intruders"] == 0 and m["min_max_cosine"] > 0.99
    big = 10 * torch.linalg.matrix_norm(w, ord=2) * torch.randn(48, 32, generator=g, dtype=torch.float64)
    m, _ = update_metrics(w, big, top_k=10, threshold=0.5)
    assert m["intruders"] > 0
    # one strong new direction: a single intruder at the top of the spectrum
    u = torch.randn(48, generator=g, dtype=torch.float64)
    v = torch.randn(32, generator=g, dtype=torch.float64)
    spike = 20 * torch.outer(u / u.norm(), v / v.norm())
    m, s = update_metrics(w, spike, top_k=10, threshold=0.5)
    assert m["stable_rank"] == pytest.approx(1.0) and m["effective_rank"] == pytest.approx(1.0, abs=1e-6)


def test_bad_input(tiny_model, random_lora, tmp_path):
    from lorascope.models import build_tiny_llama

    narrow = build_tiny_llama(tmp_path / "narrow", corpus=TINY_CORPUS, vocab_size=400, hidden=32)
    with pytest.raises(LorascopeError, match=r"--tuned n=.*different architecture.*hidden_size 32 vs 64"):
        run_weights(str(tiny_model), {"n": str(narrow)}, tmp_path / "o")
    with pytest.raises(LorascopeError, match=r"does not fit this base model"):
        run_weights(str(narrow), {"l": str(random_lora)}, tmp_path / "o")
    dora = tmp_path / "dora"
    shutil.copytree(random_lora, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LorascopeError, match=r"DoRA adapters .* are not supported"):
        run_weights(str(tiny_model), {"d": str(dora)}, tmp_path / "o")
    with pytest.raises(LorascopeError, match=r"--intruder-threshold"):
        run_weights(str(tiny_model), {"l": str(random_lora)}, tmp_path / "o", intruder_threshold=1.5)
    assert not (tmp_path / "o").exists()
    r = run_cli("weights", "--base", str(tiny_model), "--tuned", f"x={tmp_path / 'nothing'}", "--output-dir",
                str(tmp_path / "o"))
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
