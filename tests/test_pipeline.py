"""`lorascope run`: the smoke study end to end, skipping, resuming, invalidation; the verdict logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from lorascope import LorascopeError


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, real_data_dir):
    """configs/smoke.yaml run once (tiny random Llama, real data subsets), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    cache = tmp_path_factory.mktemp("cache")
    env = {"LORASCOPE_CACHE": str(cache), "LORASCOPE_DATA_DIR": str(real_data_dir), "OMP_NUM_THREADS": "1"}
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, env, r


@pytest.fixture(scope="module")
def real_data_dir():
    import os

    d = os.environ.get("LORASCOPE_DATA_DIR")
    if not d or not (Path(d) / "mrpc" / "dev.tsv").is_file():
        pytest.skip("set LORASCOPE_DATA_DIR to the shared data folder for the smoke study")
    return Path(d)


def test_smoke_study_writes_every_stage_and_the_report(smoke_run):
    run_dir, _, r = smoke_run
    study = json.loads((run_dir / "study.json").read_text())
    assert study["ranks"] == [4, 8] and study["primary_rank"] == 8
    for name in study["stages"]:
        rec = json.loads((run_dir / "stages" / f"{name.replace(':', '__')}.json").read_text())
        assert rec["finished"] and rec["hash"], name
    for task in ("mrpc", "squad_v2"):
        for m in ("full_s0", "lora_r4_s0", "lora_r8_s0"):
            assert (run_dir / "train" / task / m / "model").is_dir()
            assert (run_dir / "eval" / task / f"{m}.json").is_file()
        other = "squad_v2" if task == "mrpc" else "mrpc"
        assert (run_dir / "eval" / task / f"{other}.full_s0.json").is_file()  # forgetting
        assert (run_dir / "drift" / task / "drift.json").is_file()
        assert (run_dir / "weights" / task / "weights.json").is_file()
    for r_ in (4, 8):
        assert (run_dir / "serve" / f"r{r_}" / "serve.json").is_file()
    md = (run_dir / "report" / "report.md").read_text()
    page = (run_dir / "report" / "index.html").read_text()
    verdict = json.loads((run_dir / "report" / "verdict.json").read_text())
    # the verdict comes first, with the numbers behind each criterion
    assert md.index("## Verdict") < md.index("## Accuracy") < md.index("## Drift") < md.index("## Serving")
    for task in ("mrpc", "squad_v2"):
        t = verdict["tasks"][task]
        assert {"accuracy", "drift", "serving"} <= set(t) and t["verdict"] != "incomplete"
        acc = t["accuracy"]
        assert acc["bootstrap"]["ci_low"] <= acc["diff"] <= acc["bootstrap"]["ci_high"]
        assert f"LoRA {acc['lora']:.1f} vs full {acc['full']:.1f}" in md
    assert "(2a) LoRA drift" in md and "(2b) unmerged serving overhead" in md and "## Rank sweep" in md
    assert "Forgetting" in md and "## Environment" in md and "Recommendation: LoRA r=8" in md
    # SQuAD v2: each model's no-answer threshold tuned on 20 held-out questions (smoke.yaml), and reported
    ev = json.loads((run_dir / "eval" / "squad_v2" / "lora_r8_s0.json").read_text())
    cal = ev["metrics"]["calibration"]
    assert cal["asked"] == 20 and cal["n"] + cal["skipped_too_long"] == 20 and cal["n"] >= 10
    assert ev["metrics"]["no_answer_threshold"] == cal["threshold"]
    # smoke.yaml lets the calibration questions choose the signal too; the one chosen is applied and named
    assert set(cal["per_signal"]) == {"first_token", "answer_nll"}
    assert cal["f1"] == max(c["f1"] for c in cal["per_signal"].values())
    assert ev["metrics"]["no_answer_signal"] == cal["signal"]
    words = {"first_token": "no-answer margin", "answer_nll": "answer NLL"}[cal["signal"]]
    assert f"lora_r8_s0: {words} > {cal['threshold']:+.2f} (F1 {ev['metrics']['greedy']['f1']:.1f}" in md
    # figures: copied beside the Markdown, embedded in the HTML (self-contained: no external source)
    figs = list((run_dir / "report" / "figures").glob("*.png"))
    assert len(figs) >= 2 * 3 + 2 * 3  # drift (2 per task), spectra, serving (3 per rank)
    assert page.count("data:image/png;base64,") == len(figs)
    assert "src='http" not in page and 'src="http' not in page
    out = json.loads(r.stdout)
    assert out["report"].endswith("index.html") and set(out["tasks"]) == {"mrpc", "squad_v2"}
    assert "[1/" in (run_dir / "run.log").read_text()


def test_rerun_skips_everything_and_report_rerenders(smoke_run):
    run_dir, env, _ = smoke_run
    evals = {p: p.stat().st_mtime for p in (run_dir / "eval").rglob("*.json")}
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "running" not in "\n".join(line for line in r.stderr.splitlines() if "lorascope.pipeline" in line)
    assert all(p.stat().st_mtime == t for p, t in evals.items())
    (run_dir / "report" / "index.html").unlink()
    r = run_cli("report", str(run_dir), env=env)
    assert r.returncode == 0 and (run_dir / "report" / "index.html").is_file()


def test_changed_config_reruns_what_depends_on_it(smoke_run, tmp_path):
    run_dir, env, _ = smoke_run
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["eval"]["max_new_tokens"] = 5
    changed = tmp_path / "smoke-changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    train_rec = (run_dir / "stages" / "train__mrpc__full_s0.json").read_text()
    before = (run_dir / "eval" / "squad_v2" / "full_s0.json").stat().st_mtime
    r = run_cli("run", str(changed), "--run-dir", str(run_dir), "--only", "eval:squad_v2", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "stages" / "train__mrpc__full_s0.json").read_text() == train_rec  # not retrained
    assert (run_dir / "eval" / "squad_v2" / "full_s0.json").stat().st_mtime > before
    ev = json.loads((run_dir / "eval" / "squad_v2" / "full_s0.json").read_text())
    assert ev["config"]["eval"]["max_new_tokens"] == 5
    # the report depends on every stage: with the old config it is now out of date, and says so
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(run_dir), "--only", "report", env=env)
    assert r.returncode == 2
    assert "eval:squad_v2:base: out of date, not selected by --only" in r.stderr
    assert "stage report: needs eval:squad_v2:base, which has not run for this config" in r.stderr


def test_killed_training_resumes_inside_the_pipeline(tmp_path, real_data_dir):
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["lora"]["rank"] = 8
    cfg["study"].update(tasks=["mrpc"], methods=["lora"], drift=False, serve=False, forgetting=False)
    cfg["study"].pop("per_task", None)  # its squad_v2 section would be an error without the task
    f = tmp_path / "mini.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {"LORASCOPE_CACHE": str(tmp_path / "cache"), "LORASCOPE_DATA_DIR": str(real_data_dir),
           "OMP_NUM_THREADS": "1"}
    r = run_cli("run", str(f), "--run-dir", str(run_dir), env={**env, "LORASCOPE_FAULT_AFTER_STEP": "2"})
    assert r.returncode == 137
    rec = json.loads((run_dir / "stages" / "train__mrpc__lora_r8_s0.json").read_text())
    assert "finished" not in rec  # started, not complete
    assert list((run_dir / "train" / "mrpc" / "lora_r8_s0" / "checkpoints").glob("step-*"))
    r = run_cli("run", str(f), "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming an interrupted run" in r.stderr and "resuming from" in r.stderr.lower()
    rec = json.loads((run_dir / "stages" / "train__mrpc__lora_r8_s0.json").read_text())
    assert rec["finished"]
    assert (run_dir / "report" / "index.html").is_file()


# ---------------------------------------------------------------------------------------


def test_study_config_errors(tmp_path):
    from lorascope.pipeline import load_study

    f = tmp_path / "s.yaml"
    f.write_text("study:\n  taks: [mrpc]\n")
    with pytest.raises(LorascopeError, match=r"unknown field study.taks.*did you mean 'tasks'"):
        load_study(f)
    f.write_text("lora:\n  rank: [8, zero]\nstudy: {}\n")
    with pytest.raises(LorascopeError, match=r"lora.rank: expected an integer or a list of integers"):
        load_study(f)
    f.write_text("study:\n  tasks: [mrpc]\n  per_task: {squad_v2: {data: {max_seq_len: 64}}}\n")
    with pytest.raises(LorascopeError, match=r"study.per_task: 'squad_v2' is not one of study.tasks"):
        load_study(f)
    f.write_text("study:\n  per_task: {mrpc: {data: {max_seq_lenn: 64}}}\n")
    with pytest.raises(LorascopeError, match=r"unknown field data.max_seq_lenn"):
        load_study(f)


def test_unknown_stage_name(tmp_path):
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(tmp_path / "r"), "--only", "trian")
    assert r.returncode == 2 and "stage 'trian': no such stage" in r.stderr


def _fake_run(tmp_path: Path, *, lora_acc: float, ratio: float, overhead: float) -> Path:
    run = tmp_path / "run"
    (run / "eval" / "mrpc").mkdir(parents=True)
    (run / "drift" / "mrpc").mkdir(parents=True)
    (run / "serve" / "r8").mkdir(parents=True)
    from lorascope.pipeline import StudyArgs
    import dataclasses

    cfg = dataclasses.asdict(StudyArgs(tasks=["mrpc"]))
    (run / "study.json").write_text(json.dumps({"config": cfg, "primary_rank": 8, "seeds": [0], "ranks": [8]}))
    for name, acc in (("full_s0", 80.0), ("lora_r8_s0", lora_acc)):
        (run / "eval" / "mrpc" / f"{name}.json").write_text(json.dumps({"metrics": {"accuracy": acc}}))
    from lorascope.drift.criterion import LABELS, judge_drift

    ci = {"value": ratio, "ci_low": ratio - 0.01, "ci_high": ratio + 0.01, "lora_drift": 0.01 * ratio,
          "full_drift": 0.01, "seed_variance_included": False}
    method = {"lora": "lora_r8", "full": "full", "lora_seeds": ["lora_r8_s0"], "full_seeds": ["full_s0"],
              "noise_floor": {}, **{k: ci for k in LABELS}}
    (run / "drift" / "mrpc" / "drift.json").write_text(json.dumps({"summary": {
        "ratios": [{"lora": "lora_r8_s0", "full": "full_s0", "token_cka": ci}],
        "method_ratios": [method], "criterion_2a": [judge_drift(method)],
        "per_model": {"full_s0": {"token_cka_drift": {"value": 0.01}},
                      "lora_r8_s0": {"token_cka_drift": {"value": 0.01 * ratio}}}}}))
    (run / "serve" / "r8" / "serve.json").write_text(json.dumps({"settings": {"engine": "vllm"}, "summary": {"rows": [
        {"config": "unmerged:mrpc", "batch_size": b, "overhead": overhead * (b / 4), "expected_overhead_flops": 0.02}
        for b in (1, 4)]}}))
    return run


@pytest.mark.parametrize("lora_acc,ratio,overhead,expected", [
    (78.0, 0.5, 2.0, "meets the criteria"),  # accuracy and drift
    (78.0, 0.9, 0.3, "meets the criteria"),  # accuracy and serving (worst batch: 0.3 <= 0.3)
    (78.0, 0.9, 0.4, "does not meet the criteria"),  # neither drift nor serving
    (76.0, 0.5, 0.1, "does not meet the criteria"),  # 4 points below full
])
def test_verdict_logic(tmp_path, lora_acc, ratio, overhead, expected):
    from lorascope.report import judge

    v = judge(_fake_run(tmp_path, lora_acc=lora_acc, ratio=ratio, overhead=overhead))
    t = v["tasks"]["mrpc"]
    assert t["verdict"] == expected
    assert t["accuracy"]["diff"] == pytest.approx(lora_acc - 80.0)
    assert t["serving"]["max"] == pytest.approx(overhead) and t["serving"]["max_at_batch"] == 4
    assert t["drift"]["status"] == ("PASS" if ratio <= 0.8 else "FAIL") and t["drift"]["ratio"] == ratio


def test_paired_bootstrap_interval():
    from lorascope.report.verdict import paired_bootstrap

    a = {str(i): 100.0 * (i % 2) for i in range(400)}
    b = {str(i): 0.0 for i in range(400)}
    r = paired_bootstrap(a, b)
    assert r["value"] == pytest.approx(50.0) and r["ci_low"] < 50.0 < r["ci_high"] and r["ci_high"] - r["ci_low"] < 15
    same = paired_bootstrap(a, a)
    assert same["value"] == same["ci_low"] == same["ci_high"] == 0.0


def test_report_page_renders_in_headless_chromium(smoke_run, tmp_path):
    """The HTML page opens from disk and shows its embedded figures (a screenshot proves it)."""
    import shutil
    import subprocess

    import numpy as np
    from matplotlib import image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium package is not installed (.ci/run installs it)")
    run_dir, _, _ = smoke_run
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,5000", f"--screenshot={shot}",
                    (run_dir / "report" / "index.html").resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    px = (image.imread(shot)[:, :, :3] * 255).astype(int)
    assert px.shape[:2] == (5000, 1200)
    # matplotlib's first line colour (tab:blue) appears only if the embedded figures were drawn
    blue = (np.abs(px - np.array([31, 119, 180])) < 12).all(axis=2)
    assert blue.sum() > 500
    # the verdict table's PASS / FAIL cells are coloured
    green = (np.abs(px - np.array([0xdf, 0xf5, 0xdf])) < 4).all(axis=2)
    red = (np.abs(px - np.array([0xfb, 0xe0, 0xe0])) < 4).all(axis=2)
    assert green.sum() + red.sum() > 1000
