"""Nothing lost, nothing executed, nothing stale.

Locks on the run folder and on a train output folder; checkpoints without pickles that are
verified before a resume; disk full; content-addressed serving cache; kill -9 at seeded
random moments of a reduced smoke study (one task, no serving, tiny model) compared with a
clean run.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, run_cli
from lorascope import LorascopeError

_spec = importlib.util.spec_from_file_location("kill_study", REPO / "benchmarks" / "kill_study.py")
kill_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_study)

TRAIN_ARGS = ["--task", "mrpc", "--method", "lora", "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4",
              "--set", "train.save_every=2", "--set", "train.max_steps=6", "--set", "lora.dropout=0.1",
              "--set", "train.lr=5e-3", "--set", "train.log_every=1"]


def _train_args(tiny_model, data):
    return ["train", "--model", str(tiny_model), "--data-dir", str(data), *TRAIN_ARGS]


@pytest.fixture(scope="module")
def whole_and_killed(tiny_model, tmp_path_factory):
    """An uninterrupted training run, and one killed after step 5 (checkpoints at steps 2 and 4)."""
    from helpers import MRPC_HEADER, mrpc_rows

    root = tmp_path_factory.mktemp("ck")
    data = root / "data"
    (data / "mrpc").mkdir(parents=True)
    (data / "mrpc" / "train.tsv").write_text("\n".join([MRPC_HEADER, *mrpc_rows(48)]) + "\n")
    args = _train_args(tiny_model, data)
    whole = run_cli(*args, "--output-dir", str(root / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = run_cli(*args, "--output-dir", str(root / "killed"), env={"LORASCOPE_FAULT_AFTER_STEP": "5"})
    assert killed.returncode == 137, killed.stderr
    return root, data, args


def _copy_killed(root: Path, name: str) -> Path:
    import shutil

    dst = root / name
    shutil.copytree(root / "killed", dst)
    return dst


def _resume_in_process(root: Path, data: Path, out: Path, tiny_model, caplog) -> str:
    """Rerun the killed command's training in this process (faster than a CLI run); return its log."""
    import logging

    from lorascope.config import load_config
    from lorascope.train import train

    sets = [a for a in TRAIN_ARGS[4:] if a != "--set"]
    cfg = load_config(None, sets, **{"train.task": "mrpc", "train.method": "lora", "train.output_dir": str(out),
                                     "model.name": str(tiny_model), "data.dir": str(data)})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(cfg)
    return caplog.text


def _adapter(out: Path) -> dict:
    return load_file(out / "model" / "adapter_model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # resumed in this process, the uninterrupted run in a subprocess: float rounding at most
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# checkpoints: format, verification, fallback


def test_checkpoints_hold_no_pickles_and_the_last_two_are_kept(whole_and_killed):
    root, _, _ = whole_and_killed
    ck = root / "killed" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000002", "step-0000004"]
    for folder in ck.iterdir():
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
                         "scheduler.json", "step.json", "trainable.safetensors"]
        for p in folder.iterdir():
            assert p.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), p  # pickle
            assert p.read_bytes()[:2] != b"PK", p  # torch.save's zip container
    # AdamW moments for every trainable tensor, scheduler as numbers
    opt = load_file(ck / "step-0000004" / "optimizer.safetensors")
    n_trainable = len(load_file(ck / "step-0000004" / "trainable.safetensors"))
    assert len([k for k in opt if k.endswith(".exp_avg_sq")]) == n_trainable
    assert json.loads((ck / "step-0000004" / "scheduler.json").read_text())["last_epoch"] == 4


def test_resume_equals_uninterrupted_and_logs_each_step_once(whole_and_killed):
    root, _, args = whole_and_killed
    out = _copy_killed(root, "resumed")
    rows_before = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows_before == [1, 2, 3, 4, 5]  # step 5 ran after the last checkpoint
    r = run_cli(*args, "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "step-0000004" in r.stderr
    wa, wb = _adapter(root / "whole"), _adapter(out)
    for k in wa:  # both in subprocesses: bit for bit (RNG, optimizer and schedule states came back)
        assert torch.equal(wa[k], wb[k]), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in rows] == [x["loss"] for x in whole]


@pytest.mark.parametrize("damage", ["truncate_trainable", "truncate_optimizer", "no_step_json", "bad_header"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(whole_and_killed, damage, tiny_model, caplog):
    root, data, _ = whole_and_killed
    out = _copy_killed(root, f"corrupt-{damage}")
    newest = out / "checkpoints" / "step-0000004"
    if damage == "truncate_trainable":
        f = newest / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        expect = "trainable.safetensors has"
    elif damage == "truncate_optimizer":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        expect = "optimizer.safetensors has"
    elif damage == "no_step_json":
        (newest / "step.json").unlink()
        expect = "step.json is missing"
    else:  # same size, garbage header: only the header check can tell
        f = newest / "trainable.safetensors"
        b = bytearray(f.read_bytes())
        b[8:16] = b"\x00" * 8
        f.write_bytes(bytes(b))
        expect = "header is not valid JSON"
    text = _resume_in_process(root, data, out, tiny_model, caplog)
    assert f"checkpoint {newest} is unusable" in text and expect in text, text[-2000:]
    assert "step-0000002 (step 2)" in text
    _assert_same_weights(root / "whole", out)
    assert not (out / "checkpoints").exists()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


class _Boom:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_never_loaded(whole_and_killed, tmp_path, tiny_model, caplog):
    root, data, _ = whole_and_killed
    out = _copy_killed(root, "pickled")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(marker))
    pickle.loads(payload)  # the payload really runs code when unpickled...
    assert marker.exists()
    marker.unlink()
    newest = out / "checkpoints" / "step-0000004"
    # ...Accelerate's names for scheduler, RNG and optimizer state, and a pickle in place of the optimizer file
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (newest / name).write_bytes(payload)
    text = _resume_in_process(root, data, out, tiny_model, caplog)
    assert "pickle files" in text and "does not load" in text
    assert "step-0000002 (step 2)" in text  # the newest refused, the previous one used
    assert not marker.exists()
    _assert_same_weights(root / "whole", out)


def test_pickled_peft_adapter_is_refused_with_how_to_convert(tiny_model, whole_and_killed, tmp_path):
    from lorascope.config import ModelConfig
    from lorascope.models import load_checkpoint

    root, _, _ = whole_and_killed
    d = tmp_path / "adapter"
    import shutil

    shutil.copytree(root / "whole" / "model", d)
    marker = tmp_path / "pwned"
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(LorascopeError, match=r"adapter_model.bin: pickled adapter weights.*convert it once with"):
        load_checkpoint(str(d), ModelConfig(name=str(tiny_model)))
    assert not marker.exists()
    r = run_cli("weights", "--base", str(tiny_model), "--tuned", f"x={d}", "--output-dir", str(tmp_path / "w"))
    assert r.returncode == 2 and "pickled adapter weights" in r.stderr and not marker.exists()


def test_no_pickle_loading_in_the_source():
    """Belt and braces beside the planted-pickle test: no call that unpickles, anywhere in the package."""
    import re

    src = REPO / "src" / "lorascope"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text, f
        assert not re.search(r"\bpickle\.loads?\(|load_state\(|torch\.load\(", text.replace(
            "torch.load('", "")), f  # the conversion hint in models.py is a string for the user


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_temporary(tiny_model, small_data, tmp_path,
                                                                           monkeypatch):
    import safetensors.torch as st

    from lorascope.config import load_config
    from lorascope.train import train

    real = st.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *a, **k):
        if "step-0000004" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        calls["n"] += 1
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", full_disk)
    out = tmp_path / "o"
    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=4", "train.save_every=2",
                             "train.max_steps=6"],
                      **{"train.task": "mrpc", "train.method": "lora", "train.output_dir": str(out),
                         "model.name": str(tiny_model), "data.dir": str(small_data)})
    with pytest.raises(LorascopeError, match=r"step-0000004.tmp.*: no space left on the device to write the "
                                             r"checkpoint of step 4; it needs about [0-9.]+ MB"):
        train(cfg)
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-0000002"]  # no .tmp left, the previous one intact
    assert calls["n"] >= 2


def test_disk_full_on_the_command_line_is_one_line(tiny_model, small_data, tmp_path):
    # ENOSPC injected in a subprocess through sitecustomize: the CLI's handler turns it into one line, exit 1
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, safetensors.torch as st\n"
        "def _full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', str(a[1]))\n"
        "st.save_file = _full\n")
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{REPO / 'src'}"}
    r = run_cli("train", "--model", str(tiny_model), "--data-dir", str(small_data), "--task", "mrpc", "--method",
                "lora", "--set", "train.max_steps=1", "--output-dir", str(tmp_path / "o"), env=env)
    assert r.returncode == 1, r.stderr  # an environment failure, not bad input
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lorascope: error: ") and "no space left on the device" in last, r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "o").glob(".model.tmp-*")) and not (tmp_path / "o" / "model").exists()


# ---------------------------------------------------------------------------------------
# locks


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from lorascope.locking import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_train_folder_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tiny_model, small_data,
                                                                                            tmp_path):
    from lorascope.locking import folder_lock

    out = tmp_path / "o"
    holder = _hold_lock(out)
    try:
        r = run_cli("train", "--model", str(tiny_model), "--data-dir", str(small_data), "--task", "mrpc",
                    "--method", "lora", "--set", "train.max_steps=1", "--output-dir", str(out))
        assert r.returncode == 2
        assert f"train.output_dir {out}: in use by another lorascope process (pid {holder.pid}" in r.stderr
        assert not (out / "model").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(out) as lock:  # the kernel dropped the killed holder's lock: taken over at once
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_two_concurrent_runs_on_one_folder(tmp_path):
    """Two `lorascope run` on the same folder at once: one runs, the other stops at once naming it.

    The overlap is made certain, not left to process start-up times: the first run is paused
    (SIGSTOP) as soon as it holds the folder's lock, the second starts and must stop, then the
    first resumes and finishes alone.
    """
    import signal

    config = kill_study.write_config(tmp_path)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORASCOPE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "lorascope", "run", str(config), "--run-dir", str(run_dir),
           "--only", "prepare", "--only", "train:mrpc:lora_r4_s0"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lock = run_dir / ".lorascope.lock"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == first.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before it could be paused"
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-1500:]
    assert second.returncode == 2, second.stderr[-1500:]
    assert f"--run-dir {run_dir}: in use by another lorascope process (pid {first.pid}" in second.stderr
    out = run_dir / "train" / "mrpc" / "lora_r4_s0"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = json.loads((out / "lorascope-train.json").read_text())["steps"]
    assert steps >= 2 and [x["step"] for x in rows] == list(range(1, steps + 1))  # one writer


# ---------------------------------------------------------------------------------------
# pipeline records and the serving cache


def test_truncated_stage_record_reruns_the_stage(tmp_path, small_data):
    from lorascope import pipeline

    rec = tmp_path / "stages" / "x.json"
    rec.parent.mkdir(parents=True)
    rec.write_text('{"stage": "x", "hash": "ab')
    assert pipeline._read_record(rec) is None
    rec.write_text("[1, 2]")
    assert pipeline._read_record(rec) is None
    rec.write_text('{"stage": "x", "hash": "ab", "finished": "t"}')
    assert pipeline._read_record(rec)["hash"] == "ab"


def test_changed_weights_in_a_train_folder_rerun_the_stages_that_read_them(tmp_path, real_data_dir, monkeypatch):
    from safetensors.torch import save_file

    from lorascope.pipeline import run_study

    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path / "cache"))
    config = kill_study.write_config(tmp_path)
    run = tmp_path / "run"
    only = ["prepare", "train:mrpc:lora_r4_s0", "eval:mrpc:lora_r4_s0"]
    first = run_study(str(config), run, only=only)
    same = run_study(str(config), run, only=only)
    assert same["eval:mrpc:lora_r4_s0"] == first["eval:mrpc:lora_r4_s0"]  # unchanged: not redone
    f = run / "train" / "mrpc" / "lora_r4_s0" / "model" / "adapter_model.safetensors"
    w = load_file(f)
    save_file({k: (v * 2 if "lora_B" in k else v) for k, v in w.items()}, f)  # new weights, same folder
    third = run_study(str(config), run, only=only)
    assert third["train:mrpc:lora_r4_s0"] == first["train:mrpc:lora_r4_s0"]
    assert third["eval:mrpc:lora_r4_s0"]["hash"] != first["eval:mrpc:lora_r4_s0"]["hash"]  # evaluated again


def test_new_adapter_weights_in_the_same_folder_invalidate_cached_timings(tmp_path, small_data):
    from safetensors.torch import save_file

    from lorascope.models import build_tiny_llama
    from lorascope.serve import ServeSettings, run_serve_bench

    sys.path.insert(0, str(REPO / "tests"))
    from test_serve import make_adapter

    base = build_tiny_llama(tmp_path / "base", vocab_size=400, hidden=128, heads=2, kv_heads=1)
    ad = make_adapter(base, tmp_path / "ad", "mrpc", seed=1)
    out = tmp_path / "out"
    settings = ServeSettings(engine="transformers", batch_sizes=[1], output_tokens=3, repetitions=1,
                             check_prompts=2, modes=["merged", "unmerged"])
    first = run_serve_bench(str(base), [f"mrpc={ad}"], str(out), settings, data_dir=str(small_data))
    spec_hashes = {c["name"]: c["spec_hash"] for c in first["configs"]}
    seconds = {c["name"]: c["seconds"] for c in first["configs"]}
    # same folder, new weights (B scaled): the timings and agreement check must be measured again
    w = load_file(ad / "adapter_model.safetensors")
    save_file({k: (v * 3 if "lora_B" in k else v) for k, v in w.items()}, ad / "adapter_model.safetensors")
    second = run_serve_bench(str(base), [f"mrpc={ad}"], str(out), settings, data_dir=str(small_data))
    assert second["adapters"][0]["sha256"] != first["adapters"][0]["sha256"]
    for c in second["configs"]:
        assert c["spec_hash"] != spec_hashes[c["name"]], c["name"]
    merged = json.loads((out / "merged" / "mrpc" / "lorascope-merged.json").read_text())
    assert merged["adapter_sha256"] == second["adapters"][0]["sha256"]
    for c in spec_hashes:  # measured again: the result files are new, with the new spec's hash
        res = json.loads((out / "configs" / f"{c.replace(':', '-')}.json").read_text())
        assert res["spec_hash"] != spec_hashes[c] and res["seconds"] != seconds[c]
    # and an unchanged adapter is reused
    third = run_serve_bench(str(base), [f"mrpc={ad}"], str(out), settings, data_dir=str(small_data))
    assert [c["spec_hash"] for c in third["configs"]] == [c["spec_hash"] for c in second["configs"]]


def test_failed_serve_bench_leaves_nothing_complete_looking(tmp_path, small_data):
    from lorascope.models import build_tiny_llama

    base = build_tiny_llama(tmp_path / "base", vocab_size=400, hidden=128, heads=2, kv_heads=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    out = tmp_path / "out"
    r = run_cli("serve-bench", "--engine", "transformers", "--base", str(base), "--adapter", f"a={bad}",
                "--modes", "merged,unmerged", "--batch-sizes", "1", "--output-dir", str(out),
                "--data-dir", str(small_data))
    assert r.returncode == 2, r.stderr[-1500:]  # bad input
    assert str(bad) in r.stderr
    assert not (out / "serve.json").exists() and not (out / "serve.csv").exists()
    assert not list(out.glob("*.png"))
    rec = json.loads((out / "serve.failed.json").read_text())
    assert rec["status"] == "failed" and {f["name"] for f in rec["summary"]["failed"]} == {"merged:a", "unmerged:a"}


def test_unmerged_faster_than_merged_beyond_the_spread_warns():
    from lorascope.serve.bench import ServeSettings, summarize

    def res(name, mode, tps):
        return {"name": name, "mode": mode, "status": "ok", "peak_rss_bytes": 1, "rss_after_load_bytes": 1,
                "startup_seconds": 1, "settings": {}, "check": [],
                "batches": [{"batch_size": 1, "peak_rss_bytes": 1,
                             "repetitions": [{"tokens_per_second": t, "latency": [1.0], "ttft": [0.1], "tpot": [0.1]}
                                             for t in tps]}]}

    adapters = [{"name": "a", "flops": {"expected_overhead_model": 0.02}}]
    s = summarize([res("merged:a", "merged", [10, 11, 10.5]), res("unmerged:a", "unmerged", [20, 21, 19])],
                  adapters, ServeSettings())
    assert len(s["warnings"]) == 1 and "unmerged measured faster than merged in every repetition" in s["warnings"][0]
    s = summarize([res("merged:a", "merged", [10, 11, 10.5]), res("unmerged:a", "unmerged", [9, 12, 9.5])],
                  adapters, ServeSettings())
    assert s["warnings"] == []  # within the spread: no warning


def test_serve_worker_dies_with_its_parent(tmp_path):
    """A kill -9 of the process that started a worker takes the worker down (parent-death signal)."""
    code = ("import subprocess, sys, time\n"
            "from lorascope.serve.bench import _die_with_parent\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True,\n"
            "                     preexec_fn=_die_with_parent)\n"
            "print(p.pid, flush=True); time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")


# ---------------------------------------------------------------------------------------
# kill -9 at random moments of the reduced smoke study


def test_kill_at_five_random_moments_gives_the_clean_result(tmp_path, real_data_dir):
    rec = kill_study.kill_study(5, seed=int(os.environ.get("LORASCOPE_KILL_SEED", "0")), work=tmp_path,
                                env={"LORASCOPE_DATA_DIR": str(real_data_dir)}, log=lambda *_: None)
    assert rec["kills"] == 5
    assert rec["chains"] and all(c["exit"] == 0 for c in rec["chains"]), rec["chains"]
    assert rec["all_identical"], [c["differences"] for c in rec["chains"]]


@pytest.fixture(scope="module")
def real_data_dir():
    d = os.environ.get("LORASCOPE_DATA_DIR")
    if not d or not (Path(d) / "mrpc" / "dev.tsv").is_file():
        pytest.skip("set LORASCOPE_DATA_DIR to the shared data folder for the smoke study")
    return Path(d)


def test_every_command_on_bad_input_exits_with_one_clear_line(tmp_path):
    """benchmarks/bad_inputs.py's cases (every command; the study's search and seeds too): expected exit
    status, no traceback, the right line."""
    _bi = importlib.util.spec_from_file_location("bad_inputs", REPO / "benchmarks" / "bad_inputs.py")
    bad_inputs = importlib.util.module_from_spec(_bi)
    _bi.loader.exec_module(bad_inputs)
    rows = bad_inputs.run_all(tmp_path, log=lambda *_: None)
    assert len(rows) >= 30 and {r["command"] for r in rows} >= {"train", "eval", "score", "summary", "drift", "weights",
                                                                "serve-bench", "run", "report", "prepare-model"}
    bad = [(r["command"], r["case"], r["exit"], r["message"]) for r in rows if not r["ok"]]
    assert not bad, bad
