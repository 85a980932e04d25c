#!/bin/bash
# End of session 18, without stopping the study: a snapshot of /work/ref is archived (unfinished stages, such as
# the training in progress, are left out by `lorascope archive`), the runner keeps going in case the machine is kept.
set -x
R=/work/main/results/cpu-2core-smollm2/reference-2026-11-29-partial
rm -rf /tmp/refsnap /work/ref-archive-s18end
cp -a /work/ref /tmp/refsnap || exit 1
cd /work/main && PYTHONPATH=/work/main/src .venv/bin/python -m lorascope archive /tmp/refsnap /work/ref-archive-s18end || exit 1
rm -rf /tmp/refsnap
rm -rf $R/archive && cp -r /work/ref-archive-s18end $R/archive
grep -aE "^20[0-9-]+T" /work/notes/runner-session18.log > $R/runner-session18.log
cp /work/notes/pauses.log $R/pauses-session18.log
head_line=$(grep -aE "^20.*: lorascope run " /work/notes/runner-session18.log | tail -1 | sed 's/.*--run-dir \/work\/ref //')
{ echo "$head_line"; cat /work/notes/queue; } > $R/queue-session18.txt
rm -rf /tmp/interim18 && cp -r /work/ref-archive-s18end /tmp/interim18
LORASCOPE_DATA_DIR=/work/shared/data .venv/bin/python -m lorascope report /tmp/interim18 || exit 1
rm -rf $R/interim-report && mkdir -p $R/interim-report
cp /tmp/interim18/report/report.md /tmp/interim18/report/verdict.json $R/interim-report/ || exit 1
cp -r /tmp/interim18/report/figures $R/interim-report/
ls $R/interim-report; cat $R/queue-session18.txt
cd /work/main && LORASCOPE_DATA_DIR=/work/shared/data .venv/bin/python $R/rule_vs_greedy.py $R/archive > $R/rule_vs_greedy.txt || exit 1
cat $R/rule_vs_greedy.txt
