"""Content-token drift: which tokens are measured, the measures' ratios, criterion 2a, seeds,
the study's data settings, bad input, and the must-show check on the real SmolLM2-135M."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from helpers import run_cli
from lorascope import LorascopeError
from lorascope.config import DataConfig
from lorascope.drift import run_drift
from lorascope.drift.criterion import judge_drift
from lorascope.drift.measure import _method_ratio, drift_examples, select_tokens
from lorascope.similarity import linear_cka
from lorascope.tasks import get_task
from lorascope.tasks.base import Example, prompt_ids, prompt_text, prompt_token_kinds


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def content_mask(tok, ex: Example) -> np.ndarray:
    """Content tokens found without offsets: decode token by token, walk the rendered text, and keep
    the tokens with a non-blank character inside the example's spans (position 0 never)."""
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
        pos = found + len(piece)
        mask[i] = i > 0 and any(not text[c].isspace() and any(a <= c < b for a, b in spans)
                                for c in range(found, pos))
    return mask


# ---------------------------------------------------------------------------
# prompt builders
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["mrpc", "squad_v2"])
def test_prompt_builders_mark_exactly_the_examples_own_text(task, tiny_model, small_data):
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    for ex in get_task(task).examples("eval", DataConfig(dir=str(small_data)), limit=6):
        pieces = [ex.prompt[a:b] for a, b in ex.content]
        if task == "mrpc":
            assert len(pieces) == 2 and ex.prompt == f"Sentence 1: {pieces[0]}\nSentence 2: {pieces[1]}\n" \
                                                      "Do the two sentences mean the same thing? Answer yes or no."
        else:
            assert pieces == [ex.meta["context"], ex.meta["question"]]
        ids, kinds = prompt_token_kinds(tok, ex, model="tiny")
        assert ids == prompt_ids(tok, ex.prompt) and kinds[0] == "first_position"
        assert np.array_equal(np.array(kinds) == "content", content_mask(tok, ex))
        # the content tokens spell the content, the others the template
        content = tok.decode([i for i, k in zip(ids, kinds) if k == "content"])
        assert "".join(content.split()) == "".join("".join(pieces).split())
        template = tok.decode([i for i, k in zip(ids, kinds) if k != "content"])
        assert "Sentence 2:" in template or "Question:" in template
        assert not any(p in template for p in pieces if len(p) > 8)


def test_truncation_skips_and_counts_prompts_without_content(tiny_model):
    from lorascope.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    early = Example("early", "Sentence 1: yes no yes no yes no yes no", None, content=[(12, 39)])
    late = Example("late", "Sentence 1: Sentence 2: Sentence 1: Sentence 2: no", None, content=[(49, 51)])
    ids, kinds = prompt_token_kinds(tok, late)
    first_late = kinds.index("content")
    cut = first_late  # keeps the early prompt's content, cuts all of the late one's
    sel = select_tokens(tok, [early, late], max_tokens=cut)
    assert sel["kept"] == [0] and sel["skipped"] == ["late"] and sel["truncated"] >= 1
    assert all(len(i) <= cut for i in sel["ids"])
    assert sel["kept_by_kind"]["content"] == sum(sel["select"][0]) > 0
    assert sel["kept_by_kind"]["first_position"] == 0 and sel["dropped_by_kind"]["first_position"] == 1
    with pytest.raises(LorascopeError, match="none of the 1 prompts has a token left.*truncation to 3 tokens"):
        select_tokens(tok, [late], max_tokens=3)


def test_a_template_that_hides_the_prompt_is_a_clear_error_naming_the_model(tiny_model, small_data, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    cfg_file = odd / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = "{% for m in messages %}<|user|>{{ m['content'] | upper }}\n{% endfor %}<|assistant|>"
    cfg_file.write_text(json.dumps(cfg))
    kw = dict(max_examples=8, data_dir=str(small_data), plots=False)
    with pytest.raises(LorascopeError, match=rf"chat template of {odd}.*not contain the prompt verbatim.*--tokens all"):
        run_drift("mrpc", str(odd), {"same": str(odd)}, tmp_path / "o", **kw)
    r = run_drift("mrpc", str(odd), {"same": str(odd)}, tmp_path / "o", tokens="all", **kw)
    assert r["selection"]["kept_by_kind"] == {"all": r["n_tokens"]} and r["diagnostics"] is None
    res = run_cli("drift", "--base", str(odd), "--tuned", f"same={odd}", "--data-dir", str(small_data),
                  "--max-examples", "4", "--output-dir", str(tmp_path / "c"))
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--tokens all" in last and str(odd) in last


# ---------------------------------------------------------------------------
# runs on tiny models: selection recorded, exact zero, diagnostics, seeds
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """A 3-layer tiny Llama and four perturbed copies ('full' seeds: big changes everywhere in the
    MLPs; 'lora' seeds: small changes in one layer), to exercise ratios and noise floors."""
    from safetensors.torch import load_file, save_file

    from helpers import TINY_CORPUS
    from lorascope.models import build_tiny_llama

    root = tmp_path_factory.mktemp("variants")
    base = build_tiny_llama(root / "base", corpus=TINY_CORPUS, vocab_size=400, layers=3)
    out = {}
    for name, scale, layers in (("full_s0", 0.08, (0, 1, 2)), ("full_s1", 0.08, (0, 1, 2)),
                                ("lora_s0", 0.02, (1,)), ("lora_s1", 0.02, (1,))):
        d = root / name
        shutil.copytree(base, d)
        w = load_file(d / "model.safetensors")
        g = torch.Generator().manual_seed(hash(name) % 1000)
        for k in w:
            if any(k.startswith(f"model.layers.{i}.mlp.") for i in layers):
                w[k] = w[k] + scale * torch.randn(w[k].shape, generator=g)
        save_file(w, d / "model.safetensors", metadata={"format": "pt"})
        (d / "lorascope-model.json").write_text(json.dumps({"method": "lora" if "lora" in name else "full"}))
        out[name] = d
    return base, out


def test_base_against_itself_is_exactly_zero_and_the_selection_is_recorded(variants, small_data, tmp_path):
    base, _ = variants
    r = run_drift("mrpc", str(base), {"same": str(base)}, tmp_path, max_examples=20, batch_size=6,
                  data_dir=str(small_data))
    for key, v in r["summary"]["per_model"]["same"].items():
        if key.endswith("_drift"):
            assert v["value"] == 0.0, key
    sel = r["selection"]
    assert sel["tokens"] == "content" and sel["kept_by_kind"]["template"] == 0
    assert sel["kept_by_kind"]["first_position"] == 0 and sel["dropped_by_kind"]["first_position"] == 20
    assert sel["kept_by_kind"]["content"] == r["n_tokens"] and sel["dropped_by_kind"]["template"] > 20 * 10
    saved = json.loads((tmp_path / "drift.json").read_text())
    assert saved["selection"] == sel and saved["config"]["data"]["subset_seed"] == DataConfig().subset_seed
    assert (tmp_path / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    for row in r["diagnostics"]["layers"]:
        shares = row["gram_energy_share"]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
        assert 0 < row["top_dims_all"][0][1] <= 1


def test_diagnostics_equal_an_in_memory_float64_computation(variants, small_data):
    """Gram-energy share of each kind = sum over its rows of the squared entries of K = Xc Xc^T / ||K||^2."""
    from lorascope.drift.capture import LayerCapture
    from lorascope.drift.diagnostics import kind_diagnostics
    from lorascope.models import load_model, load_tokenizer

    base, _ = variants
    tok, model = load_tokenizer(str(base)), load_model(str(base)).eval()
    exs, _ = drift_examples("mrpc", DataConfig(dir=str(small_data)), 7)
    pk = [prompt_token_kinds(tok, e) for e in exs]
    got = kind_diagnostics(model, [i for i, _ in pk], [k for _, k in pk], tok.pad_token_id, 3, torch.device("cpu"))
    with torch.no_grad():
        hs = [model.model(input_ids=torch.tensor([i]), output_hidden_states=True).hidden_states for i, _ in pk]
    kinds = np.concatenate([k for _, k in pk])
    for layer in (0, 2):  # embedding and a decoder layer's output
        x = np.concatenate([h[layer][0].double().numpy() for h in hs])
        xc = x - x.mean(0)
        k = xc @ xc.T
        per_row = (k**2).sum(1)
        for kind in ("first_position", "template", "content"):
            want = per_row[kinds == kind].sum() / per_row.sum()
            assert got["layers"][layer]["gram_energy_share"][kind] == pytest.approx(want, rel=1e-9, abs=1e-12)
        var = xc.var(0)
        assert got["layers"][layer]["top_dims_all"][0] == [int(var.argmax()), pytest.approx(var.max() / var.sum())]
    assert LayerCapture  # imported for the hooks used inside kind_diagnostics


def test_seeds_give_a_noise_floor_and_intervals_with_seed_variance(variants, small_data, tmp_path):
    base, v = variants
    r = run_drift("mrpc", str(base), {k: str(p) for k, p in v.items()}, tmp_path, max_examples=20,
                  batch_size=5, data_dir=str(small_data), plots=False, diagnostic_examples=0)
    s = r["summary"]
    assert set(s["noise_floor"]) == {"full", "lora"}
    m = s["method_ratios"][0]
    assert (m["lora"], m["full"], m["lora_seeds"], m["full_seeds"]) == ("lora", "full", ["lora_s0", "lora_s1"],
                                                                          ["full_s0", "full_s1"])
    pm = s["per_model"]
    for key in s["measures"]:
        lo = (pm["lora_s0"][f"{key}_drift"]["value"] + pm["lora_s1"][f"{key}_drift"]["value"]) / 2
        fu = (pm["full_s0"][f"{key}_drift"]["value"] + pm["full_s1"][f"{key}_drift"]["value"]) / 2
        assert m[key]["value"] == pytest.approx(lo / fu, rel=1e-9), key
        assert m[key]["seed_variance_included"] and m[key]["se"] >= m[key]["se_prompts"]
        # the full-vs-full seed drift is the pair's own drift
        pair = r["pairs"]["full_s0-full_s1"]["layers"]
        want = np.mean([1 - row[key]["value"] if key != "cosine" else 1 - row[key]["mean"]
                        for row in pair]) if key != "relative_change" else np.mean([row[key]["mean"] for row in pair])
        assert s["noise_floor"]["full"][key]["value"] == pytest.approx(want, rel=1e-9)
    assert m["token_cka"]["value"] < 0.8  # 'lora' moved one layer a little, 'full' every layer a lot
    c = s["criterion_2a"][0]
    assert c["status"] in ("PASS", "INCONCLUSIVE") and c["rows"][0]["measure"] == "token_cka"
    # the per-layer ratio of the untouched embedding is undefined or 0, never a made-up number
    emb = s["ratios"][0]["per_layer"]["token_cka"][0]
    assert emb["value"] is None
    from lorascope.drift.plots import plot_ratio_by_layer

    assert plot_ratio_by_layer(r, tmp_path / "ratio_vs_layer.png").read_bytes()[:4] == b"\x89PNG"
    # the report's sensitivity section
    from lorascope.report.render import Doc, drift_sensitivity

    doc = Doc()
    drift_sensitivity(doc, json.loads((tmp_path / "drift.json").read_text()), tmp_path)
    text = doc.markdown(tmp_path, "figures")
    assert f"Criterion 2a, lora vs full (2 and 2 seed(s)): **{c['status']}**" in text
    assert "content-token linear CKA (primary)" in text and "Noise floor of full" in text
    assert "Tokens measured (content): content" in text


def test_method_ratio_interval_adds_the_seed_variance():
    g = 5
    rng = np.random.default_rng(0)
    lora_loo = [0.1 + 0.002 * rng.standard_normal(g) for _ in range(3)]
    full_loo = [0.5 + 0.01 * rng.standard_normal(g) for _ in range(2)]
    lora, full = [0.1, 0.12, 0.09], [0.5, 0.56]
    got = _method_ratio(lora, lora_loo, full, full_loo)
    r = np.mean(lora) / np.mean(full)
    lg, fg = np.mean(lora_loo, axis=0), np.mean(full_loo, axis=0)
    theta = lg / fg
    var_p = (g - 1) / g * sum((t - theta.mean()) ** 2 for t in theta)
    var_l = r**2 * np.var(lora, ddof=1) / 3 / np.mean(lora) ** 2
    var_f = r**2 * np.var(full, ddof=1) / 2 / np.mean(full) ** 2
    assert got["value"] == pytest.approx(r) and got["se"] == pytest.approx(math.sqrt(var_p + var_l + var_f))
    assert got["df"] == pytest.approx((var_p + var_l + var_f) ** 2 / (var_p**2 / 4 + var_l**2 / 2 + var_f**2 / 1))
    one = _method_ratio([0.1], [lora_loo[0]], [0.5], [full_loo[0]])
    assert not one["seed_variance_included"] and one["se"] == pytest.approx(one["se_prompts"])


def test_method_ratio_lower_bound_is_clipped_at_zero_only_for_non_negative_drifts():
    from lorascope.drift.stats import t975

    g = 5
    rng = np.random.default_rng(1)
    lora, full = [0.01, 0.2], [0.5, 0.52]  # two seeds far apart: few degrees of freedom, a wide interval
    lora_loo = [v + 0.001 * rng.standard_normal(g) for v in lora]
    full_loo = [v + 0.001 * rng.standard_normal(g) for v in full]
    got = _method_ratio(lora, lora_loo, full, full_loo)
    half = t975(int(math.floor(got["df"]))) * got["se"]
    assert got["value"] - half < 0  # the unclipped interval would include negative ratios
    assert got["ci_low"] == 0.0 and got["clipped_at_zero"]
    assert got["ci_high"] == pytest.approx(got["value"] + half)
    # a debiased CKA above 1 gives a negative drift: the ratio can be negative, nothing is clipped
    neg = [-0.01, 0.2]
    got = _method_ratio(neg, [v + 0.001 * rng.standard_normal(g) for v in neg], full, full_loo)
    assert got["ci_low"] < 0 and not got["clipped_at_zero"]
    # a narrow interval is left alone
    ok = _method_ratio([0.1, 0.11], [v + 0.001 * rng.standard_normal(g) for v in (0.1, 0.11)], full, full_loo)
    assert ok["ci_low"] > 0 and not ok["clipped_at_zero"]


# ---------------------------------------------------------------------------
# criterion 2a
# ---------------------------------------------------------------------------


def _entry(ratios: dict, seeds: bool = True, noise: dict | None = None, drifts=(0.1, 1.0)):
    e = {"lora": "lora_r8", "full": "full", "noise_floor": noise or {}}
    for k, (v, lo, hi) in ratios.items():
        e[k] = {"value": v, "ci_low": lo, "ci_high": hi, "seed_variance_included": seeds,
                "lora_drift": drifts[0], "full_drift": drifts[1]}
    return e


ALL = ["token_cka", "token_cka_std", "example_cka", "example_cka_debiased", "cosine", "relative_change"]


def test_criterion_passes_only_when_the_primary_interval_passes_and_the_measures_agree():
    ok = {k: (0.3, 0.2, 0.4) for k in ALL}
    c = judge_drift(_entry(ok))
    assert c["status"] == "PASS" and [r["measure"] for r in c["rows"]] == ALL
    assert all(r["meets"] and r["confident"] for r in c["rows"])
    # one measure disagrees: not a PASS, and the reason names it
    c = judge_drift(_entry({**ok, "relative_change": (0.95, 0.9, 1.0)}))
    assert c["status"] == "INCONCLUSIVE" and "relative change 0.95" in c["reason"] and "disagree" in c["reason"]
    # the primary's interval reaches above 0.8
    c = judge_drift(_entry({**ok, "token_cka": (0.7, 0.5, 0.9)}))
    assert c["status"] == "INCONCLUSIVE" and "straddles 0.8" in c["reason"]
    # what could decide it: more of whichever the interval's width comes from
    assert c["next"] == "more drift prompts (study.drift.max_examples)"
    e = _entry({**ok, "token_cka": (0.7, 0.5, 0.9)})
    e["token_cka"].update(se_seeds=0.062, se_prompts=0.004)
    assert judge_drift(e)["next"].startswith("more seeds (train.seed; the ratio's standard error is 0.062 from seeds")
    e["token_cka"].update(se_seeds=0.001)
    assert judge_drift(e)["next"] == "more drift prompts (study.drift.max_examples)"
    assert judge_drift(_entry(ok))["next"] is None  # decided: nothing to run
    # clearly above, and every measure agrees: FAIL
    c = judge_drift(_entry({k: (0.95, 0.85, 1.05) for k in ALL}))
    assert c["status"] == "FAIL"
    c = judge_drift(_entry({**{k: (0.95, 0.85, 1.05) for k in ALL}, "cosine": (0.5, 0.4, 0.6)}))
    assert c["status"] == "INCONCLUSIVE" and "1 - cosine 0.50" in c["reason"]
    # one seed per method: said, not hidden
    c = judge_drift(_entry(ok, seeds=False))
    assert c["status"] == "PASS" and "one seed per method" in c["reason"]
    # no full drift: no ratio
    c = judge_drift(_entry({**ok, "token_cka": (None, None, None)}))
    assert c["status"] == "INCONCLUSIVE"
    assert judge_drift(_entry(ok), tokens="all")["rows"][0]["label"] == "all-token linear CKA"


def test_a_difference_within_the_seed_noise_is_not_a_finding():
    ok = {k: (0.3, 0.2, 0.4) for k in ALL}
    noise = {"full": {"token_cka": {"value": 0.95}}, "lora_r8": {"token_cka": {"value": 0.05}}}
    c = judge_drift(_entry(ok, noise=noise, drifts=(0.1, 1.0)))
    assert c["status"] == "INCONCLUSIVE" and "not a finding" in c["reason"] and "full" in c["reason"]
    # what the interval and the measures say without the floor: here they alone would pass
    assert c["without_floor"]["status"] == "PASS"
    assert c["without_floor"]["reason"] == judge_drift(_entry(ok, drifts=(0.1, 1.0)))["reason"]
    # the study's MRPC case: a primary interval that reaches just above 0.8, and measures that disagree
    mrpc = {**ok, "token_cka": (0.605, 0.408, 0.803), "token_cka_std": (0.86, 0.49, 1.22),
            "cosine": (0.84, 0.66, 1.01), "relative_change": (0.89, 0.80, 0.99)}
    alone = judge_drift(_entry(mrpc, drifts=(0.0848, 0.14)))
    assert alone["reason"] == (
        "content-token linear CKA ratio 0.605 [0.408, 0.803]: the interval straddles 0.8; the measures disagree "
        "too: CKA of standardised features 0.86, 1 - cosine 0.84, relative change 0.89 not <= 0.8")
    assert alone["status"] == "INCONCLUSIVE" and alone["next"] is None  # a narrower interval leaves them apart
    floor = {"full": {"pairs": 1, "token_cka": {"value": 0.164, "ci_low": 0.158, "ci_high": 0.171}}}
    c = judge_drift(_entry(mrpc, noise=floor, drifts=(0.0848, 0.14)))
    assert "not a finding" in c["reason"] and c["without_floor"] == {"status": "INCONCLUSIVE",
                                                                     "reason": alone["reason"]}
    assert "without_floor" not in judge_drift(_entry(ok))  # only where the floor decided
    # a floor measured with an interval: below its whole interval, more prompts cannot make it a finding
    noise["full"].update(pairs=1, token_cka={"value": 0.95, "ci_low": 0.92, "ci_high": 0.98})
    c = judge_drift(_entry(ok, noise=noise, drifts=(0.1, 1.0)))  # difference 0.9 < 0.92
    assert c["reason"].startswith("the difference between the methods' content-token linear CKA drifts (0.9) is "
                                  "not larger than the drift between two seeds of full (0.95 [0.92, 0.98]; 1 seed "
                                  "pair(s), interval over prompts): not a finding; more prompts would not change")
    assert c["next"] is None
    noise["full"]["token_cka"]["ci_low"] = 0.89  # inside the floor's interval: more prompts could still tell
    c = judge_drift(_entry(ok, noise=noise, drifts=(0.1, 1.0)))
    assert "not a finding" in c["reason"] and "would not change" not in c["reason"] and c["next"].startswith("more")
    # a floor above full fine-tuning's own drift (1.0): no LoRA drift could clear it, and the reason says so
    noise["full"]["token_cka"] = {"value": 1.2, "ci_low": 1.1, "ci_high": 1.3}
    c = judge_drift(_entry(ok, noise=noise, drifts=(0.1, 1.0)))
    assert c["reason"].endswith("; the floor is above full's own mean drift from the base model (1), so no drift of "
                                "the other method, not even 0, could make the difference larger than it")
    assert c["next"] is None
    for drifts in ((0.0, 1.0), (1.0, 0.0)):  # the checked claim: at either extreme the difference stays below
        assert judge_drift(_entry(ok, noise=noise, drifts=drifts))["status"] == "INCONCLUSIVE"
    noise["full"]["token_cka"] = {"value": 0.95}
    noise["full"]["token_cka"]["value"] = 0.5
    c = judge_drift(_entry(ok, noise=noise, drifts=(0.1, 1.0)))
    assert c["status"] == "PASS" and "noise floor" not in c["reason"]
    # seeds whose drift was never measured against each other (a study run in parts): no floor, and it says so
    e = {**_entry(ok, noise={"full": noise["full"]}), "lora_seeds": ["lora_r8_s0", "lora_r8_s1"],
         "full_seeds": ["full_s0", "full_s1"]}
    c = judge_drift(e)
    assert c["status"] == "PASS" and "no seed noise floor for lora_r8: no two of its seeds" in c["reason"]


# ---------------------------------------------------------------------------
# the study's data settings
# ---------------------------------------------------------------------------


def test_drift_prompts_share_no_article_or_pair_with_training(small_data, tmp_path):
    data = DataConfig(dir=str(small_data), squad_eval_share=0.7, subset_seed=99, max_train_examples=20)
    squad = get_task("squad_v2")
    train = squad.examples("train", data, limit=data.max_train_examples)
    held, _ = drift_examples("squad_v2", data, 30)
    assert {e.meta["title"] for e in train}.isdisjoint({e.meta["title"] for e in held})
    assert {e.meta["context"] for e in train}.isdisjoint({e.meta["context"] for e in held})

    # the study hands drift its own data settings (per-task overrides included)
    from lorascope.pipeline import load_study, plan

    cfg = tmp_path / "study.yaml"
    cfg.write_text(f"model:\n  name: tiny\ndata:\n  dir: {small_data}\n  subset_seed: 99\n  squad_eval_share: 0.7\n"
                   f"study:\n  tasks: [squad_v2]\n  serve: false\n  per_task:\n    squad_v2:\n      data:\n"
                   f"        squad_eval_share: 0.6\n")
    stages = {s.name: s for s in plan(load_study(cfg), tmp_path / "run")}
    d = stages["drift:squad_v2"].config["data"]
    assert d["subset_seed"] == 99 and d["squad_eval_share"] == 0.6
    assert stages["drift:squad_v2"].config["tokens"] == "content"
    cfg.write_text(cfg.read_text().replace("serve: false", "serve: false\n  drift: {tokens: every}"))
    with pytest.raises(LorascopeError, match="study.drift.tokens: got 'every'; accepted: content, all"):
        load_study(cfg)


def test_real_mrpc_drift_prompts_share_no_pair_or_sentence_with_training(real_data):
    data = DataConfig(dir=str(real_data), subset_seed=7, max_train_examples=3668)
    train = get_task("mrpc").examples("train", data)
    held, splits = drift_examples("mrpc", data, 1000)
    assert splits == {"eval": 408, "test": 592}
    assert {e.id for e in train}.isdisjoint({e.id.split(":", 1)[1] for e in held})
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    # GLUE's dev pairs reuse sentences of the MSR train pairs (130 of these 1000 prompts share a
    # sentence with some training pair): pairs are disjoint, sentences are not; a known property
    # of the data, reported, not hidden
    sentences = {e.prompt[a:b] for e in train for a, b in e.content}
    shared = [e.id for e in held if any(e.prompt[a:b] in sentences for a, b in e.content)]
    assert 0 < len(shared) < 200


# ---------------------------------------------------------------------------
# must show: the real SmolLM2-135M
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_noise_in_middle_mlps_moves_content_cka_not_raw_token_cka(real_data, tmp_path):
    """A model that differs from the base only by noise on middle-layer MLP weights: the primary
    (content-token CKA) equals an in-memory float64 CKA computed here, and moves clearly, while raw
    token CKA over all tokens (position 0 and template included), computed here too, barely moves."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorascope.models import load_tokenizer, resolve_model

    torch.set_num_threads(2)
    base = Path(resolve_model("smollm2-135m"))
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, noisy / f.name)
    w = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k in w:
        if any(k.startswith(f"model.layers.{i}.mlp.") for i in range(12, 18)):
            w[k] = w[k] + 0.3 * w[k].float().std() * torch.randn(w[k].shape, generator=g)
    save_file(w, noisy / "model.safetensors", metadata={"format": "pt"})
    del w
    n = 8
    r = run_drift("mrpc", "smollm2-135m", {"noisy": str(noisy)}, tmp_path / "c", max_examples=n, batch_size=4,
                  data_dir=str(real_data), plots=False, jackknife_groups=2, diagnostic_examples=0)
    rows = r["pairs"]["base-noisy"]["layers"]

    tok = load_tokenizer(str(base))
    exs, _ = drift_examples("mrpc", DataConfig(dir=str(real_data)), n)
    layers = (14, 20, 29)  # outputs of decoder layers 13, 19 and 28: in and after the noisy block
    states = {}
    for name, path in (("base", base), ("noisy", noisy)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        per = {layer: [] for layer in layers}
        with torch.no_grad():
            for e in exs:
                hs = model.model(input_ids=torch.tensor([prompt_ids(tok, e.prompt)]), output_hidden_states=True)
                for layer in layers:
                    per[layer].append(hs.hidden_states[layer][0].double().numpy())
        states[name] = per
        del model
    keep = [content_mask(tok, e) for e in exs]
    assert r["n_tokens"] == sum(int(k.sum()) for k in keep)
    for layer in layers:
        xa = np.concatenate([s[k] for s, k in zip(states["base"][layer], keep)])
        xb = np.concatenate([s[k] for s, k in zip(states["noisy"][layer], keep)])
        content_cka = linear_cka(xa, xb)
        raw_cka = linear_cka(np.concatenate(states["base"][layer]), np.concatenate(states["noisy"][layer]))
        assert rows[layer]["token_cka"]["value"] == pytest.approx(content_cka, abs=1e-5)
        assert 1 - content_cka > 1e-3  # the content tokens' geometry moved
        assert 1 - raw_cka < 0.1 * (1 - content_cka)  # raw token CKA barely moves: the sink dominates it
    for row in rows[:13]:  # before the noisy layers nothing moved, exactly
        assert row["token_cka"]["value"] == 1.0


# ---------------------------------------------------------------------------
# drift along training
# ---------------------------------------------------------------------------


def test_snapshots_are_evenly_spaced_and_drift_along_training_reads_them(tiny_model, small_data, tmp_path):
    from lorascope.config import load_config
    from lorascope.drift.along import run_drift_along
    from lorascope.train import snapshot_steps, train

    assert (
        snapshot_steps(10, 4) == {2, 5, 8, 10} and snapshot_steps(3, 5) == {1, 2, 3} and snapshot_steps(9, 0) == set()
    )
    runs = {}
    for method in ("full", "lora"):
        out = tmp_path / method
        cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=8", "train.save_every=0",
                                 "train.max_steps=2", "train.drift_snapshots=2", "train.lr=5e-3"],
                          **{"train.task": "mrpc", "train.method": method, "train.output_dir": str(out),
                             "model.name": str(tiny_model), "data.dir": str(small_data)})
        train(cfg)
        snaps = sorted(p.name for p in (out / "snapshots").iterdir())
        assert snaps == ["step-0000001", "step-0000002"], snaps
        kind = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
        assert all((out / "snapshots" / s / kind).is_file() for s in snaps)
        runs[f"{method}_s0"] = str(out)
    # the last snapshot is the final model
    a = _state(tmp_path / "full" / "snapshots" / "step-0000002" / "model.safetensors")
    b = _state(tmp_path / "full" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    r = run_drift_along("mrpc", str(tiny_model), runs, tmp_path / "along", max_examples=8, eval_examples=8,
                        data_dir=str(small_data))
    pts = r["points"]
    assert [(p["run"], p["step"]) for p in pts] == [("full_s0", 1), ("full_s0", 2), ("lora_s0", 1), ("lora_s0", 2)]
    for p in pts:
        assert p["drift"]["token_cka"]["value"] > 0 and 0 <= p["metric"]["value"] <= 100 and p["metric"]["n"] == 8
        one = json.loads((tmp_path / "along" / p["run"] / f"step-{p['step']:07d}" / "drift.json").read_text())
        assert one["summary"]["per_model"][p["run"]]["token_cka_drift"]["value"] == p["drift"]["token_cka"]["value"]
    assert (tmp_path / "along" / "drift_along.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(LorascopeError, match="no snapshots/step-.*train.drift_snapshots"):
        run_drift_along("mrpc", str(tiny_model), {"x": str(tmp_path)}, tmp_path / "x", data_dir=str(small_data))


def _state(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_the_report_says_what_the_interval_and_the_measures_give_where_the_noise_floor_decided(tmp_path):
    """The drift section judges again with this lorascope (not the drift stage's stored judgement) and, where
    the seed noise floor made (2a) INCONCLUSIVE, adds what the primary interval and the other measures say."""
    from lorascope.report.render import Doc, drift_sensitivity

    ok = {k: (0.3, 0.2, 0.4) for k in ALL}
    mrpc = {**ok, "token_cka": (0.605, 0.408, 0.803), "cosine": (0.84, 0.66, 1.01)}
    e = _entry(mrpc, drifts=(0.0848, 0.14),
               noise={"full": {"pairs": 1, "seeds": ["full_s1", "full_s2"],
                               "token_cka": {"value": 0.164, "ci_low": 0.158, "ci_high": 0.171}}})
    e.update(lora_seeds=["lora_r8_s0", "lora_r8_s1"], full_seeds=["full_s0", "full_s1", "full_s2"])
    stale = {"lora": "lora_r8", "full": "full", "status": "PASS", "reason": "stored by an older lorascope",
             "primary": "token_cka", "threshold": 0.8, "rows": []}
    doc = Doc()
    drift_sensitivity(doc, {"summary": {"method_ratios": [e], "criterion_2a": [stale]}}, tmp_path)
    text = doc.markdown(tmp_path, "figures")
    assert "stored by an older lorascope" not in text
    assert ("Criterion 2a, lora_r8 vs full (2 and 3 seed(s)): **INCONCLUSIVE**: the difference between the "
            "methods' content-token linear CKA drifts (0.0552) is not larger than") in text
    assert ("Apart from the noise floor, the interval and the measures alone give INCONCLUSIVE: content-token "
            "linear CKA ratio 0.605 [0.408, 0.803]: the interval straddles 0.8; the measures disagree too: "
            "1 - cosine 0.84 not <= 0.8.") in text
    assert "| 1 - cosine | 0.0848 | 0.14 | 0.84 [0.66, 1.01] | no | no |" in text
    e["noise_floor"]["full"]["token_cka"] = {"value": 0.01}  # below the difference: no floor sentence
    doc = Doc()
    drift_sensitivity(doc, {"summary": {"method_ratios": [e], "criterion_2a": [stale]}}, tmp_path)
    assert "Apart from the noise floor" not in doc.markdown(tmp_path, "figures")
