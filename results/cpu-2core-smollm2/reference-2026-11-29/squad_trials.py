"""Rows of $R/README.md's SQuAD v2 search table from the run folder's trials (python squad_trials.py RUN)."""
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
for method in ("full", "lora"):
    d = run / "tune" / "squad_v2" / method
    tune = json.loads((d / "tune.json").read_text()) if (d / "tune.json").exists() else None
    sel = {t["lr"]: t for t in tune["trials"]} if tune else {}
    for t in sorted((p for p in d.glob("lr_*") if p.is_dir()), key=lambda p: float(p.name[3:])):
        ev = t / "eval.json"
        if not ev.exists():
            print(f"| {method} | {t.name[3:]} | (not finished) |"); continue
        e = json.loads(ev.read_text()); m = e["metrics"]; b = e["baselines"]["always_no_answer"]
        v = json.loads((t / "validation.json").read_text()) if (t / "validation.json").exists() else {}
        tr = json.loads((t / "train" / "lorascope-train.json").read_text())
        lr = tr["config"]["train"]["lr"]
        selv = sel.get(lr, {}).get("value", v.get("value"))
        # always-no-answer on the scored questions, from the scored answerable / unanswerable counts
        ana = 100 * m["NoAns_total"] / m["total"]
        print(f"| {method} | {lr:.0e} | {selv:.1f} | {m['f1']:.1f} | {m['HasAns_f1']:.1f} | {m['NoAns_f1']:.1f} | "
              f"{ana:.1f} (file: {b['f1']:.1f} on {b['total']}) | {tr['tokens_per_cpu_s']:.1f}"
              f"{'' if tr['resumed_from_step'] == 0 else ' (steps %d-%d)' % (tr['resumed_from_step'] + 1, tr['steps'])} |")
    if tune:
        print(method, "selected", {k: tune.get(k) for k in ("best_lr", "best_value", "selected_at_grid_edge", "budget")})
