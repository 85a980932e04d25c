#!/bin/bash
# Runs the reference study's invocations one by one from /work/notes/queue (one `--only ...` argument list per
# line); pulls /work/runner to main before each, so each invocation runs the newest committed code.
export LORASCOPE_DATA_DIR=/work/shared/data
cd /work/runner
while true; do
  line=$(head -1 /work/notes/queue 2>/dev/null)
  [ -z "$line" ] && { echo "$(date -u +%FT%T) queue empty"; break; }
  sed -i 1d /work/notes/queue
  git pull -q /work/main main 2>&1
  echo "$(date -u +%FT%T) at $(git rev-parse --short HEAD): lorascope run configs/reference.yaml --run-dir /work/ref $line"
  PYTHONPATH=/work/runner/src /work/main/.venv/bin/python -m lorascope run configs/reference.yaml --run-dir /work/ref $line
  echo "$(date -u +%FT%T) exit $?"
done
