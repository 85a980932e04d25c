"""kill -9 a small study at seeded random moments, rerun it, and compare with a clean run.

    python benchmarks/kill_study.py --kills 20 --seed 0 --out results/reliability/kill_study

The study is configs/smoke.yaml reduced to one task (MRPC), no serving, the tiny random
Llama, a checkpoint at every step (so kills land inside training, evaluation, drift,
weights and the report). First one clean run; then chains: start `lorascope run`, kill
its whole process group with SIGKILL after a random delay (uniform between 1 s and the
clean run's duration), start it again, ... until it completes; the completed run is
compared with the clean one: trained weights bit for bit, every evaluation, prediction,
drift, weight-space and verdict file after removing timings, provenance and paths, and
metrics.jsonl (each step exactly once, same loss, lr and gradient norm). A kill whose
moment falls after the run finished counts as a completed chain, not as a kill.

Writes OUT.json and OUT.md; exits 1 if any completed run differs from the clean one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MINI_CONFIG = """\
# configs/smoke.yaml reduced for kill tests: one task, no serving, a checkpoint every step
model:
  name: tiny-random-llama
data:
  max_train_examples: 32
  max_eval_examples: 16
  max_seq_len: 512
  eval_max_seq_len: 1200
train:
  batch_size: 8
  micro_batch_size: 8
  save_every: 1
  log_every: 1
  max_steps: 6
eval:
  batch_size: 8
lora:
  rank: 4
study:
  tasks: [mrpc]
  serve: false
  drift:
    max_examples: 8
    batch_size: 8
"""

VOLATILE = {"provenance", "eval_seconds", "seconds", "elapsed_s", "tokens_per_s", "tokens_per_s_this_process",
            "train_seconds_this_invocation", "cpu_seconds_this_invocation", "tokens_per_cpu_s", "cpu_s",
            "resumed_from_step", "created", "started", "finished", "argv", "timing"}


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "mini.yaml"
    p.write_text(MINI_CONFIG)
    return p


def start(config: Path, run_dir: Path, env: dict) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.console.log", "a")
    return subprocess.Popen([sys.executable, "-m", "lorascope", "run", str(config), "--run-dir", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def run_to_end(config: Path, run_dir: Path, env: dict, timeout: float = 900) -> int:
    p = start(config, run_dir, env)
    return p.wait(timeout=timeout)


def _normalise(obj, run_dir: str):
    if isinstance(obj, dict):
        # PEFT writes target_modules from a set: its order varies between processes
        return {k: (sorted(v) if k == "target_modules" and isinstance(v, list) else _normalise(v, run_dir))
                for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_normalise(v, run_dir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(run_dir, "RUN")
    return obj


def compare(clean: Path, other: Path) -> list[str]:
    """Differences between two completed run folders (empty list: identical results)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for f in sorted(clean.rglob("*")):
        rel = f.relative_to(clean)
        top = rel.parts[0]
        if not f.is_file() or top in ("stages",) or f.name.startswith("."):
            continue
        g = other / rel
        if not g.is_file():
            problems.append(f"{rel}: missing")
            continue
        if f.suffix == ".safetensors":
            a, b = load_file(f), load_file(g)
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                problems.append(f"{rel}: tensors differ")
        elif f.name == "metrics.jsonl":
            rows = [[json.loads(x) for x in p.read_text().splitlines()] for p in (f, g)]
            keep = [[(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rs] for rs in rows]
            if keep[0] != keep[1]:
                steps = [r[0] for r in keep[1]]
                problems.append(f"{rel}: differs (steps logged {steps})")
        elif f.suffix == ".json" and top in ("eval", "drift", "weights", "report", "train"):
            a = _normalise(json.loads(f.read_text()), str(clean))
            b = _normalise(json.loads(g.read_text()), str(other))
            if a != b:
                problems.append(f"{rel}: differs")
        elif f.suffix in (".csv", ".md") and top in ("drift", "weights"):
            if f.read_text().replace(str(clean), "RUN") != g.read_text().replace(str(other), "RUN"):
                problems.append(f"{rel}: differs")
    return problems


def kill_study(kills: int, seed: int, work: Path, env: dict | None = None, log=print) -> dict:
    """Run the kill experiment in `work`; return the record (see the module docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.setdefault("LORASCOPE_CACHE", str(work / "cache"))
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    config = write_config(work)
    clean = work / "clean"
    shutil.rmtree(clean, ignore_errors=True)
    t0 = time.time()
    rc = run_to_end(config, clean, env)
    clean_s = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"the clean run failed (exit {rc}); see {clean}.console.log")
    log(f"clean run: {clean_s:.1f} s")
    rng = random.Random(seed)
    landed, chains, chain = [], [], 0
    run_dir = work / f"chain-{chain}"
    shutil.rmtree(run_dir, ignore_errors=True)
    chain_kills: list[dict] = []
    while True:
        if len(landed) >= kills and not chain_kills:
            break
        p = start(config, run_dir, env)
        delay = rng.uniform(1.0, clean_s) if len(landed) < kills else None
        try:
            rc = p.wait(timeout=delay if delay is not None else 900)
        except subprocess.TimeoutExpired:
            stages = (
                sorted(x.stem for x in (run_dir / "stages").glob("[!.]*.json")) if (run_dir / "stages").is_dir() else []
            )
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            last = _running_stage(run_dir)
            k = {"chain": chain, "delay_s": round(delay, 2), "stage_running": last, "stage_records": len(stages)}
            landed.append(k)
            chain_kills.append(k)
            log(f"kill {len(landed)}: chain {chain} after {delay:.1f} s, in {last}")
            continue
        if rc != 0:
            chains.append({"chain": chain, "kills": chain_kills, "exit": rc, "differences": ["run failed"]})
            log(f"chain {chain}: the rerun failed with exit {rc}")
        else:
            diff = compare(clean, run_dir)
            leftovers = [str(x.relative_to(run_dir)) for x in run_dir.rglob("*.tmp*")]
            chains.append({"chain": chain, "kills": chain_kills, "exit": 0, "differences": diff,
                           "temporary_leftovers": leftovers})
            log(f"chain {chain}: completed after {len(chain_kills)} kill(s); "
                + ("identical to the clean run" if not diff else f"DIFFERS: {diff}"))
        chain += 1
        chain_kills = []
        run_dir = work / f"chain-{chain}"
        shutil.rmtree(run_dir, ignore_errors=True)
    ok = all(c["exit"] == 0 and not c["differences"] for c in chains)
    return {"kills": len(landed), "seed": seed, "clean_run_s": clean_s, "chains": chains, "all_identical": ok,
            "kill_points": landed}


def _running_stage(run_dir: Path) -> str:
    """The stage whose record has no 'finished' (the one the kill interrupted), if any."""
    best = "before the first stage"
    for rec in sorted((run_dir / "stages").glob("[!.]*.json"), key=lambda p: p.stat().st_mtime) \
            if (run_dir / "stages").is_dir() else []:
        try:
            d = json.loads(rec.read_text())
        except ValueError:
            return f"{rec.stem} (record being written)"
        best = d["stage"] if not d.get("finished") else f"after {d['stage']}"
    return best


def to_markdown(rec: dict) -> str:
    lines = [f"# kill -9 at {rec['kills']} random moments (seed {rec['seed']})", "",
             f"Clean run: {rec['clean_run_s']:.1f} s. Result: "
             + ("every completed run identical to the clean run." if rec["all_identical"] else "DIFFERENCES found."),
             "", "| kill | chain | after (s) | interrupted |", "|---|---|---|---|"]
    for i, k in enumerate(rec["kill_points"], 1):
        lines.append(f"| {i} | {k['chain']} | {k['delay_s']} | {k['stage_running']} |")
    lines += ["", "| chain | kills | exit | identical | temporary leftovers |", "|---|---|---|---|---|"]
    for c in rec["chains"]:
        lines.append(
            f"| {c['chain']} | {len(c['kills'])} | {c['exit']} | {'yes' if not c['differences'] else c['differences']} "
            f"| {len(c.get('temporary_leftovers', []))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/kill_study", help="scratch folder (removed runs are recreated)")
    ap.add_argument("--out", default="results/reliability/kill_study", help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    rec = kill_study(args.kills, args.seed, Path(args.work).resolve())
    rec["machine_note"] = "2 CPU cores shared with other jobs; delays are wall-clock seconds"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rec))
    print(to_markdown(rec))
    return 0 if rec["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
