"""ggjt-era layouts v1/v2/v3 (formats.md 5.2.1-5.2.3) and relayout between them.

The decoder and the v1 encoders here are written from the spec tables, in
numpy, independently of the kernel."""
from __future__ import annotations

import numpy as np
import pytest

import smolq.kernels as K
from smolq.ggml_types import GGMLType, type_size

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
LAYOUTS = ["v1", "v2", "v3"]


# --------------------------------------------------------------------------- spec decoder

def spec_fields(name: str, layout: str) -> list[tuple[str, str]]:
    """Field order and dtypes of one block, straight from the spec tables."""
    scale = "<f4" if layout in ("v1", "v2") and name in ("Q4_0", "Q4_1", "Q8_0") else "<f2"
    fields = [("d", scale)]
    if name in ("Q4_1", "Q5_1"):
        fields.append(("m", scale))
    if name in ("Q5_0", "Q5_1"):
        fields.append(("qh", "<u4"))
    fields.append(("qs", "(32,)i1" if name == "Q8_0" else "(16,)u1"))
    return fields


def spec_decode(raw: np.ndarray, name: str, layout: str) -> np.ndarray:
    dt = np.dtype(spec_fields(name, layout))
    assert dt.itemsize == type_size(GGMLType[name], layout)
    b = np.frombuffer(raw.tobytes(), dtype=dt)
    d = b["d"].astype(np.float32)[:, None]
    if name == "Q8_0":
        return (b["qs"].astype(np.float32) * d).reshape(-1)
    lo, hi = (b["qs"] & 15).astype(np.int32), (b["qs"] >> 4).astype(np.int32)
    q = np.empty((len(b), 32), dtype=np.int32)
    if layout == "v1":  # byte k = elements 2k (low), 2k+1 (high)
        q[:, 0::2], q[:, 1::2] = lo, hi
    else:               # byte k = elements k (low), k+16 (high)
        q[:, :16], q[:, 16:] = lo, hi
    if name in ("Q5_0", "Q5_1"):  # bit j of qh is the fifth bit of element j
        q |= ((b["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
    if name in ("Q4_1", "Q5_1"):
        return (q.astype(np.float32) * d + b["m"].astype(np.float32)[:, None]).reshape(-1)
    offset = 8 if name == "Q4_0" else 16
    return ((q - offset).astype(np.float32) * d).reshape(-1)


def rows(seed=0, nrows=12, ncols=256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nrows, ncols)) * rng.uniform(0.01, 5, (nrows, 1))
    x[0] = 0
    x[1] = -np.abs(x[1])
    x[2, ::17] *= 300
    return x.astype(np.float32)


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_dequantize_matches_spec_decoder(name, layout):
    x = rows()
    q = K.quantize(x, name, layout=layout)
    assert q.shape[1] == 256 // 32 * type_size(GGMLType[name], layout)
    expected = spec_decode(q, name, layout).reshape(x.shape)
    for impl in ("ref", "fast"):
        got = K.dequantize(q, name, x.shape, layout=layout, impl=impl)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), impl
    # and the codes are a fair quantization of x: error within half a step of the block scale
    blocks = x.reshape(-1, 32)
    err = np.abs(expected.reshape(-1, 32) - blocks).max(axis=1)
    spread = blocks.max(axis=1) - blocks.min(axis=1)
    assert (err <= spread * 0.1 + 1e-6).all()


def test_random_bytes_decode_like_spec():
    rng = np.random.default_rng(4)
    for name in LEGACY:
        for layout in LAYOUTS:
            dt = np.dtype(spec_fields(name, layout))
            raw = rng.integers(0, 256, 64 * dt.itemsize, dtype=np.uint8)
            blocks = raw.reshape(64, dt.itemsize)
            blocks[:, 0:dt["d"].itemsize] = np.frombuffer(
                rng.standard_normal(64).astype(dt["d"]).tobytes(), np.uint8).reshape(64, -1)
            if "m" in dt.names:
                off = dt.fields["m"][1]
                blocks[:, off:off + dt["m"].itemsize] = np.frombuffer(
                    rng.standard_normal(64).astype(dt["m"]).tobytes(), np.uint8).reshape(64, -1)
            got = K.dequantize(raw, name, (64 * 32,), layout=layout)
            assert np.array_equal(got.view(np.uint32), spec_decode(raw, name, layout).view(np.uint32)), (name, layout)


def test_q4_2_q4_3_v1_decode_like_spec():
    rng = np.random.default_rng(5)
    d = rng.standard_normal(8).astype("<f2")
    m = rng.standard_normal(8).astype("<f2")
    qs = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    q = np.empty((8, 16), np.int32)
    q[:, 0::2], q[:, 1::2] = qs & 15, qs >> 4
    q4_2 = np.concatenate([d.view(np.uint8).reshape(8, 2), qs], axis=1)
    want = ((q - 8).astype(np.float32) * d.astype(np.float32)[:, None]).reshape(-1)
    assert np.array_equal(K.dequantize(q4_2, "Q4_2", (128,), layout="v1"), want)
    q4_3 = np.concatenate([d.view(np.uint8).reshape(8, 2), m.view(np.uint8).reshape(8, 2), qs], axis=1)
    want = (q.astype(np.float32) * d.astype(np.float32)[:, None] + m.astype(np.float32)[:, None]).reshape(-1)
    assert np.array_equal(K.dequantize(q4_3, "Q4_3", (128,), layout="v1"), want)
    with pytest.raises(ValueError):
        K.dequantize(q4_2, "Q4_2", (128,), layout="v3")


# --------------------------------------------------------------------------- era encoders

def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def signed_absmax(b: np.ndarray) -> np.ndarray:
    return np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)


def test_v1_q4_0_encoder_rounds_like_april_2023():
    """v1 Q4_0: d = signed max / -8, q = min(15, roundf(x/d) + 8), f32 d."""
    x = rows(7)
    b = x.reshape(-1, 32)
    d = (signed_absmax(b) / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(15, roundf((b * inv).astype(np.float32)) + 8).astype(np.int32)
    got = np.frombuffer(K.quantize(x, "Q4_0", layout="v1").tobytes(), np.dtype(spec_fields("Q4_0", "v1")))
    assert np.array_equal(got["d"], d[:, 0])
    assert np.array_equal(got["qs"] & 15, q[:, 0::2]) and np.array_equal(got["qs"] >> 4, q[:, 1::2])


def test_v1_q4_1_encoder_rounds_like_april_2023():
    x = rows(8)
    b = x.reshape(-1, 32)
    mn, mx = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = ((mx - mn) / np.float32(15)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = roundf(((b - mn) * inv).astype(np.float32)).astype(np.int32)
    got = np.frombuffer(K.quantize(x, "Q4_1", layout="v1").tobytes(), np.dtype(spec_fields("Q4_1", "v1")))
    assert np.array_equal(got["d"], d[:, 0]) and np.array_equal(got["m"], mn[:, 0])
    assert np.array_equal(got["qs"] & 15, q[:, 0::2]) and np.array_equal(got["qs"] >> 4, q[:, 1::2])


@pytest.mark.parametrize("name", LEGACY)
def test_v2_has_v3_codes_with_f32_scales(name):
    """#1508 only narrowed the scales: v2 and v3 write the same codes, and the
    v3 scale is the v2 scale rounded to f16."""
    x = rows(9)
    v2 = np.frombuffer(K.quantize(x, name, layout="v2").tobytes(), np.dtype(spec_fields(name, "v2")))
    v3 = np.frombuffer(K.quantize(x, name, layout="v3").tobytes(), np.dtype(spec_fields(name, "v3")))
    assert np.array_equal(v2["qs"], v3["qs"])
    for f in v2.dtype.names:
        if f in ("d", "m"):
            assert np.array_equal(v2[f].astype(np.float16).view(np.uint16), v3[f].view(np.uint16))
        else:
            assert np.array_equal(v2[f], v3[f])


@pytest.mark.parametrize("name", ["Q5_0", "Q5_1", "Q8_0"])
def test_v1_differs_from_v2_only_in_nibble_order(name):
    x = rows(10)
    v1 = K.quantize(x, name, layout="v1")
    v2 = K.quantize(x, name, layout="v2")
    assert np.array_equal(K.dequantize(v1, name, x.shape, layout="v1").view(np.uint32),
                          K.dequantize(v2, name, x.shape, layout="v2").view(np.uint32))
    back, lossless = K.relayout(v1, name, "v1", "v2")
    assert lossless and np.array_equal(back, v2.reshape(-1))


# --------------------------------------------------------------------------- relayout

@pytest.mark.parametrize("name", LEGACY)
def test_relayout_v1_v2_round_trip_is_exact(name):
    q1 = K.quantize(rows(11), name, layout="v1")
    q2, lossless = K.relayout(q1, name, "v1", "v2")
    assert lossless
    np.testing.assert_array_equal(spec_decode(q2, name, "v2"), spec_decode(q1, name, "v1"))
    q1b, lossless = K.relayout(q2, name, "v2", "v1")
    assert lossless and np.array_equal(q1b, q1.reshape(-1))


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("src", ["v1", "v2"])
def test_relayout_to_v3_is_lossless_when_scales_fit_f16(name, src):
    # Values on a power-of-two grid: every block's scales are f16-exact.
    rng = np.random.default_rng(12)
    x = (rng.integers(-8, 8, (6, 256)) * 2.0 ** rng.integers(-6, 4, (6, 1))).astype(np.float32)
    x[:, ::32] = -8 * 2.0 ** -3  # signed max -> d = 2^-3 exactly for Q4_0
    x[:, 1::32] = 7 * 2.0 ** -3
    q = K.quantize(x, name, layout=src)
    q3, lossless = K.relayout(q, name, src, "v3")
    want = spec_decode(q, name, src)
    got = spec_decode(q3, name, "v3")
    if lossless:
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    else:  # only possible for the scale-narrowed types; then something must differ
        assert name in ("Q4_0", "Q4_1", "Q8_0") and not np.array_equal(got, want)
    if name in ("Q5_0", "Q5_1"):
        assert lossless  # f16 scales in every layout
    if name == "Q4_0":  # d = max/-8 on this grid is a power of two: fits f16
        assert lossless


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_relayout_to_v3_reports_inexact_scales(name):
    q1 = K.quantize(rows(13), name, layout="v1")  # random f32 scales: not f16-exact
    q3, lossless = K.relayout(q1, name, "v1", "v3")
    assert not lossless
    a, b = spec_decode(q1, name, "v1"), spec_decode(q3, name, "v3")
    assert not np.array_equal(a, b)
    # f16 keeps 11 significant bits: each value moves by a few 2^-11 of its block's scale
    blk_a, blk_b = a.reshape(-1, 32), b.reshape(-1, 32)
    assert (np.abs(blk_a - blk_b).max(axis=1) <= 4e-3 * np.abs(blk_a).max(axis=1) + 1e-30).all()


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("dst", ["v1", "v2"])
def test_relayout_from_v3_is_always_exact(name, dst):
    q3 = K.quantize(rows(14), name, layout="v3")
    q, lossless = K.relayout(q3, name, "v3", dst)
    assert lossless
    assert np.array_equal(spec_decode(q, name, dst).view(np.uint32), spec_decode(q3, name, "v3").view(np.uint32))
    back, lossless = K.relayout(q, name, dst, "v3")
    assert lossless and np.array_equal(back, q3.reshape(-1))


def test_relayout_rejects_bad_input():
    with pytest.raises(ValueError, match="whole number"):
        K.relayout(b"\0" * 19, "Q4_0", "v1", "v3")
    with pytest.raises(ValueError, match="one layout"):
        K.relayout(b"\0" * 84, "Q2_K", "v1", "v3")
    with pytest.raises(ValueError, match="layout"):
        K.relayout(b"\0" * 18, "Q4_0", "v3", "v4")
    out, lossless = K.relayout(b"", "Q8_0", "v1", "v3")
    assert out.size == 0 and lossless


# --------------------------------------------------------------------------- the real file

def test_real_q4_1_file_decodes_like_gguf(smollm2_gguf):
    """SmolLM2-135M Q4_1 (written by llama.cpp): our dequantization equals
    gguf.quants' on its blocks, both impls, and survives v3 -> v1 -> v3."""
    import gguf
    from gguf import quants as gq

    reader = gguf.GGUFReader(smollm2_gguf)
    seen = 0
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or t.n_elements > 3_000_000:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF order -> PyTorch order
        raw = np.asarray(t.data)
        want = gq.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(shape)
        for impl in ("ref", "fast"):
            got = K.dequantize(raw, "Q4_1", shape, impl=impl, threads=2)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (t.name, impl)
        v1, lossless = K.relayout(raw, "Q4_1", "v3", "v1")
        assert lossless
        back, lossless = K.relayout(v1, "Q4_1", "v1", "v3")
        assert lossless and np.array_equal(back, raw.reshape(-1))
        seen += 1
        if seen >= 12:
            break
    assert seen >= 5
