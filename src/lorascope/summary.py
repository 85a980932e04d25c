"""A plain-text table of metrics files written by `lorascope eval`."""

import json
from pathlib import Path

from lorascope import LorascopeError


def summarize(paths: list[str]) -> None:
    from lorascope.tasks import get_task

    rows = []
    base: dict = {}
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
            r["checkpoint"], r["task"], r["metrics"], r["n_examples"], r["baselines"]
        except (OSError, ValueError, KeyError) as exc:
            raise LorascopeError(f"{p}: not a metrics file written by `lorascope eval` ({exc})") from None
        name = r["checkpoint"]["kind"] if r["checkpoint"]["kind"] != "base" else "base (zero-shot)"
        rows.append((name, r["task"], r["metrics"], r["n_examples"]))
        base = r["baselines"]
    print(f"{'model':20s} {'task':9s} {'n':>5s}  metrics")
    for name, task, m, n in rows:
        keys = [k for k, _ in get_task(task).report_columns]
        print(f"{name:20s} {task:9s} {n:5d}  " + "  ".join(f"{k} {m[k]:.1f}" for k in keys))
    for bname, m in base.items():
        keys = ["accuracy", "f1"] if "accuracy" in m else ["exact", "f1"]
        print(f"{bname:20s} {'':9s} {m.get('n', m.get('total')):5d}  " + "  ".join(f"{k} {m[k]:.1f}" for k in keys))
