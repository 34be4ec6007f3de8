#!/usr/bin/env bash
# The accelerator measurement in one command, sized for ≤ 8 minutes on one GPU. It needs
# only what a CUDA JAX image has (jax, flax, optax, chex, absl, numpy; torch for the
# PyTorch rows): benchmarks/round_speed.py imports no data-format library.
#
#   bash benchmarks/gpu_check.sh              # K = 1 8 32 128: loop, vmap, sharded, torch (GPU)
#                                             # + a bfloat16 vmap row; writes benchmarks/results/gpu_check*.{md,json}
#   bash benchmarks/gpu_check.sh --dry-run    # the same commands at K = 1 2, tiny shapes (runs on a CPU)
#
# Rows: ms/round, compile s cold and cached, GFLOP/s, % of the matmul peak measured in the
# same run, ratios to the loop and to the PyTorch loop, the load at each row
# (docs/performance.md explains every column).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--dry-run" ]; then
  KS=(1 2); SHAPE=(--quick --reps 1); TAG=gpu_check_dry
else
  KS=(1 8 32 128); SHAPE=(--size 64 --base 16 --depth 4 --reps 5); TAG=gpu_check
fi
"$PY" -c "import jax; print('[gpu_check] jax', jax.__version__, jax.devices())"
# --no-isolate: the JAX rows share one process (a process per row would start CUDA 16
# times and overrun the 8 minutes); the torch rows still run in processes of their own.
"$PY" benchmarks/round_speed.py --ks "${KS[@]}" "${SHAPE[@]}" --no-isolate \
    --strategies loop vmap sharded torch --torch-device auto \
    --tag "$TAG" --out "$OUT"
"$PY" benchmarks/round_speed.py --ks "${KS[@]}" "${SHAPE[@]}" --no-isolate \
    --strategies vmap --dtype bfloat16 --no-cached-compile --tag "${TAG}_bf16" --out "$OUT"
echo "[gpu_check] wrote $OUT/$TAG.md and $OUT/${TAG}_bf16.md"
