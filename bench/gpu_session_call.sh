export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD BI_DEVICE=gpu XLA_PYTHON_CLIENT_PREALLOCATE=false
git log --oneline -1 > $OUT/commit.txt
BI_TEST_PATHS=tests/test_grad.py BI_TEST_K="attention" BI_TEST_PART=grad_attn BI_TEST_WORKERS=6 BI_TEST_ARGS="--tb=short" OUT=$OUT timeout 220 bash bench/gpu_check.sh tests > /dev/null 2>&1; echo "tests rc $?"; grep -cE " PASSED" $OUT/grad_attn.log; grep -E "FAILED" $OUT/grad_attn.log | head; head -c 2500 $OUT/grad_attn.failures.txt 2>/dev/null; tail -3 $OUT/grad_attn.log
timeout 340 python3 -m bench --e2e --frameworks jax --e2e-requests 16 --e2e-runs 2 --out $OUT/e2e-jax > $OUT/e2e-jax.log 2>&1; echo "e2e rc $?"; tail -22 $OUT/e2e-jax.log
