"""llama.cpp's own i-quant code as the oracle for the kernel's i-quants.

libggml (tests/ggml_lib.py) exports ggml_quantize_chunk and the
dequantize_row_* functions. llama.cpp aborts the process on input its
searches cannot handle, so `ggml_quantize` runs the quantizer in a forked
child (the parent's grid tables come along): an abort comes back as None
instead of killing the test run.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
from functools import lru_cache

import numpy as np

import smolq.kernels as K
from smolq.ggml_types import GGMLType

from ggml_lib import load_libggml


@lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL | None:
    """ggml_lib's libggml-base, plus the two i-quant entry points this oracle also calls."""
    lib = load_libggml()
    if lib is None:
        return None
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _chunk(lib: ctypes.CDLL, name: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    out = np.zeros((x.shape[0], K.row_size(name, x.shape[1])), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(GGMLType.from_name(name)), _ptr(x), _ptr(out), 0, x.shape[0], x.shape[1],
                            _ptr(imatrix))
    return out


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def ggml_quantize(name: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray | None:
    """llama.cpp's bytes for rows x (ggml_quantize_chunk), or None where it aborts."""
    lib = libggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_init(int(GGMLType.from_name(name)))  # slow (seconds): once, here, not in every child
    if not hasattr(os, "fork"):
        return _chunk(lib, name, x, imatrix)
    shape = (x.shape[0], K.row_size(name, x.shape[1]))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: quantize, send the bytes, never return into pytest
        try:
            os.close(rfd)
            os.environ["GGML_NO_BACKTRACE"] = "1"  # else ggml_abort attaches a debugger: seconds per abort
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)  # llama.cpp's "Oops" lines
            os.dup2(null, 1)
            data = _chunk(lib, name, x, imatrix).tobytes()
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        finally:
            os._exit(0)
    os.close(wfd)
    data = _read_all(rfd)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT:
        return None
    assert status == 0 and len(data) == shape[0] * shape[1], f"llama.cpp's child ended with status {status}"
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def ggml_dequantize(name: str, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """llama.cpp's dequantize_row_<type> (the type's to_float) of rows of `shape`."""
    fn = getattr(libggml(), f"dequantize_row_{name.lower()}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(shape, dtype=np.float32)
    fn(_ptr(raw), _ptr(out), out.size)
    return out


def hard_iquant_rows(seed: int = 0, ncols: int = 768) -> np.ndarray:
    """Random rows plus the awkward cases, ncols a multiple of 256 (several super-blocks)."""
    rng = np.random.default_rng(seed)
    n = ncols
    outliers = rng.standard_normal(n)
    outliers[rng.integers(0, n, 9)] *= 500.0
    single = np.full(n, 0.25)
    single[rng.integers(0, n)] = -40.0
    pool = np.array([-1.0, -0.5, -0.0, 0.0, 0.5, 1.0])
    rows = [
        rng.standard_normal(n) * 0.02, rng.standard_normal(n), rng.standard_normal(n) * 7.0,
        outliers,
        single,                                            # one outlier in a constant row
        np.zeros(n),
        rng.standard_normal(n) * 1e-30,                    # below every zero threshold
        rng.standard_normal(n) * 1e-8,                     # around IQ2_S's / IQ1_M's thresholds
        rng.standard_normal(n) * 1e-6,
        rng.standard_normal(n) * 1e6,                      # large, but no search overflows
        np.full(n, 2.75), np.full(n, -0.5),                # constant
        -np.abs(rng.standard_normal(n)),                   # negative only
        np.abs(rng.standard_normal(n)) + 3.0,              # positive only, far from 0
        np.where(rng.random(n) < 0.5, 0.0, rng.standard_normal(n)),
        rng.integers(-8, 8, n) * 0.25,                     # few distinct values: rounding ties
        (rng.integers(-8, 8, n) + 0.5) * 0.125,
        pool[rng.integers(0, len(pool), n)],               # IQ1's sort sees many equal values, +-0
        np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * rng.uniform(0.5, 1.5, n),  # alternating signs
        rng.standard_t(2, n),                              # heavy tails
    ]
    # a block whose first half is zero and second half is not (IQ1_M splits blocks in halves)
    half = rng.standard_normal(n)
    half[np.arange(n) % 16 < 8] = 0.0
    rows.append(half)
    return np.stack(rows).astype(np.float32)


def imatrices(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Importance vectors: llama-imatrix-like, a wide range with zeros, all zero."""
    rng = np.random.default_rng(seed)
    gamma = (rng.gamma(0.7, 1.0, n) * 10).astype(np.float32)
    gamma[rng.random(n) < 0.1] = 0.0
    wide = (10.0 ** rng.uniform(-6, 3, n)).astype(np.float32)
    wide[rng.random(n) < 0.2] = 0.0
    return {"gamma": gamma, "wide": wide, "zeros": np.zeros(n, np.float32)}
