#!/usr/bin/env bash
# The GPU check: the property suite natively on the GPU, and the benchmark.
#
#   bash bench/gpu_check.sh tests    # the suite (BI_TEST_K: a pytest -k expression, to run it in parts;
#                                    #   BI_TEST_WORKERS: pytest-xdist workers, default 4;
#                                    #   BI_TEST_ARGS: more pytest arguments, e.g. -x;
#                                    #   BI_TEST_PATHS: test files, default tests;
#                                    #   BI_MAX_EXAMPLES: Hypothesis examples per property;
#                                    #   BI_TEST_TIMEOUT: seconds, then pytest is interrupted and
#                                    #   stops its workers, so nothing overlaps what runs next)
#   bash bench/gpu_check.sh bench    # python -m bench (BI_BENCH_ARGS: extra arguments)
#   bash bench/gpu_check.sh spread DIR [DIR ...]
#                                    # the JAX timing twice per tree (this one, or another checkout
#                                    #   DIR such as an older commit), for bench.probes.timing_spread
#   bash bench/gpu_check.sh probes MODULE[:ARGS] ...
#                                    # bench.probes.MODULE each (ARGS: its arguments, + for
#                                    #   spaces), BI_PROBE_TIMEOUT seconds at most each (default 300)
#   bash bench/gpu_check.sh e2e      # python -m bench --e2e, one process per framework (BI_E2E_FRAMEWORKS,
#                                    #   default "torch jax"), each resuming the last one's e2e.json so the
#                                    #   last holds every engine and the cross-framework tokens;
#                                    #   BI_E2E_ARGS: its arguments (default 16 requests, 2 schedules, greedy);
#                                    #   BI_E2E_TIMEOUT: seconds per framework (default 280); JAX's compilations
#                                    #   cached in JAX_COMPILATION_CACHE_DIR (default /tmp/bi-e2e-xla) for the
#                                    #   next call on the same machine; BI_E2E_RESUME: an e2e.json (or
#                                    #   e2e.partial.json) of an earlier call for the first framework to resume
#   bash bench/gpu_check.sh matmul   # per framework (BI_MATMUL_FRAMEWORKS, default "torch jax"): the
#                                    #   tile-config bit proofs, then the matmul sweep at its full grid
#                                    #   (M = 1 ... 65536), one process per weight shape (BI_MATMUL_SHAPES,
#                                    #   default all six), all packed into $OUT/matmul.tgz; about 5 minutes
#                                    #   per framework on an H100, so within a 10-minute limit run it once
#                                    #   with BI_MATMUL_FRAMEWORKS=torch and once with BI_MATMUL_FRAMEWORKS=jax
#   bash bench/gpu_check.sh all      # tests, then bench
#
# Logs go to $OUT (default ./gpu-out); each part also packs its outputs into one
# $OUT/<part>.tgz, since a lent machine returns a few files only.
set -o pipefail
OUT=${OUT:-gpu-out}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
HERE=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" BI_DEVICE=gpu
what=${1:-all}
shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, jax, jaxlib, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'hypothesis', hypothesis.__version__, jax.devices())" | tee -a "$OUT/device.txt"
status=0

if [[ $what == tests || $what == all ]]; then
  part=${BI_TEST_PART:-tests}
  # -v: each test's result goes to the log as it ends (a run cut by a time
  # limit keeps the names of what passed and failed).
  # Failure reports as they happen (tests/conftest.py), not only at the end.
  # (a timeout around this script would leave pytest and its workers running)
  limit=()
  [[ -n ${BI_TEST_TIMEOUT:-} ]] && limit=(timeout -s INT -k 30 "$BI_TEST_TIMEOUT")
  BI_FAILURE_LOG="$OUT/$part.failures.txt" "${limit[@]}" python3 -m pytest ${BI_TEST_PATHS:-tests} -v -rfExXs -n "${BI_TEST_WORKERS:-4}" --durations=15 --junitxml="$OUT/$part.xml" \
    ${BI_TEST_ARGS:-} ${BI_TEST_K:+-k "$BI_TEST_K"} 2>&1 | tee "$OUT/$part.log" | tail -60
  status=$?
fi

if [[ $what == bench || $what == all ]]; then
  # BI_BENCH_ARGS: optional extra arguments, e.g. "--ops matmul --frameworks jax".
  python3 -m bench --out "$OUT/bench" ${BI_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30
  status=$((status || $?))
  tar czf "$OUT/bench.tgz" -C "$OUT" bench bench.log && rm -rf "$OUT/bench"
fi

if [[ $what == spread ]]; then
  # The same JAX points twice per tree, back to back on one machine.
  args=${BI_SPREAD_ARGS:---ops rms_norm --frameworks jax --m 1,16,256,4096 --features 4096,8192}
  mkdir -p "$OUT/spread"
  for tree in "$HERE" "$@"; do
    name=$(basename "$tree")
    for run in 1 2; do
      (cd "$tree" && PYTHONPATH="$tree" python3 -m bench $args --out "$OUT/spread/$name-$run") \
        > "$OUT/spread/$name-$run.log" 2>&1 || status=1
      tail -3 "$OUT/spread/$name-$run.log"
    done
    python3 -m bench.probes.timing_spread --label "$name" "$OUT/spread/$name-1/results.json" \
      "$OUT/spread/$name-2/results.json" 2>&1 | tee "$OUT/spread/$name-spread.txt" | tail -3
  done
  find "$OUT/spread" -name '*.png' -delete
  tar czf "$OUT/spread.tgz" -C "$OUT" spread && rm -rf "$OUT/spread"
fi
if [[ $what == e2e ]]; then
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/bi-e2e-xla}
  args=${BI_E2E_ARGS:---e2e-requests 16 --e2e-runs 2 --e2e-temperatures 0}
  resume=()
  [[ -n ${BI_E2E_RESUME:-} ]] && resume=(--e2e-resume "$BI_E2E_RESUME")
  for fw in ${BI_E2E_FRAMEWORKS:-torch jax}; do
    echo "=== e2e $fw"
    timeout -s INT -k 20 "${BI_E2E_TIMEOUT:-280}" python3 -m bench --e2e --frameworks "$fw" $args "${resume[@]}" \
      --out "$OUT/e2e-$fw" > "$OUT/e2e-$fw.log" 2>&1 || status=1
    tail -12 "$OUT/e2e-$fw.log"
    if [[ -f $OUT/e2e-$fw/e2e.json ]]; then
      resume=(--e2e-resume "$OUT/e2e-$fw/e2e.json")
    elif [[ -f $OUT/e2e-$fw/e2e.partial.json ]]; then
      resume=(--e2e-resume "$OUT/e2e-$fw/e2e.partial.json")
    fi
  done
  find "$OUT" -path "$OUT/e2e-*" -name '*.png' -delete
  tar czf "$OUT/e2e.tgz" -C "$OUT" $(cd "$OUT" && ls -d e2e-*)
fi
if [[ $what == matmul ]]; then
  # One process per shape, each packed into $OUT/matmul.tgz as it ends (the
  # outputs live outside $OUT): a call cut by its time limit still returns
  # the shapes that finished, in one file.
  work=$(mktemp -d)/matmul
  mkdir -p "$work"
  shapes=${BI_MATMUL_SHAPES:-4096x4096 4096x14336 14336x4096 8192x28672 8192x8192 28672x8192}
  for fw in ${BI_MATMUL_FRAMEWORKS:-torch jax}; do
    # The bit proofs of every config the tables can pick come first: a table
    # that breaks them is a defect whatever its speed.
    proofs=tests/test_matmul.py; [[ $fw == jax ]] && proofs=tests/test_matmul_jax.py
    python3 -m pytest "$proofs" -m gpu -q -p no:cacheprovider --durations=5 > "$work/proofs-$fw.log" 2>&1 \
      || status=1
    tail -3 "$work/proofs-$fw.log"
    tar czf "$OUT/matmul.tgz" -C "$(dirname "$work")" matmul
    for shape in $shapes; do
      python3 -m bench --ops matmul --frameworks "$fw" --features "$shape" --out "$work/$fw-$shape" \
        > "$work/$fw-$shape.log" 2>&1 || status=1
      tail -2 "$work/$fw-$shape.log"
      rm -rf "$work/$fw-$shape/plots"
      tar czf "$OUT/matmul.tgz" -C "$(dirname "$work")" matmul
    done
  done
fi
if [[ $what == probes ]]; then
  mkdir -p "$OUT/probes"
  for spec in "$@"; do
    mod=${spec%%:*}
    probe_args=$([[ $spec == *:* ]] && echo "${spec#*:}" | tr '+' ' ')
    echo "=== bench.probes.$mod $probe_args"
    timeout "${BI_PROBE_TIMEOUT:-300}" python3 -m "bench.probes.$mod" --out "$OUT/probes" $probe_args \
      > "$OUT/probes/$mod.log" 2>&1
    rc=$?
    if ((rc)); then status=1; echo "bench.probes.$mod: exit $rc"; fi
    tail -5 "$OUT/probes/$mod.log"
  done
  tar czf "$OUT/probes.tgz" -C "$OUT" probes
fi
exit $status
