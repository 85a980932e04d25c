"""95 % bootstrap interval (over paragraphs) of each finished SQuAD v2 search trial's selection F1, as the
report's learning-rate section computes it, for trials whose search has no tune.json yet; and the paired
difference to full fine-tuning's selected trial on the same questions (python trial_ci.py RUN)."""
import json, sys
from pathlib import Path

from lorascope.report.render import trial_scores
from lorascope.report.verdict import hierarchical_bootstrap, mean_interval

run = Path(sys.argv[1])
full = run / "tune/squad_v2/full/lr_2.00e-04"
fs, groups, _ = trial_scores("squad_v2", full, json.loads((full / "validation.json").read_text()))
for d in sorted((run / "tune/squad_v2/lora").glob("lr_*")):
    if not (d / "validation.json").is_file():
        continue
    t = json.loads((d / "validation.json").read_text())
    s, g, unit = trial_scores("squad_v2", d, t)
    ci = mean_interval(s, groups=g)
    diff = hierarchical_bootstrap([s], [fs], groups=g)
    print(f"lora {d.name}: {ci['value']:.1f} [{ci['ci_low']:.1f}, {ci['ci_high']:.1f}] over {len(set(g[k] for k in s))} "
          f"{unit}s; minus full 2e-4: {diff['value']:+.1f} [{diff['ci_low']:+.1f}, {diff['ci_high']:+.1f}] (paired, n={diff.get('n')})")
