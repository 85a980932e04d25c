#!/bin/bash
# End of session 17, without stopping the study: a snapshot of /work/ref is archived (unfinished stages, such as
# the training in progress, are left out by `lorascope archive`), the runner keeps going in case the machine is kept.
set -x
R=/work/main/results/cpu-2core-smollm2/reference-2026-11-29-partial
rm -rf /tmp/refsnap /work/ref-archive-s17end
cp -a /work/ref /tmp/refsnap || exit 1
cd /work/main && PYTHONPATH=/work/main/src .venv/bin/python -m lorascope archive /tmp/refsnap /work/ref-archive-s17end || exit 1
rm -rf /tmp/refsnap
rm -rf $R/archive && cp -r /work/ref-archive-s17end $R/archive
grep -aE "^20[0-9-]+T" /work/notes/runner-session17.log > $R/runner-session17.log
cp /work/notes/pauses.log $R/pauses-session17.log
head_line=$(grep -aE "^20.*: lorascope run " /work/notes/runner-session17.log | tail -1 | sed 's/.*--run-dir \/work\/ref //')
{ echo "$head_line"; cat /work/notes/queue; } > $R/queue-session17.txt
rm -rf /tmp/interim17 && cp -r /work/ref-archive-s17end /tmp/interim17
LORASCOPE_DATA_DIR=/work/shared/data .venv/bin/python -m lorascope report /tmp/interim17 || exit 1
rm -rf $R/interim-report && mkdir -p $R/interim-report
cp /tmp/interim17/report/report.md /tmp/interim17/report/verdict.json $R/interim-report/ || exit 1
cp -r /tmp/interim17/report/figures $R/interim-report/
ls $R/interim-report; cat $R/queue-session17.txt
cd /work/main && LORASCOPE_DATA_DIR=/work/shared/data .venv/bin/python $R/rule_vs_greedy.py $R/archive > $R/rule_vs_greedy.txt || exit 1
cat $R/rule_vs_greedy.txt
