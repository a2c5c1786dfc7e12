#!/usr/bin/env python3
"""The --target-size row of a quality benchmark: a smolq file no bigger than a competitor's.

    .venv/bin/python scripts/bench_target.py model-f16.gguf --match llama-q4_k_m.gguf \
        --imatrix model.imatrix -o smolq-target.gguf

Quantizes SRC with `smolq quantize --target-size <the --match file's size>` (or --size)
in its own process (one thread unless --threads), timed, and
prints one JSON row: the output, its bytes (never above the match), bpw, the predicted
loss and how many tensors took each type. A benchmark (scripts/bench_quality.py) imports
`target_row` and adds its perplexity beside the competitor's at equal size.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def target_row(src: Path, out: Path, *, size: int, imatrix: Path | None = None, candidates: str | None = None,
               threads: int = 1) -> dict:
    """Quantize `src` into `out` within `size` bytes; the row (raises on failure)."""
    cmd = [sys.executable, "-m", "smolq", "quantize", str(src), str(out), "--target-size", str(size),
           "--threads", str(threads), "--json", "--quiet"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if candidates:
        cmd += ["--candidates", candidates]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"smolq quantize failed: {run.stderr[-2000:]}")
    summary = json.loads(run.stdout)
    a = summary["allocation"]
    types = collections.Counter(r["type"] for r in summary["tensors"] if "loss" in r)
    return {"name": f"smolq --target-size {size}", "file": str(out), "bytes": out.stat().st_size,
            "target_bytes": size, "bpw": a["bpw"], "predicted_loss": a["predicted_loss"],
            "types": dict(sorted(types.items())), "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="F16/F32 GGUF to quantize")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--match", type=Path, help="a competitor's file: its size is the budget")
    size.add_argument("--size", help="the budget in bytes")
    p.add_argument("--imatrix", type=Path)
    p.add_argument("--candidates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--out", type=Path, required=True)
    args = p.parse_args(argv)
    budget = args.match.stat().st_size if args.match else int(args.size)
    row = target_row(args.src, args.out, size=budget, imatrix=args.imatrix, candidates=args.candidates,
                     threads=args.threads)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
