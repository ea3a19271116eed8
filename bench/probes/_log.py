"""The probes' output: one JSON line per record, to stdout and, with an
output folder, to ``<out>/<name>.jsonl`` (line-buffered, so a probe cut by a
time limit keeps every line it printed)."""

from __future__ import annotations

import json
from pathlib import Path


def jsonl_emitter(out: Path | None, name: str):
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / f"{name}.jsonl", "w", buffering=1)

    def emit(rec) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if log:
            log.write(line + "\n")

    return emit
