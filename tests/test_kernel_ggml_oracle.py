"""Byte identity with llama.cpp's own C quantizers (ggml-quants.c), imatrix
paths included. Skipped unless SMOLQ_GGML_QUANTS_LIB names a shared library
built from llama.cpp's ggml/src/ggml-quants.c, for example:

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/ggml
    tar xzf /tmp/ggml/llama_cpp_python-*.tar.gz -C /tmp/ggml
    cd /tmp/ggml/llama_cpp_python-*/vendor/llama.cpp/ggml
    # ggml-quants.c needs ggml_abort, ggml_row_size, ggml_type_size, ggml_type_name
    gcc -O2 -std=c11 -fPIC -shared -Iinclude -Isrc src/ggml-quants.c stubs.c -o libquants.so -lm

(stubs.c: ggml_abort -> abort(); ggml_row_size(t, n) = bytes_per_block(t) * n / block(t).)
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

import smolq.kernels as K

from test_kernel_quant import hard_rows

from ggml_lib import NO_LIBGGML, find_libggml

# $SMOLQ_GGML_QUANTS_LIB: a library built from ggml-quants.c alone (see above);
# otherwise the libggml-base that llama-cpp-python builds.
LIB = os.environ.get("SMOLQ_GGML_QUANTS_LIB") or find_libggml()
pytestmark = pytest.mark.skipif(not LIB, reason=NO_LIBGGML)

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"]


@pytest.fixture(scope="module")
def ggml():
    return ctypes.CDLL(str(LIB))


def ggml_quantize(lib, name, x, imatrix):
    fn = getattr(lib, f"quantize_{name.lower()}")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    out = np.zeros((x.shape[0], K.row_size(name, x.shape[1])), dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], imatrix.ctypes.data if imatrix is not None else None)
    return out


def ggml_dequantize(lib, name, raw, n):
    fn = getattr(lib, f"dequantize_row_{name.lower()}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    out = np.empty(n, dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data, n)
    return out


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_quantize_matches_llama_cpp(ggml, name, weighted):
    x = hard_rows(seed=21)
    x = x[np.abs(x).max(axis=1) < 1e20]  # ggml asserts finite scales in its weighted search
    imatrix = np.random.default_rng(3).gamma(0.7, 1.0, x.shape[1]).astype(np.float32) if weighted else None
    want = ggml_quantize(ggml, name, x, imatrix)
    for impl in ("ref", "fast"):
        got = K.quantize(x, name, imatrix=imatrix, impl=impl, threads=2)
        assert np.array_equal(got, want), (impl, np.nonzero((got != want).any(axis=1))[0].tolist())


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_llama_cpp(ggml, name):
    x = hard_rows(seed=22)
    raw = np.ascontiguousarray(K.quantize(x, name))
    want = ggml_dequantize(ggml, name, raw, x.size).reshape(x.shape)
    for impl in ("ref", "fast"):
        got = K.dequantize(raw, name, x.shape, impl=impl)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), impl


@pytest.mark.parametrize("name", TYPES)
def test_signed_zeros_and_ties_match_llama_cpp(ggml, name):
    rng = np.random.default_rng(9)
    pool = np.array([-0.0, 0.0, 1.0, -1.0, 2.0, -2.0], dtype=np.float32)
    x = pool[rng.integers(0, 6, (128, 256))]
    x[:32] = pool[rng.integers(0, 2, (32, 256))]
    want = ggml_quantize(ggml, name, x, None)
    for impl in ("ref", "fast"):
        assert np.array_equal(K.quantize(x, name, impl=impl), want), impl


@pytest.mark.parametrize("name", TYPES)
def test_halfway_and_extreme_scales_match_llama_cpp(ggml, name):
    """Blocks whose scaled values sit exactly halfway between two codes (roundf's ties), and
    blocks whose maximum is subnormal (the inverse scale overflows to inf, so x*id is inf or
    NaN and the C float -> int cast decides the byte) or near FLT_MAX: the vector paths must
    reproduce llama.cpp's bytes there too, not only on well-behaved weights."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    halves = (rng.integers(-254, 255, (4, 256)) / 2).astype(np.float32)
    halves[:, ::32] = 127.0  # amax 127: Q8_0's d = 1, so every half-integer is a tie
    x[:4] = halves
    x[4:6] = rng.integers(-3, 4, (2, 256)) * np.float32(1e-45)  # subnormal maxima
    x[6] = -0.0
    x[6, 5::32] = np.float32(1e-38)
    x[7] *= np.float32(1e37)  # near overflow
    want = ggml_quantize(ggml, name, x, None)
    for impl in ("ref", "fast"):
        got = K.quantize(x, name, impl=impl)
        bad = np.nonzero((got != want).any(axis=1))[0]
        assert bad.size == 0, f"{impl}: rows {bad.tolist()} differ from llama.cpp"
