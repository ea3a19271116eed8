#!/usr/bin/env bash
# The GPU check: the property suite natively on the GPU, then the benchmark.
# Usage: bash bench/gpu_check.sh [tests|bench|all] ; logs go to $OUT (default ./gpu-out).
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" BI_DEVICE=gpu
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, jax, jaxlib, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'hypothesis', hypothesis.__version__, jax.devices())" | tee -a "$OUT/device.txt"
status=0
if [[ $what == tests || $what == all ]]; then
  # BI_TEST_K: an optional pytest -k expression (to split the suite over runs).
  python3 -m pytest tests -q -rfExXp -n "${BI_TEST_WORKERS:-4}" --durations=15 --junitxml="$OUT/junit.xml" \
    ${BI_TEST_K:+-k "$BI_TEST_K"} 2>&1 | tee "$OUT/pytest.log" | tail -60
  status=$?
fi
if [[ $what == bench || $what == all ]]; then
  # BI_BENCH_ARGS: optional extra arguments, e.g. "--ops matmul --frameworks jax".
  python3 -m bench --out "$OUT/bench" ${BI_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  status=$((status || $?))
fi
exit $status
