"""The schedule checks of ``harness.attention`` at fixed sizes, each caught
and reported (pass, the property's failure or any other exception, seconds):
a quick way to see what a failing Hypothesis example hit, without its
shrinking::

    python -m bench.probes.attention_checks [--frameworks torch,jax] [--dtypes float32]
        [--sizes 100,600,1200] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import time
import traceback
from pathlib import Path

import numpy as np

from harness import attention as props
from harness.devices import configure
from bench.probes._log import jsonl_emitter

HEADS = (props.Heads(8, 2, 128), props.Heads(4, 4, 64), props.Heads(4, 1, 256))


def _checks(runner, n, heads, dtype):
    yield "packed_position", lambda rng: props.check_packed_position(runner, rng, n, heads, dtype, "probe")
    yield "split_kv", lambda rng: props.check_split_kv(runner, rng, 4 * n, 2, heads, dtype, "probe")
    yield "chunked_and_decode", lambda rng: props.check_chunked_and_decode(runner, rng, min(n, 200), heads, dtype,
                                                                         "probe", others=2)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_checks", description=__doc__.splitlines()[0])
    p.add_argument("--frameworks", default="torch,jax")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--sizes", default="100,600,1200")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    configure()  # the GPU, or the CPU interpreters (before any kernel package is imported)
    emit = jsonl_emitter(args.out, "attention_checks")
    only = set(filter(None, args.only.split(",")))
    for fw, dtype, n, heads in itertools.product(args.frameworks.split(","), args.dtypes.split(","),
                                                 [int(x) for x in args.sizes.split(",")], HEADS):
        runner = props.Runner(fw)
        for name, check in _checks(runner, n, heads, dtype):
            if only and name not in only:
                continue
            rec = {"framework": fw, "dtype": dtype, "n": n, "heads": [heads.hq, heads.hkv, heads.d], "check": name}
            t0 = time.perf_counter()
            try:
                check(np.random.default_rng(n))
                rec["result"] = "pass"
            except props.BatchVarianceError as e:
                rec["result"], rec["error"] = "varies", str(e)[:600]
            except Exception as e:  # a probe: report it and go on
                rec["result"] = type(e).__name__
                rec["error"] = "".join(traceback.format_exception_only(e))[-900:]
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            emit(rec)


if __name__ == "__main__":
    main()
