"""kernels.requantize (decode a stored row, check it, quantize it, in one kernel
pass): the same bytes as dequantize then quantize, and for f16 -> Q4_0/Q8_0 the
bytes gguf.quants (the numpy mirror of llama.cpp's reference quantizers) writes."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

import smolq.kernels as K

SOURCES = [("F32", "v3"), ("F16", "v3"), ("BF16", "v3"), ("Q8_0", "v3"), ("Q4_0", "v1"), ("Q5_1", "v2"),
           ("Q4_K", "v3"), ("Q6_K", "v3"), ("IQ4_NL", "v3")]
TARGETS = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q4_K", "Q6_K", "IQ4_XS", "IQ3_S", "TQ2_0", "F16", "BF16"]


def rows(seed: int = 0, nrows: int = 24, ncols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nrows, ncols)).astype(np.float32) * rng.gamma(1.0, 0.05, ncols).astype(np.float32)
    x[3] = 0.0
    x[5, ::7] *= 40.0  # outliers
    x[7] = rng.integers(-8, 8, ncols) * 0.25  # exact grid values: ties
    return x


def stored(x: np.ndarray, src: str, layout: str) -> np.ndarray:
    return K.quantize(x, src, layout=layout) if src not in ("F32",) else x.view(np.uint8).copy()


@pytest.mark.parametrize("src,layout", SOURCES)
@pytest.mark.parametrize("dst", TARGETS)
def test_equals_dequantize_then_quantize(src, layout, dst):
    x = rows(seed=len(src) + len(dst))
    raw = stored(x, src, layout)
    imatrix = np.random.default_rng(5).gamma(0.7, 1.0, x.shape[1]).astype(np.float32)
    decoded = K.dequantize(raw, src, x.shape, layout=layout)
    for w in (None, imatrix):
        want = K.quantize(decoded, dst, imatrix=w)
        for threads in (1, 3):
            got = K.requantize(raw, src, x.shape, dst, src_layout=layout, imatrix=w, threads=threads)
            assert np.array_equal(got, want), (src, dst, w is not None, threads)


@pytest.mark.parametrize("dst", ["Q4_0", "Q8_0", "Q5_0", "Q4_1"])
def test_f16_source_matches_gguf_quants(dst):
    """The job `smolq quantize f16.gguf --type q4_0` runs, against an independent quantizer."""
    x = rows(seed=11, nrows=64, ncols=2048).astype(np.float16)
    got = K.requantize(x.view(np.uint8), "F16", x.shape, dst)
    with np.errstate(all="ignore"):
        want = gq.quantize(x.astype(np.float32), G[dst]).view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(got, want)


def test_ref_and_fast_paths_agree():
    x = rows(seed=3)
    raw = x.astype(np.float16).view(np.uint8)
    for dst in ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"):
        assert np.array_equal(K.requantize(raw, "F16", x.shape, dst, impl="ref"),
                              K.requantize(raw, "F16", x.shape, dst, impl="fast")), dst


def test_non_finite_rows_are_refused_for_quantized_types_only():
    x = rows(seed=4).astype(np.float16)
    x[9, 100] = np.inf
    raw = x.view(np.uint8)
    for dst in ("Q4_0", "Q4_K", "IQ4_XS"):
        with pytest.raises(ValueError, match="NaN or infinite"):
            K.requantize(raw, "F16", x.shape, dst, threads=2)
    f32 = K.requantize(raw, "F16", x.shape, "F32")  # a float type holds it
    assert np.isinf(f32.reshape(-1).view(np.float32)[9 * x.shape[1] + 100])


def test_bad_arguments_raise_clear_errors():
    x = rows(seed=6).astype(np.float16)
    raw = x.view(np.uint8)
    with pytest.raises(ValueError, match="needs .* bytes"):
        K.requantize(raw[:-2], "F16", x.shape, "Q4_0")
    with pytest.raises(ValueError, match="importance matrix"):
        K.requantize(raw, "F16", x.shape, "IQ2_XXS")
    with pytest.raises(ValueError, match="imatrix has"):
        K.requantize(raw, "F16", x.shape, "Q4_K", imatrix=np.ones(7, np.float32))
    with pytest.raises(ValueError, match="multiple of Q4_K's block"):
        K.requantize(raw[: 24 * 96 * 2], "F16", (24, 96), "Q4_K")
    out = np.empty((24, 1), np.uint8)
    with pytest.raises(ValueError, match="out must be"):
        K.requantize(raw, "F16", x.shape, "Q4_0", out=out)
    assert K.requantize(b"", "F16", (0, 64), "Q4_0").shape == (0, 36)
