"""Criterion (1) and the 'learned' check on the reference study's seed-0 MRPC models so far, by the verdict's own
function (lorascope.report.verdict.accuracy_criterion), on the run folder as it is: one seed, so the intervals cover
evaluation examples only (the verdict says so). Usage: python interim_accuracy.py RUN_DIR (the archive/ folder here, or a run folder)"""
import json
import sys
from pathlib import Path

from lorascope.report.verdict import accuracy_criterion

acc = accuracy_criterion("mrpc", Path(sys.argv[1]), [0], 8, 3.0)
print(json.dumps(acc, indent=1, default=str))
