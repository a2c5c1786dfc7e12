"""Where llama.cpp's own ggml library is, for byte-identity checks.

`make setup` installs llama-cpp-python, which builds libggml-base with the
reference quantizers (quantize_row_*_ref, quantize_q*, ggml_quantize_chunk).
$SMOLQ_LIBGGML points elsewhere; tests skip with this reason when absent.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np

NO_LIBGGML = "libggml from llama-cpp-python not installed (make setup installs it)"


def find_libggml() -> Path | None:
    env = os.environ.get("SMOLQ_LIBGGML")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        return None
    for root in spec.submodule_search_locations or []:
        for name in ("libggml-base.so", "libggml-base.dylib"):
            p = Path(root) / "lib" / name
            if p.exists():
                return p
    return None


# --------------------------------------------------------------------------- ctypes calls into libggml

class _TypeTraits(ctypes.Structure):
    """ggml.h `struct ggml_type_traits` (0.3.36): what ggml_get_type_traits returns."""
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def load_libggml() -> ctypes.CDLL | None:
    """libggml-base with ggml_quantize_chunk's and the type traits' signatures set, or None."""
    path = find_libggml()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize_chunk(lib: ctypes.CDLL, type_id: int, x, imatrix, row_bytes: int):
    """llama.cpp's ggml_quantize_chunk (what llama-quantize runs) on float32 rows x."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    out = np.zeros((x.shape[0], row_bytes), dtype=np.uint8)
    n = lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if w is None else w.ctypes.data)
    assert n == out.size, (n, out.size)
    return out


def ggml_to_float(lib: ctypes.CDLL, type_id: int, raw, n: int):
    """The type's dequantizer from ggml_get_type_traits(type)->to_float on n elements."""
    traits = lib.ggml_get_type_traits(type_id).contents
    if not traits.to_float:
        return None
    raw = np.ascontiguousarray(raw)
    out = np.empty(n, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data, n)
    return out
