#!/usr/bin/env bash
# Every run behind README "Results" and "Beyond the paper", in order, each resumable (finished
# cells are skipped): start this again after any interruption.
#   setsid nohup docs/results/queue.sh >> sweeps/run_final.log 2>&1 < /dev/null &
set -u
here=$(dirname "$0")
for s in rerun.sh rerun_devhalf.sh rerun_positions.sh rerun_unlabelled.sh; do
  "$here/$s" || { echo "=== $s failed (rc $?) $(date)"; exit 1; }
done
