#!/usr/bin/env python3
"""i-quant quantization speed: the smolq C kernel vs llama.cpp's own code
(libggml's ggml_quantize_chunk, from llama-cpp-python), in one process, one
thread, on the same random f32 rows and importance vector.

    .venv/bin/python scripts/bench_iquants_12.py                    # 256 x 4096
    .venv/bin/python scripts/bench_iquants_12.py --rows 64 --types iq1_s iq1_m

Throughput is MB/s of f32 input (rows * cols * 4 bytes), best of --repeat
runs, timed by the calling thread's CPU time (both sides run in it; on a
busy machine that is steadier than the wall clock, which the JSON also
records), after each side has built its search tables (timed apart as "init":
llama.cpp's iq2xs_init_impl, smolq's tables on first use). "ratio" is smolq's
MB/s over llama.cpp's (>= 1: smolq at least as fast); "same" says whether the
bytes are identical. Any ggml type the kernel quantizes can be named, so the
other i-quants fit the same table. Results: a table on stdout and JSON in
bench-results/bench_iquants_12.json ($SMOLQ_LIBGGML points at another libggml).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import smolq.kernels as K  # noqa: E402
from smolq.ggml_types import GGMLType  # noqa: E402

from ggml_lib import NO_LIBGGML, find_libggml  # noqa: E402

DEFAULT_TYPES = ["iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"]


def best_time(fn, repeat: int) -> tuple[float, float, object]:
    """Best thread CPU time and best wall time of `repeat` runs, and the last result."""
    cpu, wall, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn()
        cpu, wall = min(cpu, time.thread_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall, out


def load_libggml() -> ctypes.CDLL:
    path = find_libggml()
    if path is None:
        sys.exit(f"bench_iquants_12: {NO_LIBGGML}")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def bench_type(lib: ctypes.CDLL, name: str, x: np.ndarray, imatrix: np.ndarray, repeat: int) -> dict:
    t = GGMLType.from_name(name.upper())
    out = np.zeros((x.shape[0], K.row_size(t, x.shape[1])), dtype=np.uint8)

    def ggml():
        lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                imatrix.ctypes.data)
        return out

    def smolq(impl="fast"):
        return K.quantize(x, t, imatrix=imatrix, threads=1, impl=impl)

    t0 = time.perf_counter()
    lib.ggml_quantize_init(int(t))
    ggml_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    K.quantize(x[:1], t, imatrix=imatrix, threads=1)
    smolq_init = time.perf_counter() - t0
    mb = x.nbytes / 1e6
    t_ggml, w_ggml, want = best_time(ggml, repeat)
    t_smolq, w_smolq, got = best_time(smolq, repeat)
    t_ref, _, ref = best_time(lambda: smolq("ref"), repeat)
    return {
        "type": t.name, "ggml_mb_s": mb / t_ggml, "smolq_mb_s": mb / t_smolq, "smolq_ref_mb_s": mb / t_ref,
        "ratio": t_ggml / t_smolq, "same": bool(np.array_equal(got, want) and np.array_equal(ref, want)),
        "ggml_wall_mb_s": mb / w_ggml, "smolq_wall_mb_s": mb / w_smolq,
        "ggml_init_s": ggml_init, "smolq_init_s": smolq_init,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench_iquants_12.json")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = (rng.standard_normal((args.rows, args.cols)) * rng.uniform(0.01, 2, (args.rows, 1))).astype(np.float32)
    x[:, rng.integers(0, args.cols, args.cols // 256)] *= 10  # outlier columns, as real weights have
    imatrix = (rng.gamma(0.7, 1.0, args.cols) * 10).astype(np.float32)  # llama-imatrix-like spread
    lib = load_libggml()

    results = [bench_type(lib, name, x, imatrix, args.repeat) for name in args.types]
    print(f"{args.rows} x {args.cols} f32 ({x.nbytes / 1e6:.1f} MB), 1 thread, best of {args.repeat} (thread CPU time)")
    print(f"{'type':8} {'llama.cpp MB/s':>14} {'smolq MB/s':>10} {'ref MB/s':>9} {'ratio':>6} {'same':>5}"
          f" {'init llama.cpp':>14} {'init smolq':>10}")
    for r in results:
        print(f"{r['type']:8} {r['ggml_mb_s']:14.2f} {r['smolq_mb_s']:10.2f} {r['smolq_ref_mb_s']:9.2f}"
              f" {r['ratio']:6.2f} {'yes' if r['same'] else 'NO':>5} {r['ggml_init_s']:13.2f}s {r['smolq_init_s']:9.3f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": args.rows, "cols": args.cols, "repeat": args.repeat, "threads": 1, "timing": "thread CPU time",
        "machine": platform.machine(), "processor": platform.processor(), "libggml": str(find_libggml()),
        "results": results,
    }, indent=2) + "\n")
    print(f"JSON: {args.out}")
    return 0 if all(r["same"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
