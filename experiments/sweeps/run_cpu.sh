#!/usr/bin/env bash
# Both CPU-scale sweeps, one worker per core (on 2 cores, two single-threaded
# runs side by side train ~1.5x more tokens/s than one run on both cores).
# Order: every configuration's seed 0 (study, then MLRA comparison), then every
# seed 1, then seed 2, so that a sweep stopped early has an even spread.
# Resumable: rerun the same command after an interruption.
#   experiments/sweeps/run_cpu.sh            # both workers, logs in runs/sweeps/worker<k>.log
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p runs/sweeps
worker() {
  local core=$1
  for step in "study_cpu --seeds=0" "mlra_cpu --seeds=0" "study_cpu --seeds=1" "mlra_cpu --seeds=1" \
              "study_cpu" "mlra_cpu"; do
    set -- $step
    taskset -c "$core" "$PY" -m experiments.sweep --sweep="experiments/sweeps/$1.sweep" "${@:2}"
  done
}
for ((k = 0; k < WORKERS; k++)); do
  worker "$k" > "runs/sweeps/worker$k.log" 2>&1 &
  sleep 20   # the first worker takes the data-build lock before the next starts
done
wait
echo "done; results in results/study_cpu.md and results/mlra_cpu.md"
