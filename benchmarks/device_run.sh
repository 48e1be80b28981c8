#!/usr/bin/env bash
# One prepared run on an accelerator machine (the device tool): the solver and
# statistics benchmarks, each with its baselines in the same process, on the
# card JAX finds. Results land in $OUT (copied back) with the card's name.
#
#   MATS_JAX_GIT_REV=$(git rev-parse --short HEAD) bash benchmarks/device_run.sh
#
# Each step has its own time limit so that a slow step still leaves the others'
# results. The solver runs twice: with JAX's default float32 matmul precision
# (TF32 on NVIDIA tensor cores) and with `highest` (true float32), since CG's
# attainable residual depends on it.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export MATS_JAX_GIT_REV=${MATS_JAX_GIT_REV:-unknown}
OUT=${OUT:-/tmp/mats_device_run}
mkdir -p "$OUT"
log=$OUT/device_run.log
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, flax; print(jax.__version__, jaxlib.__version__, flax.__version__, jax.devices())"
} >>"$log" 2>&1
step() {
  local limit=$1
  shift
  echo "=== $* (limit ${limit}s) $(date -u +%T)" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "=== rc=$? $(date -u +%T)" >>"$log"
}
step "${SOLVER_LIMIT:-170}" python3 benchmarks/solver_kfac.py --no-workaround --no-probe \
  --out "$OUT/solver_kfac_gpu"
step "${STATS_LIMIT:-200}" python3 benchmarks/estimators.py --device --reps 2 \
  --out "$OUT/estimators_gpu"
JAX_DEFAULT_MATMUL_PRECISION=highest step "${SOLVER_LIMIT:-170}" \
  python3 benchmarks/solver_kfac.py --no-workaround --no-probe --reps 2 \
  --out "$OUT/solver_kfac_gpu_highest"
tail -c 3000 "$log"
