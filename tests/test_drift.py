"""The drift stage on tiny random Llamas: exact values, padding, files, errors, and its interval maths."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_CORPUS, run_cli
from lorascope import LorascopeError
from lorascope.config import DataConfig
from lorascope.drift import parse_tuned, run_drift, stats
from lorascope.drift.measure import drift_examples
from lorascope.similarity import StreamingCKA, linear_cka

# CKA of identical states, computed through float64 co-moments: 1 up to rounding
EXACT = 1e-12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matrices: a second thread only adds synchronisation, and the test machine is shared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A 4-layer tiny Llama (so that a perturbed layer 1 has layers before and after it)."""
    from lorascope.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("deep") / "model", corpus=TINY_CORPUS, vocab_size=400, layers=4)


@pytest.fixture(scope="module")
def perturbed(deep_model, tmp_path_factory):
    """deep_model with the MLP weights of decoder layer 1 changed."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("perturbed") / "model"
    shutil.copytree(deep_model, out)
    w = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for k in w:
        if k.startswith("model.layers.1.mlp."):
            w[k] = w[k] + 0.05 * torch.randn(w[k].shape, generator=g)
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def zero_lora(tiny_model, tmp_path_factory):
    """A PEFT LoRA adapter as initialised (lora_B = 0), so it changes nothing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("zero_lora") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(out)
    return out


def _layers(result, pair):
    return result["pairs"][pair]["layers"]


def test_identical_models_and_a_zero_lora_have_no_drift_and_files_are_written(tiny_model, zero_lora, small_data,
                                                                              tmp_path):
    r = run_drift("mrpc", str(tiny_model), [f"same={tiny_model}", f"zero={zero_lora}"], tmp_path / "out",
                  max_examples=20, batch_size=6, data_dir=str(small_data))
    assert list(r["pairs"]) == ["base-same", "base-zero", "same-zero"]
    assert r["layers"] == ["embedding", "layer_0", "layer_1"] and r["final_norm_included"] is False
    for pair in r["pairs"]:
        for row in _layers(r, pair):
            for key in ("token_cka", "example_cka", "example_cka_debiased"):
                assert row[key]["value"] == pytest.approx(1.0, abs=EXACT), (pair, row["layer"], key)
                assert row[key]["ci_high"] - row[key]["ci_low"] < 1e-9
            assert row["cosine"]["mean"] == pytest.approx(1.0, abs=EXACT)
            assert all(row["cosine"][q] == 1.0 for q in ("q05", "q25", "q50", "q75", "q95"))
            assert row["relative_change"]["mean"] == 0.0 and row["relative_change"]["q95"] == 0.0
    for name in ("same", "zero"):
        assert r["summary"]["per_model"][name]["token_cka_drift"]["value"] == pytest.approx(0.0, abs=EXACT)
    assert r["summary"]["ratios"][0]["token_cka"]["value"] is None  # the 'full' model did not move

    out = tmp_path / "out"
    saved = json.loads((out / "drift.json").read_text())
    for key in ("config", "models", "n_examples", "n_tokens", "example_ids_sha256", "layers", "final_norm_included",
                "pairs", "summary", "methods", "timing", "provenance"):
        assert key in saved, key
    assert saved["n_examples"] == 20 and saved["n_tokens"] > 20 and len(saved["example_ids_sha256"]) == 64
    assert saved["models"]["zero"]["kind"] == "lora" and saved["models"]["same"]["kind"] == "full"
    assert saved["config"]["jackknife_groups"] == 5 and saved["provenance"]["versions"]["torch"]
    rows = list(csv.DictReader((out / "drift.csv").open()))
    assert len(rows) == 3 * 3 and rows[0]["pair"] == "base-same" and float(rows[0]["token_cka"]) == pytest.approx(1)
    assert {"token_cka_ci_low", "example_cka_debiased", "cosine_q05", "relative_change_q95"} <= set(rows[0])
    for png in ("cka_vs_layer.png", "cosine_vs_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def _reference_states(model_dir, token_ids):
    """Per example, the embedding and every decoder layer's output (the last before the final norm),
    collected without lorascope: output_hidden_states for all but the last, a hook for the last."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    last = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o)
    )
    per_layer = None
    with torch.no_grad():
        for ids in token_ids:
            hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            states = [h[0].double().numpy() for h in hs[:-1]] + [last.pop()[0].double().numpy()]
            per_layer = [[] for _ in states] if per_layer is None else per_layer
            for i, s in enumerate(states):
                per_layer[i].append(s)
    hook.remove()
    return per_layer  # [layer][example] -> (tokens, hidden)


def test_perturbed_layer_streaming_equals_in_memory_and_padding_is_excluded(deep_model, perturbed, small_data,
                                                                            tmp_path):
    from lorascope.models import load_tokenizer
    from lorascope.tasks.base import prompt_ids

    kw = dict(max_examples=20, data_dir=str(small_data), plots=False)
    r = run_drift("mrpc", str(deep_model), {"p": str(perturbed)}, tmp_path / "a", batch_size=7, **kw)
    rows = _layers(r, "base-p")
    assert [x["layer"] for x in rows] == ["embedding", "layer_0", "layer_1", "layer_2", "layer_3"]
    for row in rows[:2]:  # before the perturbed layer: untouched
        assert row["token_cka"]["value"] == pytest.approx(1.0, abs=EXACT)
        assert row["cosine"]["q05"] == 1.0 and row["relative_change"]["q95"] == 0.0
    for row in rows[2:]:  # the perturbed layer and every later one moved
        assert row["token_cka"]["value"] < 1 - 1e-4 and row["cosine"]["mean"] < 1 - 1e-5
        assert row["token_cka"]["ci_low"] < row["token_cka"]["value"] < row["token_cka"]["ci_high"]

    # the same numbers from states collected here, one unpadded example at a time, keeping the
    # tokens inside the two sentences only
    exs, _ = drift_examples("mrpc", DataConfig(dir=str(small_data)), 20)
    tok = load_tokenizer(str(deep_model))
    ids = [prompt_ids(tok, e.prompt) for e in exs]
    keep = [_content_mask(tok, e) for e in exs]
    ref_a, ref_b = _reference_states(deep_model, ids), _reference_states(perturbed, ids)
    for layer, row in enumerate(rows):
        sa = [s[k] for s, k in zip(ref_a[layer], keep)]
        sb = [s[k] for s, k in zip(ref_b[layer], keep)]
        xa, xb = np.concatenate(sa), np.concatenate(sb)
        assert row["n_tokens"] == xa.shape[0] == sum(int(k.sum()) for k in keep) < sum(len(t) for t in ids)
        assert row["token_cka"]["value"] == pytest.approx(linear_cka(xa, xb), abs=1e-6)
        want_std = linear_cka(stats.zscore_columns(xa), stats.zscore_columns(xb))
        assert row["token_cka_std"]["value"] == pytest.approx(want_std, abs=1e-6)
        pa = np.stack([s.mean(0) for s in sa])
        pb = np.stack([s.mean(0) for s in sb])
        assert row["example_cka"]["value"] == pytest.approx(linear_cka(pa, pb), abs=1e-5)
        assert row["example_cka_debiased"]["value"] == pytest.approx(linear_cka(pa, pb, debiased=True), abs=1e-5)
        cos = (xa * xb).sum(1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(xb, axis=1)
        assert row["cosine"]["mean"] == pytest.approx(cos.mean(), abs=1e-6)
        rel = np.linalg.norm(xb - xa, axis=1) / np.linalg.norm(xa, axis=1)
        assert row["relative_change"]["q50"] == pytest.approx(np.median(rel), rel=0.02, abs=1e-9)

    # padding is excluded: one prompt per batch (no padding at all) gives the same values
    r1 = run_drift("mrpc", str(deep_model), {"p": str(perturbed)}, tmp_path / "b", batch_size=1, **kw)
    for a, b in zip(rows, _layers(r1, "base-p")):
        assert a["n_tokens"] == b["n_tokens"]
        for key in ("token_cka", "example_cka", "example_cka_debiased"):
            assert a[key]["value"] == pytest.approx(b[key]["value"], abs=1e-6)
            assert a[key]["ci_low"] == pytest.approx(b[key]["ci_low"], abs=1e-5)

    # every real token, for comparison
    ra = run_drift("mrpc", str(deep_model), {"p": str(perturbed)}, tmp_path / "all", batch_size=7, tokens="all", **kw)
    for layer, row in enumerate(_layers(ra, "base-p")):
        xa, xb = np.concatenate(ref_a[layer]), np.concatenate(ref_b[layer])
        assert row["n_tokens"] == xa.shape[0] == sum(len(t) for t in ids)
        assert row["token_cka"]["value"] == pytest.approx(linear_cka(xa, xb), abs=1e-6)


def _content_mask(tok, ex):
    """Tokens of the rendered prompt whose text lies inside the example's sentences, found here
    by decoding token by token and searching the sentences (not through offsets)."""
    from lorascope.tasks.base import prompt_ids, prompt_text

    text = prompt_text(tok, ex.prompt)
    at = text.index(ex.prompt)
    spans = [(at + a, at + b) for a, b in ex.content]
    ids = prompt_ids(tok, ex.prompt)
    mask, pos = np.zeros(len(ids), bool), 0
    for i, t in enumerate(ids):
        piece = tok.decode([t])
        found = text.find(piece, pos) if piece else -1
        if found < 0:
            continue
        start, end = found, found + len(piece)
        pos = end
        inside = [c for c in range(start, end) if not text[c].isspace() and any(a <= c < b for a, b in spans)]
        mask[i] = i > 0 and bool(inside)
    return mask


def test_first_position_can_be_dropped_and_test_split_fills_up(tiny_model, small_data, tmp_path):
    r = run_drift("mrpc", str(tiny_model), {"same": str(tiny_model)}, tmp_path / "o", max_examples=24,
                  data_dir=str(small_data), tokens="all", drop_first_position=True, plots=False)
    assert r["example_splits"] == {"eval": 20, "test": 4}
    full = run_drift("mrpc", str(tiny_model), {"same": str(tiny_model)}, tmp_path / "f", max_examples=24,
                     data_dir=str(small_data), tokens="all", plots=False)
    assert r["n_tokens"] == full["n_tokens"] - 24
    assert r["example_ids_sha256"] == full["example_ids_sha256"]


def test_bad_input_is_a_clear_error(tiny_model, deep_model, small_data, tmp_path):
    from lorascope.models import build_tiny_llama

    kw = dict(max_examples=20, data_dir=str(small_data), plots=False)
    narrow = build_tiny_llama(tmp_path / "narrow", corpus=TINY_CORPUS, vocab_size=400, hidden=32)
    with pytest.raises(LorascopeError, match=r"--tuned n=.*different architecture.*hidden_size 32 vs 64"):
        run_drift("mrpc", str(tiny_model), {"n": str(narrow)}, tmp_path / "o", **kw)
    with pytest.raises(LorascopeError, match=r"different architecture.*num_hidden_layers 4 vs 2"):
        run_drift("mrpc", str(tiny_model), {"d": str(deep_model)}, tmp_path / "o", **kw)
    # same architecture, a tokenizer whose ids differ
    other_vocab = tmp_path / "vocab"
    shutil.copytree(tiny_model, other_vocab)
    spec = json.loads((other_vocab / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other_vocab / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(LorascopeError, match=r"tokenizer vocabulary differs from the base model's"):
        run_drift("mrpc", str(tiny_model), {"v": str(other_vocab)}, tmp_path / "o", **kw)
    with pytest.raises(LorascopeError, match=r"only 26 held-out examples \(20 in eval \+ 6 in test\).*"
                                             r"--max-examples 26 or less"):
        run_drift("mrpc", str(tiny_model), {"s": str(tiny_model)}, tmp_path / "o", max_examples=30,
                  data_dir=str(small_data))
    for bad, msg in ((["lora"], "expected NAME=CHECKPOINT"), (["base=x"], "not 'base'"),
                     (["a-b=x"], "letters, digits"), (["a="], "path is empty"), (["a=x", "a=y"], "given twice"),
                     ([], "at least one")):
        with pytest.raises(LorascopeError, match=msg):
            parse_tuned(bad)
    assert not (tmp_path / "o").exists()


def test_cli_errors_exit_2_with_one_line(tiny_model, small_data, tmp_path):
    r = run_cli("drift", "--base", str(tiny_model), "--tuned", "lora", "--output-dir", str(tmp_path),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "--tuned 'lora': expected NAME=CHECKPOINT" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# interval maths (pure arrays)
# ---------------------------------------------------------------------------


def test_subset_hsic_gives_the_cka_of_each_subset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) + 100.0  # an offset, as in real hidden states
    y = x @ rng.normal(size=(5, 7)) + rng.normal(size=(30, 7))
    group = np.asarray([i % 6 for i in range(30)])
    w = np.concatenate([np.ones((30, 1)), stats.leave_group_out_weights(group, 6)], axis=1)
    k, l = stats.centred_gram(x), stats.centred_gram(y)
    kl, kk, ll = stats.subset_hsic(k, l, w), stats.subset_hsic(k, k, w), stats.subset_hsic(l, l, w)
    for j, debiased in enumerate((False, True)):
        got = stats.cka_from_hsic(kl[j], kk[j], ll[j])
        assert got[0] == pytest.approx(linear_cka(x, y, debiased=debiased), abs=1e-10)
        for g in range(6):
            keep = group != g
            assert got[g + 1] == pytest.approx(linear_cka(x[keep], y[keep], debiased=debiased), abs=1e-10)


def test_zscored_state_and_jackknife():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) * np.array([1, 10, 100, 1, 1, 1e3])
    y = x[:, :4] @ rng.normal(size=(4, 4)) + rng.normal(size=(200, 4))
    acc = StreamingCKA()
    for i in range(0, 200, 37):
        acc.update(x[i:i + 37], y[i:i + 37])
    got = StreamingCKA.from_state_dict(stats.zscore_state(acc.state_dict())).value()
    assert got == pytest.approx(linear_cka(stats.zscore_columns(x), stats.zscore_columns(y)), abs=1e-12)
    # jackknife of a mean: the textbook standard error s / sqrt(G)
    v = rng.normal(size=10)
    loo = (v.sum() - v) / 9
    ci = stats.jackknife_interval(v.mean(), loo)
    assert ci["se"] == pytest.approx(v.std(ddof=1) / np.sqrt(10))
    assert ci["ci_high"] - v.mean() == pytest.approx(2.262157 * ci["se"])
    assert stats.t975(30) == pytest.approx(2.042272, abs=1e-6) and stats.t975(60) == pytest.approx(2.000298, abs=1e-5)
    assert stats.jackknife_interval(1.0, [1.0, 1.0, 1.0], bounds=(0, 1))["ci_high"] == 1.0


def test_histogram_quantiles_are_within_half_a_percent():
    rng = np.random.default_rng(2)
    v = rng.lognormal(-5, 2, size=20000)
    qs = stats.hist_quantiles(stats.histogram(v), (0.05, 0.5, 0.95))
    for q, got in zip((0.05, 0.5, 0.95), qs):
        assert got == pytest.approx(np.quantile(v, q), rel=0.006)
    assert stats.hist_quantiles(stats.histogram(np.zeros(5)), (0.5,)) == [0.0]


# ---------------------------------------------------------------------------
# slow: several processes, the real model
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(deep_model, perturbed, small_data, tmp_path):
    import subprocess
    import sys

    common = ["drift", "--base", str(deep_model), "--tuned", f"p={perturbed}", "--tuned", f"q={deep_model}",
              "--data-dir", str(small_data), "--max-examples", "26", "--batch-size", "3"]
    env = {"OMP_NUM_THREADS": "1"}
    one = run_cli(*common, "--output-dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lorascope",
                          *common, "--output-dir", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, **env})
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "drift.json").read_text())
    b = json.loads((tmp_path / "two" / "drift.json").read_text())
    assert b["config"]["processes"] == 2 and a["n_tokens"] == b["n_tokens"]
    assert a["example_ids_sha256"] == b["example_ids_sha256"]
    for pair in a["pairs"]:
        for ra, rb in zip(_layers(a, pair), _layers(b, pair)):
            for key in ("token_cka", "example_cka", "example_cka_debiased", "cosine", "relative_change"):
                for field, va in ra[key].items():
                    if isinstance(va, float):
                        assert va == pytest.approx(rb[key][field], abs=1e-8), (pair, ra["layer"], key, field)
                    else:
                        assert va == rb[key][field]


@pytest.mark.slow
def test_smollm2_against_itself(real_data, tmp_path):
    r = run_drift("mrpc", "smollm2-135m", {"same": "base"}, tmp_path, max_examples=6, batch_size=3,
                  data_dir=str(real_data), jackknife_groups=2, plots=False)
    rows = _layers(r, "base-same")
    assert len(rows) == 31 and rows[-1]["layer"] == "layer_29"
    assert all(row["token_cka"]["value"] == pytest.approx(1.0, abs=1e-9) for row in rows)
