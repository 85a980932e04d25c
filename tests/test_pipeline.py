"""`lorascope run`: the smoke study end to end, skipping, resuming, invalidation; the verdict logic."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from helpers import REPO, run_cli, write_data
from lorascope import LorascopeError


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, pipeline_data):
    """configs/smoke.yaml run once (tiny random Llama, small generated data), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    cache = tmp_path_factory.mktemp("cache")
    env = {"LORASCOPE_CACHE": str(cache), "LORASCOPE_DATA_DIR": str(pipeline_data), "OMP_NUM_THREADS": "1"}
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, env, r


@pytest.fixture(scope="module")
def pipeline_data(tmp_path_factory):
    """Small generated data in the shared layout (so the whole pipeline never skips): enough MRPC pairs
    and SQuAD v2 articles for smoke.yaml's training, tuning, evaluation, calibration and drift sets."""
    return write_data(tmp_path_factory.mktemp("pipeline-data") / "data", mrpc=(64, 30, 10), squad=(60, 4))


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
        # one length policy: drift reads the first data.max_seq_len tokens of each prompt, as training did
        drift_cfg = json.loads((run_dir / "drift" / task / "drift.json").read_text())["config"]
        assert drift_cfg["max_tokens"] == drift_cfg["data"]["max_seq_len"] == 1200
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
        assert {"accuracy", "drift", "serving"} <= set(t)
        acc = t["accuracy"]
        assert acc["bootstrap"]["ci_low"] <= acc["diff"] <= acc["bootstrap"]["ci_high"]
        assert f"LoRA {acc['lora']:.1f} vs full {acc['full']:.1f}" in md
    assert "(2a) LoRA drift" in md and "(2b) unmerged serving overhead" in md and "## Rank sweep" in md
    assert "Forgetting" in md and "## Environment" in md and "Recommendation: " in md
    # serving: the open loop and the time split (smoke.yaml asks for both) reach the report and the recommendation
    assert "Open loop: requests arriving as a Poisson process" in md and "Where the time goes" in md
    assert "where the unmerged time goes (transformers" in verdict["recommendation"]
    assert verdict["tasks"]["squad_v2"]["accuracy"]["unit"] == "paragraph"  # SQuAD questions cluster by paragraph
    assert "a tiny random Llama" in md  # the base model is named for what it is
    # learning-rate selection: every trial recorded, the final models at the selected rate, the curves shown
    for task in ("mrpc", "squad_v2"):
        for method, name in (("full", "full_s0"), ("lora", "lora_r8_s0")):
            tj = json.loads((run_dir / "tune" / task / method / "tune.json").read_text())
            assert len(tj["trials"]) == 2 and tj["best_lr"] in [t["lr"] for t in tj["trials"]]
            trained = json.loads((run_dir / "train" / task / name / "lorascope-train.json").read_text())
            assert trained["config"]["train"]["lr"] == tj["best_lr"]
            assert trained["config"]["data"]["validation_share"] == 0.0  # the final models use every example
            # smoke.yaml searches MRPC's epochs too (1 or 2 at the selected rate); SQuAD v2 trains train.epochs
            if task == "mrpc":
                assert [t["epochs"] for t in tj["epoch_trials"]] == [1.0, 2.0]
                assert trained["config"]["train"]["epochs"] == tj["best_epochs"]
            else:
                assert "best_epochs" not in tj and trained["config"]["train"]["epochs"] == 1.0
    assert "## Learning-rate selection" in md and md.count("lr_curve.png") == 4
    # each trial with an interval over its validation examples (SQuAD v2: paragraphs), each selection with its
    # paired margin over the runner-up: the rate for every method and task, the epochs where they were searched
    assert "| 95 % CI |" in md and "Each selection against its runner-up" in md
    for label in ("mrpc / full, rate: ", "mrpc / lora, epochs: ", "squad_v2 / lora, rate: "):
        assert label in md
    squad_line = md.split("squad_v2 / full, rate: ")[1].split(";")[0]
    assert " paragraphs" in squad_line and "points over" in squad_line
    assert "and vs epochs at the selected rate" in md and "mrpc: accuracy of the validation split as evaluated; " \
        "epochs at each method's selected rate: best validation score, ties: fewer epochs; squad_v2:" in md
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
    assert (f"lora_r8_s0: {words} > {cal['threshold']:+.2f} (on the evaluated questions greedy decoding's own choice "
            f"would score F1 {ev['metrics']['greedy']['f1']:.1f}; on the held-out questions F1 {cal['f1']:.1f}, "
            f"greedy decoding's own choice {cal['f1_greedy']:.1f}, abstaining on {cal['abstained']} of "
            f"{cal['n']}") in md
    # figures: copied beside the Markdown, embedded in the HTML (self-contained: no external source)
    figs = list((run_dir / "report" / "figures").glob("*.png"))
    assert len(figs) >= 2 * 3 + 2 * 3  # drift (2 per task), spectra, serving (3 per rank)
    assert page.count("data:image/png;base64,") == len(figs)
    assert "src='http" not in page and 'src="http' not in page
    out = json.loads(r.stdout)
    assert out["report"].endswith("index.html") and set(out["tasks"]) == {"mrpc", "squad_v2"}
    assert "[1/" in (run_dir / "run.log").read_text()


def test_smoke_study_is_inconclusive_on_both_tasks_and_says_why(smoke_run):
    """A random tiny model learns nothing: no criterion may be decided, and the first line says so."""
    run_dir, _, _ = smoke_run
    verdict = json.loads((run_dir / "report" / "verdict.json").read_text())
    md = (run_dir / "report" / "report.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("Verdict: mrpc INCONCLUSIVE") and "squad_v2 INCONCLUSIVE" in first
    assert "have not learned the task" in first and "To decide, run:" in first and "reference.yaml" in first
    for task in ("mrpc", "squad_v2"):
        t = verdict["tasks"][task]
        assert t["verdict"] == "INCONCLUSIVE" and t["accuracy"]["status"] == "INCONCLUSIVE"
        assert t["drift"]["status"] == "INCONCLUSIVE" and "learned" in t["drift"]["reason"]
        assert not all(m["learned"] for m in t["accuracy"]["learned"].values())
    assert "no recommendation on accuracy or drift for mrpc, squad_v2" in verdict["recommendation"]
    assert "less forgetting" not in md and "moves the hidden states" not in md
    # the drift section never shows another (2a) than the verdict's as if it were the verdict: the one in bold is
    # the verdict's, and the drift rule's own result, where it differs, is labelled as such
    paras = [x for x in md.split("\n\n") if x.startswith("Criterion 2a, ")]
    assert len(paras) == 4  # two tasks, ranks 4 and 8; the verdict judges rank 8
    for p in paras:
        rule = p.split("seed(s))", 1)[1]
        if p.startswith("Criterion 2a, lora_r8 vs full"):
            assert p.count("**") == 2 and "**INCONCLUSIVE**" in p
            assert rule.startswith(": **INCONCLUSIVE**") or rule.startswith(", the drift rule alone: ")
        else:
            assert "**" not in p and rule.startswith(", the drift rule alone (the verdict judges lora_r8): ")


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
    # an evaluation setting that the learning-rate search does not use (it scores without calibration)
    cfg["study"]["per_task"]["squad_v2"]["eval"]["calibration_examples"] = 24
    changed = tmp_path / "smoke-changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    train_rec = (run_dir / "stages" / "train__mrpc__full_s0.json").read_text()
    before = (run_dir / "eval" / "squad_v2" / "full_s0.json").stat().st_mtime
    r = run_cli("run", str(changed), "--run-dir", str(run_dir), "--only", "eval:squad_v2", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "stages" / "train__mrpc__full_s0.json").read_text() == train_rec  # not retrained
    assert (run_dir / "eval" / "squad_v2" / "full_s0.json").stat().st_mtime > before
    ev = json.loads((run_dir / "eval" / "squad_v2" / "full_s0.json").read_text())
    assert ev["config"]["eval"]["calibration_examples"] == 24
    # the ETA foresaw that every eval:squad_v2 stage would rerun (their config changed), and timed the rest
    # by the same stages' records from the first run
    stages = json.loads((run_dir / "study.json").read_text())["stages"]
    later = [n for n in stages if n.startswith("eval:squad_v2:")][1:]
    assert len(later) >= 2
    assert "eval:squad_v2:base: running" in r.stderr
    assert f"; {len(later)} stage(s) to run after it, {len(later)} timed by finished stages like them: ~" in r.stderr
    # the report depends on every stage: with the old config it is now out of date, and says so
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(run_dir), "--only", "report", env=env)
    assert r.returncode == 2
    assert "eval:squad_v2:base: out of date, not selected by --only" in r.stderr
    assert "stage report: needs eval:squad_v2:base, which has not run for this config" in r.stderr


def test_a_grown_search_grid_keeps_the_finished_trials(smoke_run, tmp_path):
    run_dir, env, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["study"]["tune_lrs_full"] += [3e-4]
    cfg["study"]["tune_lrs_lora"] += [3e-3]  # the same budget for both
    grown = tmp_path / "smoke-grown.yaml"
    grown.write_text(yaml.safe_dump(cfg))
    trials = run / "tune" / "mrpc" / "lora"
    before = {p: p.stat().st_mtime_ns for p in trials.glob("lr_*/validation.json")}
    assert len(before) == 3  # 2 rates, and 2 epochs at the selected one (smoke.yaml searches MRPC's epochs)
    r = run_cli("run", str(grown), "--run-dir", str(run), "--only", "tune:mrpc:lora", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the finished trials are kept
    tj = json.loads((trials / "tune.json").read_text())
    assert [t["lr"] for t in tj["trials"]] == sorted(cfg["study"]["tune_lrs_lora"]) and tj["budget"] == 3
    assert (trials / "lr_3.00e-03" / "validation.json").is_file()


def test_only_runs_prepare_when_a_new_run_folder_needs_it(tmp_path, pipeline_data):
    """`--only train:...` on a new run folder: the base model is resolved first (prepare is always selected),
    instead of the run stopping for want of it; nothing else outside the selection runs."""
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["study"].update(tasks=["mrpc"], methods=["lora"], drift=False, serve=False, forgetting=False, tune_lr=False)
    cfg["study"].pop("per_task", None)
    f = tmp_path / "mini.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {"LORASCOPE_CACHE": str(tmp_path / "cache"), "LORASCOPE_DATA_DIR": str(pipeline_data),
           "OMP_NUM_THREADS": "1"}
    stage = f"train:mrpc:lora_r{cfg['lora']['rank'][0]}_s0"  # smoke.yaml sweeps ranks
    r = run_cli("run", str(f), "--run-dir", str(run_dir), "--only", stage, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].endswith("prepare: would run") and f"{stage}: would run" in r.stdout
    assert "would stop" not in r.stdout and lines[-1].startswith("2 stage(s) would run")
    r = run_cli("run", str(f), "--run-dir", str(run_dir), "--only", stage, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    done = sorted(p.stem for p in (run_dir / "stages").glob("*.json")
                  if json.loads(p.read_text()).get("finished"))
    assert done == ["prepare", stage.replace(":", "__")]


def test_killed_training_resumes_inside_the_pipeline(tmp_path, pipeline_data):
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["lora"]["rank"] = 8
    cfg["study"].update(tasks=["mrpc"], methods=["lora"], drift=False, serve=False, forgetting=False,
                        tune_lr=False)  # the kill must hit the final training (test_tune covers the search)
    cfg["study"].pop("per_task", None)  # its squad_v2 section would be an error without the task
    f = tmp_path / "mini.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {"LORASCOPE_CACHE": str(tmp_path / "cache"), "LORASCOPE_DATA_DIR": str(pipeline_data),
           "OMP_NUM_THREADS": "1"}
    r = run_cli("run", str(f), "--run-dir", str(run_dir), env={**env, "LORASCOPE_FAULT_AFTER_STEP": "2"})
    assert r.returncode == 137
    rec = json.loads((run_dir / "stages" / "train__mrpc__lora_r8_s0.json").read_text())
    assert "finished" not in rec  # started, not complete
    assert list((run_dir / "train" / "mrpc" / "lora_r8_s0" / "checkpoints").glob("step-*"))
    # an archive of the killed run leaves the unfinished stage out, record and folder: the next run starts it afresh
    r = run_cli("archive", str(run_dir), str(tmp_path / "kept"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["unfinished_stages_left_out"] == 1
    assert not (tmp_path / "kept" / "stages" / "train__mrpc__lora_r8_s0.json").exists()
    assert not (tmp_path / "kept" / "train" / "mrpc" / "lora_r8_s0").exists()
    assert (tmp_path / "kept" / "stages" / "prepare.json").is_file()
    r = run_cli("run", str(f), "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming an interrupted run" in r.stderr and "resuming from" in r.stderr.lower()
    # its seconds cover the second invocation only: it is marked, and times no other stage; nothing after it
    # has finished anything like it, so the ETA says so instead of guessing
    assert ("train:mrpc:lora_r8_s0: running (elapsed 0m00s; 3 stage(s) to run after it, 3 not yet timed "
            "(eval:mrpc:base, eval:mrpc:lora_r8_s*, report))") in r.stderr
    rec = json.loads((run_dir / "stages" / "train__mrpc__lora_r8_s0.json").read_text())
    assert rec["finished"] and rec["resumed"] is True
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


def test_noise_floor_tasks_choose_where_two_seeds_are_measured_together(tmp_path):
    """study.drift.noise_floor_tasks: on the tasks it names, a method's last two seeds share a drift stage (the
    noise floor); on the others each model has its own, so no two models must exist at once. The named tasks'
    stages keep their configs (a running study's finished parts stay valid)."""
    from lorascope.pipeline import load_study, plan

    f = tmp_path / "s.yaml"
    study = {"tasks": ["mrpc", "squad_v2"], "serve": False, "drift": {"per_model": True},
             "per_task": {"squad_v2": {"train": {"seed": [0, 1]}}}}
    cfg = {"train": {"seed": [0, 1, 2]}, "study": study}

    def drift_stages():
        f.write_text(yaml.safe_dump(cfg))
        return {s.name: s for s in plan(load_study(f), tmp_path / "run") if s.kind == "drift"}

    both = drift_stages()
    assert [n for n in both if n.startswith("drift:squad_v2:")] == [
        "drift:squad_v2:full_s0+full_s1", "drift:squad_v2:lora_r8_s0+lora_r8_s1"]
    study["drift"]["noise_floor_tasks"] = ["mrpc"]
    only_mrpc = drift_stages()
    assert [n for n in only_mrpc if n.startswith("drift:squad_v2:")] == [
        "drift:squad_v2:full_s0", "drift:squad_v2:lora_r8_s0", "drift:squad_v2:full_s1", "drift:squad_v2:lora_r8_s1"]
    assert only_mrpc["drift:squad_v2"].deps == [f"drift:squad_v2:{m}" for m in
                                                ("full_s0", "lora_r8_s0", "full_s1", "lora_r8_s1")]
    mrpc = [n for n in both if n.startswith("drift:mrpc")]
    assert mrpc == [n for n in only_mrpc if n.startswith("drift:mrpc")] and "drift:mrpc:full_s1+full_s2" in mrpc
    assert all(both[n].config == only_mrpc[n].config and both[n].deps == only_mrpc[n].deps for n in mrpc)
    study["drift"]["noise_floor_tasks"] = []
    assert "drift:mrpc:full_s2" in drift_stages()
    for bad, msg in (({"noise_floor_tasks": ["mrpc"]}, "only with study.drift.per_model: true"),
                     ({"per_model": True, "noise_floor_tasks": ["squad"]},
                      "'squad' is not a task whose drift is measured \\(mrpc, squad_v2\\)")):
        study["drift"] = bad
        f.write_text(yaml.safe_dump(cfg))
        with pytest.raises(LorascopeError, match=f"study.drift.noise_floor_tasks: {msg}"):
            load_study(f)


def test_unknown_stage_name(tmp_path):
    r = run_cli("run", "configs/smoke.yaml", "--run-dir", str(tmp_path / "r"), "--only", "trian")
    assert r.returncode == 2 and "stage 'trian': no such stage" in r.stderr


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
    # the verdict table's PASS / FAIL / INCONCLUSIVE cells are coloured
    green = (np.abs(px - np.array([0xdf, 0xf5, 0xdf])) < 4).all(axis=2)
    red = (np.abs(px - np.array([0xfb, 0xe0, 0xe0])) < 4).all(axis=2)
    yellow = (np.abs(px - np.array([0xff, 0xf3, 0xc4])) < 4).all(axis=2)
    assert green.sum() + red.sum() + yellow.sum() > 1000


def test_the_eta_counts_only_what_will_run_and_times_it_by_finished_stages_like_it(tmp_path):
    from lorascope.pipeline import Stage, _Digests, _StageTimes, _will_run

    def stage(name, deps=()):
        return Stage(name, name.split(":")[0], lambda: None, {"x": 1}, list(deps), [tmp_path / name])

    stages = [stage("train:t:full_s0"), stage("train:t:full_s1"), stage("train:t:full_s2"),
              stage("eval:t:full_s0", ["train:t:full_s0"]), stage("eval:t:full_s1", ["train:t:full_s1"]),
              stage("report", ["eval:t:full_s0", "eval:t:full_s1"])]
    digests = _Digests(tmp_path / "digests.json")
    # train s0 is up to date (its hash as the loop computes it, its output present), s1 was killed, s2 never began
    from lorascope.pipeline import _stage_hash
    (tmp_path / "train:t:full_s0").mkdir()
    h0 = _stage_hash(stages[0], {}, {}, {s.name: s for s in stages}, digests)
    prior = {"train:t:full_s0": {"stage": "train:t:full_s0", "hash": h0, "finished": "x", "seconds": 100.0,
                                 "resumed": False, "outputs": [str(tmp_path / "train:t:full_s0")]},
             "train:t:full_s1": {"stage": "train:t:full_s1", "hash": "old", "started": "x"},
             "eval:t:full_s0": {"stage": "eval:t:full_s0", "hash": "h", "finished": "x", "seconds": 7.0,
                                "resumed": True}}
    assert _will_run(stages, prior, [], [], digests) == {"train:t:full_s1", "train:t:full_s2", "eval:t:full_s0",
                                                         "eval:t:full_s1", "report"}
    # --only: an unselected stage never runs, even downstream of one that does
    assert _will_run(stages, prior, ["train"], [], digests) == {"train:t:full_s1", "train:t:full_s2"}
    # --force reruns an up-to-date stage and everything downstream of it
    assert "train:t:full_s0" in _will_run(stages, prior, [], ["train:t:full_s0"], digests)
    assert _will_run(stages, prior, ["eval", "report"], [], digests) == {"eval:t:full_s0", "eval:t:full_s1",
                                                                        "report"}
    # train s1 and s2 are timed by s0 (the seed aside); the evals are not (the only finished one was resumed)
    eta = _StageTimes(prior).eta(["train:t:full_s1", "train:t:full_s2", "eval:t:full_s1", "report"])
    assert eta == "; 4 stage(s) to run after it, 2 timed by finished stages like them: ~3m20s, 2 not yet timed " \
                  "(eval:t:full_s*, report)"
    # two finished seeds: their mean
    prior["train:t:full_s1"] = {"stage": "train:t:full_s1", "finished": "x", "seconds": 140.0, "resumed": False}
    assert _StageTimes(prior).eta(["train:t:full_s2"]) == "; 1 stage(s) to run after it, 1 timed by finished " \
                                                          "stages like them: ~2m00s"
    # a record from before the flag may have been resumed: it times nothing
    del prior["train:t:full_s1"]["resumed"]
    assert _StageTimes(prior).eta(["train:t:full_s2"]).endswith("~1m40s")
    assert _StageTimes(prior).eta([]) == ""


def test_a_study_in_parts_measures_models_one_by_one_and_resumes_from_its_archive(tmp_path, pipeline_data):
    """study.drift.per_model and `lorascope archive`: each model's drift and weights are measured on their
    own and pooled; the archive keeps no weights; a run in a copy of it (at another path) reruns nothing,
    and a stage that would need an archived model's weights stops with one line naming the stage to rerun."""
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["lora"]["rank"] = 4
    cfg["train"]["seed"] = [0, 1, 2]
    cfg["study"].update(tasks=["mrpc"], serve=False, forgetting=False, tune_lr=False, min_seeds=3)
    cfg["study"]["drift"]["per_model"] = True
    cfg["study"].pop("per_task", None)
    f = tmp_path / "parts.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {"LORASCOPE_CACHE": str(tmp_path / "cache"), "LORASCOPE_DATA_DIR": str(pipeline_data),
           "OMP_NUM_THREADS": "1"}
    r = run_cli("run", str(f), "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = json.loads((run_dir / "study.json").read_text())["stages"]
    models = ["full_s0", "lora_r4_s0", "full_s1", "lora_r4_s1", "full_s2", "lora_r4_s2"]
    # each model alone, but a method's last two seeds together (their seed-to-seed drift: the noise floor)
    assert [s for s in stages if s.startswith("drift:")] == [
        "drift:mrpc:full_s0", "drift:mrpc:lora_r4_s0", "drift:mrpc:full_s1+full_s2",
        "drift:mrpc:lora_r4_s1+lora_r4_s2", "drift:mrpc"]
    assert [s for s in stages if s.startswith("weights:")] == [f"weights:mrpc:{m}" for m in models] + ["weights:mrpc"]
    drift = json.loads((run_dir / "drift" / "mrpc" / "drift.json").read_text())
    assert set(drift["models"]) == {"base", *models}
    assert {m: v["seeds"] for m, v in drift["summary"]["noise_floor"].items()} == {
        "full": ["full_s1", "full_s2"], "lora_r4": ["lora_r4_s1", "lora_r4_s2"]}
    assert drift["summary"]["method_ratios"][0]["token_cka"]["seeds_lora"] == 3
    weights = json.loads((run_dir / "weights" / "mrpc" / "weights.json").read_text())
    assert set(weights["summary"]) == set(models)
    report = (run_dir / "report" / "report.md").read_text()
    assert "Measured in parts: the models were measured in runs of one or two models each" in report
    assert "pairs of tuned models measured together: full_s1-full_s2, lora_r4_s1-lora_r4_s2" in report
    assert "Noise floor of full: drift between its seeds full_s1, full_s2" in report

    # before the pooled stages have run, `lorascope report` pools the parts finished so far (into the report,
    # never into drift/ or weights/), shows them and decides nothing on them
    part = tmp_path / "partial"
    shutil.copytree(run_dir, part)
    for st in ("drift:mrpc", "weights:mrpc", "drift:mrpc:full_s1+full_s2", "drift:mrpc:lora_r4_s1+lora_r4_s2",
               "eval:mrpc:full_s2"):
        (part / "stages" / f"{st.replace(':', '__')}.json").unlink()
    shutil.rmtree(part / "drift")
    shutil.rmtree(part / "weights")
    (part / "eval" / "mrpc" / "full_s2.json").unlink()
    r = run_cli("report", str(part), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (part / "drift").exists() and not (part / "weights").exists()
    interim = json.loads((part / "report" / "interim" / "drift" / "mrpc" / "drift.json").read_text())
    assert list(interim["models"]) == ["base", "full_s0", "lora_r4_s0"]
    per = {m: interim["summary"]["per_model"][m]["token_cka_drift"]["value"] for m in ("full_s0", "lora_r4_s0")}
    for m, v in per.items():  # each model's drift is its own part's, as in the study's pooled drift.json
        assert v == pytest.approx(drift["summary"]["per_model"][m]["token_cka_drift"]["value"], rel=1e-12)
    ratio = interim["summary"]["method_ratios"][0]["token_cka"]
    assert ratio["seeds_lora"] == ratio["seeds_full"] == 1
    assert ratio["value"] == pytest.approx(per["lora_r4_s0"] / per["full_s0"], rel=1e-9)
    iw = json.loads((part / "report" / "interim" / "weights" / "mrpc" / "weights.json").read_text())
    assert iw["summary"] == weights["summary"]  # every weight part had finished
    v = json.loads((part / "report" / "verdict.json").read_text())["tasks"]["mrpc"]
    assert v["drift"]["status"] == "INCONCLUSIVE" and v["drift"]["reason"].startswith(
        "interim, not decided: drift still to run for full_s1+full_s2, lora_r4_s1+lora_r4_s2; evaluations still "
        "to run (criterion 1); on what was measured so far (full_s0, lora_r4_s0) the rule gives ")
    assert v["accuracy"]["status"] == "INCONCLUSIVE" and v["accuracy"]["interim"]["missing"] == ["full_s2"]
    partial_md = (part / "report" / "report.md").read_text()
    assert ("Interim: the study's drift:mrpc stage has not run yet; pooled here from the 2 part(s) finished so far "
            "(full_s0, lora_r4_s0); still to run: full_s1+full_s2, lora_r4_s1+lora_r4_s2.") in partial_md
    assert "Interim: the study's weights:mrpc stage has not run yet" in partial_md
    assert partial_md.splitlines()[0].endswith("To decide, run: rerun `lorascope run` with the same config to "
                                               "finish the missing stages.")
    assert "Interim:" not in report  # the finished study's report pools nothing itself

    # the archive: no weights, no checkpoints; the trained models' stages are marked
    r = run_cli("archive", str(run_dir), str(tmp_path / "kept"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = tmp_path / "kept"
    assert not [p for p in kept.rglob("*") if p.suffix in (".safetensors", ".bin") or p.name == "checkpoints"]
    assert json.loads(r.stdout)["archived_stages"] == [f"train:mrpc:{m}" for m in sorted(models)]
    rec = json.loads((kept / "stages" / "train__mrpc__full_s0.json").read_text())
    assert rec["archived"]["left_out"] and all("model" in p for p in rec["archived"]["left_out"])
    assert (kept / "eval" / "mrpc" / "full_s0.json").is_file() and (kept / "drift" / "mrpc" / "drift.json").is_file()
    r = run_cli("archive", str(run_dir), str(kept), env=env)
    assert r.returncode == 2 and "already exists" in r.stderr

    # resumed elsewhere: nothing reruns, not even what reads the trained models
    resumed = tmp_path / "elsewhere" / "run"
    shutil.copytree(kept, resumed)
    r = run_cli("run", str(f), "--run-dir", str(resumed), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ": running" not in r.stderr and f"[{len(stages)}/{len(stages)}] report: up to date" in r.stderr
    r = run_cli("run", str(f), "--run-dir", str(resumed), "--force", "report", env=env)
    assert r.returncode == 0 and "report: running" in r.stderr
    assert (resumed / "report" / "report.md").read_text().splitlines()[:5] == report.splitlines()[:5]
    # --dry-run says the same beforehand, and writes nothing
    before = sorted((str(p), p.stat().st_mtime_ns) for p in resumed.rglob("*"))
    r = run_cli("run", str(f), "--run-dir", str(resumed), "--dry-run", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(stages) + 1 and lines[-1] == "0 stage(s) would run"
    assert lines[0] == f"[1/{len(stages)}] prepare: up to date"
    assert "train:mrpc:full_s1: up to date (archived without its weights)" in r.stdout
    r = run_cli("run", str(f), "--run-dir", str(resumed), "--dry-run", "--force", "drift:mrpc:full_s1+full_s2",
                env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    stop = next(x for x in r.stdout.splitlines() if "drift:mrpc:full_s1+full_s2:" in x)
    assert stop.endswith("drift:mrpc:full_s1+full_s2: would stop: needs the files of train:mrpc:full_s1, which this "
                         "run folder keeps without its weights; retrain them first: --force train:mrpc:full_s1")
    assert "drift:mrpc: would run, if the run got this far" in r.stdout
    assert r.stdout.splitlines()[-1].endswith("the run would stop at drift:mrpc:full_s1+full_s2 (above)")
    assert sorted((str(p), p.stat().st_mtime_ns) for p in resumed.rglob("*")) == before
    # a stage that reads an archived model: one line, the stage to retrain, exit 2, nothing removed
    r = run_cli("run", str(f), "--run-dir", str(resumed), "--force", "drift:mrpc:full_s1+full_s2", env=env)
    assert r.returncode == 2
    assert ("stage drift:mrpc:full_s1+full_s2: needs the files of train:mrpc:full_s1, which this run folder keeps "
            "without its weights") in r.stderr and "--force train:mrpc:full_s1" in r.stderr
    assert (resumed / "drift-models" / "mrpc" / "full_s1+full_s2" / "drift.json").is_file()
