"""`lorascope run CONFIG`: the whole study, stage by stage, in one run directory.

Stages, in order (each one function call of an existing command):
  prepare                      resolve / convert the base model
  tune:TASK:METHOD             learning-rate search per task and method on a validation split
                               carved from the training side (study.tune_lr; lorascope.tune)
  train:TASK:MODEL             full fine-tuning and LoRA per rank and seed (lorascope train)
  eval:TASK:MODEL              base, full and LoRA on each task, and every tuned model on the
                               other tasks (forgetting) (lorascope eval)
  drift:TASK                   hidden-state drift of every tuned model of a task (lorascope drift)
  weights:TASK                 weight-space analysis of their updates (lorascope weights)
                               with study.drift.per_model, both per model (drift:TASK:MODEL,
                               drift:TASK:MODEL+MODEL for a method's last two seeds, weights:TASK:MODEL)
                               and pooled (drift:TASK, weights:TASK; lorascope.drift.combine_drift)
  serve:rRANK                  the tasks' LoRA adapters served merged vs unmerged (lorascope serve-bench)
  report                       report/index.html and report/report.md (lorascope report)

Each stage records a hash of what it depends on (its config and the hashes of the stages
it reads) in RUN/stages/STAGE.json, written last. A rerun skips a stage whose record
matches, redoes one whose inputs changed (its old outputs are removed first, so nothing
stale is reused), and resumes an interrupted training from its last checkpoint. A stage that
`lorascope archive` kept without its weights counts as done and hashes what reads it with the
digest its files had (lorascope.archive).

The config is an ordinary lorascope YAML (sections model, data, lora, train, eval) with
`lora.rank` and `train.seed` allowed to be lists (a sweep), plus a `study` section; see
StudyArgs and configs/quick.yaml.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.config import Config, apply_mapping, coerce, did_you_mean
from lorascope.drift.measure import DriftSettings
from lorascope.layout import RunLayout, trained_name
from lorascope.runinfo import provenance, write_json
from lorascope.serve.bench import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class StudyDrift(DriftSettings):
    """study.drift: the drift and weight-space stages. Every `lorascope drift` setting (same names, defaults
    and help), plus whether the stages run and for which tasks; `study.drift: false` is short for
    `{enabled: false}`."""

    enabled: bool = field(default=True, metadata={"help": "run the drift and weight-space stages"})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "tasks whose drift and weight space are measured (default: every study task); criterion 2a is not "
                "measured for the others, and the report says so"})
    per_model: bool = field(default=False, metadata={
        "help": "measure each model against the base model as soon as it is trained (stages drift:TASK:MODEL "
                "and weights:TASK:MODEL; a method's last two seeds together, drift:TASK:MODEL+MODEL, for the seed "
                "noise floor, so train them in the same part), then pool them (drift:TASK, weights:TASK): a study "
                "run in parts then needs no model's weights after its own stages (see `lorascope archive`). Costs "
                "a pass of the base model per drift stage"})
    noise_floor_tasks: list[str] | None = field(default=None, metadata={
        "help": "with per_model: the tasks whose method's last two seeds are measured together (their seed noise "
                "floor; default every task); on the others each model is measured alone, so that no two models "
                "need to exist at the same time (a part shorter than two trainings), and criterion 2a's reason "
                "says there is no noise floor"})

    def settings(self) -> DriftSettings:
        """The drift stage's settings."""
        return DriftSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DriftSettings)})


@dataclass
class StudyServe(ServeSettings):
    """study.serve: the serving stage. Every `lorascope serve-bench` setting (same names, defaults and help),
    plus whether it runs, which tasks' adapters it serves and criterion 2b's threshold; `study.serve: false`
    is short for `{enabled: false}`."""

    enabled: bool = field(default=True, metadata={"help": "run the serving benchmark"})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "tasks whose LoRA adapters are served (default: every study task; each costs a merged and an "
                "unmerged engine); criterion 2b is not measured for the others, and the report says so"})
    max_overhead: float = field(default=0.30, metadata={"help": "criterion 2b: unmerged overhead at most this"})

    def settings(self) -> ServeSettings:
        """The serving stage's settings."""
        return ServeSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ServeSettings)})


def _section_problems(section: str, settings) -> list[str]:
    """A settings class's problems() ('--batch-sizes [0]: expected ...') named as study fields
    ('study.serve.batch_sizes: [0]: expected ...')."""
    flags = {f.metadata.get("flag", "--" + f.name.replace("_", "-")): f.name for f in dataclasses.fields(settings)}
    out = []
    for line in settings.problems():
        flag, rest = re.match(r"(--[a-z0-9-]+):? ?(.*)", line, re.S).groups()
        out.append(f"study.{section}.{flags.get(flag, flag)}: {rest}")
    return out


#: study fields from before study.drift and study.serve were sections, and where they went
LEGACY = {"drift_examples": ("drift", "max_examples"), "drift_batch_size": ("drift", "batch_size"),
          "drift_tokens": ("drift", "tokens"), "drift_reduction": ("drift", "reduction"),
          "max_serving_overhead": ("serve", "max_overhead"),
          **{f"serve_{f.name}": ("serve", f.name) for f in dataclasses.fields(StudyServe) if f.name != "enabled"}}


@dataclass
class StudyArgs:
    tasks: list[str] = field(default_factory=lambda: ["mrpc", "squad_v2"],
                             metadata={"help": "tasks to train and evaluate on"})
    methods: list[str] = field(default_factory=lambda: ["full", "lora"], metadata={"help": "full and/or lora"})
    primary_rank: int | None = field(default=None, metadata={
        "help": "the LoRA rank the verdict is about (default: 8 if swept, else the first rank)"})
    forgetting: bool = field(default=True, metadata={"help": "evaluate every tuned model on the other tasks too"})
    drift: StudyDrift = field(default_factory=StudyDrift, metadata={
        "help": "the drift and weight-space stages: every `lorascope drift` setting, plus enabled (or false)"})
    serve: StudyServe = field(default_factory=StudyServe, metadata={
        "help": "the serving stage: every `lorascope serve-bench` setting, plus enabled (or false), tasks and "
                "max_overhead (criterion 2b)"})
    accuracy_margin: float = field(default=3.0, metadata={"help": "criterion 1: LoRA within this many points of full"})
    min_seeds: int = field(default=1, metadata={
        "help": "seeds each criterion needs (train.seed must list at least this many); with one seed the accuracy "
                "intervals cover evaluation examples only, and the report says so"})
    lr_full: float | None = field(default=None, metadata={
        "help": "peak learning rate of full fine-tuning when tune_lr is off (default: train.lr, else 5e-5)"})
    lr_lora: float | None = field(default=None, metadata={
        "help": "peak learning rate of LoRA when tune_lr is off (default: train.lr, else 4e-4)"})
    tune_lr: bool = field(default=False, metadata={
        "help": "select the learning rate per task and method on a validation split carved from the training side "
                "before the final models train (stage tune:TASK:METHOD)"})
    tune_lrs_full: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4], metadata={
        "help": "learning rates tried for full fine-tuning (the search budget: as many trials as rates)"})
    tune_lrs_lora: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3], metadata={
        "help": "learning rates tried for LoRA; as many as for full fine-tuning, so both get the same budget"})
    tune_epochs: list[float] | None = field(default=None, metadata={
        "help": "epoch counts tried at each method's selected learning rate (one list for both methods: the same "
                "budget); the final models train for the best. null: train.epochs, not searched"})
    tune_validation_share: float = field(default=0.15, metadata={
        "help": "share of the training examples (whole paragraphs for SQuAD v2) that scores the trials"})
    note: str = field(default="", metadata={
        "help": "what this preset leaves out and why (fewer seeds, samples, serving configurations); shown at the "
                "top of the report"})
    per_task: dict = field(default_factory=dict, metadata={
        "help": "per-task overrides of the other sections, e.g. {squad_v2: {data: {max_seq_len: 256}}}, and a "
                "task's own learning-rate grids (tune_lrs_full, tune_lrs_lora) and epoch grid (tune_epochs)"})

    def problems(self) -> list[str]:
        from lorascope.tasks import TASKS

        out = []
        for t in self.tasks:
            if t not in TASKS:
                out.append(f"study.tasks: unknown task {t!r}; accepted: {', '.join(sorted(TASKS))}"
                           + did_you_mean(t, TASKS))
        if not self.tasks:
            out.append("study.tasks: name at least one task")
        for m in self.methods:
            if m not in ("full", "lora"):
                out.append(f"study.methods: unknown method {m!r}; accepted: full, lora")
        sv = self.serve
        for section, chosen in (("serve", sv.tasks), ("drift", self.drift.tasks)):
            for t in chosen or []:
                if t not in self.tasks:
                    out.append(f"study.{section}.tasks: {t!r} is not one of study.tasks ({', '.join(self.tasks)})")
            if chosen is not None and not chosen:
                out.append(f"study.{section}.tasks: name at least one task, or leave it out (every task) and set "
                           f"study.{section}: false to skip the stage")
        nf = self.drift.noise_floor_tasks
        if nf is not None and not self.drift.per_model:
            out.append("study.drift.noise_floor_tasks: only with study.drift.per_model: true (one drift stage over "
                       "every model measures every seed pair); set per_model or remove it")
        for t in nf or []:
            if t not in (self.drift.tasks or self.tasks):
                out.append(f"study.drift.noise_floor_tasks: {t!r} is not a task whose drift is measured "
                           f"({', '.join(self.drift.tasks or self.tasks)}); [] measures every model alone")
        if not 0 <= sv.max_overhead:
            out.append(f"study.serve.max_overhead: must be 0 or more (0.3 is 30 %), got {sv.max_overhead}")
        for t in self.per_task:
            if t not in self.tasks:
                out.append(f"study.per_task: {t!r} is not one of study.tasks ({', '.join(self.tasks)})")
        if sv.enabled:
            out += _section_problems("serve", sv.settings())
        if self.drift.enabled:
            out += _section_problems("drift", self.drift.settings())
        for name in ("lr_full", "lr_lora"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                out.append(f"study.{name}: must be a positive number or null, got {v}")
        if self.tune_lr and (self.lr_full is not None or self.lr_lora is not None):
            out.append("study.lr_full / study.lr_lora: fixed rates contradict study.tune_lr: true (the search "
                       "selects them); remove one or the other")
        if not self.tune_lr and (self.tune_epochs is not None
                                 or any(isinstance(o, dict) and o.get("tune_epochs") is not None
                                        for o in self.per_task.values())):
            out.append("study.tune_epochs: searches epochs at the selected learning rate, so it needs study.tune_lr: "
                       "true; set it, or set train.epochs instead")
        if self.min_seeds < 1:
            out.append(f"study.min_seeds: must be at least 1, got {self.min_seeds}")
        if self.tune_lr:
            from lorascope.tune import check_grid

            for m in self.methods:
                out += check_grid(getattr(self, f"tune_lrs_{m}"), f"study.tune_lrs_{m}")
            if set(self.methods) == {"full", "lora"} and len(self.tune_lrs_full) != len(self.tune_lrs_lora):
                out.append(f"study.tune_lrs_full and study.tune_lrs_lora: {len(self.tune_lrs_full)} vs "
                           f"{len(self.tune_lrs_lora)} rates; both methods must get the same search budget")
            for t, over in self.per_task.items():
                own = {m: over[f"tune_lrs_{m}"] for m in ("full", "lora")
                       if isinstance(over, dict) and f"tune_lrs_{m}" in over}
                for m, lrs in own.items():
                    if not isinstance(lrs, list):
                        out.append(f"study.per_task.{t}.tune_lrs_{m}: expected a list of learning rates, got {lrs!r}")
                    else:
                        out += check_grid(lrs, f"study.per_task.{t}.tune_lrs_{m}")
                if own and set(self.methods) == {"full", "lora"}:
                    grids = {m: own.get(m, getattr(self, f"tune_lrs_{m}")) for m in ("full", "lora")}
                    if all(isinstance(g, list) for g in grids.values()) and len(grids["full"]) != len(grids["lora"]):
                        out.append(f"study.per_task.{t}: {len(grids['full'])} rates for full fine-tuning vs "
                                   f"{len(grids['lora'])} for LoRA on {t}; both methods must get the same search "
                                   f"budget (set tune_lrs_full and tune_lrs_lora there together)")
            from lorascope.tune import check_epochs

            if self.tune_epochs is not None:
                out += check_epochs(self.tune_epochs, "study.tune_epochs")
            for t, over in self.per_task.items():
                if isinstance(over, dict) and over.get("tune_epochs") is not None:
                    out += check_epochs(over["tune_epochs"], f"study.per_task.{t}.tune_epochs")
            if not 0.0 < self.tune_validation_share < 1.0:
                out.append(f"study.tune_validation_share: must be between 0 and 1 (exclusive), got "
                           f"{self.tune_validation_share}")
        return out


#: keys of study.per_task.TASK that are the study's own settings for that task, not config sections
PER_TASK_STUDY_KEYS = ("tune_lrs_full", "tune_lrs_lora", "tune_epochs")


@dataclass
class Study:
    base: Config  # shared sections; lora.rank and train.seed hold the first value of a sweep
    study: StudyArgs
    ranks: list[int]
    seeds: list[int]
    source: str
    task_seeds: dict[str, list[int]] = field(default_factory=dict)  # study.per_task.TASK.train.seed

    def seeds_of(self, task: str) -> list[int]:
        """The seeds `task` trains with: its own list (study.per_task.TASK.train.seed) or train.seed."""
        return self.task_seeds.get(task, self.seeds)

    def tune_grid(self, task: str, method: str) -> list[float]:
        """The learning rates `method` is searched over on `task`: the task's own (study.per_task.TASK.tune_lrs_M)
        or the study's."""
        own = self.study.per_task.get(task) or {}
        return list(own.get(f"tune_lrs_{method}") or getattr(self.study, f"tune_lrs_{method}"))

    def tune_epochs(self, task: str) -> list[float] | None:
        """The epoch counts searched on `task` (study.per_task.TASK.tune_epochs, else study.tune_epochs), sorted;
        None: not searched."""
        own = self.study.per_task.get(task) or {}
        grid = own["tune_epochs"] if "tune_epochs" in own else self.study.tune_epochs
        return None if grid is None else sorted(float(e) for e in grid)

    def task_config(self, task: str) -> Config:
        cfg = copy.deepcopy(self.base)
        over = {k: v for k, v in (self.study.per_task.get(task) or {}).items() if k not in PER_TASK_STUDY_KEYS}
        apply_mapping(cfg, over, f"{self.source}: study.per_task.{task}")
        cfg.train.task = task
        cfg.eval.task = task
        return cfg.validate(self.source)

    @property
    def primary_rank(self) -> int:
        if self.study.primary_rank is not None:
            return self.study.primary_rank
        return 8 if 8 in self.ranks else self.ranks[0]

    def models(self, task: str) -> list[tuple[str, str, int | None, int]]:
        """(name, method, rank, seed) of every model trained on `task`."""
        out = []
        for seed in self.seeds_of(task):
            if "full" in self.study.methods:
                out.append((trained_name("full", None, seed), "full", None, seed))
            if "lora" in self.study.methods:
                for r in self.ranks:
                    out.append((trained_name("lora", r, seed), "lora", r, seed))
        return out


def load_study(path: str | Path) -> Study:
    from lorascope.config import read_yaml

    p = Path(path)
    data = read_yaml(p)
    if not isinstance(data, dict):
        raise LorascopeError(f"{p}: expected a mapping of sections")
    data = copy.deepcopy(data)
    study_raw = data.pop("study", None) or {}
    if not isinstance(study_raw, dict):
        raise LorascopeError(f"{p}: section 'study' must be a mapping of field: value")
    ranks = _sweep(data, "lora", "rank", p)
    seeds = _sweep(data, "train", "seed", p)
    base = apply_mapping(Config(), data, str(p))
    if ranks:
        base.lora.rank = ranks[0]
    if seeds:
        base.train.seed = seeds[0]
    study = _study_args(study_raw, str(p))
    problems = study.problems()
    if problems:
        raise LorascopeError(f"{p}: " + "; ".join(problems))
    s = Study(base=base.validate(str(p)), study=study, ranks=ranks or [base.lora.rank],
              seeds=seeds or [base.train.seed], source=str(p))
    for t, over in study.per_task.items():  # a task's own seed list (a task may cost more per seed)
        if isinstance(over, dict) and isinstance(over.get("train"), dict):
            own = _sweep(over, "train", "seed", Path(f"{p}: study.per_task.{t}"))
            if own:
                s.task_seeds[t] = own
    for t in study.tasks:
        s.task_config(t)  # validates the per-task overrides now, not hours later
    short = [("train.seed", s.seeds, "")] if any(t not in s.task_seeds for t in study.tasks) else []
    short += [(f"study.per_task.{t}.train.seed", own, f" for {t}") for t, own in s.task_seeds.items()]
    for where, given, task in short:
        if len(given) < study.min_seeds:
            raise LorascopeError(f"{p}: {where}: {len(given)} seed(s) given ({given}){task}, but study.min_seeds asks "
                                 f"for at least {study.min_seeds}; list them, e.g. {where}: "
                                 f"{list(range(study.min_seeds))}")
    if s.primary_rank not in s.ranks and "lora" in study.methods:
        raise LorascopeError(f"{p}: study.primary_rank {s.primary_rank} is not among lora.rank {s.ranks}")
    return s


def _study_args(raw: dict, src: str) -> StudyArgs:
    """The `study` section: its fields, with `drift` and `serve` sections of their own (or false / true)."""
    study = StudyArgs()
    raw = dict(raw)
    for key in [k for k in raw if k in LEGACY]:  # the flat names used until 2026-11-29
        section, name = LEGACY[key]
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise LorascopeError(f"{src}: study.{key} is now study.{section}.{name}, but study.{section} is "
                                 f"{sec!r} here; write study.{section}: {{{name}: ...}}")
        log.warning("%s: study.%s is now study.%s.%s; reading it as that", src, key, section, name)
        sec.setdefault(name, raw.pop(key))
    for key, value in raw.items():
        _set_field(study, "study", key, value, src)
    return study


def _set_field(obj, path: str, key, value, src: str) -> None:
    """obj.key = value, checked; `path` is obj's dotted name in the config (study, study.serve)."""
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise LorascopeError(f"{src}: unknown field {path}.{key}; accepted: {', '.join(names)}"
                             + did_you_mean(str(key), names))
    current = getattr(obj, key)
    if key == "per_task":
        if not isinstance(value, dict):
            raise LorascopeError(f"{src}: study.per_task must map task names to sections")
        setattr(obj, key, value)
    elif dataclasses.is_dataclass(current):  # a section: a mapping of its fields, or true / false for enabled
        if isinstance(value, bool):
            current.enabled = value
        elif isinstance(value, dict):
            for k, v in value.items():
                _set_field(current, f"{path}.{key}", k, v, src)
        else:
            raise LorascopeError(f"{src}: {path}.{key}: expected a mapping of its settings, or true / false; "
                                 f"got {value!r}")
    else:
        setattr(obj, key, coerce(value, typing.get_type_hints(type(obj))[key], f"{src}: {path}.{key}"))


def _sweep(data: dict, section: str, name: str, p: Path) -> list[int]:
    sec = data.get(section) or {}
    if not isinstance(sec, dict) or name not in sec:
        return []
    value = sec[name]
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= (1 if name == "rank" else 0)
                             for v in values):
        raise LorascopeError(f"{p}: {section}.{name}: expected an integer or a list of integers, got {value!r}")
    sec.pop(name)
    return values


# ---------------------------------------------------------------------------------------
# stages


@dataclass
class Stage:
    name: str
    kind: str
    fn: Callable[[], Any]
    config: dict[str, Any]  # what the stage depends on besides its upstream stages
    deps: list[str]
    outputs: list[Path]  # removed before the stage reruns with a different hash
    reads_deps: bool = True  # reads its upstream stages' files (weights...); False: only their result files


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(study: Study, run_dir: Path) -> list[Stage]:
    """Every stage of the study, in run order, each with the config it depends on and its upstream stages."""
    from lorascope.models import resolve_model

    layout = RunLayout(run_dir)
    stages = [Stage("prepare", "prepare", lambda: resolve_model(study.base.model.name, study.base.model.revision),
                    {"model": dataclasses.asdict(study.base.model)}, [], [])]
    if study.study.tune_lr:
        stages += _plan_tune(study, layout)
    stages += _plan_train(study, layout)
    stages += _plan_eval(study, layout)
    if study.study.drift.enabled and any(study.models(t) for t in study.study.tasks):
        stages += _plan_drift(study, layout)
    if study.study.serve.enabled and "lora" in study.study.methods:
        stages += _plan_serve(study, layout)

    from lorascope.report import render_report

    stages.append(Stage("report", "report", lambda: render_report(run_dir),
                        {"study": dataclasses.asdict(study.study), "ranks": study.ranks, "seeds": study.seeds,
                         "primary_rank": study.primary_rank,
                         **({"task_seeds": study.task_seeds} if study.task_seeds else {})},
                        [s.name for s in stages], [layout.report], reads_deps=False))
    return stages


def _plan_tune(study: Study, layout: RunLayout) -> list[Stage]:
    """tune:TASK:METHOD: the learning-rate search, at the first seed and the primary rank."""
    from lorascope.tune import tune_lr

    st, stages = study.study, []
    for task in st.tasks:
        for method in st.methods:
            cfg = study.task_config(task)
            cfg.train.method = method
            cfg.train.seed = study.seeds_of(task)[0]
            if method == "lora":
                cfg.lora.rank = study.primary_rank
            lrs = study.tune_grid(task, method)
            out = layout.tune(task, method)
            dep_cfg = cfg.to_dict()
            dep_cfg["train"] = {k: v for k, v in dep_cfg["train"].items() if k != "output_dir"}
            # what the validation scoring uses of the eval section (it never calibrates)
            dep_cfg["eval"] = {k: dep_cfg["eval"][k] for k in ("batch_size", "max_new_tokens")}
            dep_cfg["grid"], dep_cfg["validation_share"] = lrs, st.tune_validation_share
            epochs = study.tune_epochs(task)
            if epochs is not None:  # only then: a study without an epoch search keeps its stage hashes
                dep_cfg["epochs_grid"] = epochs
            stages.append(Stage(f"tune:{task}:{method}", "tune",
                                (lambda c=cfg, g=lrs, o=out, e=epochs: tune_lr(c, g, st.tune_validation_share, o, e)),
                                # the trials' folders are not among the outputs: a changed grid or config reruns
                                # the search, which keeps every trial whose own config is unchanged (tune.py)
                                dep_cfg, ["prepare"], [out / "tune.json", out / "lr_curve.png"]))
    return stages


def _plan_train(study: Study, layout: RunLayout) -> list[Stage]:
    """train:TASK:MODEL for every method, rank and seed; at the searched rate when tune_lr is on."""
    st, stages = study.study, []
    for task in st.tasks:
        for name, method, rank, seed in study.models(task):
            cfg = study.task_config(task)
            cfg.train.method = method
            cfg.train.seed = seed
            if rank is not None:
                cfg.lora.rank = rank
            cfg.train.output_dir = str(layout.train(task, name))
            fixed_lr = st.lr_full if method == "full" else st.lr_lora
            if fixed_lr is not None:
                cfg.train.lr = fixed_lr
            dep_cfg = {k: v for k, v in cfg.to_dict().items() if k != "eval"}
            dep_cfg["train"] = {k: v for k, v in dep_cfg["train"].items() if k != "output_dir"}
            if method == "full":
                dep_cfg.pop("lora")
            deps = ["prepare"]
            tuned_lr = None
            if st.tune_lr:
                # the final model trains at the rate its method's search selected (read when the stage runs)
                deps.append(f"tune:{task}:{method}")
                tuned_lr = layout.tune(task, method) / "tune.json"
                dep_cfg["train"].pop("lr")
                if study.tune_epochs(task) is not None:  # and for the epochs it selected
                    dep_cfg["train"].pop("epochs")
            stages.append(Stage(f"train:{task}:{name}", "train", (lambda c=cfg, t=tuned_lr: _train(c, t)), dep_cfg,
                                deps, [layout.train(task, name)]))
    return stages


def _plan_eval(study: Study, layout: RunLayout) -> list[Stage]:
    """eval:TASK:MODEL: the base model and every tuned model on its task (and on the others: forgetting)."""
    from lorascope.evaluate import evaluate

    st, stages = study.study, []

    def eval_stage(task, name, checkpoint, deps, trained_on=None):
        cfg = study.task_config(task)
        cfg.eval.checkpoint = checkpoint
        out = layout.eval(task, name, trained_on)
        name = out.stem
        cfg.eval.output = str(out)
        dep_cfg = {"model": cfg.to_dict()["model"], "data": cfg.to_dict()["data"],
                   "eval": {k: v for k, v in cfg.to_dict()["eval"].items() if k not in ("output", "checkpoint")},
                   "checkpoint": name}
        stages.append(Stage(f"eval:{task}:{name}", "eval", (lambda c=cfg: evaluate(c)), dep_cfg, deps,
                            [out, out.with_suffix(".predictions.json")]))

    for task in st.tasks:
        eval_stage(task, "base", "base", ["prepare"])
        for train_task in st.tasks:
            if train_task != task and not st.forgetting:
                continue
            for name, *_ in study.models(train_task):
                eval_stage(task, name, str(layout.model(train_task, name)), [f"train:{train_task}:{name}"],
                           trained_on=train_task)
    return stages


def _plan_drift(study: Study, layout: RunLayout) -> list[Stage]:
    """drift:TASK and weights:TASK over every tuned model of the task, for the tasks study.drift.tasks names."""
    from lorascope.drift import run_drift, run_weights

    st, stages, model_name = study.study, [], study.base.model.name
    settings = st.drift.settings()
    # what the stage depends on: the four settings a study could set before study.drift was a section (so run
    # folders of that time stay up to date), and any other setting that is not at its default
    dep_settings = {"examples": settings.max_examples, "batch": settings.batch_size, "reduction": settings.reduction,
                    "tokens": settings.tokens}
    dep_settings.update({k: v for k, v in dataclasses.asdict(settings).items()
                         if k not in ("max_examples", "batch_size", "reduction", "tokens")
                         and v != getattr(DriftSettings(), k)})
    for task in [t for t in st.tasks if t in (st.drift.tasks or st.tasks)]:
        tuned = {name: str(layout.model(task, name)) for name, *_ in study.models(task)}
        deps = [f"train:{task}:{n}" for n in tuned]
        out = layout.drift(task)
        data = study.task_config(task).data  # the data settings training used: held-out means held out
        # one length policy: unless study.drift.max_tokens says otherwise, drift reads the first data.max_seq_len
        # tokens of each prompt, the length the models trained at (causal attention: the states
        # of those positions are the same as in the whole prompt)
        ts = settings if settings.max_tokens is not None else dataclasses.replace(settings,
                                                                                  max_tokens=data.max_seq_len)
        dep = {**dep_settings, "max_tokens": ts.max_tokens, "model": model_name, "data": dataclasses.asdict(data)}
        wout = layout.weights(task)
        if not st.drift.per_model:
            stages.append(Stage(f"drift:{task}", "drift",
                                (lambda t=task, tu=tuned, o=out, d=data, s=ts:
                                 run_drift(t, model_name, tu, o, s, data=d)), dep, deps, [out]))
            stages.append(Stage(f"weights:{task}", "weights",
                                (lambda tu=tuned, o=wout: run_weights(model_name, tu, o)),
                                {"model": model_name}, deps, [wout]))
            continue
        # one model at a time (the last two seeds of a method together: their seed-to-seed drift is the noise
        # floor), pooled afterwards: no model's weights are needed after its own stages
        from lorascope.drift.measure import combine_drift
        from lorascope.drift.weights import combine_weights

        pairs = st.drift.noise_floor_tasks is None or task in st.drift.noise_floor_tasks
        groups = [members[-2:] for members in _methods_with_seeds(study, task).values() if len(members) >= 2 and pairs]
        together = {n for g in groups for n in g}
        runs, wparts = {}, {}
        for name, *_ in study.models(task):
            group = next((g for g in groups if name in g), [name])
            if name in together and name != group[0]:
                continue
            label = "+".join(group)
            runs[label] = layout.drift_part(task, label)
            stages.append(Stage(f"drift:{task}:{label}", "drift",
                                (lambda t=task, tu={n: tuned[n] for n in group}, o=runs[label], d=data, s=ts:
                                 run_drift(t, model_name, tu, o, s, data=d, values=True)),
                                {**dep, "tuned": group}, [f"train:{task}:{n}" for n in group], [runs[label]]))
        stages.append(Stage(f"drift:{task}", "drift", (lambda r=runs, o=out: combine_drift(r, o)),
                            {**dep, "pooled": list(runs)}, [f"drift:{task}:{label}" for label in runs], [out],
                            reads_deps=False))
        for name, path in tuned.items():
            wparts[name] = layout.weights_part(task, name)
            stages.append(Stage(f"weights:{task}:{name}", "weights",
                                (lambda tu={name: path}, o=wparts[name]: run_weights(model_name, tu, o)),
                                {"model": model_name, "tuned": name}, [f"train:{task}:{name}"], [wparts[name]]))
        stages.append(Stage(f"weights:{task}", "weights", (lambda p=wparts, o=wout: combine_weights(p, o)),
                            {"model": model_name, "pooled": list(wparts)},
                            [f"weights:{task}:{n}" for n in wparts], [wout], reads_deps=False))
    return stages


def _methods_with_seeds(study: Study, task: str) -> dict[str, list[str]]:
    """{method (full, lora_r8): its models on `task`, in seed order}."""
    out: dict[str, list[str]] = {}
    for name, method, rank, _ in study.models(task):
        out.setdefault("full" if method == "full" else f"lora_r{rank}", []).append(name)
    return out


def _plan_serve(study: Study, layout: RunLayout) -> list[Stage]:
    """serve:rRANK: the first seed's adapters of the served tasks, merged vs unmerged."""
    st, stages, model_name = study.study, [], study.base.model.name
    data_dir = study.base.data.resolved_dir()
    settings = st.serve.settings()
    served = [t for t in st.tasks if t in (st.serve.tasks or st.tasks)]
    for r in sorted(set(study.ranks)):
        lora = {task: trained_name("lora", r, study.seeds_of(task)[0]) for task in served}
        adapters = [f"{task}={layout.model(task, lora[task])}" for task in served]
        out = layout.serve(r)
        stages.append(Stage(f"serve:r{r}", "serve",
                            (lambda a=adapters, o=out, s=settings: _serve(model_name, a, o, s, data_dir)),
                            {"settings": dataclasses.asdict(settings), "model": model_name,
                             **({"tasks": served} if st.serve.tasks is not None else {})},
                            [f"train:{task}:{lora[task]}" for task in served], [out]))
    return stages


def _train(cfg: Config, tune_file: Path | None):
    from lorascope.train import train

    if tune_file is not None:
        cfg = copy.deepcopy(cfg)
        tj = json.loads(tune_file.read_text())
        cfg.train.lr = tj["best_lr"]
        if "best_epochs" in tj:
            cfg.train.epochs = tj["best_epochs"]
        log.info("train %s/%s at the selected learning rate %.2e%s", cfg.train.task, cfg.train.method, cfg.train.lr,
                 f", for the selected {cfg.train.epochs:g} epoch(s)" if "best_epochs" in tj else "")
    return train(cfg)


def _serve(model_name, adapters, out, settings, data_dir):
    from lorascope.serve import run_serve_bench

    report = run_serve_bench(model_name, adapters, str(out), settings, data_dir=data_dir)
    failed = report["summary"]["failed"]
    if failed:
        raise LorascopeError("serving benchmark: " + "; ".join(f["error"] for f in failed))
    return report


def run_study(config_path: str, run_dir: str | Path, *, only: list[str] = (), force: list[str] = ()) -> dict:
    """Run (or resume) every stage of the study in `run_dir`; return the stage records."""
    from lorascope.locking import folder_lock

    study = load_study(config_path)
    run_dir = Path(run_dir)
    with folder_lock(run_dir, "--run-dir"):
        return _run_locked(study, config_path, run_dir, only, force)


def dry_run(config_path: str, run_dir: str | Path, *, only: list[str] = (), force: list[str] = ()) -> list[str]:
    """What `lorascope run` with these arguments would do, one line per stage, without running or writing
    anything (no lock taken): up to date, would run (or resume), not selected, or where it would stop (a
    dependency that has not run, or whose weights `lorascope archive` left out). The last line: how many would
    run, with the ETA of :class:`_StageTimes`."""
    study = load_study(config_path)
    run_dir = Path(run_dir)
    stages = plan(study, run_dir)
    names = [s.name for s in stages]
    _check_patterns(stages, only, force)
    _check_data(study)
    by_name = {s.name: s for s in stages}
    digests = _Digests(RunLayout(run_dir).digests_file)
    prior = {n: _read_record(RunLayout(run_dir).stage_record(n)) for n in names}
    will = _will_run(stages, prior, only, force, digests)
    lines, hashes, records, stop = [], {}, {}, None
    for i, s in enumerate(stages, 1):
        prev = prior[s.name]
        if s.name not in will:
            h = hashes[s.name] = _stage_hash(s, hashes, records, by_name, digests)
            if _fresh(prev, h, s.outputs) and not _matches(s.name, force):
                records[s.name] = prev
                what = "up to date" + (" (archived without its weights)" if prev.get("archived") else "")
            else:
                what = f"{'missing' if prev is None else 'out of date'}, not selected by --only"
        elif stop:
            what = "would run, if the run got this far"
        else:
            blocked = [d for d in s.deps if d not in records and d not in will]
            archived = [d for d in s.deps if s.reads_deps and (records.get(d) or {}).get("archived")]
            if blocked:
                stop = s.name
                what = (f"would stop: needs {blocked[0]}, which has not run for this config (add it to --only, "
                               f"or run without --only)")
            elif archived:
                stop = s.name
                what = (f"would stop: needs the files of {archived[0]}, which this run folder keeps without "
                               f"its weights; retrain them first: --force {archived[0]}")
            else:
                upstream = any(d in will for d in s.deps)
                h = None if upstream else _stage_hash(s, hashes, records, by_name, digests)
                resumes = (h is not None and prev is not None and prev.get("hash") == h and not prev.get("finished")
                           and not _matches(s.name, force))
                what = "would resume (interrupted)" if resumes else "would run"
        lines.append(f"[{i}/{len(stages)}] {s.name}: {what}")
    n = len(will)
    summary = f"{n} stage(s) would run" + (_StageTimes(prior).eta(sorted(will)).replace(
        f"; {n} stage(s) to run after it", "") if n else "")
    lines.append(summary + (f"; the run would stop at {stop} (above)" if stop else ""))
    return lines


def _check_patterns(stages: list[Stage], only, force) -> None:
    names = [s.name for s in stages]
    for pat in [*only, *force]:
        if not any(_matches(n, [pat]) for n in names):
            kinds = sorted({s.kind for s in stages})
            raise LorascopeError(f"stage {pat!r}: no such stage; stages are {', '.join(kinds)} "
                                 f"(or a full name such as {names[min(1, len(names) - 1)]})")


def _run_locked(study: Study, config_path: str, run_dir: Path, only, force) -> dict:
    # temporaries of a killed run (atomic writes never finished): safe to remove while we hold the lock
    for tmp in run_dir.rglob(".*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    handler = logging.FileHandler(RunLayout(run_dir).log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        return _run(study, config_path, run_dir, only, force)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _selected(s: Stage, only) -> bool:
    """Whether --only selects stage `s`. `prepare` (resolving the base model, which every other stage needs)
    always is: `--only tune` on a new run folder then runs, rather than stopping for want of it."""
    return not only or _matches(s.name, only) or s.kind == "prepare"


def _matches(stage: str, patterns) -> bool:
    return any(stage == p or stage.startswith(p + ":") for p in patterns)


def _run(study: Study, config_path: str, run_dir: Path, only, force) -> dict:
    stages = plan(study, run_dir)
    names = [s.name for s in stages]
    by_name = {s.name: s for s in stages}
    _check_patterns(stages, only, force)
    _check_data(study)
    write_json(RunLayout(run_dir).study_file,
               {"config_file": str(config_path), "config": dataclasses.asdict(study.study),
                "base_config": study.base.to_dict(), "ranks": study.ranks, "seeds": study.seeds,
                "task_seeds": {t: study.seeds_of(t) for t in study.study.tasks},
                "primary_rank": study.primary_rank, "stages": names, "provenance": provenance()})
    records: dict[str, dict] = {}
    hashes: dict[str, str] = {}
    digests = _Digests(RunLayout(run_dir).digests_file)
    t_run = time.time()
    # what each stage took, from the records of earlier invocations too: the ETA's only source
    timing = _StageTimes({n: _read_record(RunLayout(run_dir).stage_record(n)) for n in names})
    will_run = _will_run(stages, timing.records, only, force, digests)
    for i, s in enumerate(stages, 1):
        # a forced rerun upstream, or new weights in an upstream folder, invalidates what reads it
        h = hashes[s.name] = _stage_hash(s, hashes, records, by_name, digests)
        rec_file = RunLayout(run_dir).stage_record(s.name)
        prev = _read_record(rec_file)
        selected = _selected(s, only)
        fresh = _fresh(prev, h, s.outputs)
        if fresh and not _matches(s.name, force):
            records[s.name] = prev
            log.info("[%d/%d] %s: up to date", i, len(stages), s.name)
            continue
        if not selected:
            missing = "missing" if prev is None else "out of date"
            log.info("[%d/%d] %s: %s, not selected by --only", i, len(stages), s.name, missing)
            continue
        for dep in s.deps:
            if dep not in records:
                raise LorascopeError(f"stage {s.name}: needs {dep}, which has not run for this config; run without "
                                     f"--only (or with --only {dep.split(':')[0]}) first")
            if s.reads_deps and records[dep].get("archived"):
                raise LorascopeError(f"stage {s.name}: needs the files of {dep}, which this run folder keeps without "
                                     f"its weights (`lorascope archive`); retrain them first: --force {dep} (the "
                                     f"stages that read it rerun if its weights come out different)")
        resuming = (
            prev is not None and prev.get("hash") == h and not prev.get("finished") and not _matches(s.name, force)
        )
        if not resuming:
            # new, changed or forced: start clean, so no stale output is ever reused
            if prev is not None and prev.get("hash") != h:
                log.info("[%d/%d] %s: config changed; removing its old outputs", i, len(stages), s.name)
            for o in s.outputs:
                if o.is_dir():
                    shutil.rmtree(o)
                elif o.exists():
                    o.unlink()
        else:
            log.info("[%d/%d] %s: resuming an interrupted run", i, len(stages), s.name)
        # a record without "finished": the stage started with this hash (a kill leaves it so, and a
        # rerun resumes, e.g. training from its last checkpoint)
        # resumed: its seconds will cover this invocation only, so it times no other stage
        write_json(rec_file, {"stage": s.name, "hash": h, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "resumed": resuming, "outputs": [str(o) for o in s.outputs]})
        later = [n for n in names[i:] if n in will_run]
        log.info("[%d/%d] %s: running (elapsed %s%s)", i, len(stages), s.name, _fmt(time.time() - t_run),
                 timing.eta(later))
        t0 = time.time()
        s.fn()
        seconds = time.time() - t0
        rec = {"stage": s.name, "hash": h, "seconds": seconds, "resumed": resuming,
               "outputs": [str(o) for o in s.outputs], "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        timing.records[s.name] = rec
        write_json(rec_file, rec)  # last: its presence with this hash marks the stage complete
        records[s.name] = rec
        log.info("[%d/%d] %s: done in %s", i, len(stages), s.name, _fmt(seconds))
    digests.save()
    log.info("study done in %s; report: %s", _fmt(time.time() - t_run), RunLayout(run_dir).report / "index.html")
    return records


class _Digests:
    """sha256 of stage outputs by content, with a per-file cache keyed by (size, mtime) so reruns stay cheap."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.cache = json.loads(path.read_text()) if path.is_file() else {}
        except (ValueError, OSError):
            self.cache = {}

    def of(self, outputs: list[Path]) -> str:
        h = hashlib.sha256()
        for root in outputs:
            files = (
                [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
            )
            for f in files:
                rel = f.relative_to(root.parent)
                if any(part.startswith(".") for part in rel.parts) or "checkpoints" in rel.parts:
                    continue  # locks, temporaries, and resumable state are not results
                h.update(f"{rel}\0{self.file(f)}\0".encode())
        return h.hexdigest()[:16]

    def file(self, f: Path) -> str:
        st = f.stat()
        key, stamp = str(f), [st.st_size, st.st_mtime_ns]
        hit = self.cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        d = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                d.update(chunk)
        self.cache[key] = [stamp, d.hexdigest()]
        return self.cache[key][1]

    def save(self) -> None:
        write_json(self.path, self.cache)


def _check_data(study: Study) -> None:
    """Read and validate every task's train and eval splits now, so bad data stops the run before any work."""
    from lorascope.tasks import get_task

    for t in study.study.tasks:
        data = study.task_config(t).data
        for split in ("train", "eval"):
            get_task(t).load_split(split, data)


def _read_record(path: Path) -> dict | None:
    """A stage record, or None (the stage reruns) when it is missing, truncated or not a record."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        log.warning("%s: unreadable stage record (%s); the stage reruns from scratch", path, exc)
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str):
        log.warning("%s: not a stage record (no 'hash'); the stage reruns from scratch", path)
        return None
    return rec


def _stage_hash(s: Stage, hashes: dict[str, str], records: dict[str, dict], by_name: dict[str, Stage],
                digests: _Digests) -> str:
    """What a stage's result depends on: its config, and its upstream stages' hashes, completion times and
    the contents of their outputs (files changed outside lorascope invalidate what was computed from them)."""
    return _hash({"stage": s.name, "config": s.config,
                  "deps": [(hashes.get(d), records.get(d, {}).get("finished"), _digest_of(d, records, by_name, digests))
                           for d in s.deps]})


def _digest_of(d: str, records: dict[str, dict], by_name: dict[str, Stage], digests: _Digests) -> str | None:
    """The digest of a finished stage's outputs: of its files, or, for a stage archived without its weights
    (`lorascope archive`), the digest its files had when the stages that read them ran."""
    if d not in records:
        return None
    archived = records[d].get("archived")
    if isinstance(archived, dict) and isinstance(archived.get("digest"), str):
        return archived["digest"]
    return digests.of(by_name[d].outputs)


def _fresh(rec: dict | None, h: str, outputs: list[Path]) -> bool:
    """Finished with hash `h`, and its outputs are there (or were archived without their weights on purpose)."""
    return bool(rec is not None and rec.get("hash") == h and rec.get("finished")
                and (rec.get("archived") or all(Path(o).exists() for o in outputs)))


def _will_run(stages: list[Stage], prior: dict[str, dict | None], only, force, digests: _Digests) -> set[str]:
    """The stages this invocation will run, decided as the loop in :func:`_run` decides them: a stage runs
    when it is selected (--only) and forced, or not up to date (no finished record with its current hash,
    which is known in advance unless an upstream stage runs first, and then it changes)."""
    by_name = {s.name: s for s in stages}
    out: set[str] = set()
    hashes: dict[str, str] = {}
    records: dict[str, dict] = {}
    for s in stages:
        selected = _selected(s, only)
        if any(d in out for d in s.deps):
            if selected:
                out.add(s.name)
            continue
        h = hashes[s.name] = _stage_hash(s, hashes, records, by_name, digests)
        rec = prior.get(s.name)
        if _fresh(rec, h, s.outputs) and not _matches(s.name, force):
            records[s.name] = rec
        elif selected:
            out.add(s.name)
    return out


class _StageTimes:
    """An ETA from what stages like the remaining ones took: the same name but for the seed (train:mrpc:full_s1
    is timed by train:mrpc:full_s0), finished in one go (a resumed stage's seconds cover only its last
    invocation; records from before the `resumed` flag count as resumed). Stages with nothing like them
    finished are counted as not timed, never guessed."""

    def __init__(self, records: dict[str, dict | None]):
        self.records = records

    @staticmethod
    def like(name: str) -> str:
        return re.sub(r"_s\d+$", "_s*", name)

    def eta(self, later: list[str]) -> str:
        if not later:
            return ""
        seconds: dict[str, list[float]] = {}
        for name, rec in self.records.items():
            # `resumed` is False only in records that know it: older ones may have been resumed, so they time nothing
            one_go = rec and rec.get("finished") and rec.get("resumed") is False
            if one_go and isinstance(rec.get("seconds"), (int, float)):
                seconds.setdefault(self.like(name), []).append(float(rec["seconds"]))
        timed = [sum(seconds[k]) / len(seconds[k]) for k in map(self.like, later) if k in seconds]
        untimed = sorted({self.like(n) for n in later if self.like(n) not in seconds})
        text = f"; {len(later)} stage(s) to run after it"
        if timed:
            text += f", {len(timed)} timed by finished stages like them: ~{_fmt(sum(timed))}"
        if untimed:
            n = len(later) - len(timed)
            text += (f", {n} not yet timed ({', '.join(untimed[:3])}{', ...' if len(untimed) > 3 else ''})")
        return text


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
