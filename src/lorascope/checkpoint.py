"""Training checkpoints that hold no pickles and survive corruption.

A checkpoint is a folder OUT/checkpoints/step-NNNNNNN with
  trainable.safetensors   the trainable parameters (LoRA: the adapter; full: every weight)
  optimizer.safetensors   the optimizer's tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
  optimizer.json          its param_groups and non-tensor state
  scheduler.json          the LR scheduler's state_dict (numbers only)
  rng-R.json / rng-R.safetensors   Python, NumPy and torch RNG states of process R
  step.json               written last: the step, the world size and every file's size
Nothing is ever read with pickle (Accelerate's save_state writes custom_checkpoint_0.pkl,
random_states_0.pkl and optimizer.bin as pickles, and loading them runs whatever code a
crafted file holds). The order of examples needs no state: it is a pure function of the
seed and the step (train.batch_plan).

A checkpoint is written to a hidden temporary folder and renamed into place; on any
failure the temporary folder is removed. The last two are kept. Before resuming, a
checkpoint is verified (files present with their recorded sizes, safetensors headers
consistent with the file sizes, step record readable, tensors matching the model); a
checkpoint that fails is skipped with a warning naming what was wrong, and the previous
one is used.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from lorascope import LorascopeError

log = logging.getLogger(__name__)

KEEP = 2
STEP_RE = re.compile(r"^step-(\d{7})$")
PICKLE_FILES = ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl",
                "pytorch_model.bin", "sampler.bin")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under OUT/checkpoints, newest first (not verified)."""
    ckdir = Path(out) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def save(accelerator, model, optimizer, scheduler, out: Path, step: int) -> Path:
    """Write checkpoint `step` of `model` (unwrapped), `optimizer` and `scheduler`; keep the last two."""
    from safetensors.torch import save_file

    ckdir = Path(out) / "checkpoints"
    final = ckdir / f"step-{step:07d}"
    tmp = ckdir / f".step-{step:07d}.tmp"
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if main:
            save_file(trainable_state(model), tmp / "trainable.safetensors")
            tensors, meta = _optimizer_to_files(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            _write_json(tmp / "optimizer.json", meta)
            _write_json(tmp / "scheduler.json", _scheduler_state(scheduler))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / f"rng-{accelerator.process_index}.safetensors")
        _write_json(tmp / f"rng-{accelerator.process_index}.json", rng_meta)
        accelerator.wait_for_everyone()
        if main:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            _write_json(tmp / "step.json", {"step": step, "world": accelerator.num_processes, "files": files,
                                            "format": "lorascope-checkpoint-1"})
            _fsync_dir(tmp)
            if final.exists():  # e.g. a corrupt checkpoint of this step that a resume skipped
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(ckdir)
            _prune(out, step)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in DISK_ERRORS:
            raise DiskError(_disk_message(exc, ckdir, f"checkpoint of step {step}", _needed_bytes(model, optimizer))
                            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, model, optimizer, scheduler, out: Path) -> int:
    """Load the newest checkpoint that verifies; return its step (0 when there is none)."""
    for step, folder in checkpoints(out):
        try:
            loaded = load_verified(folder, model, accelerator.process_index, accelerator.num_processes)
        except CheckpointError as exc:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", folder, exc)
            continue
        trainable, opt_state, sched_state, rng = loaded
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
        set_rng_state(*rng)
        if accelerator.is_main_process:
            log.info("resuming from %s (step %d)", folder, step)
        return step
    if checkpoints(out) and accelerator.is_main_process:
        log.warning("no usable checkpoint in %s; training starts again from step 0", Path(out) / "checkpoints")
    return 0


class DiskError(LorascopeError):
    """Disk full or folder unwritable: not the user's input, so the command exits 1 (not 2)."""

    exit_code = 1


class CheckpointError(Exception):
    """What is wrong with a checkpoint folder (one line)."""


def verify(folder: Path, rank: int = 0, world: int | None = None) -> dict[str, Any]:
    """Check a checkpoint folder without loading tensors; return its step record or raise CheckpointError."""
    folder = Path(folder)
    pickles = [n for n in PICKLE_FILES if (folder / n).exists()]
    if pickles:
        raise CheckpointError(f"it holds pickle files ({', '.join(pickles)}) of an older format, which lorascope "
                              f"does not load")
    rec_path = folder / "step.json"
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        step, files = rec["step"], rec["files"]
        if not isinstance(step, int) or not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        raise CheckpointError("step.json is missing (the checkpoint was not finished)") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError("step.json is unreadable or lacks 'step' and 'files'") from None
    m = STEP_RE.match(folder.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"step.json says step {step}, the folder name says {int(m.group(1))}")
    if world is not None and rec.get("world") != world:
        raise CheckpointError(f"written by {rec.get('world')} process(es), now {world}")
    needed = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              f"rng-{rank}.json", f"rng-{rank}.safetensors"]
    for name in needed:
        if name not in files:
            raise CheckpointError(f"step.json lists no {name}")
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{name} is missing")
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointError(f"{name} has {actual} bytes, step.json recorded {size}")
        if name.endswith(".safetensors"):
            safetensors_problem = check_safetensors(p)
            if safetensors_problem:
                raise CheckpointError(f"{name}: {safetensors_problem}")
        elif name.endswith(".json"):
            try:
                json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{name} is not valid JSON") from None
    return rec


def check_safetensors(path: Path) -> str | None:
    """None if the file's header parses and its tensors exactly fill the file; else what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes: too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return f"header length {n} exceeds the file size {size} (truncated or not safetensors)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON (corrupt or not safetensors)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            width = _DTYPE_BYTES[info["dtype"]]
            count = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has a malformed header entry"
        if stop - start != count * width:
            return f"tensor {name!r} spans {stop - start} bytes, its shape {info['shape']} needs {count * width}"
        end = max(end, stop)
    if 8 + n + end != size:
        return f"{size} bytes, its header describes {8 + n + end} (truncated or padded)"
    return None


def load_verified(folder: Path, model, rank: int = 0, world: int | None = None):
    """Verify and read a checkpoint into memory; raise CheckpointError before touching the model."""
    import torch
    from safetensors.torch import load_file

    verify(folder, rank, world)
    try:
        trainable = load_file(folder / "trainable.safetensors")
        opt_tensors = load_file(folder / "optimizer.safetensors")
        opt_meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        sched = json.loads((folder / "scheduler.json").read_text(encoding="utf-8"))
        rng_tensors = load_file(folder / f"rng-{rank}.safetensors")
        rng_meta = json.loads((folder / f"rng-{rank}.json").read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    got = {n: tuple(t.shape) for n, t in trainable.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [n for n in got if got[n] != expected[n]]
        raise CheckpointError(f"trainable.safetensors does not match the model ({len(diff)} tensors differ, "
                              f"e.g. {diff[0]})")
    for name, value in trainable.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"trainable.safetensors: {name} holds NaN or inf")
    try:
        opt_state = _optimizer_from_files(opt_tensors, opt_meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"optimizer.json does not describe optimizer.safetensors ({exc})") from None
    return trainable, opt_state, sched, (rng_tensors, rng_meta)


def trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_to_files(sd: dict) -> tuple[dict[str, Any], dict]:
    import torch

    tensors, state_meta = {}, {}
    for idx, st in sd["state"].items():
        plain = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                plain[k] = v
        state_meta[str(idx)] = {"tensors": sorted(k for k, v in st.items() if isinstance(v, torch.Tensor)),
                                "plain": plain}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    tuples = sorted({k for g in sd["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {"state": state_meta, "param_groups": groups, "tuple_fields": tuples}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        d = dict(st["plain"])
        for k in st["tensors"]:
            d[k] = tensors[f"{idx}.{k}"]
        state[int(idx)] = d
    groups = [{k: (tuple(v) if k in meta["tuple_fields"] and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _scheduler_state(scheduler) -> dict:
    sd = scheduler.state_dict()
    out = {}
    for k, v in sd.items():
        try:
            json.dumps(v)
        except TypeError:
            raise LorascopeError(f"train: the LR scheduler's state field {k!r} is not plain data; cannot checkpoint "
                                 f"it without pickle") from None
        out[k] = v
    return out


def rng_state() -> tuple[dict[str, Any], dict]:
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, [int(x) for x in keys], int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _prune(out: Path, step: int) -> None:
    """Keep the newest KEEP checkpoints at or before `step`; drop later ones (left by a resume that skipped them)."""
    kept = 0
    for s, folder in checkpoints(out):
        if s > step or kept >= KEEP:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            kept += 1
    for leftover in (Path(out) / "checkpoints").glob(".step-*.tmp"):
        if leftover.name != f".step-{step:07d}.tmp":
            shutil.rmtree(leftover, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _needed_bytes(model, optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 3 * n  # the parameters and AdamW's two moments


def _disk_message(exc: OSError, where: Path, what: str, needed: int | None) -> str:
    path = exc.filename or where
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(where if Path(where).exists() else Path(where).parent).free if where else None
        need = f"; it needs about {needed / 2**20:.1f} MB" if needed else ""
        have = f", {free / 2**20:.1f} MB free" if free is not None else ""
        return f"{path}: no space left on the device to write the {what}{need}{have}; free some space or " \
               f"choose another folder"
    return f"{path}: cannot write the {what} ({exc.strerror}); make the folder writable or choose another one"


def disk_error_message(exc: OSError, what: str = "output") -> str | None:
    """One line for a disk-full or unwritable-folder error, else None."""
    if exc.errno not in DISK_ERRORS:
        return None
    return _disk_message(exc, Path(exc.filename).parent if exc.filename else Path("."), what, None)
