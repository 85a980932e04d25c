"""Render report/report.md and report/index.html from a run directory.

The report is a list of blocks (headings, paragraphs, tables, figures) rendered twice:
Markdown with the figures copied into report/figures/, and one HTML page with the
figures embedded as data URIs, so it opens from disk anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorascope.layout import RunLayout, trained_name
from lorascope.report.interim import interim_note, pool_parts
from lorascope.report.verdict import RESAMPLES, judge, primary, seeds_of
from lorascope.runinfo import atomic_path

_SIGNAL_WORDS = {"first_token": "no-answer margin", "answer_nll": "answer NLL"}


def _load(p: Path) -> Any:
    return json.loads(p.read_text()) if p.is_file() else None


def _score_or_missing(x: float | None) -> str:
    return "not evaluated yet" if x is None else _f(x)


def _f(x: Any, fmt: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, fmt)
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def _drift_seeds(dr: dict) -> str:
    s = dr.get("seeds") or {}
    if s.get("lora") is None or s.get("full") is None:
        return "seeds unknown"
    return f"seeds LoRA {s['lora']}, full {s['full']}"


def _seeds(acc: dict) -> str:
    s = acc.get("seeds", {})
    return f"{s.get('full', 0)} full, {s.get('lora', 0)} LoRA"


def _ci(c: dict | None) -> str:
    if not c or c.get("value") is None:
        return "-"
    return f"{c['value']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]"


def trial_scores(task: str, trial_dir: Path, trial: dict) -> tuple[dict[str, float] | None, dict | None, str]:
    """Per-example validation scores of one search trial (their mean is its validation score), the clusters
    the bootstrap resamples and their name. A task with a selection rule (SQuAD v2) scores each question
    under the rule fitted on the other half (`scores` of the trial's selection record); otherwise the
    evaluation's per-example scores. (None, ...) for a trial that recorded neither."""
    from lorascope.report.verdict import clusters, per_example_scores

    eval_file = trial_dir / "eval.json"
    if not (trial_dir / "eval.predictions.json").is_file():
        return None, None, "example"
    sel = trial.get("selection") or {}
    scores = sel.get("scores") if "rule" in sel else per_example_scores(task, eval_file)
    groups, unit = clusters(task, eval_file)
    return scores or None, groups, unit


def _ci_span(c: dict | None) -> str:
    return "-" if not c or c.get("ci_low") is None else f"[{c['ci_low']:.1f}, {c['ci_high']:.1f}]"


def _lr_section(doc: Doc, run_dir: Path, tasks: list[str]) -> None:
    """Learning-rate selection: every trial with an interval over its validation examples, the setting chosen
    per method with its margin over the runner-up, the curve per method and task."""
    from lorascope.report.verdict import mean_interval

    rows, rules, margins, unfinished = [], {}, [], []
    for task in tasks:
        tune_dir = RunLayout(run_dir).tune_dir(task)
        for f in sorted(tune_dir.glob("*/tune.json")) if tune_dir.is_dir() else []:
            tj = _load(f)
            rules[task] = tj.get("score") or f"{tj['metric']} of the validation split as evaluated"
            if "epochs_rule" in tj:  # the same rule for both methods, each at its own rate
                rules[task] += "; epochs at each method's selected rate: best validation score, ties: fewer epochs"
            searched = "best_epochs" in tj
            shown = []  # (trial, epochs, per-example scores, clusters, unit, rate trial or not)
            n_rates = len(tj["trials"])
            for i, trial in enumerate(tj["trials"] + [t for t in tj.get("epoch_trials", []) if "reused_from" not in t]):
                e = trial.get("epochs", tj.get("epochs"))
                chosen = trial["lr"] == tj["best_lr"] and (not searched or e == tj["best_epochs"])
                # the trial's folder beside tune.json (the recorded path may be another machine's)
                scores, groups, unit = (trial_scores(task, f.parent / Path(trial["train_dir"]).parent.name, trial)
                                        if trial.get("train_dir") and trial.get("value") is not None
                                        else (None, None, "example"))
                ci = mean_interval(scores, groups=groups) if scores else None
                shown.append((trial, e, scores, groups, unit, i < n_rates))
                rows.append([task, tj["method"], f"{trial['lr']:.1e}", "-" if e is None else f"{e:g}",
                             _f(trial.get("value")), _ci_span(ci), trial.get("state", "complete"),
                             "selected" if chosen else ""])
            rates = [x for x in shown if x[5]]
            margins.append(_runner_up(f"{task} / {tj['method']}, rate",
                                      [(x, x[0]["lr"] == tj["best_lr"]) for x in rates]))
            if searched:  # the selected rate's own trial stands for its epoch count (it is reused, not retrained)
                counts = [x for x in rates if x[0]["lr"] == tj["best_lr"]] + [x for x in shown if not x[5]]
                margins.append(_runner_up(f"{task} / {tj['method']}, epochs",
                                          [(x, x[1] == tj["best_epochs"]) for x in counts]))
            doc.fig(f.parent / "lr_curve.png", f"{task} / {tj['method']}: validation {tj['metric']} vs learning rate"
                    + (" and vs epochs at the selected rate" if searched else ""))
        for mdir in sorted(d for d in tune_dir.iterdir() if d.is_dir()) if tune_dir.is_dir() else []:
            if not (mdir / "tune.json").is_file():
                unfinished.append(_unfinished_search(task, mdir, rows, rules, _planned_grid(run_dir, task, mdir.name)))
    if rows:
        blocks = [b for b in doc.blocks if b[0] == "fig" and "lr_curve" in str(b[1])]
        doc.blocks = [b for b in doc.blocks if b not in blocks]
        doc.h(2, "Learning-rate selection")
        doc.table(["task", "method", "learning rate", "epochs", "validation score", "95 % CI", "trial", ""], rows)
        doc.p("Each method gets the same budget of trials on a validation split carved from the training side "
              "(never the evaluation, calibration or drift examples); the final models train at the selected rate "
              "(and, where epochs were searched, for the selected epochs). "
              "Validation score: " + "; ".join(f"{t}: {r}" for t, r in rules.items()) + ". "
              "Each trial is one training run at the search's seed: its interval (95 %, bootstrap over the "
              "validation examples, or their paragraphs where they share one) covers which examples were drawn, "
              "not the seed.")
        if any(unfinished):
            doc.p("Unfinished searches (a study run in parts): " + "; ".join(u for u in unfinished if u) + ". "
                  "Their finished trials are shown with intervals, but no rate is selected and no curve drawn "
                  "until every trial of the search has run.")
        lines = [m for m in margins if m]
        if lines:
            doc.p("Each selection against its runner-up (the rate among the rate trials; the epochs at the "
                  "selected rate), on the same validation examples (paired, same bootstrap): " + "; ".join(lines)
                  + ". An interval that includes 0 means validation could not tell the two apart; the selection "
                  "then rests on the point values.")
        doc.blocks += blocks


#: what a search of the study in a run folder tries: its learning rates, the epochs its rate trials train,
#: and the epoch counts it then tries at the selected rate (None: epochs not searched)
Grid = tuple[set[float], float | None, set[float] | None]


def _planned_grid(run_dir: Path, task: str, method: str) -> Grid | None:
    """The search of `method` on `task` as the study in `run_dir` plans it, from its study.json
    (study.per_task.TASK.tune_lrs_M, else study.tune_lrs_M; tune_epochs and train.epochs likewise); None when
    the run folder does not say."""
    f = RunLayout(run_dir).study_file
    try:
        study = json.loads(f.read_text(encoding="utf-8"))
        st = study["config"]
        own = (st.get("per_task") or {}).get(task) or {}
        lrs = own.get(f"tune_lrs_{method}") or st.get(f"tune_lrs_{method}")
        epochs = own["tune_epochs"] if "tune_epochs" in own else st.get("tune_epochs")
        base = (own.get("train") or {}).get("epochs", (study.get("base_config") or {}).get("train", {}).get("epochs"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not lrs:
        return None
    return ({float(x) for x in lrs}, None if base is None else float(base),
            None if epochs is None else {float(e) for e in epochs})


def _unfinished_search(task: str, mdir: Path, rows: list, rules: dict,
                       grid: Grid | None = None) -> str | None:
    """Rows for the finished trials of a search whose tune.json is not written yet (its trials so far: each
    trial's validation.json), appended to `rows`; the sentence that says how far it got, or None if no trial
    has started. With `grid` (the study's rates and epoch counts for this search), a finished trial outside it
    (left by an earlier grid; the search will not use it) is counted, not shown."""
    from lorascope.report.verdict import mean_interval
    from lorascope.tasks import get_task

    started = sorted((d for d in mdir.glob("lr_*") if d.is_dir()),
                     key=lambda d: ("_epochs_" in d.name, d.name))
    done = [(d, _load(d / "validation.json")) for d in started if (d / "validation.json").is_file()]
    if not started:
        return None
    stale = []
    if grid is not None:
        lrs, base_epochs, epoch_grid = grid

        def planned(d: Path, t: dict) -> bool:
            e = t.get("epochs")
            if "_epochs_" in d.name:  # an epoch trial, at the rate the search selects (not known yet)
                return epoch_grid is not None and e is not None and float(e) in epoch_grid
            return (any(math.isclose(float(t["lr"]), g, rel_tol=1e-6) for g in lrs)
                    and (base_epochs is None or e is None or math.isclose(float(e), base_epochs)))
        stale = [t for d, t in done if not planned(d, t)]
        done = [(d, t) for d, t in done if planned(d, t)]
    selection_rule = get_task(task).selection_rule
    for d, trial in done:
        rules.setdefault(task, selection_rule or f"{trial.get('metric')} of the validation split as evaluated")
        scores, groups, _ = (trial_scores(task, d, trial) if trial.get("value") is not None
                             else (None, None, "example"))
        ci = mean_interval(scores, groups=groups) if scores else None
        e = trial.get("epochs")
        rows.append([task, mdir.name, f"{trial['lr']:.1e}", "-" if e is None else f"{e:g}", _f(trial.get("value")),
                     _ci_span(ci), trial.get("state", "complete"), "search unfinished"])
    running = len(started) - len(done) - len(stale)
    return (f"{task} / {mdir.name}: {len(done)} trial(s) finished"
            + (f", {running} started and not finished" if running else "")
            + (f" ({len(stale)} other finished trial(s) not shown, outside this study's grid: "
               + ", ".join(_trial_name(t) for t in stale) + ")" if stale else ""))


def _trial_name(t: dict) -> str:
    return f"{t['lr']:.1e}" + ("" if t.get("epochs") is None else f", {t['epochs']:g} epoch(s)")


def _runner_up(label: str, entries: list) -> str | None:
    """'LABEL: selected vs runner-up: difference [95 % CI] points over N UNITs', or None without both.
    entries: ((trial, epochs, scores, clusters, unit, _), selected) for the trials of one decision."""
    from lorascope.report.verdict import hierarchical_bootstrap

    def name(t, e):
        return f"{t['lr']:.1e}" + ("" if e is None else f", {e:g} epoch(s)")

    sel = next((x for x, chosen in entries if chosen and x[2]), None)
    others = sorted((x for x, chosen in entries if not chosen and x[2]), key=lambda x: -x[0]["value"])
    if sel is None or not others:
        return None
    run = others[0]
    # paired: the same validation examples, resampled by cluster as the trials' intervals are
    d = hierarchical_bootstrap([sel[2]], [run[2]], groups=sel[3])
    n, unit = (d["clusters"], sel[4].split(" ")[0]) if sel[3] else (d["n"], "example")
    apart = d.get("ci_low") is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)
    return (f"{label}: {name(sel[0], sel[1])} ({sel[0]['value']:.1f}) vs {name(run[0], run[1])} "
            f"({run[0]['value']:.1f}): {_ci(d)} points over {n} {unit}s"
            + ("" if apart else " (the interval includes 0)"))


class Doc:
    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def fig(self, path: Path, caption: str) -> None:
        if path.is_file():
            self.blocks.append(("fig", path, caption))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, fig_dir: Path, rel: str) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":  # a "|" inside a cell (||dW||_F) would split it: escaped
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b[2]]
            elif b[0] == "fig":
                name = "-".join(b[1].parts[-3:])
                shutil.copyfile(b[1], fig_dir / name)
                out.append(f"![{b[2]}]({rel}/{name})\n\n*{b[2]}*")
            elif b[0] == "pre":
                out.append("```\n" + b[1] + "\n```")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td class='{_cls(c)}'>{html.escape(c)}</td>" for c in r) + "</tr>"
                               for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "fig":
                data = base64.b64encode(b[1].read_bytes()).decode()
                body.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            elif b[0] == "pre":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def _cls(cell: str) -> str:
    mark = {"PASS": "pass", "FAIL": "fail", "INCONCLUSIVE": "inconclusive"}.get(cell.split(" ")[0].rstrip(":"))
    if mark:
        return mark
    try:
        float(cell.split(" ")[0].rstrip("%"))
        return "num"
    except ValueError:
        return ""


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.num{text-align:right}
th{background:#f3f3f3}.pass{background:#dff5df}.fail{background:#fbe0e0}.inconclusive{background:#fff3c4}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;overflow-x:auto}"""


def _serve_tail(r: dict) -> str:
    st = (r.get("stats") or {}).get("latency")
    if st is None:  # a serve.json written before the sample counts were recorded
        return _f(r.get("latency_p95_s"), ".3f")
    if st["supported"]["p95"]:
        return f"{st['p95']:.3f}"
    return f"max {st['max']:.3f} (only {st['samples']} requests)"


def _serve_ov(r: dict, col: str) -> str:
    if r.get(col) is None:
        return "-"
    lo, hi, cov = r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high"), r.get(f"{col}_ci_coverage")
    if lo is None:
        return _pct(r[col])
    note = f" (min-max of too few rounds: {cov:.0%} coverage)" if cov is not None and cov < 0.95 else ""
    return f"{_pct(r[col])} [{_pct(lo)}, {_pct(hi)}]{note}"


def render_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    study = _load(RunLayout(run_dir).study_file)
    if study is None:
        raise FileNotFoundError(f"{run_dir}: no study.json; not a `lorascope run` directory")
    with tempfile.TemporaryDirectory(prefix="lorascope-interim-") as interim_dir:
        # a study run in parts whose pooled drift or weight stages have not run: pool the parts finished so far
        layout = pool_parts(run_dir, interim_dir) or RunLayout(run_dir)
        return _render(run_dir, study, layout, Path(interim_dir))


def _render(run_dir: Path, study: dict[str, Any], layout: RunLayout, interim_dir: Path) -> Path:
    verdict = judge(run_dir, layout=layout)
    cfg = study["config"]
    tasks = cfg["tasks"]
    rank = study["primary_rank"]
    doc = Doc()
    # the first line is the verdict, with its reasons and what to run when it is INCONCLUSIVE
    doc.p(f"Verdict: {verdict['overall']}.")
    doc.h(1, "lorascope report: LoRA vs full fine-tuning")
    from lorascope.models import display_name

    per_task = {t: seeds_of(study, t) for t in tasks}
    seeds = (", ".join(map(str, study["seeds"])) if all(s == study["seeds"] for s in per_task.values())
             else "; ".join(f"{t} {', '.join(map(str, s))}" for t, s in per_task.items()))
    doc.p(f"Base model {display_name(study['base_config']['model']['name'])}; tasks {', '.join(tasks)}; LoRA "
          f"rank(s) {', '.join(map(str, study['ranks']))} (the verdict is about rank {rank}); seed(s) "
          f"{seeds}. Config {study['config_file']}.")
    if cfg.get("note"):
        doc.p(f"What this preset leaves out: {cfg['note'].strip()}")

    _verdict_section(doc, verdict, rank)
    _lr_section(doc, run_dir, tasks)

    _accuracy_section(doc, layout, tasks)
    _drift_section(doc, layout, tasks, verdict)
    _weights_section(doc, layout, tasks)
    _forgetting_section(doc, layout, tasks, cfg)
    _serving_section(doc, layout)
    _rank_section(doc, layout, study, tasks)
    _environment_section(doc, study, cfg)

    out = layout.report
    with atomic_path(out, is_dir=True) as tmp:
        figs = tmp / "figures"
        figs.mkdir()
        (tmp / "report.md").write_text(doc.markdown(figs, "figures"))
        (tmp / "index.html").write_text(doc.html("lorascope report"))
        (tmp / "verdict.json").write_text(json.dumps(verdict, indent=2))
        if any(interim_dir.iterdir()):  # the interim pooled drift.json / weights.json the report shows
            shutil.copytree(interim_dir, tmp / "interim")
    return out / "index.html"


def _verdict_section(doc: Doc, verdict: dict[str, Any], rank: int) -> None:
    """The verdict table, whether the models learned, and what the intervals cover."""
    crit = verdict["criteria"]
    doc.h(2, "Verdict")
    doc.p(f"Recommendation: {verdict['recommendation']}")
    rows = []
    for task, t in verdict["tasks"].items():
        acc, dr, sv = t.get("accuracy"), t.get("drift"), t.get("serving")
        if acc:
            b = acc.get("bootstrap")
            ci = f" [{b['ci_low']:+.1f}, {b['ci_high']:+.1f}]" if b else ""
            diff = f": {acc['diff']:+.1f}{ci}" if acc.get("diff") is not None else ""
            rows.append([task, f"(1) {t['label']}: LoRA within {crit['accuracy_margin']:g} points of full",
                         f"LoRA {_score_or_missing(acc['lora'])} vs full {_score_or_missing(acc['full'])}{diff}; "
                         f"seeds {_seeds(acc)}",
                         f"{acc['status']}: {acc['reason']}"])
        elif t.get("accuracy_absent"):
            rows.append([task, f"(1) {t['label']}: LoRA within {crit['accuracy_margin']:g} points of full", "-",
                         t["accuracy_absent"]])
        if dr:
            rows.append([task, f"(2a) LoRA drift at least {crit['drift_reduction']:.0%} below full",
                         f"{dr['measured']}; {_drift_seeds(dr)}", f"{dr['status']}: {dr['reason']}"])
        elif t.get("drift_absent"):
            rows.append([task, f"(2a) LoRA drift at least {crit['drift_reduction']:.0%} below full", "-",
                         t["drift_absent"]])
        if sv:
            if len(sv.get("overheads") or {}) == 1:  # one batch size: no range to give
                measured = f"{sv['engine']}: {_pct(sv['max'])} at batch {sv['max_at_batch']}"
            else:
                measured = (f"{sv['engine']}: {_pct(sv['min'])} to {_pct(sv['max'])} over batch sizes "
                            f"(worst at {sv['max_at_batch']}")
            rows.append([task, f"(2b) unmerged serving overhead at most {crit['max_serving_overhead']:.0%}",
                         f"{measured}{'; ' if '(' in measured else ' ('}FLOP limit {_pct(sv['flop_limit'])})",
                         f"{sv['status']}: {sv['reason']}"])
        elif t.get("serving_absent"):
            rows.append([task, f"(2b) unmerged serving overhead at most {crit['max_serving_overhead']:.0%}", "-",
                         t["serving_absent"]])
        rows.append([task, "overall: (1) and ((2a) or (2b))", "", f"{t['verdict']}: {t['reason']}"])
    doc.table(["task", "criterion", "measured (95% interval)", "result"], rows)

    learned_rows = []
    for task, t in verdict["tasks"].items():
        acc = t.get("accuracy") or {}
        so_far = bool(acc.get("interim")) or str(acc.get("reason", "")).startswith("evaluations missing")
        for m in ("full", "lora"):
            lm = (acc.get("learned") or {}).get(m)
            if not lm:
                continue
            base_ci = lm["vs"].get("zero-shot base model")
            bl = next((c for ref, c in lm["vs"].items() if ref.startswith("baseline")), None)
            learned_rows.append([task, "full" if m == "full" else f"LoRA r={rank}", _f(acc.get(m)),
                                 str(acc["seeds"][m]),
                                 (f"{acc['best_baseline']['name']} {acc['best_baseline']['value']:.1f}: "
                                  f"{_ci(bl)}") if bl else "-",
                                 f"{_f(acc.get('base'))}: {_ci(base_ci)}" if base_ci else "-",
                                 ("yes" if lm["learned"] else _not_learned(lm))
                                 + (" (on the seeds evaluated so far)" if so_far else "")])
    if learned_rows:
        doc.h(3, "Did the models learn the tasks?")
        doc.table(["task", "model", "score (mean over seeds)", "seeds", "vs best trivial baseline",
                   "vs zero-shot base model", "learned"], learned_rows)
        doc.p("A model has learned a task when the 95% intervals of its differences to both the best trivial "
              "baseline and the zero-shot base model exclude 0. Criteria (1) and (2a) compare only models that "
              "learned the task; otherwise they are INCONCLUSIVE.")
    for task, t in verdict["tasks"].items():
        mc = (t.get("accuracy") or {}).get("measure_check")
        if not mc:
            continue
        if mc["status"] is None:
            doc.p(f"{task}, the same decisions under a second measure ({mc['measure']}): {mc['reason']}.")
            continue
        who = {"full": "full fine-tuning", "lora": f"LoRA r={rank}"}
        learned = "; ".join(f"{who[m]} {_f(mc['means'][m])}, " + ("learned" if ok else "not learned: " + ", ".join(
            f"vs {ref.removeprefix('baseline: ')} {_ci(c)}" for ref, c in mc["vs"][m].items()))
            for m, ok in mc["learned"].items())
        doc.p(f"{task}, the same decisions under a second measure, {mc['measure']}: {learned}; criterion (1) "
              f"{mc['status']}: {mc['reason']}. A model counts as having learned the task, and criterion (1) is "
              f"decided, only where both measures agree.")
    units = sorted({t["accuracy"].get("unit", "example") for t in verdict["tasks"].values() if "accuracy" in t})
    # the seeds behind the intervals shown: those evaluated (a study in parts has not evaluated all it plans)
    counts = sorted({n for t in verdict["tasks"].values() if isinstance(t.get("accuracy", {}).get("seeds"), dict)
                     for n in t["accuracy"]["seeds"].values() if n}) or sorted(
        {len(t.get("seeds", verdict["seeds"])) for t in verdict["tasks"].values()}) or [len(verdict["seeds"])]
    n_seeds = counts[0]
    doc.p(f"Intervals: accuracy, hierarchical bootstrap ({RESAMPLES} resamples) over the "
          f"{' or '.join(map(str, counts))} seed(s) of each "
          f"method and then over evaluation clusters (unit: {', '.join(units) or 'example'})"
          + (": with 1 seed they cover the choice of evaluation examples only, not seed variance"
             if n_seeds < 2 else "")
          + " (checked against a Student t interval with the seeds' unbiased variance and cluster-robust example "
            "variance, Welch-Satterthwaite degrees of freedom: a decision stands only where both intervals give it)"
          + "; drift ratio, delete-a-group jackknife over prompts, plus the between-seed variance when a method "
          "has two or more seeds. Serving overhead: per round, merged tokens/s / unmerged tokens/s - 1, the two "
          "arms timed back to back on the same prompts; the median over rounds per batch size, with an "
          "order-statistic interval (the tokens/s columns pool all rounds, so their ratio need not equal the "
          "median). FLOP limit: the unmerged adapter's extra matrix arithmetic per token relative to the base "
          "model's (2r(d_in + d_out) per adapted matrix): the overhead if time followed the arithmetic.")


def _not_learned(lm: dict) -> str:
    """'no', and where every bootstrap interval excludes 0, the t interval that does not (verdict.t_interval)."""
    if lm.get("learned_primary"):  # learned under the task's measure, not under its second one
        return "no: not under the second measure (below)"
    boot_ok = all(c.get("ci_low") is not None and c["ci_low"] > 0 for c in lm["vs"].values())
    t_bad = [(ref, c) for ref, c in (lm.get("vs_t") or {}).items() if c.get("ci_low") is None or c["ci_low"] <= 0]
    if not (boot_ok and t_bad):
        return "no"
    ref, c = t_bad[0]
    return (f"no: vs {ref.removeprefix('baseline: ')}, the t interval {_ci(c)} does not exclude 0"
            if c.get("ci_low") is not None else "no")


def _columns(task: str) -> list[tuple[str, str]]:
    from lorascope.tasks import TASKS

    return list(TASKS[task].report_columns) if task in TASKS else [(primary(task)[0], "score")]


def _task_rule(task: str) -> str:
    from lorascope.tasks import TASKS

    return TASKS[task].long_prompt_rule if task in TASKS else "skipped"


def _scored(m: dict, n: int) -> str:
    """How many of `n` examples metrics `m` are on: "458 of 472" where the evaluation skipped some."""
    scored = m.get("total", m.get("n", n))  # SQuAD v2's official count; MRPC's confusion total
    return str(n) if scored == n else f"{scored} of {n}"


def _accuracy_section(doc: Doc, layout: RunLayout, tasks: list[str]) -> None:
    """Every evaluated model per task, the trivial baselines, the length policy and the calibration."""
    doc.h(2, "Accuracy")
    for task in tasks:
        cols = _columns(task)
        rows, calibrated, n_cal = [], [], None
        base_ev = None
        for f in sorted(layout.eval_dir(task).glob("*.json")):
            if f.name.endswith(".predictions.json") or "." in f.stem:
                continue
            ev = _load(f)
            if f.stem == "base":
                base_ev = ev
            rows.append([f.stem] + [_f(ev["metrics"].get(k)) for k, _ in cols]
                        + [_scored(ev["metrics"], ev["n_examples"])])
            cal = ev["metrics"].get("calibration")
            if cal:
                n_cal = cal["n"]
                signal = cal.get("signal", "first_token")
                held = (f"; on the held-out questions F1 {_f(cal.get('f1'))}, greedy decoding's own choice "
                        f"{_f(cal.get('f1_greedy', cal.get('f1_at_0')))}" if cal.get("f1") is not None else "")
                if cal.get("abstained") is not None:
                    held += f", abstaining on {cal['abstained']} of {cal['n']}" + (
                        " (the rule is always-no-answer)" if cal["abstained"] == cal["n"] else "")
                calibrated.append(f"{f.stem}: {_SIGNAL_WORDS.get(signal, signal)} > {cal['threshold']:+.2f} "
                                  f"(on the evaluated questions greedy decoding's own choice would score F1 "
                                  f"{_f(ev['metrics']['greedy'].get('f1'))}{held})")
        rows.sort(key=lambda r: (r[0] != "base", r[0]))
        if base_ev:
            for name, m in base_ev.get("baselines", {}).items():
                # on the questions the models were scored on (in an evaluation older than n_scored: on all)
                rows.append([f"baseline: {name.replace('_', ' ')}"] + [_f(m.get(k)) for k, _ in cols]
                            + [_scored(m, base_ev["n_examples"])])
        doc.h(3, task)
        if not rows:
            doc.p("No model evaluated yet.")
            continue
        doc.table(["model"] + [c for _, c in cols] + ["examples"], rows)
        if base_ev and "config" in base_ev:
            dc = base_ev["config"]["data"]
            n_len = dc["max_seq_len"] if dc.get("eval_max_seq_len") is None else dc["eval_max_seq_len"]
            policy = (f"Length policy: {dc['max_seq_len']} tokens for training and evaluation alike"
                      if n_len == dc["max_seq_len"] else
                      f"Length policy: {dc['max_seq_len']} tokens in training, {n_len} in evaluation")
            skipped = base_ev["metrics"].get("skipped_too_long")
            rule = _task_rule(task)
            doc.p(policy + (f" (a longer training context is {rule})" if rule != "skipped" else "")
                  + (f"; {skipped} evaluation prompt(s) longer than that were skipped." if skipped else "."))
        if calibrated:
            doc.p(f"When each model abstains, tuned for the best F1 on {n_cal} held-out questions that share "
                  f"no paragraph with the evaluated ones (margin: logit of the no-answer string's first token "
                  f"over the best other first token, where 0 is greedy decoding's own choice; answer NLL: "
                  f"negative log-likelihood of the model's own answer, in nats): "
                  + "; ".join(calibrated) + ".")


def _drift_section(doc: Doc, layout: RunLayout, tasks: list[str], verdict: dict[str, Any] | None = None) -> None:
    """Drift per model and task, its figures and the per-measure sensitivity table. `verdict`: the study's, whose
    (2a) the sensitivity paragraph names where the drift rule alone says otherwise."""
    doc.h(2, "Drift of the hidden states")
    for task in tasks:
        d = _load(layout.drift(task) / "drift.json")
        if not d:
            continue
        doc.h(3, task)
        note = interim_note(layout, task, "drift")
        if note:
            doc.p(note)
        rows = []
        for name, m in d["summary"]["per_model"].items():
            tc, ec = m["token_cka_drift"], m.get("example_cka_drift", {})
            rows.append([name, f"{tc['value']:.2e} [{tc['ci_low']:.2e}, {tc['ci_high']:.2e}]",
                         _f(ec.get("value"), ".2e"), _f(m.get("cosine_drift", {}).get("value"), ".4f")])
        doc.table(["model", "1 - token CKA (mean over layers) [95% CI]", "1 - example CKA", "1 - cosine"], rows)
        groups = (d.get("config") or {}).get("jackknife_groups")
        doc.p(f"{d['n_examples']} held-out prompts, {d['n_tokens']} tokens; states: embedding and each decoder "
              f"layer ({'the last includes' if d.get('final_norm_included') else 'before'} the final norm). Each "
              f"model's interval: delete-a-group jackknife over the prompts"
              + (f" ({groups} groups)" if groups else "") + ", this model (one seed) against the base model; "
              "the seeds' spread enters only the ratio's interval below.")
        doc.fig(layout.drift(task) / "cka_vs_layer.png", f"{task}: linear CKA with the base model per layer")
        doc.fig(layout.drift(task) / "cosine_vs_layer.png", f"{task}: cosine similarity with the base per layer")
        drift_sensitivity(doc, d, layout.drift(task), ((verdict or {}).get("tasks", {}).get(task) or {}).get("drift"))


def _weights_section(doc: Doc, layout: RunLayout, tasks: list[str]) -> None:
    """Weight-update spectra per model and module type."""
    doc.h(2, "Weight space")
    for task in tasks:
        w = _load(layout.weights(task) / "weights.json")
        if not w:
            continue
        doc.h(3, task)
        note = interim_note(layout, task, "weights")
        if note:
            doc.p(note)
        rows = []
        for model, per in w["summary"].items():
            for mt, s in per.items():
                rows.append([model, mt, _f(s["fro_norm_mean"], ".3f"), _f(s["effective_rank_mean"]),
                             _f(s["stable_rank_mean"], ".2f"), _f(s["top8_energy_mean"], ".2f"),
                             str(s["intruders_total"])])
        doc.table(["model", "module", "||dW||_F (mean over layers)", "effective rank (mean)", "stable rank (mean)",
                   "top-8 energy (mean)", "intruders (sum over layers)"], rows)
        methods = w.get("methods") or {}
        if methods:
            doc.p("dW: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in methods.items()) + ". One model "
                  "(one seed) each; no interval.")
        doc.fig(layout.weights(task) / "weight_spectra.png", f"{task}: singular value spectra of the updates")


def _forgetting_section(doc: Doc, layout: RunLayout, tasks: list[str], cfg: dict[str, Any]) -> None:
    """Each tuned model scored on the other tasks, beside its drift on its own task."""
    if cfg.get("forgetting"):
        doc.h(2, "Forgetting: each tuned model on the other tasks")
        rows = []
        for task in tasks:
            metric = primary(task)[0]
            base_ev = _load(layout.eval(task, "base"))
            for f in sorted(layout.eval_dir(task).glob("*.*.json")):
                if f.name.endswith(".predictions.json"):
                    continue
                ev = _load(f)
                trained_on, name = f.stem.split(".", 1)
                d = _load(layout.drift(trained_on) / "drift.json")
                drift = d["summary"]["per_model"].get(name, {}).get("token_cka_drift", {}).get("value") if d else None
                b = base_ev["metrics"][metric] if base_ev else None
                v = ev["metrics"][metric]
                rows.append([f"{name} (trained on {trained_on})", f"{task} {metric}", _f(v),
                             _f(None if b is None else v - b, "+.1f"), _f(drift, ".2e")])
        doc.table(["model", "evaluated on", "score", "change vs base", "drift on its own task"], rows)


def _serving_section(doc: Doc, layout: RunLayout) -> None:
    """Per serving benchmark: the closed batches, open loop and time split when measured, agreement, memory."""
    serve_dirs = [d / "serve.json" for d in layout.serve_dirs()]
    if serve_dirs:
        doc.h(2, "Serving: merged vs unmerged adapters")
        for sf in serve_dirs:
            s = _load(sf)
            doc.h(3, f"{sf.parent.name} ({s['settings']['engine']})")
            rows = [[r["config"], str(r["batch_size"]), str(r.get("samples", "")), _f(r["tokens_per_second"]),
                     _serve_tail(r), _f(r["ttft_p50_s"], ".3f"), _serve_ov(r, "overhead"),
                     _serve_ov(r, "ttft_overhead"), _serve_ov(r, "tpot_overhead"), _pct(r["expected_overhead_flops"]),
                     _f(r.get("peak_pss_mib") or r["peak_rss_mib"], ".0f")] for r in s["summary"]["rows"]]
            doc.table(["config", "batch", "requests timed", "tokens/s", "p95 latency s", "TTFT p50 s",
                       "end-to-end overhead [95% CI]", "TTFT (prefill) overhead", "TPOT (decode) overhead",
                       "FLOP limit", "peak PSS MiB"], rows)
            n_rounds = s["settings"].get("batches") or s["settings"].get("repetitions")
            doc.p(f"Overheads vs merged: median over {n_rounds} rounds per batch size in which merged and unmerged "
                  f"ran back to back on the same prompts (engines warm side by side, arms alternating), with a "
                  f"distribution-free 95% interval of the median. End to end: time per output token including "
                  f"prefill; TTFT: time to first token (prefill); TPOT: time per output token after the first "
                  f"(decode). A p95 is shown only from 20 requests on (else the max, marked). Engine mode: "
                  f"{(s.get('eager') or {}).get('reason', 'not recorded')}.")
            _open_loop_and_time_split(doc, s)
            for w in s["summary"].get("warnings", []):
                doc.p(f"Caution: {w}")
            ag = [f"{k}: {v['identical']}/{v['n']} identical" for k, v in s["summary"]["agreement"].items() if v]
            if ag:
                doc.p("Greedy output agreement: " + "; ".join(ag) + ".")
            mem = s["summary"]["memory"]
            if "merged_alternative_mib" in mem:
                doc.p(f"Memory (peak PSS over the run, MiB = 2^20 bytes): all adapters in one engine "
                      f"{mem['multi']['peak_pss_mib']:.0f} MiB vs the merged alternative "
                      f"{mem['merged_alternative_mib']:.0f} MiB ({mem['merged_alternative_rule']}).")
            bd = [[n, *(_f(m["breakdown_mib"][k], ".0f") for k in ("weights", "adapters", "kv_cache_reserved",
                                                                  "engine_runtime", "total_peak_pss"))]
                  for n, m in mem.items() if isinstance(m, dict) and "breakdown_mib" in m]
            if bd:
                doc.table(["config", "weights MiB", "adapters MiB", "KV cache reserved MiB", "engine runtime MiB",
                           "peak PSS MiB"], bd)
            for fig, cap in (("serve_throughput.png", "output tokens/s vs batch size"),
                             ("serve_latency_p95.png", "p95 latency vs batch size"),
                             ("serve_memory.png", "memory per configuration"),
                             ("serve_open_loop.png", "open loop: latency against offered load")):
                doc.fig(sf.parent / fig, f"{sf.parent.name}: {cap}")
            for f in s["summary"]["failed"]:
                doc.p(f"Failed configuration: {f['error']}")


def _open_loop_and_time_split(doc: Doc, s: dict[str, Any]) -> None:
    """The open-loop rows (latency against offered load) and the time split, where the benchmark measured them."""
    rows = [[r["config"], _f(r["offered_rate"], ".3g"), _f(r["completed_rate"], ".3g"), str(r["samples"]),
             _f(r["latency_p50_s"], ".3f"), _serve_tail(r), _f(r["ttft_p50_s"], ".3f"), _f(r["tpot_p50_s"], ".4f"),
             _pct(r.get("latency_p50_overhead")) if r.get("latency_p50_overhead") is not None else "-",
             "no (saturated)" if r["saturated"] else "yes"] for r in s["summary"].get("open_loop") or []]
    if rows:
        doc.p("Open loop: requests arriving as a Poisson process at each offered rate (the same prompts and arrival "
              "times for every configuration); latencies count from each request's scheduled arrival. One run per "
              "rate: no interval.")
        doc.table(["config", "offered req/s", "completed req/s", "requests", "p50 latency s", "p95 latency s",
                   "TTFT p50 s", "TPOT p50 s", "p50 overhead vs merged", "kept up"], rows)
    split = s["summary"].get("time_split") or []
    if split:
        doc.p(f"Where the time goes: one prefill and one decode step per configuration, timers around the modules "
              f"(the repetition with the median total of {split[0]['reps']}). The LoRA share of the step far above "
              f"the FLOP limit means the unmerged overhead is implementation, not arithmetic.")
        doc.table(["config", "batch", "phase", "total s", "base matmuls s", "LoRA ops s", "rest s", "LoRA share",
                   "overhead vs merged", "FLOP limit"],
                  [[r["config"], str(r["batch_size"]), r["phase"], _f(r["total_s"], ".4f"),
                    _f(r["base_matmul_s"], ".4f"), _f(r["lora_s"], ".4f"), _f(r["other_s"], ".4f"),
                    f"{r['lora_share']:.1%}", _pct(r["overhead"]) if r["overhead"] is not None else "-",
                    f"{r['flop_limit']:+.1%}" if r["flop_limit"] is not None else "-"] for r in split])


def _rank_section(doc: Doc, layout: RunLayout, study: dict[str, Any], tasks: list[str]) -> None:
    """Accuracy, drift and serving overhead per LoRA rank, when the study swept ranks."""
    if len(study["ranks"]) > 1:
        doc.h(2, "Rank sweep")
        rows = []
        for r in study["ranks"]:
            for task in tasks:
                metric = primary(task)[0]
                names = [trained_name("lora", r, s) for s in seeds_of(study, task)]
                evs = [_load(layout.eval(task, n)) for n in names]
                acc = [e["metrics"][metric] for e in evs if e]
                d = _load(layout.drift(task) / "drift.json")
                dv = [d["summary"]["per_model"].get(n, {}).get("token_cka_drift", {}).get("value")
                      for n in names] if d else []
                dv = [x for x in dv if x is not None]
                s_ = _load(layout.serve(r) / "serve.json")
                ov = [x["overhead"] for x in s_["summary"]["rows"]
                      if s_ and x["config"] == f"unmerged:{task}" and x["overhead"] is not None] if s_ else []
                rows.append([str(r), task, _f(sum(acc) / len(acc) if acc else None),
                             _f(sum(dv) / len(dv) if dv else None, ".2e"),
                             _pct(max(ov)) if ov else "-"])
        doc.table(["rank", "task", "primary metric (mean over seeds)", "drift", "worst serving overhead"], rows)


def _environment_section(doc: Doc, study: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Versions, git state, hardware and the whole configuration."""
    doc.h(2, "Environment")
    prov = study["provenance"]
    doc.pre(json.dumps({"versions": prov["versions"], "git": prov["git"], "hardware": prov["hardware"]}, indent=2))
    doc.pre(json.dumps({"study": cfg, "base_config": study["base_config"], "ranks": study["ranks"],
                        "seeds": study["seeds"], "task_seeds": study.get("task_seeds")}, indent=2))


def _near(x: float, threshold: float) -> str:
    """Two decimals, or three where two would round onto the threshold (0.803 is not 0.80 against 0.8)."""
    two = f"{x:.2f}"
    return f"{x:.3f}" if float(two) == round(threshold, 2) and x != threshold else two


def drift_sensitivity(doc: Doc, d: dict[str, Any], folder: Path, decided: dict[str, Any] | None = None) -> None:
    """Criterion 2a per drift measure, the seed noise floor, the token selection and the diagnostics figure.
    `decided`: the verdict's (2a) of this task, which also asks that both models learned the task (and that the
    study's parts are all in): where it differs from the drift rule alone, the paragraph says so."""
    from lorascope.drift.criterion import LABELS, judge_drift

    sel = d.get("selection")
    if sel:
        kept = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sel["kept_by_kind"].items() if v)
        dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sel["dropped_by_kind"].items() if v)
        doc.p(f"Tokens measured ({sel['tokens']}): {kept}; left out: {dropped or 'none'}"
              + (f"; {sel['skipped_prompts']} prompt(s) skipped (no content token left after truncation)"
                 if sel.get("skipped_prompts") else "") + ".")
    summary = d["summary"]
    tokens = (sel or {}).get("tokens", "content")
    for c, m in zip(summary.get("criterion_2a", []), summary.get("method_ratios", [])):
        if c.get("primary", "token_cka") in m:  # judged again by this lorascope, as the verdict does
            c = {**c, **judge_drift(m, threshold=c.get("threshold", 0.8), primary=c.get("primary", "token_cka"),
                                    tokens=tokens)}
        other_rank = decided is not None and decided.get("lora", c["lora"]) != c["lora"]
        differs = decided is not None and decided.get("status") != c["status"]
        if other_rank:  # the verdict is about another rank: this pair's rule result, not in bold
            judged = f", the drift rule alone (the verdict judges {decided['lora']}): {c['status']}: {c['reason']}"
        elif differs:
            judged = (f", the drift rule alone: {c['status']}: {c['reason']}. The verdict's (2a) is "
                      f"**{decided['status']}**: {decided['reason']}")
        else:
            judged = f": **{c['status']}**: {c['reason']}"
        doc.p(f"Criterion 2a, {c['lora']} vs {c['full']} ({len(m['lora_seeds'])} and {len(m['full_seeds'])} "
              f"seed(s))" + judged + "."
              + (f" Apart from the noise floor, the interval and the measures alone give "
                 f"{c['without_floor']['status']}: {c['without_floor']['reason']}." if c.get("without_floor") else ""))
        rows = []
        for r in c["rows"]:
            mr = m.get(r["measure"], {})
            t = c["threshold"]
            ci = "" if r["ci_low"] is None else f" [{_near(r['ci_low'], t)}, {_near(r['ci_high'], t)}]"
            rows.append([r.get("label", LABELS.get(r["measure"], r["measure"]))
                         + (" (primary)" if r["measure"] == c["primary"] else ""),
                         _f(mr.get("lora_drift"), ".3g"), _f(mr.get("full_drift"), ".3g"),
                         ("n/a" if r["ratio"] is None else _near(r["ratio"], c["threshold"])) + ci,
                         {True: "yes", False: "no", None: "n/a"}[r["meets"]],
                         {True: "yes", False: "no", None: "n/a"}[r["confident"]]])
        doc.table(["drift measure", "LoRA drift", "full drift", "ratio LoRA / full (95%)",
                   f"ratio <= {c['threshold']:g}", "whole interval <= threshold"], rows)
        for method, floor in (m.get("noise_floor") or {}).items():
            v = floor.get(c["primary"], {})
            doc.p(f"Noise floor of {method}: drift between its seeds {', '.join(floor['seeds'])} "
                  f"({LABELS[c['primary']]}) {_f(v.get('value'), '.3g')}.")
    pooled = (d.get("methods") or {}).get("pooled")
    if pooled:  # study.drift.per_model: say how the models were measured, and which seed pairs give the floor
        doc.p(f"Measured in parts: {pooled}.")
    if (folder / "ratio_vs_layer.png").is_file():
        pair = next(iter(summary.get("ratios") or []), None)  # what plot_ratio_by_layer draws
        pooled_seeds = [(len(x.get("lora_seeds", [])), len(x.get("full_seeds", [])))
                        for x in summary.get("method_ratios", [])]
        several = any(a > 1 or b > 1 for a, b in pooled_seeds)
        doc.fig(folder / "ratio_vs_layer.png", "drift ratio LoRA / full per layer, for every measure"
                + (f" ({pair['lora']} / {pair['full']}" + (
                    f": one checkpoint pair; criterion 2a pools {pooled_seeds[0][0]} and {pooled_seeds[0][1]} "
                    f"seed(s)" if several else "") + ")" if pair else ""))
    if (folder / "diagnostics.png").is_file():
        doc.fig(folder / "diagnostics.png", "why token statistics over all tokens mislead: the base model's Gram "
                                            "energy by token kind, and the variance share of the largest features")
    if (folder / "along" / "drift_along.png").is_file():
        doc.fig(folder / "along" / "drift_along.png", "drift along training, against step and against the "
                                                       "validation metric")
