"""GPTQ int32 word packing against gptq.md section 2: a test-side unpacker
written from the documented layout (incl. the 3-bit "10 | 1 | 10 | 1 | 10"
words) and the documented tensor shapes."""
from __future__ import annotations

import numpy as np
import pytest

import smolq.kernels as K
from tests.test_gptq_packing import spec_unpack_rows


def doc_unpack_column(words: np.ndarray, bits: int) -> np.ndarray:
    """One packed line (uint32 words) through the test-side row unpacker of gptq.md 2.2/2.3."""
    return spec_unpack_rows(np.asarray(words, dtype=np.uint32)[:, None], bits)[:, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_packing_follows_the_documented_layout(bits):
    rng = np.random.default_rng(bits)
    n_in, n_out = 128, 24
    vals = rng.integers(0, 1 << bits, (n_in, n_out))
    packed = K.gptq_pack(vals, bits, axis=0)
    assert packed.dtype == np.int32 and packed.shape == (n_in // 32 * bits, n_out)
    words = packed.view(np.uint32)
    for c in range(n_out):
        assert np.array_equal(doc_unpack_column(words[:, c], bits), vals[:, c])
    assert np.array_equal(K.gptq_unpack(packed, bits, n_in, axis=0), vals)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qzeros_packing_follows_the_documented_layout(bits):
    rng = np.random.default_rng(10 + bits)
    groups, n_out = 5, 96
    zeros = rng.integers(0, 1 << bits, (groups, n_out))
    packed = K.gptq_pack(zeros, bits, axis=1)
    assert packed.shape == (groups, n_out // 32 * bits)
    for g in range(groups):
        assert np.array_equal(doc_unpack_column(packed.view(np.uint32)[g], bits), zeros[g])
    assert np.array_equal(K.gptq_unpack(packed, bits, n_out, axis=1), zeros)
    assert np.array_equal(K.gptq_unpack(packed.view(np.uint32), bits, n_out, axis=-1), zeros)


def test_three_bit_straddling_values_by_hand():
    """Value 10 = 0b101 and value 21 = 0b110, all others 0."""
    v = np.zeros((32, 1), dtype=np.int64)
    v[10], v[21] = 0b101, 0b110
    w = K.gptq_pack(v, 3, axis=0).view(np.uint32)[:, 0]
    assert w[0] == 0b01 << 30           # low two bits of 5 at bits 30-31
    assert w[1] == (0b1 | (0b0 << 31))  # high bit of 5 at bit 0; low bit of 6 (0) at bit 31
    assert w[2] == 0b11                 # high two bits of 6 at bits 0-1


def test_four_bit_word_by_hand():
    v = np.arange(8).reshape(8, 1)
    assert K.gptq_pack(v, 4, axis=0).view(np.uint32)[0, 0] == 0x76543210


@pytest.mark.parametrize("bits, qweight_rows, qzeros_cols", [(4, 512, 512), (3, 384, 384), (2, 256, 256), (8, 1024, 1024)])
def test_shapes_match_the_reference_table(bits, qweight_rows, qzeros_cols):
    """gptq.md 2.1 worked example: LLaMA-7B q_proj (4096 x 4096), group 128."""
    n_in = n_out = 4096
    groups = n_in // 128
    qweight = K.gptq_pack(np.zeros((n_in, 8), np.int32), bits, axis=0)
    assert qweight.shape == (qweight_rows, 8)
    qzeros = K.gptq_pack(np.zeros((groups, n_out), np.int32), bits, axis=1)
    assert qzeros.shape == (32, qzeros_cols)


def test_all_ones_fill_every_bit():
    for bits in (2, 3, 4, 8):
        p = K.gptq_pack(np.full((32, 3), (1 << bits) - 1), bits, axis=0)
        assert (p == -1).all()


@pytest.mark.parametrize("call, message", [
    (lambda: K.gptq_pack(np.zeros((32, 4), np.int32), 5), "bits"),
    (lambda: K.gptq_pack(np.full((32, 4), 16), 4), r"\[0, 16\)"),
    (lambda: K.gptq_pack(np.full((32, 4), -1), 4), r"\[0, 16\)"),
    (lambda: K.gptq_pack(np.zeros((30, 4), np.int32), 3), "whole int32 words"),
    (lambda: K.gptq_pack(np.zeros((32,), np.int32), 4), "2-D"),
    (lambda: K.gptq_pack(np.zeros((32, 4)), 4), "integers"),
    (lambda: K.gptq_pack(np.zeros((32, 4), np.int32), 4, axis=2), "axis"),
    (lambda: K.gptq_unpack(np.zeros((4, 4), np.int32), 4, 64), "words"),
    (lambda: K.gptq_unpack(np.zeros((4, 4), np.int64), 4, 32), "int32"),
])
def test_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
