#!/bin/bash
# Session 8's runner: like runner.sh (one `--only ...` argument list per queue line, main pulled before each),
# plus a line `ARCHIVE DEST` that writes `lorascope archive /work/ref DEST` between invocations, so that the
# archive of the finished stages can be taken while a later training keeps going (and checkpointing).
export LORASCOPE_DATA_DIR=/work/shared/data
cd /work/runner
while pgrep -f "lorascope run configs/reference.yaml" > /dev/null; do sleep 10; done  # the previous runner's invocation
while true; do
  line=$(head -1 /work/notes/queue 2>/dev/null)
  [ -z "$line" ] && { echo "$(date -u +%FT%T) queue empty"; break; }
  sed -i 1d /work/notes/queue
  git pull -q /work/main main 2>&1
  if [[ $line == ARCHIVE* ]]; then
    dest=${line#ARCHIVE }
    echo "$(date -u +%FT%T) at $(git rev-parse --short HEAD): lorascope archive /work/ref $dest"
    rm -rf "$dest"; PYTHONPATH=/work/runner/src /work/main/.venv/bin/python -m lorascope archive /work/ref "$dest"
  else
    echo "$(date -u +%FT%T) at $(git rev-parse --short HEAD): lorascope run configs/reference.yaml --run-dir /work/ref $line"
    PYTHONPATH=/work/runner/src /work/main/.venv/bin/python -m lorascope run configs/reference.yaml --run-dir /work/ref $line
  fi
  echo "$(date -u +%FT%T) exit $?"
done
