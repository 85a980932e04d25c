"""`lorascope archive RUN DEST`: a run folder without its weights, small enough to keep, that a later
`lorascope run` resumes from.

A long study runs in parts on machines whose run folders do not survive (a session ends, the next
one starts on a fresh disk). What every later stage needs of a finished one is its result files
(metrics, predictions, drift values, records), not the trained weights, once the stages that read
those weights (evaluation, drift, weight space) have finished. The archive is a copy of RUN that
leaves out

- trained models (`model/` folders: weights, and the config and tokenizer files that are no use
  without them), training checkpoints (`checkpoints/`), and any other weight file (*.safetensors,
  *.bin, *.pt, *.pth, *.gguf),
- locks, temporaries and the file-digest cache,

and marks each stage record whose outputs lost files with ``"archived": {"digest": D, "left_out": [...]}``,
D being the digest of those outputs as they were in RUN. A `lorascope run` in a copy of the archive
treats such a stage as up to date and hashes what reads it with D, so nothing downstream reruns;
a stage that still has to run and reads an archived stage's files stops with one line that says
which stage to rerun (``--force STAGE``). Trials of a learning-rate search are reused from their
records (validation.json), so their weights are left out too.

A stage that started but did not finish (killed) is left out with its outputs, so the next run
starts it afresh. The run folder is locked meanwhile (no `lorascope run` may write it), and the copy
is written to .DEST.tmp-* and renamed when complete: an interrupted archive never looks complete.
DEST must not exist.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.layout import RunLayout

log = logging.getLogger(__name__)

#: the top folders of a run folder (lorascope.layout) under which stages write
LAYOUT_TOPS = ("tune", "train", "eval", "drift", "drift-models", "weights", "weights-models", "serve", "report")

#: suffixes of weight files, left out of an archive
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _hidden(rel: Path) -> bool:
    return any(p.startswith(".") for p in rel.parts)  # locks, temporaries, the digest cache: never results


def left_out(rel: Path) -> bool:
    """Whether the archive leaves out the file at `rel` (relative to the run folder)."""
    dirs = rel.parts[:-1]
    return rel.suffix in WEIGHT_SUFFIXES or "checkpoints" in dirs or "model" in dirs or _hidden(rel)


def archive_run(run_dir: str | os.PathLike, dest: str | os.PathLike) -> dict[str, Any]:
    """Copy `run_dir` to `dest` without weights; return what was kept and left out."""
    from lorascope.pipeline import _Digests, _read_record

    run, dest = Path(run_dir).resolve(), Path(dest)
    layout = RunLayout(run)
    if not (layout.root / "stages").is_dir():
        raise LorascopeError(f"{run}: not a run folder of `lorascope run` (no stages/ folder)")
    if dest.exists():
        raise LorascopeError(f"{dest}: already exists; name a new folder (the archive never overwrites)")
    from lorascope.locking import folder_lock

    with folder_lock(run, "RUN_DIR"):  # no `lorascope run` writes it meanwhile
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        records = {f: _read_record(f) for f in sorted((run / "stages").glob("*.json")) if not f.name.startswith(".")}
        # a stage that did not finish (killed) is left out with its outputs: the next run starts it afresh
        unfinished = [o.relative_to(run) for rec in records.values() if rec and not rec.get("finished")
                      for o in (_local(x, run) for x in rec.get("outputs", [])) if o.is_relative_to(run)]
        kept, dropped, dropped_bytes = 0, [], 0
        for f in sorted(p for p in run.rglob("*") if p.is_file()):
            rel = f.relative_to(run)
            if any(rel == u or rel.is_relative_to(u) for u in unfinished) or (
                    f in records and not (records[f] or {}).get("finished")):
                continue
            if left_out(rel):
                if not _hidden(rel):
                    dropped.append(str(rel))
                    dropped_bytes += f.stat().st_size
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / rel)
            kept += 1
        digests = _Digests(layout.digests_file)
        archived = []
        for rec_file, rec in records.items():
            if rec is None or not rec.get("finished"):
                continue
            outputs = [_local(o, run) for o in rec.get("outputs", [])]
            gone = [str(rel) for o in outputs for rel in (f.relative_to(run) for f in _files(o))
                    if left_out(rel) and not _hidden(rel)]
            if gone:
                # the digest the stages that read it were hashed with (weights included)
                rec["archived"] = rec.get("archived") or {"digest": digests.of(outputs), "left_out": gone}
                archived.append(rec["stage"])
            out = tmp / "stages" / rec_file.name
            out.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
        tmp.rename(dest)
    summary = {"archive": str(dest), "files": kept, "unfinished_stages_left_out": len(
                   [r for r in records.values() if r and not r.get("finished")]), "left_out_files": len(dropped),
               "left_out_mib": round(dropped_bytes / 2**20, 1), "archived_stages": archived}
    log.info("archived %s to %s: %d files kept, %d weight/checkpoint files (%.0f MiB) left out; stages without "
             "their weights: %s", run, dest, kept, len(dropped), dropped_bytes / 2**20, ", ".join(archived) or "none")
    return summary


def _local(output: str, run: Path) -> Path:
    """A record's output path (as written in the run folder the stage ran in, perhaps another one) inside `run`."""
    p = Path(output)
    if not p.is_absolute():
        p = Path.cwd() / p
    try:
        return run.resolve() / p.resolve().relative_to(run.resolve())
    except ValueError:
        pass
    # a record written in another folder (a run restored from an archive): the part from the layout's top folder on
    tops = [i for i, part in enumerate(p.parts) if part in LAYOUT_TOPS]
    for i in tops:
        if run.joinpath(*p.parts[i:]).exists():
            return run.joinpath(*p.parts[i:])
    return run.joinpath(*p.parts[tops[-1]:]) if tops else p


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
