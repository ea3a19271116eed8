export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD BI_DEVICE=gpu XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p $OUT/p
git log --oneline -1 > $OUT/commit.txt
timeout 130 python3 -m bench.probes.attention_grad_bits --out $OUT/p --lengths 1,37,100,300,1000,2048 > $OUT/agb.log 2>&1; echo "agb rc $?"; grep -c '"stages_differ": \[\]' $OUT/agb.log; grep -v 'differ": \[\], "gradients_differ": \[\]' $OUT/agb.log | tail -40
BI_TEST_PATHS=tests/test_grad.py BI_TEST_K="attention and (invariance or parity)" BI_TEST_PART=grad_attn BI_TEST_WORKERS=4 BI_TEST_ARGS="--tb=short" OUT=$OUT timeout 170 bash bench/gpu_check.sh tests > /dev/null 2>&1; echo "tests rc $?"; grep -E "PASSED|FAILED|ERROR" $OUT/grad_attn.log | sed 's/.*:://' | sort | uniq -c | tail -40; grep -E "^E |Error:" $OUT/grad_attn.log | head -30
timeout 60 python3 -m bench.probes.e2e_ops --out $OUT/p > $OUT/e2e_ops.log 2>&1; echo "e2e_ops rc $?"; tail -20 $OUT/e2e_ops.log
timeout 190 python3 -m bench --e2e --frameworks torch --e2e-requests 16 --e2e-runs 2 --out $OUT/e2e-torch > $OUT/e2e-torch.log 2>&1; echo "e2e rc $?"; tail -30 $OUT/e2e-torch.log
