#!/bin/bash
# End of session 13: stop the runner and the study invocation (SIGINT: it stops after its newest checkpoint),
# put the invocation back at the head of the queue, archive /work/ref into results, render the interim report.
set -x
R=/work/main/results/cpu-2core-smollm2/reference-2026-11-29-partial
head_line=$(grep -E "^20.*: lorascope run " /work/notes/runner-session13.log | tail -1 | sed 's/.*--run-dir \/work\/ref //')
pkill -f "bash runner8.sh"
pkill -INT -f "lorascope run configs/reference.yaml"; sleep 15
pgrep -f "lorascope run configs/reference.yaml" && { pkill -KILL -f "lorascope run configs/reference.yaml"; sleep 3; }
echo "$(date -u +%FT%T) stopped by end13.sh for the end-of-session archive" >> /work/notes/runner-session13.log
[ -n "$head_line" ] && sed -i "1i $head_line" /work/notes/queue
cat /work/notes/queue
rm -rf /work/ref-archive-s13end
cd /work/runner && PYTHONPATH=/work/runner/src /work/main/.venv/bin/python -m lorascope archive /work/ref /work/ref-archive-s13end || exit 1
rm -rf $R/archive && cp -r /work/ref-archive-s13end $R/archive
grep -E "^20[0-9-]+T" /work/notes/runner-session13.log > $R/runner-session13.log
cp /work/notes/pauses.log $R/pauses-session13.log
cp /work/notes/queue $R/queue-session13.txt
rm -rf /tmp/interim13 && cp -r /work/ref-archive-s13end /tmp/interim13
cd /work/main && LORASCOPE_DATA_DIR=/work/shared/data .venv/bin/python -m lorascope report /tmp/interim13 || exit 1
rm -rf $R/interim-report && mkdir -p $R/interim-report
cp /tmp/interim13/report/report.md /tmp/interim13/report/verdict.json $R/interim-report/ || exit 1
cp -r /tmp/interim13/report/figures $R/interim-report/
ls $R/interim-report
# keep the machine working in case it comes back next session: the runner resumes the queue's head
cd /work/notes && (nohup bash runner8.sh >> runner-session13.log 2>&1 &)
