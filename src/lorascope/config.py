"""Configuration: one dataclass per concern, YAML files and dotted overrides, validation.

A config file is YAML with one mapping per section (`model`, `data`, `lora`, `train`,
`eval`); any field can be overridden on the command line with `--set section.field=value`
(the value is parsed as YAML, so `--set lora.target_modules=[q_proj,v_proj]` works).
Every problem in a config is reported at once, naming the file, the field and what is
accepted, and unknown keys get a "did you mean".
"""

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorascope import LorascopeError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = field(default="smollm2-135m", metadata={"help": "Hugging Face Hub id, local model directory, "
                                                                "or the offline alias 'smollm2-135m'"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with a Hub model; "
                                                                     "off unless you trust its author"})

    def problems(self) -> list[str]:
        return [] if self.name.strip() else ["model.name: must not be empty"]


@dataclass
class DataConfig:
    dir: str | None = field(default=None, metadata={
        "help": "local data directory holding mrpc/ and squad_v2/; default: $LORASCOPE_DATA_DIR, "
                "else the Hugging Face Hub"})
    max_train_examples: int | None = field(default=None, metadata={"help": "deterministic subset of the train split"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "deterministic subset of the eval split"})
    max_seq_len: int = field(default=512, metadata={
        "help": "one length policy for training and evaluation, in tokens: a longer SQuAD training prompt is cut "
                "to a context window at a random offset that keeps the answer (or plausible answer) inside; an "
                "evaluation prompt that cannot fit with its answer (eval.max_new_tokens) is skipped and counted"})
    eval_max_seq_len: int | None = field(default=None, metadata={
        "help": "null (default): data.max_seq_len, the same policy as training; set only to depart from it"})
    squad_eval_share: float = field(default=0.4, metadata={
        "help": "when train-v2.0.json is absent: share of dev-v2.0.json questions (whole articles) held out "
                "for evaluation; the other articles are used for training"})
    validation_share: float = field(default=0.0, metadata={
        "help": "share of the training examples (whole paragraphs for SQuAD) held out as the 'validation' split "
                "for learning-rate selection; 0: none (the final models train on all of them)"})
    subset_seed: int = field(
        default=1234, metadata={"help": "seed of the subset draws (independent of the training seed)"}
    )

    @property
    def eval_len(self) -> int:
        """The longest evaluated prompt plus answer: data.max_seq_len unless eval_max_seq_len departs from it."""
        return self.max_seq_len if self.eval_max_seq_len is None else self.eval_max_seq_len

    def resolved_dir(self) -> str | None:
        d = self.dir if self.dir is not None else os.environ.get("LORASCOPE_DATA_DIR")
        return None if d in (None, "", "hub") else d

    def problems(self) -> list[str]:
        out = []
        for name in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                out.append(f"data.{name}: must be a positive integer or null, got {v}")
        if self.max_seq_len < 16:
            out.append(f"data.max_seq_len: must be at least 16, got {self.max_seq_len}")
        if self.eval_max_seq_len is not None and self.eval_max_seq_len < 16:
            out.append(f"data.eval_max_seq_len: must be at least 16, got {self.eval_max_seq_len}")
        if not 0.0 <= self.validation_share < 1.0:
            out.append(
                f"data.validation_share: must be in [0, 1) (0: no validation split), got {self.validation_share}"
            )
        if not 0.0 < self.squad_eval_share < 1.0:
            out.append(f"data.squad_eval_share: must be between 0 and 1 (exclusive), got {self.squad_eval_share}")
        return out


@dataclass
class LoraArgs:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    # 0, PEFT's own default, and what full fine-tuning gets here (the model has no dropout): a mask over the
    # input of each of the 7 adapted projections costs ~17 % of a LoRA step on CPUs (docs/training-speed.md)
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the LoRA branch input (default 0, PEFT's default; > 0 draws a mask per projection)"})
    target_modules: list[str] = field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        metadata={"help": "module names to adapt (default: all attention and MLP projections)"},
    )

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"lora.rank: must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            out.append(f"lora.alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            out.append("lora.target_modules: must name at least one module, e.g. [q_proj, v_proj]")
        return out


@dataclass
class TrainArgs:
    task: str = field(default="mrpc", metadata={"help": "task name (mrpc, squad_v2)"})
    method: str = field(default="lora", metadata={"help": "full or lora"})
    output_dir: str = field(default="runs/train", metadata={"help": "where the model, checkpoints and logs go"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training set (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step, over all processes"})
    micro_batch_size: int = field(default=8, metadata={"help": "examples per forward pass per process; "
                                                               "gradients are accumulated up to batch_size"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: 5e-5 full, 4e-4 lora)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of steps with linear warm-up"})
    schedule: str = field(default="linear", metadata={"help": "decay after warm-up: linear, cosine or constant"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping norm (null: off)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, initialisation and dropout"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps (0: only at the end)"})
    log_every: int = field(default=5, metadata={"help": "write metrics every N optimizer steps"})
    drift_snapshots: int = field(default=0, metadata={"help": "save the tuned weights at N evenly spaced steps "
                                                             "(the last included) into OUTPUT/snapshots/step-K for "
                                                             "drift along training (0: none)"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPUs that support it, else fp32), "
                                                                   "no, bf16 or fp16"})
    trackers: list[str] = field(
        default_factory=list, metadata={"help": "Accelerate trackers: wandb, tensorboard, mlflow"}
    )

    def problems(self) -> list[str]:
        from lorascope.tasks import TASKS

        out = []
        if self.task not in TASKS:
            out.append(f"train.task: unknown task {self.task!r}; accepted: {', '.join(sorted(TASKS))}"
                       + did_you_mean(self.task, TASKS))
        if self.method not in ("full", "lora"):
            out.append(f"train.method: unknown method {self.method!r}; accepted: full, lora")
        if self.epochs <= 0:
            out.append(f"train.epochs: must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"train.max_steps: must be a positive integer or null, got {self.max_steps}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            out.append(f"train.batch_size and train.micro_batch_size: must be positive, got "
                       f"{self.batch_size} and {self.micro_batch_size}")
        if self.lr is not None and self.lr <= 0:
            out.append(f"train.lr: must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("linear", "cosine", "constant"):
            out.append(f"train.schedule: unknown schedule {self.schedule!r}; accepted: linear, cosine, constant")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            out.append(f"train.max_grad_norm: must be positive or null, got {self.max_grad_norm}")
        if self.drift_snapshots < 0:
            out.append(f"train.drift_snapshots: must be >= 0, got {self.drift_snapshots}")
        if self.save_every < 0 or self.log_every < 1:
            out.append(
                f"train.save_every must be >= 0 and train.log_every >= 1, got {self.save_every} and {self.log_every}"
            )
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            out.append(f"train.mixed_precision: got {self.mixed_precision!r}; accepted: auto, no, bf16, fp16")
        for t in self.trackers:
            if t not in ("wandb", "tensorboard", "mlflow"):
                out.append(f"train.trackers: unknown tracker {t!r}; accepted: wandb, tensorboard, mlflow")
        return out

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-5 if self.method == "full" else 4e-4


@dataclass
class EvalArgs:
    task: str = field(default="mrpc", metadata={"help": "task name (mrpc, squad_v2)"})
    checkpoint: str = field(
        default="base", metadata={"help": "'base', a full model directory or a PEFT adapter directory"}
    )
    split: str = field(default="eval", metadata={"help": "eval (MRPC dev / held-out SQuAD questions), train, or "
                                                         "validation (carved from train by data.validation_share)"})
    output: str | None = field(
        default=None, metadata={"help": "metrics JSON path (default: CHECKPOINT/eval-TASK-SPLIT.json; for the base "
                                        "model runs/eval/base-MODEL-TASK.json)"}
    )
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest generated answer (SQuAD)"})
    no_answer_signal: str = field(default="first_token", metadata={
        "help": "SQuAD v2: the score that decides abstention: first_token (logit of 'unanswerable' minus the best "
                "other first token), answer_nll (negative log-likelihood of the model's own answer, in nats), or "
                "best (whichever gives the better F1 on the calibration questions; needs calibration_examples)"})
    no_answer_threshold: float = field(default=0.0, metadata={
        "help": "SQuAD v2: abstain when the no_answer_signal score exceeds this; 0 with first_token = greedy "
                "decoding's own choice"})
    calibration_examples: int = field(default=0, metadata={
        "help": "SQuAD v2: tune no_answer_threshold (and, with signal best, the signal) for the best F1 on this many "
                "held-out questions that share no paragraph with the evaluated ones, then apply it (0 = off; other "
                "tasks ignore it)"})

    def problems(self) -> list[str]:
        from lorascope.tasks import TASKS

        out = []
        if self.task not in TASKS:
            out.append(f"eval.task: unknown task {self.task!r}; accepted: {', '.join(sorted(TASKS))}"
                       + did_you_mean(self.task, TASKS))
        if self.split not in ("eval", "train", "validation"):
            out.append(f"eval.split: got {self.split!r}; accepted: eval, train, validation (needs "
                       f"data.validation_share)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            out.append("eval.batch_size and eval.max_new_tokens: must be positive integers")
        if self.calibration_examples < 0 or (0 < self.calibration_examples < 20):
            out.append(f"eval.calibration_examples: got {self.calibration_examples}; accepted: 0 (off) or at "
                       f"least 20 questions")
        signals = ("first_token", "answer_nll", "best")
        if self.no_answer_signal not in signals:
            out.append(f"eval.no_answer_signal: got {self.no_answer_signal!r}; accepted: {', '.join(signals)}")
        elif self.no_answer_signal == "best" and not self.calibration_examples:
            out.append("eval.no_answer_signal: 'best' is chosen on calibration questions; set "
                       "eval.calibration_examples (at least 20) or name the signal (first_token, answer_nll)")
        if not math.isfinite(self.no_answer_threshold):
            out.append(f"eval.no_answer_threshold: got {self.no_answer_threshold}; accepted: a finite number")
        return out


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def validate(self, source: str = "config") -> "Config":
        problems = [p for sec in dataclasses.fields(self) for p in getattr(self, sec.name).problems()]
        if problems:
            raise LorascopeError(f"{source}: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a YAML value against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise LorascopeError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0], where) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise LorascopeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LorascopeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LorascopeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise LorascopeError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LorascopeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str) -> Config:
    """Set the fields named in a nested mapping ({section: {field: value}}), checking names and types."""
    if not isinstance(mapping, dict):
        raise LorascopeError(
            f"{source}: expected a mapping of sections ({', '.join(_sections())}), got {type(mapping).__name__}"
        )
    for sec_name, values in mapping.items():
        if sec_name not in _sections():
            raise LorascopeError(f"{source}: unknown section {sec_name!r}; accepted: {', '.join(_sections())}"
                                 + did_you_mean(str(sec_name), _sections()))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise LorascopeError(f"{source}: section {sec_name!r} must be a mapping of field: value")
        section = getattr(cfg, sec_name)
        hints = typing.get_type_hints(type(section))
        names = [f.name for f in dataclasses.fields(section)]
        for key, value in values.items():
            if key not in names:
                raise LorascopeError(f"{source}: unknown field {sec_name}.{key}; accepted: {', '.join(names)}"
                                     + did_you_mean(str(key), names))
            setattr(section, key, coerce(value, hints[key], f"{source}: {sec_name}.{key}"))
    return cfg


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def parse_override(text: str) -> dict[str, Any]:
    """'train.lr=1e-4' -> {'train': {'lr': 0.0001}}."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise LorascopeError(f"--set {text!r}: expected section.field=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise LorascopeError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return {section: {name: value}}


def read_yaml(p: Path) -> Any:
    """Parse a YAML file; errors name the file, the line and column, and what is wrong, on one line."""
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise LorascopeError(f"{p}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise LorascopeError(f"{p}: not UTF-8 text (undecodable byte at offset {exc.start}); expected a UTF-8 YAML "
                             f"config") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(x for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
        raise LorascopeError(f"{p}: not valid YAML at {where}{what or str(exc).splitlines()[0]}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), **direct: Any) -> Config:
    """Build a Config from defaults, then a YAML file, then `--set` overrides, then direct values.

    `direct` maps 'section.field' to a value (the command line's own flags); None is skipped.
    """
    cfg = Config()
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        data = read_yaml(p)
        apply_mapping(cfg, data, source)
    for text in overrides:
        apply_mapping(cfg, parse_override(text), f"--set {text}")
    for dotted, value in direct.items():
        if value is not None:
            sec, name = dotted.split(".", 1)
            apply_mapping(cfg, {sec: {name: value}}, f"--{name.replace('_', '-')}")
    return cfg.validate(source)
