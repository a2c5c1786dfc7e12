"""quantize/rtn.py: lazy entries, F16/BF16 sources, same-type relayout; gguf.quants as the reference."""
from __future__ import annotations

import numpy as np
import pytest

from smolq.formats.base import TensorEntry
from smolq.transforms.rtn import quantize_entries, quantize_entry, to_float32
from smolq.ggml_types import GGMLType as T

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

RNG = np.random.default_rng(7)
X = (RNG.standard_normal((8, 256)) * 0.1).astype(np.float32)


def entry_of(data: bytes, t: T, shape, layout="v3", calls=None):
    def load():
        if calls is not None:
            calls.append(t)
        return data

    return TensorEntry("w", t, tuple(shape), load=load, layout=layout)


def test_nothing_is_read_until_load():
    calls: list = []
    src = [entry_of(X.tobytes(), T.F32, X.shape, calls=calls) for _ in range(3)]
    out = quantize_entries(src, [T.Q4_0, T.Q8_0, T.F32])
    assert calls == []  # planning and wrapping read nothing
    assert [e.type for e in out] == [T.Q4_0, T.Q8_0, T.F32]
    assert [e.nbytes for e in out] == [8 * 8 * 18, 8 * 8 * 34, X.nbytes]
    out[1].load()
    assert calls == [T.F32]  # one tensor, once
    assert out[2].load is src[2].load  # unchanged type: passed through without a copy


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"])
@pytest.mark.parametrize("src_type", ["F32", "F16", "BF16"])
def test_bytes_equal_gguf_quants(src_type, qtype):
    """Source bytes made by gguf-py (F16/BF16), quantized by smolq, compared with gguf-py on the same values."""
    raw = gguf.quants.quantize(X, Q[src_type]) if src_type != "F32" else X
    values = gguf.quants.dequantize(np.asarray(raw).view(np.uint8) if src_type == "BF16" else raw, Q[src_type])
    src = entry_of(np.asarray(raw).tobytes(), T[src_type], X.shape)
    np.testing.assert_array_equal(to_float32(src), values.reshape(X.shape))
    got = quantize_entry(src, T[qtype]).load()
    expected = gguf.quants.quantize(values.reshape(X.shape).astype(np.float32), Q[qtype])
    assert np.asarray(got).tobytes() == expected.tobytes()


def test_same_type_between_layouts_is_relaid_not_requantized():
    from smolq import kernels

    v1 = kernels.quantize(X, T.Q8_0, layout="v1")
    src = entry_of(v1.tobytes(), T.Q8_0, X.shape, layout="v1")
    out = quantize_entry(src, T.Q8_0, layout="v3")
    assert out.layout == "v3" and out.nbytes == 8 * 8 * 34
    got = np.asarray(out.load())
    # same values as decoding the v1 blocks (up to the f32 -> f16 scale rounding of v3)
    np.testing.assert_allclose(kernels.dequantize(got, T.Q8_0, X.shape), kernels.dequantize(v1, T.Q8_0, X.shape, layout="v1"),
                               rtol=2e-3, atol=1e-6)


def test_planned_types_must_match_entries():
    with pytest.raises(ValueError):
        quantize_entries([entry_of(X.tobytes(), T.F32, X.shape)], [])
