"""GPTQ word packing and tensor shapes, checked with an unpacker written here
from gptq.md 2.2-2.4 (not with smolq's own)."""
from __future__ import annotations

import numpy as np
import pytest

from smolq.formats import gptq_ckpt
from smolq.formats.gptq_ckpt import GPTQLayer, pack_words_numpy, unpack_words_numpy


def spec_unpack_rows(qweight: np.ndarray, bits: int) -> np.ndarray:
    """Unpack along rows exactly as gptq.md describes it."""
    w = qweight.view(np.uint32).astype(np.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        out = np.zeros((w.shape[0] * per, w.shape[1]), dtype=np.int64)
        for r in range(w.shape[0]):
            for k in range(per):
                out[r * per + k] = (w[r] >> (bits * k)) & ((1 << bits) - 1)
        return out
    assert bits == 3
    out = np.zeros((w.shape[0] // 3 * 32, w.shape[1]), dtype=np.int64)
    for g in range(w.shape[0] // 3):
        w0, w1, w2 = w[3 * g], w[3 * g + 1], w[3 * g + 2]
        vals = [(w0 >> (3 * k)) & 7 for k in range(10)]  # word 0: values 0-9 at bits 3k
        vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))  # value 10: low 2 bits at 30-31, high bit at word 1 bit 0
        vals += [(w1 >> (3 * k + 1)) & 7 for k in range(10)]  # values 11-20 at bits 3k+1
        vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))  # value 21: low bit at 31, high 2 bits at word 2 bits 0-1
        vals += [(w2 >> (3 * k + 2)) & 7 for k in range(10)]  # values 22-31 at bits 3k+2
        out[32 * g:32 * g + 32] = np.stack(vals)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_recovered_by_spec_unpacker(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, size=(96, 7))
    v[0], v[-1] = 0, (1 << bits) - 1  # extremes, all bits set
    packed = pack_words_numpy(v, bits, 0)
    assert packed.dtype == np.int32 and packed.shape == (96 * bits // 32, 7)
    np.testing.assert_array_equal(spec_unpack_rows(packed, bits), v)
    np.testing.assert_array_equal(unpack_words_numpy(packed, bits, 96, 0), v)
    # columns (qzeros) use the same scheme along the other axis
    packed_c = pack_words_numpy(v.T, bits, 1)
    np.testing.assert_array_equal(spec_unpack_rows(packed_c.T.copy(), bits), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_packing_equals_numpy(bits):
    kernels = pytest.importorskip("smolq.kernels")
    rng = np.random.default_rng(10 + bits)
    v = rng.integers(0, 1 << bits, size=(64, 96)).astype(np.int32)
    for axis in (0, 1):
        np.testing.assert_array_equal(kernels.gptq_pack(v, bits, axis), pack_words_numpy(v, bits, axis))
        packed = pack_words_numpy(v, bits, axis)
        np.testing.assert_array_equal(kernels.gptq_unpack(packed, bits, v.shape[axis], axis), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_shapes_match_reference_table_and_v1_zeros(bits):
    # gptq.md 2.1: qweight [in/32*bits, out], qzeros [G, out/32*bits], scales [G, out], g_idx [in]
    n_in, n_out, gs = 256, 96, 128
    G = n_in // gs
    rng = np.random.default_rng(bits)
    layer = GPTQLayer(qint=rng.integers(0, 1 << bits, (n_out, n_in)).astype(np.uint8),
                      scales=rng.random((G, n_out)).astype(np.float16).astype(np.float32),
                      zeros=rng.integers(1, 1 << bits, (G, n_out)),
                      g_idx=np.arange(n_in) // gs, bits=bits)
    t = layer.packed("gptq")
    assert t["qweight"].shape == (n_in // 32 * bits, n_out) and t["qweight"].dtype == np.int32
    assert t["qzeros"].shape == (G, n_out // 32 * bits) and t["qzeros"].dtype == np.int32
    assert t["scales"].shape == (G, n_out) and t["scales"].dtype == np.float16
    assert t["g_idx"].shape == (n_in,) and t["g_idx"].dtype == np.int32
    stored = spec_unpack_rows(t["qzeros"].T.copy(), bits).T
    np.testing.assert_array_equal(stored, layer.zeros - 1)  # v1: zero - 1
    # v2 stores the true zero; both read back to the same weights
    back1 = GPTQLayer.from_packed(t, bits, "gptq").dequantize()
    back2 = GPTQLayer.from_packed(layer.packed("gptq_v2"), bits, "gptq_v2").dequantize()
    np.testing.assert_array_equal(back1, layer.dequantize())
    np.testing.assert_array_equal(back2, layer.dequantize())


def test_v1_refuses_zero_point_zero():
    layer = GPTQLayer(qint=np.zeros((32, 32), np.uint8), scales=np.ones((1, 32), np.float32),
                      zeros=np.zeros((1, 32), np.int64), g_idx=np.zeros(32, np.int64), bits=4)
    with pytest.raises(ValueError, match="zero points"):
        layer.packed("gptq")
    assert gptq_ckpt.is_gptq_dir("/nonexistent") is False
