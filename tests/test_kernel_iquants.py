"""The i-quants and MXFP4 in the C kernel, against independent decoders and
llama.cpp itself.

One table, IQ_TYPES, drives every test: a type joins by adding a row.
Byte identity is with libggml's ggml_quantize_chunk (what llama-quantize
runs, imatrix or not); decoding is checked against gguf-py's
gguf.quants.dequantize and libggml's own to_float, bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

import smolq.kernels as K
from smolq.ggml_types import TYPE_INFO, GGMLType

from ggml_lib import NO_LIBGGML, ggml_quantize_chunk, ggml_to_float, load_libggml

gguf = pytest.importorskip("gguf")
from gguf import quants as gguf_quants  # noqa: E402


@dataclass(frozen=True)
class IQType:
    name: str
    min_snr_db: float  # round trip of gaussian rows (measured: 22.3 IQ4_NL, 18.7 MXFP4, 13.4 IQ3_XXS)
    uses_imatrix: bool = True  # False: llama.cpp ignores quant_weights (MXFP4)
    needs_imatrix: bool = False  # ggml_quantize_chunk asserts one (IQ2_XXS, IQ2_XS, IQ1_S)
    # ggml's lattice searches abort (GGML_ASSERT) once w*diff^2 overflows; rows
    # beyond this magnitude are not shown to the oracle.
    oracle_max_abs: float = float("inf")
    fp16_d_at: int | None = 0  # byte offset of the block's fp16 scale (None: no fp16 scale)

    @property
    def type(self) -> GGMLType:
        return GGMLType[self.name]

    @property
    def block(self) -> int:
        return TYPE_INFO[self.type].block_size


IQ_TYPES = [
    IQType("IQ4_NL", min_snr_db=21),
    IQType("IQ4_XS", min_snr_db=21),
    IQType("MXFP4", min_snr_db=17.5, uses_imatrix=False, fp16_d_at=None),
    IQType("IQ3_XXS", min_snr_db=12.5, oracle_max_abs=1e8),
    IQType("IQ3_S", min_snr_db=14.5, oracle_max_abs=1e8),
]
IDS = [t.name for t in IQ_TYPES]
NCOLS = 512  # two super-blocks, sixteen 32-blocks

LIB = load_libggml()
needs_ggml = pytest.mark.skipif(LIB is None, reason=NO_LIBGGML)


# --------------------------------------------------------------------------- data

def hard_rows(seed: int = 0, ncols: int = NCOLS) -> np.ndarray:
    """Random rows and the awkward cases of these searches, one per row."""
    rng = np.random.default_rng(seed)
    g = lambda: rng.standard_normal(ncols)  # noqa: E731
    rows = [g() * s for s in (0.02, 1.0, 7.0)]
    out = g()
    out[rng.integers(0, ncols, 9)] *= 500.0
    lone = np.zeros(ncols)
    lone[77] = -3.5  # a single outlier in a zero row
    gaps = g()
    gaps[64:96] = 0  # an all-zero 32-block in the middle (IQ3_S then shifts its bytes)
    gaps[:32] = 0
    gaps[256:512] = 0  # an all-zero super-block
    one_negative = np.abs(g())
    one_negative[::8] *= -1  # an odd count of negatives in every 8 (IQ3_XXS parity)
    block_scales = g() * np.repeat(2.0 ** rng.integers(-20, 20, ncols // 32), 32)
    pow2 = np.repeat(2.0 ** rng.integers(-10, 10, ncols // 32), 32) * np.sign(g())
    below_pow2 = np.nextafter(pow2.astype(np.float32), np.float32(0)).astype(np.float64)
    iq4_grid = np.resize(np.array(gguf_quants.IQ4_NL.kvalues, np.float64), ncols) * 0.25
    rows += [
        out, lone, gaps, one_negative, block_scales, pow2, below_pow2, iq4_grid,
        np.zeros(ncols),
        g() * 1e-30,                                       # tiny
        g() * 1e-40,                                       # subnormal
        g() * 1e-8,                                        # near IQ3_XXS's all-zero threshold
        g() * 1e6,                                         # large, still within fp16 scales
        g() * 1e30,                                        # huge (fp16 scales overflow)
        np.full(ncols, 2.75),                              # all equal
        np.full(ncols, -0.5),                              # all equal, negative
        -np.abs(g()),                                      # negative only
        np.abs(g()) + 3.0,                                 # positive only, far from 0
        np.where(rng.random(ncols) < 0.5, 0.0, g()),       # half zeros
        rng.integers(-8, 8, ncols) * 0.25,                 # exact grid values: rounding ties
        (rng.integers(-8, 8, ncols) + 0.5) * 0.125,        # half-way ties
    ]
    sym = g()
    sym[:32] = np.tile([1.5, -1.5], 16)  # +m and -m in one block: the first wins
    rows.append(sym)
    return np.stack(rows).astype(np.float32)


def gaussian_rows(seed: int, nrows: int, ncols: int = NCOLS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nrows, ncols)) * rng.uniform(0.01, 5, (nrows, 1))
    x[:, rng.integers(0, ncols, 6)] *= 8  # a few outlier columns, as real weights have
    return x.astype(np.float32)


def imatrices(ncols: int = NCOLS) -> dict[str, np.ndarray]:
    """Importance weights as llama-imatrix writes them, and odd ones."""
    rng = np.random.default_rng(5)
    typical = rng.gamma(0.7, 1.0, ncols) * 10
    with_zeros = typical.copy()
    with_zeros[rng.random(ncols) < 0.3] = 0
    with_zeros[:32] = 0  # one block with no weight at all
    wide = 10.0 ** rng.uniform(-6, 6, ncols)
    return {name: w.astype(np.float32) for name, w in
            {"typical": typical, "with-zeros": with_zeros, "all-zero": np.zeros(ncols), "wide": wide}.items()}


IMATRIX_CASES = [None, "typical", "with-zeros", "all-zero", "wide"]


def pick_imatrix(case: str | None, ncols: int = NCOLS) -> np.ndarray | None:
    return None if case is None else imatrices(ncols)[case]


def oracle_rows(t: IQType, x: np.ndarray) -> np.ndarray:
    return x[np.abs(x).max(axis=1) <= t.oracle_max_abs]


def llama_cpp_bytes(t: IQType, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    return ggml_quantize_chunk(LIB, int(t.type), x, imatrix, K.row_size(t.name, x.shape[1]))


def random_blocks(t: IQType, nrows: int, seed: int) -> np.ndarray:
    """Random bytes of whole rows, every bit pattern but a non-finite fp16 scale."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (nrows, K.row_size(t.name, NCOLS)), dtype=np.uint8)
    if t.fp16_d_at is not None:
        blocks = raw.reshape(-1, K.row_size(t.name, t.block))
        blocks[:, t.fp16_d_at + 1] &= 0xBF  # exponent below 0x1f: finite
    return raw


def same_bits(a: np.ndarray, b: np.ndarray, any_nan: bool = False) -> bool:
    """Bit for bit (signed zeros too); any_nan: a NaN equals any NaN (numpy keeps no payload promises)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if any_nan:
        nan = np.isnan(a)
        if not np.array_equal(nan, np.isnan(b)):
            return False
        a, b = np.where(nan, 0, a), np.where(nan, 0, b)
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


def differing_rows(a: np.ndarray, b: np.ndarray) -> list[int]:
    return np.nonzero((a != b).any(axis=1))[0].tolist()


# --------------------------------------------------------------------------- byte identity with llama.cpp

@needs_ggml
@pytest.mark.parametrize("imatrix_case", IMATRIX_CASES)
@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_hard_rows_match_llama_cpp(t, imatrix_case):
    if t.needs_imatrix and imatrix_case is None:
        pytest.skip(f"llama.cpp requires an imatrix for {t.name}")
    x = oracle_rows(t, hard_rows(seed=11))
    w = pick_imatrix(imatrix_case)
    want = llama_cpp_bytes(t, x, w)
    for impl in ("ref", "fast"):
        got = K.quantize(x, t.name, imatrix=w, impl=impl, threads=2)
        assert np.array_equal(got, want), (impl, differing_rows(got, want))


@needs_ggml
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_many_rows_match_llama_cpp(t, weighted):
    x = gaussian_rows(seed=12, nrows=160, ncols=1024)
    w = imatrices(1024)["typical"] if weighted or t.needs_imatrix else None
    want = llama_cpp_bytes(t, x, w)
    got = K.quantize(x, t.name, imatrix=w, threads=2)
    assert np.array_equal(got, want), differing_rows(got, want)


@needs_ggml
@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_signed_zeros_and_ties_match_llama_cpp(t):
    rng = np.random.default_rng(9)
    pool = np.array([-0.0, 0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -3.0], dtype=np.float32)
    x = pool[rng.integers(0, len(pool), (48, NCOLS))]
    x[:16] = pool[rng.integers(0, 2, (16, NCOLS))]  # only signed zeros
    w = pick_imatrix("typical") if t.needs_imatrix else None
    want = llama_cpp_bytes(t, x, w)
    for impl in ("ref", "fast"):
        got = K.quantize(x, t.name, imatrix=w, impl=impl)
        assert np.array_equal(got, want), (impl, differing_rows(got, want))


def tie_rows(name: str, nrows: int = 32) -> np.ndarray:
    """Rows whose scaled values sit exactly on (and one float either side of)
    the midpoints between neighbouring table values, where the search's strict
    comparisons decide: IQ4 blocks led by -127 (the candidate id = 1 then sees
    x itself), MXFP4 blocks led by 6 * 2^s (d = 2^(s-1): E2M1 * 2^s)."""
    rng = np.random.default_rng(19)
    if name.startswith("IQ4"):
        v = np.array(gguf_quants.IQ4_NL.kvalues, np.float32)
        lead, scale = np.float32(-127), np.float32(1)
    else:
        v = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
        lead, scale = np.float32(6), None
    mids = (v[1:] + v[:-1]) / 2
    pool = np.concatenate([mids, np.nextafter(mids, np.float32(-np.inf)), np.nextafter(mids, np.float32(np.inf)), v])
    if scale is None:  # MXFP4: also the negative side
        pool = np.concatenate([pool, -pool])
    x = pool[rng.integers(0, len(pool), (nrows, NCOLS))]
    x[:, ::32] = lead
    if scale is None:
        x *= np.repeat(2.0 ** rng.integers(-30, 30, (nrows, NCOLS // 32)), 32, axis=1).astype(np.float32)
    return x.astype(np.float32)


@pytest.mark.parametrize("t", [t for t in IQ_TYPES if t.name in ("IQ4_NL", "IQ4_XS", "MXFP4")], ids=lambda t: t.name)
def test_ties_between_table_values(t):
    x = tie_rows(t.name)
    ref = K.quantize(x, t.name, impl="ref")
    assert np.array_equal(ref, K.quantize(x, t.name, impl="fast")), "fast path differs from the reference"
    if LIB is not None:
        assert np.array_equal(ref, llama_cpp_bytes(t, x, None)), "differs from llama.cpp"


# --------------------------------------------------------------------------- decoding

def decoders(t: IQType, raw: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    out = {impl: K.dequantize(raw, t.name, shape, impl=impl) for impl in ("ref", "fast")}
    out["gguf-py"] = gguf_quants.dequantize(raw, gguf.GGMLQuantizationType[t.name])
    if LIB is not None:
        y = ggml_to_float(LIB, int(t.type), raw, shape[0] * shape[1])
        if y is not None:
            out["libggml"] = y.reshape(shape)
    return out


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf-py on huge scales
@pytest.mark.parametrize("source", ["quantized", "random-bytes"])
@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_dequantize_matches_gguf_py_and_llama_cpp(t, source):
    if source == "quantized":
        x = hard_rows(seed=13)
        raw = K.quantize(x, t.name, imatrix=pick_imatrix("typical"))
    else:
        raw = random_blocks(t, 24, seed=14)
    got = decoders(t, raw, (raw.shape[0], NCOLS))
    assert "gguf-py" in got
    for name, y in got.items():
        # huge rows overflow the fp16 scale into a NaN whose sign bit numpy does not keep
        assert same_bits(y, got["ref"], any_nan=name == "gguf-py"), name


# --------------------------------------------------------------------------- the kernel's own guarantees

@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_threads_and_impls_give_the_same_bytes(t):
    x = gaussian_rows(seed=15, nrows=600)  # 128 rows of 512 per thread at least: 4 threads
    w = pick_imatrix("typical")
    one = K.quantize(x, t.name, imatrix=w, threads=1, impl="ref")
    assert np.array_equal(one, K.quantize(x, t.name, imatrix=w, threads=3, impl="ref"))
    assert np.array_equal(one, K.quantize(x, t.name, imatrix=w, threads=3, impl="fast"))
    y = K.dequantize(one, t.name, x.shape, threads=1, impl="ref")
    assert same_bits(y, K.dequantize(one, t.name, x.shape, threads=3, impl="fast"))


FIRST_CALL_THREADED = """
import sys, numpy as np, smolq.kernels as K
rng = np.random.default_rng(20)
x = rng.standard_normal((512, 512)).astype(np.float32)
w = rng.gamma(0.7, 1.0, 512).astype(np.float32)
for name in sys.argv[1:]:
    for impl in ("fast", "ref"):
        first = K.quantize(x, name, imatrix=w, threads=4, impl=impl)  # the tables are built under 4 threads
        assert np.array_equal(first, K.quantize(x, name, imatrix=w, threads=1, impl=impl)), (name, impl)
"""


def test_tables_built_on_first_use_under_threads():
    # A fresh process, so the first quantization of each type builds its
    # tables (IQ3 neighbour lists, IQ4 thresholds) with 4 threads racing.
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_THREADED, *IDS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_round_trip_quality(t):
    x = np.random.default_rng(16).standard_normal((64, 1024)).astype(np.float32)
    w = imatrices(1024)["typical"] if t.needs_imatrix else None
    y = K.dequantize(K.quantize(x, t.name, imatrix=w), t.name, x.shape)
    assert K.error_stats(x, y)["snr_db"] > t.min_snr_db


def weighted_error(x, y, imatrix):
    return float(np.sum(imatrix[None, :] * (x.astype(np.float64) - y) ** 2))


@pytest.mark.parametrize("t", [t for t in IQ_TYPES if t.uses_imatrix], ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error(t):
    x = gaussian_rows(seed=17, nrows=48)
    w = pick_imatrix("typical")
    plain = K.dequantize(K.quantize(x, t.name), t.name, x.shape)
    weighted = K.dequantize(K.quantize(x, t.name, imatrix=w), t.name, x.shape)
    assert weighted_error(x, weighted, w) < 0.95 * weighted_error(x, plain, w)


@pytest.mark.parametrize("t", [t for t in IQ_TYPES if not t.uses_imatrix], ids=lambda t: t.name)
def test_imatrix_is_ignored_where_llama_cpp_ignores_it(t):
    x = gaussian_rows(seed=18, nrows=8)
    assert np.array_equal(K.quantize(x, t.name, imatrix=pick_imatrix("typical")), K.quantize(x, t.name))


# --------------------------------------------------------------------------- hand-computed cases

def test_mxfp4_block_by_hand():
    # amax 6 -> e = floor(log2 6) - 2 + 127 = 127, d = 2^(127-128) = 0.5: the
    # doubled E2M1 table times 0.5 is E2M1 itself, so these values are exact.
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = np.array([e2m1[i % 8] * (-1 if i % 3 else 1) for i in range(32)], dtype=np.float32)
    raw = K.quantize(x[None], "MXFP4")[0]
    assert raw[0] == 127
    codes = [int(b) for b in raw[1:]]
    want = [e2m1.index(abs(v)) | (8 if v < 0 or (v == 0 and np.signbit(v)) else 0) for v in x]
    # 0.0 * -1 is -0.0 in numpy, but llama.cpp's nearest search picks +0 (index 0, first on ties)
    want = [0 if x[i] == 0 else want[i] for i in range(32)]
    assert codes == [want[j] | want[j + 16] << 4 for j in range(16)]
    assert np.array_equal(K.dequantize(raw, "MXFP4", (32,)), x + 0.0)


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_values_times_a_power_of_two_round_trip_exactly(name):
    # x = kvalues * 0.25: the scale search lands on 0.25 exactly (fp16-exact, as
    # is IQ4_XS's super-block scale 0.25/32), so every value comes back.
    x = (np.resize(np.array(gguf_quants.IQ4_NL.kvalues, np.float32), 256) * 0.25)[None]
    x = np.roll(x, 5, axis=1)
    assert np.array_equal(K.dequantize(K.quantize(x, name), name, x.shape), x)


@pytest.mark.parametrize("t", IQ_TYPES, ids=IDS)
def test_kernel_knows_the_type_as_gguf_py_does(t):
    assert (t.type, "v3") in K.QUANTIZE_TYPES
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.name]]
    assert t.block == block and int(gguf.GGMLQuantizationType[t.name]) == int(t.type)
    assert K.row_size(t.name, 1024) == 1024 // block * nbytes
