"""Importance-weighted (imatrix) quantization of the non-K types.

llama.cpp weighs each element by qw[j] * sqrt(sigma2 + x[j]^2) and searches
scales for the least weighted squared error; here we check that property
from the outside. Byte identity with llama.cpp itself is in
test_kernel_ggml_oracle.py (needs a built ggml-quants library)."""
from __future__ import annotations

import numpy as np
import pytest

import smolq.kernels as K


def data(seed=0, nrows=48, ncols=512):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((nrows, ncols)) * rng.uniform(0.05, 3, (nrows, 1))).astype(np.float32)
    x[:, rng.integers(0, ncols, 6)] *= 8  # a few outlier columns, as real weights have
    imatrix = (rng.gamma(0.7, 1.0, ncols) * 10).astype(np.float32)
    return x, imatrix


def weighted_error(x, y, imatrix):
    sigma2 = np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True)
    w = imatrix[None, :] * np.sqrt(sigma2 + x.astype(np.float64) ** 2)
    return float(np.sum(w * (x - y) ** 2))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("layout", ["v1", "v3"])
def test_imatrix_lowers_the_weighted_error(name, layout):
    x, imatrix = data()
    plain = K.dequantize(K.quantize(x, name, layout=layout), name, x.shape, layout=layout)
    weighted_q = K.quantize(x, name, layout=layout, imatrix=imatrix)
    weighted = K.dequantize(weighted_q, name, x.shape, layout=layout)
    e_plain, e_weighted = weighted_error(x, plain, imatrix), weighted_error(x, weighted, imatrix)
    assert e_weighted < 0.97 * e_plain, (e_weighted, e_plain)  # typically 8-30% lower
    # ... and it is still a quantization of x, not something else
    assert K.error_stats(x, weighted)["snr_db"] > (12 if name.startswith("Q4") else 18)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_imatrix_ref_equals_fast_and_threads(name):
    x, imatrix = data(1)
    a = K.quantize(x, name, imatrix=imatrix, impl="ref", threads=1)
    assert np.array_equal(a, K.quantize(x, name, imatrix=imatrix, impl="fast", threads=3))


@pytest.mark.parametrize("name", ["Q8_0", "TQ1_0", "TQ2_0", "F16", "BF16"])
def test_imatrix_is_ignored_where_llama_cpp_ignores_it(name):
    x, imatrix = data(2)
    assert np.array_equal(K.quantize(x, name, imatrix=imatrix), K.quantize(x, name))


def test_zero_importance_everywhere_still_quantizes():
    x, _ = data(3, nrows=4)
    q = K.quantize(x, "Q4_1", imatrix=np.zeros(x.shape[1], np.float32))
    y = K.dequantize(q, "Q4_1", x.shape)
    assert np.isfinite(y).all()


def test_bad_imatrix():
    x, imatrix = data(4, nrows=2)
    with pytest.raises(ValueError, match="finite"):
        K.quantize(x, "Q4_0", imatrix=np.full_like(imatrix, np.nan))
    with pytest.raises(ValueError, match=">= 0"):
        K.quantize(x, "Q4_0", imatrix=-imatrix)
