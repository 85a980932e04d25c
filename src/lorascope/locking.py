"""An exclusive lock on a folder, held for a whole command.

Two `lorascope run` (or `lorascope train`) on one folder would train the same stages into
the same directories and interleave their logs. The lock is an advisory `fcntl.flock` on
FOLDER/.lorascope.lock: the kernel drops it when its process dies, however it dies
(kill -9 included), so a lock left by a killed process is taken over by the next command
without any staleness heuristic. The file records who holds it (pid, host, command,
start time) so the refusal can name the other process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lorascope import LorascopeError

LOCK_NAME = ".lorascope.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) for the duration of the block.

    Raises LorascopeError naming the holder when another live process holds it. Reentrant
    within one process for the same folder (a nested claim is a no-op).
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    key = str(path.absolute())
    if key in _HELD:
        yield path
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LorascopeError(f"{what} {folder}: cannot create its lock file {path} ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise LorascopeError(f"{what} {folder}: in use by another lorascope process ({holder}); wait for it to "
                                 f"finish or stop it, or use another folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD.add(key)
        try:
            yield path
        finally:
            _HELD.discard(key)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_HELD: set[str] = set()


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(raw)
        cmd = " ".join(str(a) for a in info.get("argv", []))[:200]
        return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: {cmd}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown: its lock record is being written"
