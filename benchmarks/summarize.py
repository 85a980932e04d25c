"""Print a small table of metrics JSON files written by `lorascope eval`."""

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        name = r["checkpoint"]["kind"] if r["checkpoint"]["kind"] != "base" else "base (zero-shot)"
        rows.append((name, r["task"], r["metrics"], r["n_examples"]))
        base = r["baselines"]
    print(f"{'model':20s} {'task':9s} {'n':>5s}  metrics")
    for name, task, m, n in rows:
        keys = ["accuracy", "f1"] if task == "mrpc" else ["exact", "f1", "HasAns_f1", "NoAns_f1"]
        print(f"{name:20s} {task:9s} {n:5d}  " + "  ".join(f"{k} {m[k]:.1f}" for k in keys))
    for bname, m in base.items():
        keys = ["accuracy", "f1"] if "accuracy" in m else ["exact", "f1"]
        print(f"{bname:20s} {'':9s} {m.get('n', m.get('total')):5d}  " + "  ".join(f"{k} {m[k]:.1f}" for k in keys))


if __name__ == "__main__":
    main(sys.argv[1:])
