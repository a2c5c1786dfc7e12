"""The C kernel's quantizers and dequantizers against gguf.quants (the numpy
mirror of llama.cpp's reference quantizers), byte for byte and bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants as gq

import smolq.kernels as K
from smolq.ggml_types import GGMLType

GGUF_QUANT_TYPES = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"]


def hard_rows(seed: int = 0, ncols: int = 512) -> np.ndarray:
    """Random rows plus every awkward case the brief lists."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal(ncols) * s for s in (0.02, 1.0, 7.0)]
    out = rng.standard_normal(ncols)
    out[rng.integers(0, ncols, 9)] *= 500.0  # outliers
    rows += [
        out,
        np.zeros(ncols),                                   # zero row
        rng.standard_normal(ncols) * 1e-30,                # tiny
        rng.standard_normal(ncols) * 1e30,                 # huge
        np.full(ncols, 2.75),                              # all equal
        np.full(ncols, -0.5),                              # all equal, negative
        -np.abs(rng.standard_normal(ncols)),               # negative only
        np.abs(rng.standard_normal(ncols)) + 3.0,          # positive only, far from 0
        np.where(rng.random(ncols) < 0.5, 0.0, rng.standard_normal(ncols)),  # half zeros
        rng.integers(-8, 8, ncols) * 0.25,                 # exact grid values: rounding ties
        (rng.integers(-8, 8, ncols) + 0.5) * 0.125,        # half-way ties
    ]
    x = np.stack(rows).astype(np.float32)
    # a sign-symmetric block: +m and -m both present, first one wins
    x[1, 0], x[1, 5] = 3.0, -3.0
    return x


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return hard_rows()


def gguf_quantize(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gq.quantize(x, G[name]).view(np.uint8).reshape(x.shape[0], -1)


def gguf_dequantize(q: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gq.dequantize(q, G[name])


@pytest.mark.parametrize("name", GGUF_QUANT_TYPES)
@pytest.mark.parametrize("impl", ["ref", "fast"])
@pytest.mark.parametrize("threads", [1, 3])
def test_quantize_matches_gguf(x, name, impl, threads):
    expected = gguf_quantize(x, name)
    got = K.quantize(x, GGMLType[name], impl=impl, threads=threads)
    assert got.shape == expected.shape
    bad = np.nonzero((got != expected).any(axis=1))[0]
    assert bad.size == 0, f"{name} rows differing from gguf.quants: {bad.tolist()}"


@pytest.mark.parametrize("name", GGUF_QUANT_TYPES + ["F16"])
@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_dequantize_matches_gguf_on_own_output(x, name, impl):
    q = K.quantize(x, name)
    expected = q.view(np.float16).astype(np.float32) if name == "F16" else gguf_dequantize(q, name)
    got = K.dequantize(q, name, x.shape, impl=impl)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(got.view(np.uint32), expected.reshape(x.shape).view(np.uint32))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "BF16", "F16"])
def test_dequantize_random_blocks_matches_gguf(name):
    """Arbitrary bytes (any nibble, any f16 scale that is finite) decode like gguf."""
    rng = np.random.default_rng(1)
    t = GGMLType[name]
    nbytes = K.row_size(t, 1024)
    raw = rng.integers(0, 256, (8, nbytes), dtype=np.uint8)
    if name not in ("F16", "BF16"):  # keep scales finite: clear the f16 exponent's top bit
        bpb = K.row_size(t, 32 if t.value < 10 else 256)
        blocks = raw.reshape(-1, bpb)
        scale_at = {"TQ1_0": [53], "TQ2_0": [65]}.get(name, [1, 3] if name in ("Q4_1", "Q5_1") else [1])
        for i in scale_at:
            blocks[:, i] &= 0x3F
    expected = raw.view(np.float16).astype(np.float32) if name == "F16" else gguf_dequantize(raw, name)
    # (F16 includes signaling NaNs here: numpy keeps their bits, and so must we.)
    for impl in ("ref", "fast"):
        got = K.dequantize(raw, t, (8, 1024), impl=impl)
        assert np.array_equal(got.view(np.uint32), expected.reshape(8, 1024).view(np.uint32)), impl


def test_f16_fast_matches_ref_on_all_bit_patterns():
    """F16 both ways, every float class (NaN payloads, subnormals, overflow)."""
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).reshape(64, -1)
    ref = K.quantize(x, "F16", impl="ref")
    fast = K.quantize(x, "F16", impl="fast")
    assert np.array_equal(ref, fast)
    # numpy keeps a signaling NaN signaling; ggml (F16C's vcvtps2ph) and we quiet it.
    signaling = ((bits & 0x7F800000) == 0x7F800000) & ((bits & 0x7FFFFF) != 0) & ((bits & 0x400000) == 0)
    with np.errstate(all="ignore"):
        numpy_bits = x.astype(np.float16).view(np.uint16).reshape(-1)
    ours = ref.view(np.uint16).reshape(-1)
    assert np.array_equal(ours[~signaling], numpy_bits[~signaling])
    assert ((ours[signaling] & 0x7E00) == 0x7E00).all()  # quiet NaNs
    assert np.array_equal(ours[signaling] & 0x81FF, (bits[signaling] >> 16 & 0x8000) | (bits[signaling] >> 13 & 0x1FF))
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8)
    a = K.dequantize(halves, "F16", (1 << 16,), impl="ref")
    b = K.dequantize(halves, "F16", (1 << 16,), impl="fast")
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_negative_zero_block_follows_llama_cpp():
    """An all-zero block: llama.cpp's loop keeps max = +0.0, so d = 0/-8 = -0.0
    (f16 0x8000) whatever the zeros' signs. gguf.quants takes the first
    element instead, so it writes 0x0000 when that element is -0.0."""
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = -0.0
    for impl in ("ref", "fast"):
        q = K.quantize(x, "Q4_0", impl=impl)
        assert q[0, :2].tobytes() == np.float16(-0.0).tobytes()
        assert (q[0, 2:] == 0x88).all()  # every q = trunc(0*0 + 8.5) = 8


def test_quantize_is_thread_count_independent(x):
    big = np.tile(x, (40, 1))
    for name in ("Q4_0", "Q5_1", "TQ1_0"):
        one = K.quantize(big, name, threads=1)
        for n in (2, 5, 0):
            assert np.array_equal(one, K.quantize(big, name, threads=n))
        deq1 = K.dequantize(one, name, big.shape, threads=1)
        deqn = K.dequantize(one, name, big.shape, threads=4)
        assert np.array_equal(deq1.view(np.uint32), deqn.view(np.uint32))


def test_nd_input_and_shapes():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    q = K.quantize(x, "Q8_0")
    assert q.shape == (6, 2 * 34)
    assert K.dequantize(q, "Q8_0", (2, 3, 64)).shape == (2, 3, 64)
    assert K.dequantize(q.tobytes(), "Q8_0", (2, 3, 64)).shape == (2, 3, 64)


@pytest.mark.parametrize("call, message", [
    (lambda: K.quantize(np.zeros((2, 33), np.float32), "Q4_0"), "multiple"),
    (lambda: K.quantize(np.zeros(32, np.float32), "Q4_2"), "cannot quantize"),
    (lambda: K.quantize(np.zeros(32, np.float32), "Q4_0", layout="v9"), "layout"),
    (lambda: K.quantize(np.zeros(32, np.float32), "Q4_0", impl="turbo"), "impl"),
    (lambda: K.quantize(np.full(32, np.nan, np.float32), "Q4_0"), "NaN"),
    (lambda: K.quantize(np.zeros(32, np.int32), "Q4_0"), "float"),
    (lambda: K.quantize(np.float32(1.0), "Q8_0"), "1-D"),
    (lambda: K.quantize(np.zeros(32, np.float32), "Q4_0", imatrix=np.ones(31)), "imatrix"),
    (lambda: K.dequantize(b"\0" * 17, "Q4_0", (32,)), "needs 18 bytes"),
    (lambda: K.dequantize(b"\0" * 18, "Q4_0", (31,)), "multiple"),
    (lambda: K.dequantize(b"\0" * 18, "Q4_0", (-32,)), "negative"),
    (lambda: K.dequantize(b"", "NOPE", (0,)), "unknown"),
])
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_empty_tensors():
    assert K.quantize(np.zeros((0, 64), np.float32), "Q4_0").shape == (0, 36)
    assert K.dequantize(b"", "Q4_0", (0, 64)).shape == (0, 64)


def test_signed_zeros_and_ties_ref_equals_fast():
    """Blocks drawn from {-0.0, +0.0, ±1, ±2}: many equal extremes and zero
    extremes of either sign, where the fast paths' integer max/min tricks must
    pick the element the reference loops pick."""
    rng = np.random.default_rng(9)
    pool = np.array([-0.0, 0.0, 1.0, -1.0, 2.0, -2.0], dtype=np.float32)
    x = pool[rng.integers(0, 6, (256, 256))]
    x[:64] = pool[rng.integers(0, 2, (64, 256))]  # zeros only, mixed signs
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "F16", "BF16"):
        assert np.array_equal(K.quantize(x, name, impl="ref"), K.quantize(x, name, impl="fast")), name


def test_q4_1_zero_block_keeps_first_zero_sign():
    """llama.cpp: min starts at FLT_MAX and takes v only when v < min, so an
    all-zero block keeps its first zero: m = -0.0 (f16 0x8000) when x[0] is -0.0."""
    x = np.zeros((2, 32), dtype=np.float32)
    x[0, 0] = -0.0
    x[1, 1] = -0.0
    for impl in ("ref", "fast"):
        q = K.quantize(x, "Q4_1", impl=impl)
        assert q[0, 2:4].tobytes() == np.float16(-0.0).tobytes()
        assert q[1, 2:4].tobytes() == np.float16(0.0).tobytes()


PORTABLE_CHECK = """
import sys
import numpy as np
import smolq.kernels as K
from tests.test_kernel_quant import hard_rows
assert K._lib.smolq_use_avx2() == 0, "SMOLQ_NO_AVX2 did not turn the AVX2 paths off"
rng = np.random.default_rng(3)
x = np.concatenate([hard_rows(1, 512), rng.standard_normal((64, 512))]).astype(np.float32)
w = (rng.random(512) + 0.01).astype(np.float32)
bad = [f"{t}{' +imatrix' if m is not None else ''}"
       for t in ("Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") for m in (None, w)
       if not np.array_equal(K.quantize(x, t, imatrix=m, impl="ref"), K.quantize(x, t, imatrix=m, impl="fast"))]
sys.exit(f"portable fast paths differ from the reference: {bad}" if bad else 0)
"""


def test_portable_fast_paths_equal_the_reference_where_avx2_is_turned_off():
    """On an AVX2 machine the fast entry points take hand-written AVX2 code (Q4_0, Q8_0, the
    K-quant searches eight lanes wide); CPUs without AVX2 take the portable vector paths.
    SMOLQ_NO_AVX2 forces those here, in a child process, and they must give the reference's
    bytes too; and the switch must really have switched."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SMOLQ_NO_AVX2="1", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], capture_output=True, text=True, env=env,
                          cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] or proc.stdout[-2000:]
    # Here (not turned off) the AVX2 paths may run only on a CPU that has AVX2; a kernel built
    # by another compiler than GCC has none, so 0 is always allowed.
    has_avx2 = Path("/proc/cpuinfo").exists() and " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    assert K._lib.smolq_use_avx2() in (0, int(has_avx2))
