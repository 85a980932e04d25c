#!/bin/bash
# Stop the runner loop and the study invocation after its newest checkpoint, put the invocation back at the
# head of the queue, and archive the run folder.
set -x
pkill -f "bash runner8.sh"
pkill -INT -f "lorascope run configs/reference.yaml"; sleep 15
pgrep -f "lorascope run configs/reference.yaml" && { pkill -KILL -f "lorascope run configs/reference.yaml"; sleep 3; }
echo "$(date -u +%FT%T) stopped by stop10.sh for the end-of-session archive" >> /work/notes/runner-session10.log
sed -i '1i --only tune:squad_v2:full' /work/notes/queue
cat /work/notes/queue
rm -rf /work/ref-archive-s10b
cd /work/runner && PYTHONPATH=/work/runner/src /work/main/.venv/bin/python -m lorascope archive /work/ref /work/ref-archive-s10b
