"""Every command on bad input: exit status and the one line it prints.

    python benchmarks/bad_inputs.py --out results/reliability/bad_inputs

Builds a tiny random Llama, a small data folder and broken variants of configs, data
files, adapters and run folders, then runs `lorascope COMMAND ...` on each case and
records the exit status and the last line of stderr. A case passes when the status is
the expected one (2 for bad input, 1 for an environment failure such as a full disk) and
the output holds no traceback. By default each case runs in this process through
lorascope.cli.main (the function `python -m lorascope` exits with), which is fast;
--subprocess runs each as a real `python -m lorascope` process.

Writes OUT.json and OUT.md; exits 1 if any case fails. tests/test_reliability.py runs the
same cases in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


class Fixtures:
    """Small, valid inputs that each case breaks in one way."""

    def __init__(self, root: Path):
        from lorascope.models import build_tiny_llama

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.model = build_tiny_llama(root / "model", vocab_size=400)
        self.narrow = build_tiny_llama(root / "narrow", vocab_size=400, hidden=32, heads=2, kv_heads=1)
        self.data = root / "data"
        (self.data / "mrpc").mkdir(parents=True, exist_ok=True)
        (self.data / "squad_v2").mkdir(exist_ok=True)
        for split, k0 in (("train", 0), ("dev", 1000)):  # no pair in both splits (the leakage check refuses that)
            rows = [f"{i % 2}\t{100 + k0 + i}\t{200 + k0 + i}\tThe firm said {k0 + i} rose.\tProfits rose {k0 + i}."
                    for i in range(24)]
            (self.data / "mrpc" / f"{split}.tsv").write_text("\n".join([MRPC_HEADER, *rows]) + "\n")
        self.squad = self.squad_articles()
        (self.data / "squad_v2" / "dev-v2.0.json").write_text(json.dumps({"version": "v2.0", "data": self.squad}))
        self.adapter = self.make_adapter(self.model, root / "adapter")
        self.narrow_adapter = self.make_adapter(self.narrow, root / "narrow_adapter")

    @staticmethod
    def squad_articles() -> list:
        arts = []
        for a in range(6):
            ctx = f"Article {a} says that the river Alpha{a} flows through the city of Beta{a}."
            qas = [{"id": f"q{a}_0", "question": f"Which city does Alpha{a} flow through?", "is_impossible": False,
                    "answers": [{"text": f"Beta{a}", "answer_start": ctx.index(f"Beta{a}")}]},
                   {"id": f"q{a}_1", "question": f"Who founded Gamma{a}?", "answers": [], "is_impossible": True}]
            arts.append({"title": f"T{a}", "paragraphs": [{"context": ctx, "qas": qas}]})
        return arts

    @staticmethod
    def make_adapter(base: Path, out: Path) -> Path:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
        pm.save_pretrained(out)
        return out

    def dir(self, name: str) -> Path:
        d = self.root / "cases" / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def data_with(self, name: str, squad: list | None = None, mrpc_train: bytes | None = None) -> Path:
        d = self.dir(name) / "data"
        shutil.copytree(self.data, d)
        if squad is not None:
            (d / "squad_v2" / "dev-v2.0.json").write_text(json.dumps({"version": "v2.0", "data": squad}))
        if mrpc_train is not None:
            (d / "mrpc" / "train.tsv").write_bytes(mrpc_train)
        return d

    def adapter_copy(self, name: str, src: Path | None = None) -> Path:
        d = self.dir(name) / "adapter"
        shutil.copytree(src or self.adapter, d)
        return d

    def config(self, name: str, text: str) -> Path:
        p = self.dir(name) / "config.yaml"
        p.write_text(text)
        return p


def _squad_edit(fx: Fixtures, fn: Callable[[list], None]) -> list:
    arts = json.loads(json.dumps(fx.squad))
    fn(arts)
    return arts


def _negative_answer_start(arts: list) -> None:
    _qa(arts)["answers"][0].update(answer_start=-3)


def _qa(arts, a=0, q=0):
    return arts[a]["paragraphs"][0]["qas"][q]


def _truncate(p: Path, keep: float = 0.5) -> None:
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])


# (command, what is wrong, expected exit, build argv) -------------------------------------


def cases(fx: Fixtures) -> list[tuple[str, str, int, Callable[[], list[str]]]]:
    m, d = str(fx.model), str(fx.data)

    counter = iter(range(1000))

    def train(data: Path | str = d, task: str = "mrpc", *extra: str) -> list[str]:
        out = fx.root / "cases" / f"train-out-{next(counter)}"  # a folder per case: each meets its own problem
        return ["train", "--model", m, "--data-dir", str(data), "--task", task, "--method", "lora",
                "--set", "train.max_steps=1", *extra, "--output-dir", str(out)]

    def evaluate(ck: Path | str, task: str = "mrpc") -> list[str]:
        return ["eval", "--model", m, "--data-dir", d, "--task", task, "--checkpoint", str(ck),
                "--set", "data.max_eval_examples=4", "--output", str(fx.root / "cases" / "eval-out.json")]

    def drift(tuned: str) -> list[str]:
        return ["drift", "--base", m, "--data-dir", d, "--tuned", tuned, "--max-examples", "4",
                "--output-dir", str(fx.root / "cases" / "drift-out")]

    def weights(tuned: str) -> list[str]:
        return ["weights", "--base", m, "--tuned", tuned, "--output-dir", str(fx.root / "cases" / "weights-out")]

    def serve(*extra: str, adapter: Path | None = None) -> list[str]:
        return ["serve-bench", "--engine", "transformers", "--base", m, "--data-dir", d, "--batch-sizes", "1",
                "--output-tokens", "2", "--repetitions", "1", "--adapter", f"mrpc={adapter or fx.adapter}",
                "--output-dir", str(fx.root / "cases" / "serve-out"), *extra]

    def run(cfg_text: str, name: str, *extra: str) -> list[str]:
        return ["run", str(fx.config(name, cfg_text)), "--run-dir", str(fx.root / "cases" / name / "run"), *extra]

    mini = f"model:\n  name: {m}\ndata:\n  dir: {d}\nstudy:\n  tasks: [mrpc]\n  serve: false\n"

    def corrupt_adapter(name):
        a = fx.adapter_copy(name)
        _truncate(a / "adapter_model.safetensors", 0.7)
        return a

    def pickled_adapter(name):
        a = fx.adapter_copy(name)
        (a / "adapter_model.safetensors").unlink()
        (a / "adapter_model.bin").write_bytes(b"\x80\x04\x95garbage pickle")
        return a

    def truncated_full(name):
        dd = fx.dir(name) / "full"
        shutil.copytree(fx.model, dd)
        _truncate(dd / "model.safetensors", 0.5)
        return dd

    def held(name):
        folder = fx.root / "cases" / name / "run"
        fx.holders.append(_hold(folder))
        return folder

    def held_train():
        folder = fx.root / "cases" / "train-held"
        fx.holders.append(_hold(folder))
        return folder

    def different_config():
        out = fx.dir("train-other") / "out"
        out.mkdir()
        (out / "run-config.json").write_text(json.dumps({"config_hash": "0" * 16, "config": {"lora": {"rank": 2}}}))
        (out / "checkpoints" / "step-0000002").mkdir(parents=True)  # work of that config, which it protects
        return str(out)

    return [
        # config files and flags (train)
        (
            "train",
            "YAML syntax error",
            2,
            lambda: [
                "train",
                "--config",
                str(fx.config("yaml", "train:\n  lr: [1e-4\n")),
                "--model",
                m,
                "--data-dir",
                d,
            ],
        ),
        (
            "train",
            "train.epochs: .nan",
            2,
            lambda: [
                "train",
                "--config",
                str(fx.config("nan", "train:\n  epochs: .nan\n")),
                "--model",
                m,
                "--data-dir",
                d,
            ],
        ),
        ("train", "train.lr: .inf", 2, lambda: train(d, "mrpc", "--set", "train.lr=.inf")),
        ("train", "unknown field train.lrr", 2, lambda: train(d, "mrpc", "--set", "train.lrr=1e-4")),
        ("train", "train.batch_size=abc", 2, lambda: train(d, "mrpc", "--set", "train.batch_size=abc")),
        ("train", "config file missing", 2, lambda: ["train", "--config", "/nonexistent/x.yaml"]),
        (
            "train",
            "config file not UTF-8",
            2,
            lambda: ["train", "--config", str(_bytes(fx, "cfgbin", b"\xff\xfe\x00x"))],
        ),
        ("train", "output folder held by another process", 2, lambda: train(d, "mrpc")[:-1] + [str(held_train())]),
        ("train", "output folder of another config", 2, lambda: train(d, "mrpc")[:-1] + [different_config()]),
        # data files
        (
            "train",
            "MRPC train.tsv in UTF-16",
            2,
            lambda: train(fx.data_with("utf16", mrpc_train=(MRPC_HEADER + "\n1\t1\t2\ta\tb\n").encode("utf-16"))),
        ),
        (
            "train",
            "MRPC train.tsv binary with NUL bytes",
            2,
            lambda: train(fx.data_with("nul", mrpc_train=MRPC_HEADER.encode() + b"\n1\t1\t2\ta\x00b\tc\n")),
        ),
        ("train", "MRPC wrong columns", 2, lambda: train(fx.data_with("cols", mrpc_train=b"a\tb\n1\t2\n"))),
        (
            "train",
            "MRPC label 2",
            2,
            lambda: train(fx.data_with("label", mrpc_train=(MRPC_HEADER + "\n2\t1\t2\ta\tb\n").encode())),
        ),
        (
            "train",
            "MRPC duplicate pair id",
            2,
            lambda: train(fx.data_with("dup", mrpc_train=(MRPC_HEADER + "\n1\t1\t2\ta\tb\n0\t1\t2\tc\td\n").encode())),
        ),
        (
            "train",
            "SQuAD answer_start beyond the context",
            2,
            lambda: train(
                fx.data_with("oob", squad=_squad_edit(fx, lambda a: _qa(a)["answers"][0].update(answer_start=10_000))),
                "squad_v2",
            ),
        ),
        (
            "train",
            "SQuAD answer_start as a string",
            2,
            lambda: train(
                fx.data_with("str", squad=_squad_edit(fx, lambda a: _qa(a)["answers"][0].update(answer_start="41"))),
                "squad_v2",
            ),
        ),
        (
            "train",
            "SQuAD answer_start not at the answer text",
            2,
            lambda: train(
                fx.data_with("off", squad=_squad_edit(fx, lambda a: _qa(a)["answers"][0].update(answer_start=0))),
                "squad_v2",
            ),
        ),
        (
            "train",
            "SQuAD duplicate question id",
            2,
            lambda: train(
                fx.data_with("qdup", squad=_squad_edit(fx, lambda a: _qa(a, 1).update(id="q0_0"))), "squad_v2"
            ),
        ),
        (
            "train",
            "SQuAD is_impossible with answers",
            2,
            lambda: train(
                fx.data_with("imp", squad=_squad_edit(fx, lambda a: _qa(a).update(is_impossible=True))), "squad_v2"
            ),
        ),
        ("train", "SQuAD file truncated JSON", 2, lambda: train(_trunc_squad(fx), "squad_v2")),
        # eval
        ("eval", "checkpoint folder missing", 2, lambda: evaluate("/nonexistent/ck")),
        ("eval", "adapter safetensors truncated", 2, lambda: evaluate(corrupt_adapter("ev-corrupt"))),
        ("eval", "adapter of another width", 2, lambda: evaluate(fx.narrow_adapter)),
        ("eval", "pickled adapter (.bin)", 2, lambda: evaluate(pickled_adapter("ev-bin"))),
        ("eval", "unknown task", 2, lambda: evaluate(fx.adapter, "mrcp")),
        # score
        (
            "score",
            "predictions not JSON",
            2,
            lambda: [
                "score",
                "squad_v2",
                "--data",
                str(fx.data / "squad_v2" / "dev-v2.0.json"),
                "--predictions",
                str(_bytes(fx, "pred", b"{not json")),
            ],
        ),
        (
            "score",
            "prediction not a string",
            2,
            lambda: [
                "score",
                "squad_v2",
                "--data",
                str(fx.data / "squad_v2" / "dev-v2.0.json"),
                "--predictions",
                str(_bytes(fx, "pred2", b'{"q0_0": 3}')),
            ],
        ),
        (
            "score",
            "data file missing",
            2,
            lambda: [
                "score",
                "squad_v2",
                "--data",
                "/nonexistent.json",
                "--predictions",
                str(_bytes(fx, "pred3", b"{}")),
            ],
        ),
        # summary
        ("summary", "not a metrics file", 2, lambda: ["summary", str(_bytes(fx, "summ", b'{"a": 1}'))]),
        # drift
        ("drift", "adapter safetensors truncated", 2, lambda: drift(f"x={corrupt_adapter('dr-corrupt')}")),
        ("drift", "adapter of another width", 2, lambda: drift(f"x={fx.narrow_adapter}")),
        ("drift", "--tuned without NAME=", 2, lambda: drift(str(fx.adapter))),
        # weights
        ("weights", "adapter safetensors truncated", 2, lambda: weights(f"x={corrupt_adapter('w-corrupt')}")),
        ("weights", "pickled adapter (.bin)", 2, lambda: weights(f"x={pickled_adapter('w-bin')}")),
        ("weights", "full model with truncated weights", 2, lambda: weights(f"x={truncated_full('w-full')}")),
        ("weights", "adapter of another width", 2, lambda: weights(f"x={fx.narrow_adapter}")),
        # serve-bench
        ("serve-bench", "--batch-sizes 1,x", 2, lambda: serve("--batch-sizes", "1,x")),
        ("serve-bench", "--modes fast", 2, lambda: serve("--modes", "fast")),
        ("serve-bench", "adapter folder missing", 2, lambda: serve(adapter=Path("/nonexistent/adapter"))),
        ("serve-bench", "adapter safetensors truncated", 2, lambda: serve(adapter=corrupt_adapter("sv-corrupt"))),
        ("serve-bench", "adapter of another width", 2, lambda: serve(adapter=fx.narrow_adapter)),
        # run
        ("run", "YAML syntax error", 2, lambda: run("study:\n  tasks: mrpc, squad_v2]\n x: 1\n", "run-yaml")),
        ("run", "unknown task in study.tasks", 2, lambda: run(mini.replace("[mrpc]", "[mrcp]"), "run-task")),
        ("run", "lora.rank list with a string", 2, lambda: run(mini + "lora:\n  rank: [4, x]\n", "run-rank")),
        (
            "run",
            "train.epochs: .inf in study.per_task",
            2,
            lambda: run(mini + "  per_task:\n    mrpc:\n      train:\n        epochs: .inf\n", "run-inf"),
        ),
        ("run", "run folder held by another process", 2, lambda: run(mini, "run-held")[:-1] + [str(held("run-held"))]),
        (
            "run",
            "SQuAD answer_start out of range (checked before any stage)",
            2,
            lambda: run(
                mini.replace(
                    f"dir: {d}",
                    f"dir: {fx.data_with('run-squad-data', squad=_squad_edit(fx, _negative_answer_start))}",
                ).replace("[mrpc]", "[mrpc, squad_v2]"),
                "run-squad",
            ),
        ),
        ("run", "--only of an unknown stage", 2, lambda: run(mini, "run-only", "--only", "trian")),
        # the learning-rate search and seeds (a fair comparison needs the same budget for both methods)
        ("run", "an empty learning-rate list (a search budget of zero)", 2,
         lambda: run(mini + "  tune_lr: true\n  tune_lrs_full: []\n  tune_lrs_lora: []\n", "run-lr-empty")),
        ("run", "a negative learning rate in the search", 2,
         lambda: run(mini + "  tune_lr: true\n  tune_lrs_full: [1.0e-4, -1.0e-3]\n  tune_lrs_lora: [1.0e-4, 1.0e-3]\n",
                     "run-lr-neg")),
        ("run", "more learning rates for one method than the other", 2,
         lambda: run(mini + "  tune_lr: true\n  tune_lrs_full: [1.0e-4]\n  tune_lrs_lora: [1.0e-4, 1.0e-3]\n",
                     "run-lr-budget")),
        ("run", "a search validation share of 1", 2,
         lambda: run(mini + "  tune_lr: true\n  tune_validation_share: 1.0\n", "run-share")),
        ("run", "fewer seeds than study.min_seeds", 2, lambda: run(mini + "  min_seeds: 3\n", "run-seeds")),
        ("train", "a validation share that leaves no training examples", 2,
         lambda: train(d, "mrpc", "--set", "data.validation_share=0.999999")),
        # report, prepare-model
        ("report", "not a run folder", 2, lambda: ["report", str(fx.dir("notrun"))]),
        ("prepare-model", "model folder missing", 2, lambda: ["prepare-model", "--model", "/nonexistent/model"]),
    ]


# a word the message must hold: the case met the problem it is about, not an earlier one
EXPECT = {
    ("train", "YAML syntax error"): "line 3, column",
    ("train", "train.epochs: .nan"): "train.epochs: expected a finite number",
    ("train", "train.lr: .inf"): "train.lr: expected a finite number",
    ("train", "output folder held by another process"): "in use by another lorascope process (pid",
    ("train", "output folder of another config"): "different config",
    ("train", "MRPC train.tsv in UTF-16"): "UTF-16",
    ("train", "MRPC train.tsv binary with NUL bytes"): "contains NUL bytes",
    ("train", "MRPC wrong columns"): "train.tsv: unexpected columns",
    ("train", "MRPC label 2"): "field Quality must be 0 or 1, got '2'",
    ("train", "MRPC duplicate pair id"): "duplicate pair id '1-2'",
    ("train", "SQuAD answer_start beyond the context"): "answers[0].answer_start is 10000, outside the context",
    ("train", "SQuAD answer_start as a string"): "answer_start is '41' (str)",
    ("train", "SQuAD answer_start not at the answer text"): "not the answer text 'Beta0'",
    ("train", "SQuAD duplicate question id"): "duplicate question id",
    ("train", "SQuAD is_impossible with answers"): "is_impossible is true but it has 1 answer",
    ("train", "SQuAD file truncated JSON"): "is not valid JSON",
    ("eval", "adapter safetensors truncated"): "adapter_model.safetensors is unreadable",
    ("eval", "adapter of another width"): "has shapes A [4, 32]",
    ("eval", "pickled adapter (.bin)"): "convert it once with",
    ("drift", "adapter safetensors truncated"): "adapter_model.safetensors is unreadable",
    ("drift", "adapter of another width"): "has shapes A [4, 32]",
    ("weights", "adapter safetensors truncated"): "adapter_model.safetensors is unreadable",
    ("weights", "pickled adapter (.bin)"): "convert it once with",
    ("weights", "full model with truncated weights"): "model.safetensors: not a readable safetensors file",
    ("weights", "adapter of another width"): "(32, 32)",
    ("serve-bench", "adapter safetensors truncated"): "adapter_model.safetensors is unreadable",
    ("serve-bench", "adapter of another width"): "has shapes A [4, 32]",
    ("serve-bench", "adapter folder missing"): "no such directory",
    ("run", "YAML syntax error"): "line 3, column",
    ("run", "run folder held by another process"): "in use by another lorascope process (pid",
    ("run", "train.epochs: .inf in study.per_task"): "expected a finite number",
    ("run", "SQuAD answer_start out of range (checked before any stage)"): "answer_start is -3, outside the context",
    ("run", "an empty learning-rate list (a search budget of zero)"): "study.tune_lrs_full: the search budget is zero",
    ("run", "a negative learning rate in the search"): "study.tune_lrs_full: learning rates must be positive",
    ("run", "more learning rates for one method than the other"): "both methods must get the same search budget",
    ("run", "a search validation share of 1"): "study.tune_validation_share: must be between 0 and 1",
    ("run", "fewer seeds than study.min_seeds"): "but study.min_seeds asks for at least 3",
    ("train", "a validation share that leaves no training examples"): "leaves no",
}


def _bytes(fx: Fixtures, name: str, data: bytes) -> Path:
    p = fx.dir(name) / "file"
    p.write_bytes(data)
    return p


def _trunc_squad(fx: Fixtures) -> Path:
    d = fx.data_with("trunc")
    _truncate(d / "squad_v2" / "dev-v2.0.json", 0.6)
    return d


def _hold(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from lorascope.locking import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(900)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert p.stdout.readline().strip() == "held"
    return p


def run_case(argv: list[str], in_process: bool = True) -> tuple[int, str]:
    """(exit status, stderr) of `lorascope ARGV`."""
    if not in_process:
        r = subprocess.run([sys.executable, "-m", "lorascope", *argv], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=600)
        return r.returncode, r.stderr
    from lorascope.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    return code, err.getvalue()


def judge(expected: int, code: int, stderr: str) -> tuple[bool, str]:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("lorascope: error:") or ln.startswith("lorascope: ")
              or "error:" in ln]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    ok = code == expected and "Traceback" not in stderr and bool(errors)
    return ok, line


def run_all(root: Path, in_process: bool = True, log=print) -> list[dict]:
    fx = Fixtures(root)
    fx.holders = []
    out = []
    try:
        for command, what, expected, build in cases(fx):
            argv = build()
            code, stderr = run_case(argv, in_process)
            ok, line = judge(expected, code, stderr)
            expect = EXPECT.get((command, what))
            if expect and expect not in line:
                ok = False
            out.append({"command": command, "case": what, "expected": expected, "exit": code, "ok": ok,
                        "message": line, "traceback": "Traceback" in stderr})
            log(f"{'ok  ' if ok else 'FAIL'} {command:13s} {what:45s} exit {code}: {line[:160]}")
    finally:
        for p in fx.holders:
            p.send_signal(signal.SIGKILL)
            p.wait()
    return out


def to_markdown(rows: list[dict]) -> str:
    n_ok = sum(r["ok"] for r in rows)
    lines = [
        f"# Bad input, every command: {n_ok} of {len(rows)} cases as expected",
        "",
        "Produced by `python benchmarks/bad_inputs.py` (each case through lorascope.cli.main, the function "
        "`python -m lorascope` exits with). Paths under the scratch folder are shortened to `…/`.",
        "",
        "| # | command | bad input | exit | expected | message (last line of stderr) |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        msg = r["message"].replace("|", "\\|")
        lines.append(f"| {i} | {r['command']} | {r['case']} | {r['exit']} | {r['expected']} | {msg} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bad_inputs", help="scratch folder (recreated)")
    ap.add_argument("--out", default="results/reliability/bad_inputs", help="writes OUT.json and OUT.md")
    ap.add_argument("--subprocess", action="store_true", help="run each case as `python -m lorascope`")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    rows = run_all(work, in_process=not args.subprocess)
    for r in rows:
        r["message"] = r["message"].replace(str(work), "…")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rows))
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} cases as expected")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
