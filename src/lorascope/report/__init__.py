"""The study's report, from a run directory's result files alone.

`render_report(RUN_DIR)` reads study.json, eval/, drift/, weights/ and serve/ and writes
report/report.md (figures copied beside it) and report/index.html (self-contained, the
figures embedded), starting with the verdict on the proposal's success criteria. Of a study
run in parts that has not finished, it shows what was measured so far and decides nothing on it
(lorascope.report.interim).
"""

from lorascope.report.render import render_report
from lorascope.report.verdict import judge

__all__ = ["judge", "render_report"]
