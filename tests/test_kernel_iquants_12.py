"""IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M in the C kernel.

Quantization against llama.cpp's own code (libggml's ggml_quantize_chunk,
tests/iquant_oracle.py), byte for byte, including where llama.cpp aborts;
dequantization against gguf-py's independent numpy decoder and libggml's
dequantize_row_*, bit for bit. Reference and fast paths, one thread and
several, must agree."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

import smolq.kernels as K
from smolq.ggml_types import GGMLType

from ggml_lib import NO_LIBGGML
from iquant_oracle import ggml_dequantize, ggml_quantize, hard_iquant_rows, imatrices, libggml

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}  # ggml_quantize_requires_imatrix
BLOCK_BYTES = {"IQ2_XXS": 66, "IQ2_XS": 74, "IQ2_S": 82, "IQ1_S": 50, "IQ1_M": 56}

needs_ggml = pytest.mark.skipif(libggml() is None, reason=NO_LIBGGML)


def imatrix_cases(name: str) -> list[str]:
    return ["gamma", "wide", "zeros"] + ([] if name in NEEDS_IMATRIX else ["none"])


def smolq_all_ways(x, name, imatrix):
    """The kernel's bytes by every path: ref and fast, one thread and three; all must agree."""
    runs = [K.quantize(x, name, imatrix=imatrix, impl=impl, threads=t) for impl in ("ref", "fast") for t in (1, 3)]
    for other in runs[1:]:
        assert np.array_equal(other, runs[0])
    return runs[0]


def differing_rows(got, want):
    return np.nonzero((got != want).any(axis=1))[0].tolist()


# --------------------------------------------------------------------------- quantization

@needs_ggml
@pytest.mark.parametrize("name", TYPES)
def test_block_sizes_match_llama_cpp(name):
    assert K.row_size(name, 256) == BLOCK_BYTES[name]
    assert bool(libggml().ggml_quantize_requires_imatrix(int(GGMLType.from_name(name)))) == (name in NEEDS_IMATRIX)


@needs_ggml
@pytest.mark.parametrize("name", TYPES)
def test_quantize_matches_llama_cpp(name):
    x = hard_iquant_rows(seed=1)
    for case in imatrix_cases(name):
        imatrix = None if case == "none" else imatrices(x.shape[1], seed=2)[case]
        want = ggml_quantize(name, x, imatrix)
        assert want is not None, f"llama.cpp aborted on the {case} matrix: choose tamer rows"
        got = smolq_all_ways(x, name, imatrix)
        assert np.array_equal(got, want), (case, differing_rows(got, want))


@needs_ggml
@pytest.mark.parametrize("name", TYPES)
def test_random_rows_match_llama_cpp(name):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((24, 1024)) * rng.uniform(0.001, 10, (24, 1))).astype(np.float32)
    x[:, rng.integers(0, 1024, 12)] *= 20  # outlier columns, as real weights have
    imatrix = (rng.gamma(0.5, 1.0, 1024) * rng.uniform(0.1, 100)).astype(np.float32)
    want = ggml_quantize(name, x, imatrix)
    got = K.quantize(x, name, imatrix=imatrix)
    assert np.array_equal(got, want), differing_rows(got, want)


@needs_ggml
@pytest.mark.parametrize("name", TYPES)
def test_refuses_exactly_where_llama_cpp_aborts(name):
    """Searches that overflow find no grid point; llama.cpp aborts there, smolq raises."""
    rng = np.random.default_rng(4)
    weights = {"plain": rng.gamma(0.7, 1.0, 256).astype(np.float32),
               "huge": (rng.gamma(0.7, 1.0, 256) * 1e30).astype(np.float32)}
    if name not in NEEDS_IMATRIX:
        weights["none"] = None
    outcomes = set()
    for scale in (1e5, 1e10, 1e15, 1e18, 1e20, 1e30):
        x = (rng.standard_normal((2, 256)) * scale).astype(np.float32)
        for case, imatrix in weights.items():
            want = ggml_quantize(name, x, imatrix)
            for impl in ("ref", "fast"):
                if want is None:
                    with pytest.raises(ValueError, match="too large"):
                        K.quantize(x, name, imatrix=imatrix, impl=impl)
                else:
                    assert np.array_equal(K.quantize(x, name, imatrix=imatrix, impl=impl), want), (scale, case)
            outcomes.add(want is None)
    if name.startswith("IQ2"):  # the IQ1 searches reach no abort with these cases
        assert outcomes == {True, False}, "the cases should reach both outcomes"


@pytest.mark.parametrize("name", sorted(NEEDS_IMATRIX))
def test_types_that_need_an_imatrix_refuse_without_one(name):
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match="needs an importance matrix"):
        K.quantize(x, name)


def test_the_c_kernel_itself_refuses_a_missing_imatrix():
    """Below the binding's own check: smolq_quantize answers SMOLQ_ERR_IMATRIX (-4)."""
    x = np.ones(256, np.float32)
    out = np.zeros(82, np.uint8)
    for name in TYPES:
        t = int(GGMLType.from_name(name))
        code = K._lib.smolq_quantize(t, 3, x.ctypes.data, out.ctypes.data, 1, 256, None, 1, 0)
        assert code == (-4 if name in NEEDS_IMATRIX else K.row_size(name, 256)), name


@pytest.mark.parametrize("name", TYPES)
def test_threads_and_impls_agree_on_many_rows(name):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((400, 512)) * rng.uniform(0.01, 5, (400, 1))).astype(np.float32)
    imatrix = (rng.gamma(0.7, 1.0, 512) * 10).astype(np.float32)
    smolq_all_ways(x, name, imatrix)
    a = K.quantize(x, name, imatrix=imatrix, impl="ref", threads=1)
    assert np.array_equal(a, K.quantize(x, name, imatrix=imatrix, impl="fast", threads=4))
    # rows are independent: a row alone gives its bytes in the matrix
    assert np.array_equal(K.quantize(x[123:124], name, imatrix=imatrix), a[123:124])


@pytest.mark.parametrize("name", TYPES)
def test_quantization_follows_the_data(name):
    """Independent of llama.cpp: the decoded rows approximate the input, and the
    importance weights pull the error towards the columns they weigh most."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    imatrix = np.where(np.arange(512) % 4 == 0, 100.0, 0.01).astype(np.float32)
    y = K.dequantize(K.quantize(x, name, imatrix=imatrix), name, x.shape)
    flat = K.dequantize(K.quantize(x, name, imatrix=np.ones(512, np.float32)), name, x.shape)
    min_snr = {"IQ2_XXS": 8.0, "IQ2_XS": 9.0, "IQ2_S": 10.5, "IQ1_S": 5.0, "IQ1_M": 6.0}[name]
    assert K.error_stats(x, flat)["snr_db"] > min_snr
    heavy = np.arange(512) % 4 == 0
    err_heavy = np.mean((x - y)[:, heavy] ** 2)
    err_flat = np.mean((x - flat)[:, heavy] ** 2)
    # IQ2_XXS's one scale per 32 and coarse grid leave the weights little to choose (~1x here)
    assert err_heavy < (1.0 if name == "IQ2_XXS" else 0.9) * err_flat, (err_heavy, err_flat)


# --------------------------------------------------------------------------- dequantization

def random_blocks(name: str, nrows: int, nblocks: int, seed: int) -> np.ndarray:
    """Arbitrary block bytes (every bit pattern of every field) with finite scales."""
    rng = np.random.default_rng(seed)
    nbytes = BLOCK_BYTES[name]
    raw = rng.integers(0, 256, (nrows, nblocks, nbytes), dtype=np.uint8)
    d = rng.uniform(-2, 2, (nrows, nblocks)).astype(np.float16).view(np.uint8).reshape(nrows, nblocks, 2)
    if name == "IQ1_M":  # the fp16 scale is the top nibbles of the four scale words
        s = d[..., 0].astype(np.uint16) | (d[..., 1].astype(np.uint16) << 8)
        for k in range(4):
            hi = 48 + 2 * k + 1
            raw[..., hi] = (raw[..., hi] & 0x0F) | (((s >> (4 * k)) & 0xF) << 4).astype(np.uint8)
    else:
        raw[..., :2] = d
    return raw.reshape(nrows, nblocks * nbytes)


def assert_bits_equal(got, want, what):
    assert np.array_equal(np.asarray(got, np.float32).view(np.uint32), np.asarray(want, np.float32).view(np.uint32)), what


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_py(name):
    shape = (16, 768)
    raw = random_blocks(name, shape[0], shape[1] // 256, seed=7)
    want = gq.dequantize(raw, G[name]).reshape(shape)
    for impl in ("ref", "fast"):
        for threads in (1, 3):
            assert_bits_equal(K.dequantize(raw, name, shape, impl=impl, threads=threads), want, (impl, threads))


@needs_ggml
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_llama_cpp(name):
    x = hard_iquant_rows(seed=8)
    imatrix = imatrices(x.shape[1], seed=9)["gamma"]
    quantized = K.quantize(x, name, imatrix=imatrix)
    random = random_blocks(name, 8, 3, seed=10)
    for raw in (quantized, random):
        shape = (raw.shape[0], raw.shape[1] // BLOCK_BYTES[name] * 256)
        assert_bits_equal(K.dequantize(raw, name, shape), ggml_dequantize(name, raw, shape), name)


def test_dequantize_checks_sizes():
    with pytest.raises(ValueError, match="needs 66 bytes"):
        K.dequantize(np.zeros(65, np.uint8), "IQ2_XXS", (1, 256))
    with pytest.raises(ValueError, match="multiple of IQ1_M's block of 256"):
        K.quantize(np.zeros((1, 128), np.float32), "IQ1_M")
