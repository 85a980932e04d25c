"""SQuAD v2: each evaluated model's F1 under the fitted no-answer rule and under greedy abstention, with a 95 %
bootstrap interval over the paragraphs (one model, one seed: it covers the questions drawn only; 2000 resamples).
Usage: LORASCOPE_DATA_DIR=... python per_model_f1.py RUN_DIR   (a run folder or archive/)
"""
import json
import sys
from pathlib import Path

from lorascope.config import DataConfig
from lorascope.report.verdict import mean_interval
from lorascope.tasks import get_task

task, data = get_task("squad_v2"), DataConfig()
d = Path(sys.argv[1]) / "eval" / "squad_v2"
print("| model | F1, fitted rule [95 % CI] | F1, greedy abstention [95 % CI] | paragraphs |")
print("|---|---|---|---|")
for f in sorted(d.glob("*.predictions.json")):
    m = f.name[: -len(".predictions.json")]
    if m == "base":
        continue
    p = json.loads(f.read_text())
    greedy, why = task.alternative_scores(p, data)  # the verdict's second measure
    assert greedy is not None, why
    cells = []
    for s in ({k: 100.0 * v for k, v in p["scores"].items()}, greedy):
        c = mean_interval(s, groups=p["paragraph"])
        cells.append(f"{c['value']:.1f} [{c['ci_low']:.1f}, {c['ci_high']:.1f}]")
    print(f"| {m} | {cells[0]} | {cells[1]} | {c['clusters']} |")
