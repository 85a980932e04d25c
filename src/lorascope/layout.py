"""The run folder of `lorascope run`, written down once: the planner, the verdict and the report use it.

    RUN/
      study.json, run.log, stages/STAGE.json      the plan and each stage's record
      tune/TASK/METHOD/tune.json                   learning-rate search (every trial)
      train/TASK/MODEL/model/                      trained weights (MODEL: full_s0, lora_r8_s0, ...)
      eval/TASK/MODEL.json                         metrics on TASK (+ MODEL.predictions.json)
      eval/TASK/base.json                          the zero-shot base model
      eval/TASK/TRAIN_TASK.MODEL.json              forgetting: a model trained on TRAIN_TASK, scored on TASK
      drift/TASK/drift.json                        drift of every model of TASK (+ csv, figures)
      drift-models/TASK/MODEL/                     study.drift.per_model: one model's drift, pooled into drift/TASK
      drift-models/TASK/noise_METHOD/              ... and two seeds of a method (the seed noise floor)
      weights/TASK/weights.json                    weight-update spectra
      weights-models/TASK/MODEL/                   study.drift.per_model: one model's, pooled into weights/TASK
      serve/rRANK/serve.json                       serving benchmark of the rank-RANK adapters
      report/                                      report.md, index.html, verdict.json, figures/ (+ interim/:
                                                   a study in parts, its drift and weights pooled so far)

The result JSON formats are documented where they are written: eval (lorascope.evaluate),
drift (lorascope.drift.measure), serve (lorascope.serve.bench), verdict (lorascope.report.verdict).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def trained_name(method: str, rank: int | None, seed: int) -> str:
    """The name of a trained model in the run folder: full_s{seed} or lora_r{rank}_s{seed}."""
    return f"full_s{seed}" if method == "full" else f"lora_r{rank}_s{seed}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def study_file(self) -> Path:
        return self.root / "study.json"

    @property
    def log_file(self) -> Path:
        return self.root / "run.log"

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage.replace(':', '__')}.json"

    @property
    def digests_file(self) -> Path:
        return self.root / "stages" / ".file-digests.json"

    def tune(self, task: str, method: str) -> Path:
        return self.root / "tune" / task / method

    def tune_dir(self, task: str) -> Path:
        return self.root / "tune" / task

    def train(self, task: str, name: str) -> Path:
        return self.root / "train" / task / name

    def model(self, task: str, name: str) -> Path:
        return self.train(task, name) / "model"

    def eval_dir(self, task: str) -> Path:
        return self.root / "eval" / task

    def eval(self, task: str, name: str, trained_on: str | None = None) -> Path:
        """Metrics of model `name` on `task`; `trained_on` another task: the forgetting evaluation."""
        label = name if trained_on in (None, task) else f"{trained_on}.{name}"
        return self.eval_dir(task) / f"{label}.json"

    def drift(self, task: str) -> Path:
        return self.root / "drift" / task

    def drift_part(self, task: str, name: str) -> Path:
        """Drift of one model (or of two seeds: noise_METHOD) when study.drift.per_model measures them one by one."""
        return self.root / "drift-models" / task / name

    def weights(self, task: str) -> Path:
        return self.root / "weights" / task

    def weights_part(self, task: str, name: str) -> Path:
        return self.root / "weights-models" / task / name

    def serve(self, rank: int) -> Path:
        return self.root / "serve" / f"r{rank}"

    def serve_dirs(self) -> list[Path]:
        d = self.root / "serve"
        return sorted(p.parent for p in d.glob("r*/serve.json")) if d.is_dir() else []

    @property
    def report(self) -> Path:
        return self.root / "report"
