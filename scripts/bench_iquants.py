#!/usr/bin/env python3
"""I-quant and MXFP4 quantization speed: smolq's C kernel vs llama.cpp's
ggml_quantize_chunk (libggml from llama-cpp-python), one thread each, in
the same process, on the same random f32 rows with the same imatrix.

    .venv/bin/python scripts/bench_iquants.py                  # every i-quant and MXFP4, 256 MB of f32 each
    .venv/bin/python scripts/bench_iquants.py --mb 32 --types iq4_nl iq3_s
    .venv/bin/python scripts/bench_iquants.py --mb 8 --types iq2_xxs iq1_s --ref

The data is cut into chunks of --chunk-mb, and each chunk is quantized by
both in turn, so a machine whose load changes during the run slows both
alike; times are the calling thread's CPU time (smolq's includes the
binding's checks). Each side builds its search tables first (IQ2/IQ1/IQ3
grids and neighbour lists: llama.cpp's ggml_quantize_init, smolq's tables on
first use), timed apart as "init". Throughput is MB/s of f32 input; "ratio" is
smolq / llama.cpp (>= 1: smolq is at least as fast). "same" says whether the
bytes are equal (exit 1 if not). smolq's scalar reference path is timed too
with --ref. Any type the kernel quantizes can be named. Results: a table on
stdout and JSON in bench-results/bench_iquants.json ($SMOLQ_LIBGGML points at
another libggml).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import smolq.kernels as K  # noqa: E402
from benchlib import cpu_name  # noqa: E402
from smolq.ggml_types import GGMLType  # noqa: E402

from ggml_lib import NO_LIBGGML, ggml_quantize_chunk, load_libggml  # noqa: E402

DEFAULT_TYPES = ["iq4_nl", "iq4_xs", "mxfp4", "iq3_xxs", "iq3_s", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"]


def make_rows(nrows: int, ncols: int, seed: int) -> np.ndarray:
    """Weights-like rows: gaussian, per-row scales, a few outlier columns."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nrows, ncols), dtype=np.float32)
    x *= rng.uniform(0.005, 0.05, (nrows, 1)).astype(np.float32)
    x[:, rng.integers(0, ncols, 8)] *= 8
    return x


def timed(fn) -> tuple[float, np.ndarray]:
    """CPU time of this thread (both quantizers run on the calling thread at one
    thread), so other processes on a busy machine do not skew the comparison."""
    t0 = time.thread_time()
    out = fn()
    return time.thread_time() - t0, out


def init_tables(lib, t: GGMLType, x: np.ndarray, imatrix: np.ndarray) -> dict:
    """Each side's search tables built before the timing: seconds (wall) each took."""
    t0 = time.perf_counter()
    lib.ggml_quantize_init(int(t))
    t1 = time.perf_counter()
    K.quantize(x[:1], t, imatrix=imatrix, threads=1)
    return {"llama_cpp_init_s": t1 - t0, "smolq_init_s": time.perf_counter() - t1}


def bench_type(lib, name: str, chunks: list[np.ndarray], imatrix: np.ndarray, with_ref: bool) -> dict:
    t = GGMLType.from_name(name.upper())
    row_bytes = K.row_size(t, chunks[0].shape[1])
    init = init_tables(lib, t, chunks[0], imatrix)
    total = {"smolq": 0.0, "llama": 0.0, "ref": 0.0}
    same = True
    for x in chunks:
        ts, ours = timed(lambda: K.quantize(x, t, imatrix=imatrix, threads=1))
        tl, theirs = timed(lambda: ggml_quantize_chunk(lib, int(t), x, imatrix, row_bytes))
        total["smolq"] += ts
        total["llama"] += tl
        same &= bool(np.array_equal(ours, theirs))
        if with_ref:
            tr, ref = timed(lambda: K.quantize(x, t, imatrix=imatrix, threads=1, impl="ref"))
            total["ref"] += tr
            same &= bool(np.array_equal(ref, theirs))
    mb = sum(x.nbytes for x in chunks) / 1e6
    row = {"type": t.name, "mb": mb, "smolq_mb_s": mb / total["smolq"], "llama_cpp_mb_s": mb / total["llama"],
           "ratio": total["llama"] / total["smolq"], "same_bytes": same, **init}
    if with_ref:
        row["smolq_ref_mb_s"] = mb / total["ref"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=256, help="MB of f32 input per type (default 256)")
    ap.add_argument("--chunk-mb", type=float, default=16)
    ap.add_argument("--cols", type=int, default=4096, help="row length (a multiple of 256)")
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--ref", action="store_true", help="also time smolq's scalar reference path")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench_iquants.json")
    args = ap.parse_args()
    lib = load_libggml()
    if lib is None:
        print(f"bench_iquants: {NO_LIBGGML}", file=sys.stderr)
        return 2
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    if args.cols % 256:
        print(f"bench_iquants: --cols {args.cols} is not a multiple of 256", file=sys.stderr)
        return 2

    rows_per_chunk = max(1, int(args.chunk_mb * 1e6 / (4 * args.cols)))
    nchunks = max(1, round(args.mb * 1e6 / (4 * args.cols * rows_per_chunk)))
    imatrix = (np.random.default_rng(1).gamma(0.7, 1.0, args.cols) * 10).astype(np.float32)
    # one chunk of data reused: the same bytes for every type keep memory at one chunk
    chunk = make_rows(rows_per_chunk, args.cols, seed=0)
    chunks = [chunk] * nchunks

    results = []
    for tname in args.types:
        row = bench_type(lib, tname, chunks, imatrix, args.ref)
        results.append(row)
        print_row(row, first=len(results) == 1, with_ref=args.ref)

    report = {"cols": args.cols, "mb_per_type": results[0]["mb"] if results else 0, "chunk_rows": rows_per_chunk,
              "threads": 1, "imatrix": True,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": cpu_name()},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    slower = [r["type"] for r in results if r["ratio"] < 1]
    print(f"\nMB/s of f32 input, 1 thread, with an imatrix; JSON: {args.out}")
    if slower:
        print(f"smolq slower than llama.cpp for: {', '.join(slower)}")
    return 0 if all(r["same_bytes"] for r in results) else 1


def print_row(row: dict, first: bool, with_ref: bool) -> None:
    cols = [("type", "type", "{}"), ("smolq_mb_s", "smolq", "{:,.1f}"), ("llama_cpp_mb_s", "llama.cpp", "{:,.1f}"),
            ("ratio", "ratio", "{:.2f}"), ("same_bytes", "same", "{}"), ("llama_cpp_init_s", "init llama", "{:.3f}s"),
            ("smolq_init_s", "init smolq", "{:.3f}s")]
    if with_ref:
        cols.insert(2, ("smolq_ref_mb_s", "smolq ref", "{:,.1f}"))
    if first:
        print(" ".join(f"{h:>10}" for _, h, _ in cols))
    print(" ".join(f"{(f.format(row[k]) if not isinstance(row[k], bool) else ('yes' if row[k] else 'NO')):>10}"
                   for k, _, f in cols), flush=True)


if __name__ == "__main__":
    sys.exit(main())
