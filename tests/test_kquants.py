"""K-quants Q2_K..Q6_K in the C kernel (smolq/kernels/quants_k.c).

Checked against two independent implementations:
- gguf.quants.dequantize (numpy, from the gguf package) for every dequantizer,
  on random blocks, on smolq's own output, and on the real Gemma-3 Q4_K_M file;
- llama.cpp's ggml (libggml-base.so shipped by llama-cpp-python) for the
  quantizers: quantize_row_qX_K_ref without an importance matrix,
  ggml_quantize_chunk with one. `make test` installs llama-cpp-python (a long
  build); these tests skip with a reason when it is absent.

The kernel's K-quant functions are loaded with ctypes straight from the built
library, so these tests do not depend on the Python binding.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from smolq.ggml_types import QK_K, TYPE_INFO, GGMLType

KTYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
IDS = [t.name for t in KTYPES]

# Number of quantization steps each type spans across one sub-block's range.
STEPS = {GGMLType.Q2_K: 3, GGMLType.Q3_K: 7, GGMLType.Q4_K: 15, GGMLType.Q5_K: 31, GGMLType.Q6_K: 63}

# Byte offsets of the fp16 super-block scales, from the layout table in
# formats.md 5.2.4 (d / dmin).
FP16_FIELDS = {
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}

VP = ctypes.c_void_p
QUANT_FN = ctypes.CFUNCTYPE(None, VP, VP, ctypes.c_int64, VP)
DEQUANT_FN = ctypes.CFUNCTYPE(None, VP, VP, ctypes.c_int64)
from ggml_lib import NO_LIBGGML, find_libggml


def _ptr(a: np.ndarray | None) -> VP | None:
    return None if a is None else a.ctypes.data_as(VP)


def _cname(t: GGMLType) -> str:
    """The C spelling of a K type: q4_K."""
    return t.name.lower().replace("_k", "_K")


def _row_bytes(t: GGMLType, n: int) -> int:
    return n // QK_K * TYPE_INFO[t].type_size


# --------------------------------------------------------------- libraries

class Kernel:
    """The K-quant entry points of smolq's C kernel, through ctypes."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        for t in KTYPES:
            name = _cname(t)
            q = getattr(lib, f"smolq_quantize_row_{name}")
            q.argtypes, q.restype = [VP, VP, ctypes.c_int64, VP], None
            d = getattr(lib, f"smolq_dequantize_row_{name}")
            d.argtypes, d.restype = [VP, VP, ctypes.c_int64], None
        lib.smolq_kquant_fast_quantize.argtypes = [ctypes.c_int]
        lib.smolq_kquant_fast_quantize.restype = VP
        lib.smolq_kquant_fast_dequantize.argtypes = [ctypes.c_int]
        lib.smolq_kquant_fast_dequantize.restype = VP

    def _fn(self, kind: str, t: GGMLType):
        return getattr(self.lib, f"smolq_{kind}_row_{_cname(t)}")

    def quantize(self, t: GGMLType, x: np.ndarray, imatrix: np.ndarray | None = None, fn=None) -> np.ndarray:
        """Quantize a 2-D float32 array row by row; returns (rows, row bytes) uint8."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, _row_bytes(t, n)), dtype=np.uint8)
        fn = fn or self._fn("quantize", t)
        w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        for r in range(rows):
            fn(_ptr(x[r]), _ptr(out[r]), n, _ptr(w))
        return out

    def dequantize(self, t: GGMLType, blocks: np.ndarray, fn=None) -> np.ndarray:
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        rows = blocks.shape[0]
        n = blocks.shape[1] // TYPE_INFO[t].type_size * QK_K
        out = np.empty((rows, n), dtype=np.float32)
        fn = fn or self._fn("dequantize", t)
        fn(_ptr(blocks), _ptr(out), rows * n)
        return out


def _kernel_path() -> Path | None:
    spec = importlib.util.find_spec("smolq")
    for root in spec.submodule_search_locations or []:
        found = sorted((Path(root) / "kernels").glob("_smolq_kernel*.so"))
        if found:
            return found[0]
    return None


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    path = _kernel_path()
    if path is None:
        pytest.fail("smolq C kernel not built (python setup.py build_ext --inplace)")
    return Kernel(ctypes.CDLL(str(path)))


class Ggml:
    """llama.cpp's reference quantizers and dequantizers."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, VP, VP, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, VP]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        for t in KTYPES:
            name = _cname(t)
            q = getattr(lib, f"quantize_row_{name}_ref")
            q.argtypes, q.restype = [VP, VP, ctypes.c_int64], None
            d = getattr(lib, f"dequantize_row_{name}")
            d.argtypes, d.restype = [VP, VP, ctypes.c_int64], None

    def quantize_ref(self, t: GGMLType, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], _row_bytes(t, x.shape[1])), dtype=np.uint8)
        getattr(self.lib, f"quantize_row_{_cname(t)}_ref")(_ptr(x), _ptr(out), x.size)
        return out

    def quantize_chunk(self, t: GGMLType, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, _row_bytes(t, n)), dtype=np.uint8)
        w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = self.lib.ggml_quantize_chunk(int(t), _ptr(x), _ptr(out), 0, rows, n, _ptr(w))
        assert written == out.size
        return out

    def dequantize(self, t: GGMLType, blocks: np.ndarray) -> np.ndarray:
        blocks = np.ascontiguousarray(blocks)
        n = blocks.shape[1] // TYPE_INFO[t].type_size * QK_K
        out = np.empty((blocks.shape[0], n), dtype=np.float32)
        getattr(self.lib, f"dequantize_row_{_cname(t)}")(_ptr(blocks), _ptr(out), out.size)
        return out


@pytest.fixture(scope="module")
def ggml() -> Ggml:
    path = find_libggml()
    if path is None:
        pytest.skip(NO_LIBGGML)
    return Ggml(ctypes.CDLL(str(path)))


# ------------------------------------------------------------------- inputs

def _gguf_dequant(t: GGMLType, blocks: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # inf scales (from 1e30 inputs) times 0
        return gguf_dequantize(np.ascontiguousarray(blocks), GGMLQuantizationType(int(t))).reshape(blocks.shape[0], -1)


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 as raw bits, so that equality means bit for bit (signed zeros too)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def input_cases(n: int = 1024) -> dict[str, np.ndarray]:
    """Named (rows, n) float32 inputs covering the branches of the quantizers."""
    rng = np.random.default_rng(1234)
    cases: dict[str, np.ndarray] = {}
    cases["gauss"] = rng.standard_normal((48, n))
    outliers = rng.standard_normal((32, n))
    outliers[rng.random(outliers.shape) < 0.01] *= 60.0
    cases["outliers"] = outliers
    cases["heavy_tail"] = rng.standard_t(2, (16, n))
    # Every sub-block at its own magnitude, across 10^-4 .. 10^4.
    per_sub = np.exp(rng.uniform(-9, 9, (16, n // 16, 1)))
    cases["sub_block_scales"] = (rng.standard_normal((16, n // 16, 16)) * per_sub).reshape(16, n)
    cases["zeros"] = np.zeros((4, n))
    half_zero = rng.standard_normal((8, n))
    half_zero[:, : n // 2] = 0.0
    cases["half_zero"] = half_zero
    cases["sparse"] = np.where(rng.random((16, n)) < 0.03, rng.standard_normal((16, n)), 0.0)
    for exp in (-38, -30, -20, -8, 4, 8, 20, 30):
        cases[f"magnitude_1e{exp}"] = rng.standard_normal((6, n)) * 10.0 ** exp
    cases["all_equal_pos"] = np.full((3, n), 0.37)
    cases["all_equal_neg"] = np.full((3, n), -2.5)
    cases["all_positive"] = rng.random((16, n)) + 0.5
    cases["all_negative"] = -rng.random((16, n)) - 0.5
    cases["half_integers"] = rng.integers(-8, 8, (16, n)) * 0.5  # exact ties for rounding
    cases["few_levels"] = rng.integers(0, 3, (8, n)).astype(np.float64)
    cases["one_hot"] = np.eye(8, n) * 3.0
    return {k: v.astype(np.float32) for k, v in cases.items()}


def _imatrix(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(rng.standard_normal(n) * 1.5).astype(np.float32)


def _random_blocks(t: GGMLType, nblocks: int, seed: int) -> np.ndarray:
    """Random bytes with finite random fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    size = TYPE_INFO[t].type_size
    blocks = rng.integers(0, 256, (nblocks, size), dtype=np.uint8)
    for off in FP16_FIELDS[t]:
        halves = (rng.standard_normal(nblocks) * np.exp(rng.uniform(-8, 8, nblocks))).astype(np.float16)
        halves[::7] = 0.0
        blocks[:, off:off + 2] = halves.view(np.uint8).reshape(nblocks, 2)
    return blocks


# ------------------------------------------------- dequantize (no ggml needed)

@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_dequantize_random_blocks_matches_gguf(kernel, t):
    blocks = _random_blocks(t, 512, seed=int(t)).reshape(64, -1)
    assert np.array_equal(_bits(kernel.dequantize(t, blocks)), _bits(_gguf_dequant(t, blocks)))


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_dequantize_own_output_matches_gguf(kernel, t):
    for name, x in input_cases().items():
        q = kernel.quantize(t, x)
        assert np.array_equal(_bits(kernel.dequantize(t, q)), _bits(_gguf_dequant(t, q))), name
        qi = kernel.quantize(t, x, _imatrix(x.shape[1], seed=3))
        assert np.array_equal(_bits(kernel.dequantize(t, qi)), _bits(_gguf_dequant(t, qi))), name


@pytest.fixture(scope="module")
def gemma_k_tensors(gemma_gguf) -> list[tuple[str, GGMLType, np.ndarray]]:
    """(name, type, blocks as (rows, row bytes) uint8) of every K-quant tensor
    in the Gemma-3 Q4_K_M file. Opened once: GGUFReader takes ~20 s on its
    262k-token vocabulary."""
    reader = GGUFReader(gemma_gguf)
    return [
        (tensor.name, GGMLType(int(tensor.tensor_type)), np.array(tensor.data))
        for tensor in reader.tensors
        if int(tensor.tensor_type) in {int(t) for t in KTYPES}
    ]


def test_dequantize_gemma_blocks_matches_gguf(kernel, gemma_k_tensors):
    seen: dict[GGMLType, int] = {}
    for name, t, blocks in gemma_k_tensors:
        # Whole tensor for the first of each type, a slice of rows for the rest.
        if seen.get(t):
            blocks = blocks[:64]
        seen[t] = seen.get(t, 0) + 1
        assert np.array_equal(_bits(kernel.dequantize(t, blocks)), _bits(_gguf_dequant(t, blocks))), name
    assert seen.get(GGMLType.Q4_K) and seen.get(GGMLType.Q6_K), seen


# ----------------------------------------- quantize sanity (no ggml needed)

@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_round_trip_error_is_within_half_a_step(kernel, t):
    """Per super-block RMSE stays below half a quantization step of the block's
    range (ideal rounding gives ~0.29 of a step), for several distributions."""
    rng = np.random.default_rng(99)
    n = 1024
    for x in (rng.standard_normal((64, n)), rng.uniform(-1, 1, (64, n)), rng.standard_t(3, (64, n))):
        x = x.astype(np.float32)
        y = _gguf_dequant(t, kernel.quantize(t, x))
        xb, yb = x.reshape(-1, QK_K), y.reshape(-1, QK_K)
        step = (xb.max(axis=1) - xb.min(axis=1)) / STEPS[t]
        ratio = np.sqrt(((xb - yb) ** 2).mean(axis=1)) / step
        assert ratio.max() < 0.5, ratio.max()
        assert ratio.mean() < 0.3, ratio.mean()


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_imatrix_lowers_weighted_error(kernel, t):
    """With 10% of the columns weighted 100x, the imatrix path must cut the
    weighted squared error clearly below the unweighted quantizer's."""
    rng = np.random.default_rng(7)
    n = 1024
    x = rng.standard_normal((64, n)).astype(np.float32)
    w = np.ones(n, np.float32)
    w[rng.random(n) < 0.1] = 100.0
    plain = _gguf_dequant(t, kernel.quantize(t, x))
    weighted = _gguf_dequant(t, kernel.quantize(t, x, w))
    err_plain = (w * (x - plain) ** 2).sum(axis=1)
    err_weighted = (w * (x - weighted) ** 2).sum(axis=1)
    assert err_weighted.mean() < 0.8 * err_plain.mean()


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_zero_rows_quantize_to_zero(kernel, t):
    x = np.zeros((2, 512), np.float32)
    for imatrix in (None, _imatrix(512, seed=1)):
        q = kernel.quantize(t, x, imatrix)
        assert not np.any(_gguf_dequant(t, q)), t


# ------------------------------------------------------------ fast variants

@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_fast_quantize_is_byte_identical(kernel, t):
    addr = kernel.lib.smolq_kquant_fast_quantize(int(t))
    if not addr:
        pytest.skip(f"no fast quantizer for {t.name}")
    fast = QUANT_FN(addr)
    for name, x in input_cases().items():
        assert np.array_equal(kernel.quantize(t, x, fn=fast), kernel.quantize(t, x)), name
        w = _imatrix(x.shape[1], seed=5)
        assert np.array_equal(kernel.quantize(t, x, w, fn=fast), kernel.quantize(t, x, w)), name


# No fast K-quant dequantizer exists: the reference loops already vectorise.


# ----------------------------------------------- against ggml

def _first_diff(a: np.ndarray, b: np.ndarray) -> str:
    rows = np.nonzero((a != b).any(axis=1))[0]
    return f"{len(rows)} of {a.shape[0]} rows differ, first row {rows[0]}" if len(rows) else "equal"


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_quantize_matches_ggml_reference(kernel, ggml, t):
    for name, x in input_cases().items():
        ours = kernel.quantize(t, x)
        with np.errstate(all="ignore"):
            theirs = ggml.quantize_ref(t, x)
        assert np.array_equal(ours, theirs), f"{name}: {_first_diff(ours, theirs)}"
        # ggml_quantize_chunk without an imatrix must be the same function.
        assert np.array_equal(ours, ggml.quantize_chunk(t, x, None)), name


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_quantize_with_imatrix_matches_ggml(kernel, ggml, t):
    assert not ggml.lib.ggml_quantize_requires_imatrix(int(t))
    for seed, (name, x) in enumerate(input_cases().items()):
        w = _imatrix(x.shape[1], seed)
        if seed % 4 == 0:
            w[::5] = 0.0  # imatrix files do hold zero weights
        ours = kernel.quantize(t, x, w)
        theirs = ggml.quantize_chunk(t, x, w)
        assert np.array_equal(ours, theirs), f"{name}: {_first_diff(ours, theirs)}"


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_quantize_real_weights_matches_ggml(kernel, ggml, gemma_k_tensors, t):
    """Real weight rows: Gemma-3's Q4_K and Q6_K tensors, dequantized, requantized."""
    picked = [g for g in gemma_k_tensors if g[1] == GGMLType.Q4_K][:2] + [g for g in gemma_k_tensors if g[1] == GGMLType.Q6_K][:1]
    assert len(picked) == 3
    for name, source_type, blocks in picked:
        x = _gguf_dequant(source_type, blocks[:128])
        imatrix = (x.astype(np.float64) ** 2).mean(axis=0).astype(np.float32)  # activation-like
        assert np.array_equal(kernel.quantize(t, x), ggml.quantize_ref(t, x)), name
        assert np.array_equal(kernel.quantize(t, x, imatrix), ggml.quantize_chunk(t, x, imatrix)), name


@pytest.mark.parametrize("t", KTYPES, ids=IDS)
def test_dequantize_ggml_output_matches_gguf_and_ggml(kernel, ggml, t):
    for name, x in input_cases().items():
        with np.errstate(all="ignore"):
            q = ggml.quantize_ref(t, x)
        ours = _bits(kernel.dequantize(t, q))
        assert np.array_equal(ours, _bits(_gguf_dequant(t, q))), name
        assert np.array_equal(ours, _bits(ggml.dequantize(t, q))), name
    blocks = _random_blocks(t, 256, seed=21).reshape(16, -1)
    assert np.array_equal(_bits(kernel.dequantize(t, blocks)), _bits(ggml.dequantize(t, blocks)))
