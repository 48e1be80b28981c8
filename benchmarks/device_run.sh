#!/usr/bin/env bash
# Prepared runs on an accelerator machine (the device tool): the solver and
# statistics benchmarks, each with its baselines in the same process, on the
# card JAX finds. Results land in $OUT (copied back) with the card's name.
#
#   MATS_JAX_GIT_REV=$(git rev-parse --short HEAD) bash benchmarks/device_run.sh STEP...
#
# STEP: solver, estimators, streaming_inputs, streaming. Since c74f544 the solver computes every product at
# `highest` precision (true float32) whatever JAX's default, so the solver step
# sets JAX_DEFAULT_MATMUL_PRECISION=highest for its matmul floor too (at the
# default an NVIDIA card runs float32 matmuls as TF32). The 2026-11-27 H200 run
# (benchmarks/results/device_h200.md) ran all three in one call with 170-200 s
# each and every step ran out of time: the scipy baselines (now also a
# preconditioned one) run on the host CPU and take minutes. Give each step its
# own call, with a limit near the per-call maximum (LIMIT, seconds), so that
# each writes its result files; a step that still times out leaves only the
# log, from which benchmarks/device_log.py makes the results page.
# streaming_inputs writes the 250M-parameter model, its three fine-tuned
# copies and their K-FAC statistics (~13 GB) into the machine's scratch
# directory; streaming (run after it, on the same warm machine) times the
# streamed MaTS merge of benchmarks/streaming_mats.py on the card.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export MATS_JAX_GIT_REV=${MATS_JAX_GIT_REV:-unknown}
OUT=${OUT:-/tmp/mats_device_run}
LIMIT=${LIMIT:-540}
mkdir -p "$OUT"
log=$OUT/device_run.log
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib, flax; print(jax.__version__, jaxlib.__version__, flax.__version__, jax.devices())"
} >>"$log" 2>&1
step() {
  echo "=== $* (limit ${LIMIT}s) $(date -u +%T)" >>"$log"
  timeout "$LIMIT" "$@" >>"$log" 2>&1
  echo "=== rc=$? $(date -u +%T)" >>"$log"
}
for name in "${@:-solver}"; do
  case $name in
  solver)
    JAX_DEFAULT_MATMUL_PRECISION=highest step python3 benchmarks/solver_kfac.py \
      --no-probe --out "$OUT/solver_kfac_gpu" ;;
  estimators)
    step python3 benchmarks/estimators.py --device --reps 2 --out "$OUT/estimators_gpu" ;;
  streaming_inputs)
    step python3 benchmarks/streaming_mats.py --generate-only ;;
  streaming)
    step python3 benchmarks/streaming_mats.py --maxiter 5 --out "$OUT/streaming_mats_gpu" ;;
  *) echo "unknown step $name" >>"$log" ;;
  esac
done
tail -c 3000 "$log"
