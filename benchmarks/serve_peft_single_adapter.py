"""Before/after of the transformers engine's single-adapter path (PEFT with vs without adapter_names).

Two serve-bench runs on the same base, adapter, prompts and settings; in each, merged and unmerged
alternate round by round, and the unmerged overheads (end to end, TTFT, TPOT) are paired with that
run's own merged rounds. "before": one adapter served through PEFT's mixed-batch path
(adapter_names, as the engine did before); "after": PEFT's plain single-adapter path.

    python benchmarks/serve_peft_single_adapter.py --adapter mrpc=DIR --work runs/serve-v2 \
        --results results/cpu-2core-smollm2/serve-transformers-v2

The results folder gets each run's serve.json / serve.csv / figures and summary.md (no weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapter", required=True, help="NAME=DIR")
    ap.add_argument("--work", required=True, help="scratch folder (merged copies, logs)")
    ap.add_argument("--results", required=True)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--data-dir")
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from lorascope.serve import ServeSettings, run_serve_bench

    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    reports = {}
    for label, force in (("before", True), ("after", False)):
        s = ServeSettings(engine="transformers", batch_sizes=[int(x) for x in a.batch_sizes.split(",")],
                          batches=a.batches, output_tokens=a.output_tokens, modes=["merged", "unmerged"],
                          force_adapter_names=force)
        out = Path(a.work) / label
        reports[label] = run_serve_bench(a.base, [a.adapter], str(out), s, data_dir=a.data_dir)
        dst = res / label
        dst.mkdir(exist_ok=True)
        for f in ["serve.json", "serve.csv", *[p.name for p in out.glob("serve_*.png")]]:
            shutil.copy(out / f, dst / f)
    lines = ["# transformers engine, one adapter: PEFT mixed-batch path (before) vs plain path (after)", "",
             "Overheads of unmerged vs merged, median over rounds paired in time [95% interval of the median]; "
             f"{a.batches} rounds per batch size; cores shared with other users.", "",
             "| path | batch | end to end | TTFT | TPOT | FLOP limit |", "|---|---|---|---|---|---|"]
    for label, rep in reports.items():
        for r in rep["summary"]["rows"]:
            if r["mode"] != "unmerged":
                continue

            def f(c, r=r):
                return "" if r[c] is None else f"{r[c]:+.1%} [{r[c + '_ci_low']:+.1%}, {r[c + '_ci_high']:+.1%}]"

            path = rep["configs"][[c["name"] for c in rep["configs"]].index(r["config"])]["settings"]["peft_path"]
            lines.append(f"| {label}: {path} | {r['batch_size']} | {f('overhead')} | {f('ttft_overhead')} | "
                         f"{f('tpot_overhead')} | {r['expected_overhead_flops']:+.1%} |")
    for label, rep in reports.items():
        if rep["summary"]["warnings"]:
            lines += ["", f"Warnings ({label}):"] + [f"- {w}" for w in rep["summary"]["warnings"]]
    (res / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v["status"] for k, v in reports.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
