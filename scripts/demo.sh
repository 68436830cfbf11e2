#!/usr/bin/env bash
# make demo: start a manager on the embedded default, run the quick start, stop the manager.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG=.demo/manager.log
mkdir -p .demo
"$PY" -m infinibrain.manager >"$LOG" 2>&1 &
MANAGER=$!
trap 'kill -TERM $MANAGER 2>/dev/null; wait $MANAGER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do  # wait (at most 20 s) until it answers
  if "$PY" -c "from infinibrain import AICluster; AICluster(timeout=0.5).release()" 2>/dev/null; then break; fi
  if ! kill -0 $MANAGER 2>/dev/null; then echo "manager failed to start:"; cat "$LOG"; exit 1; fi
  sleep 0.2
done
echo "manager running (pid $MANAGER), log in $LOG"
"$PY" examples/quickstart.py
