"""smolq's GGUF reader/writer against the independent `gguf` package (gguf-py)."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GQ  # noqa: E402
from gguf import GGUFValueType as GV  # noqa: E402

from smolq.formats.base import TensorEntry  # noqa: E402
from smolq.formats.gguf import GGUFValueType, Metadata, MetaValue, read_gguf, write_gguf  # noqa: E402
from smolq.ggml_types import GGMLType  # noqa: E402

V = GGUFValueType


def sample_metadata() -> Metadata:
    """Every scalar type, strings, arrays of each type, a nested array, bools."""
    m = Metadata()
    m["general.architecture"] = MetaValue.string("llama")
    m["t.u8"] = MetaValue.u8(255)
    m["t.i8"] = MetaValue.i8(-128)
    m["t.u16"] = MetaValue.u16(65535)
    m["t.i16"] = MetaValue.i16(-32768)
    m["t.u32"] = MetaValue.u32(4_000_000_000)
    m["t.i32"] = MetaValue.i32(-2_000_000_000)
    m["t.f32"] = MetaValue.f32(0.1)
    m["t.bool_true"] = MetaValue.boolean(True)
    m["t.bool_false"] = MetaValue.boolean(False)
    m["t.str"] = MetaValue.string("héllo ✓")
    m["t.u64"] = MetaValue.u64(2**64 - 1)
    m["t.i64"] = MetaValue.i64(-(2**63))
    m["t.f64"] = MetaValue.f64(1e300)
    m.set("t.arr.u8", [0, 1, 255], "u8")
    m.set("t.arr.i8", [-1, 2], "i8")
    m.set("t.arr.u16", [1, 65535], "u16")
    m.set("t.arr.i16", [-5, 5], "i16")
    m.set("t.arr.u32", [7, 2**32 - 1], "u32")
    m.set("t.arr.i32", [-7, 7, 0], "i32")
    m.set("t.arr.f32", [0.5, -1.25, 3.1], "f32")
    m.set("t.arr.bool", [True, False, True], "bool")
    m.set("t.arr.str", ["a", "", "ü€"], "string")
    m.set("t.arr.u64", [2**63 + 1], "u64")
    m.set("t.arr.i64", [-(2**40), 2**40], "i64")
    m.set("t.arr.f64", [1.5, -2e-300], "f64")
    m["t.nested"] = MetaValue.array([MetaValue.array([1, 2, 3], "i32"), MetaValue.array([4], "i32")], "array")
    return m


def sample_tensors() -> list[TensorEntry]:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 4, 8)).astype(np.float16)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    q4 = gguf.quants.quantize(w, GQ.Q4_0)
    q8 = gguf.quants.quantize(w, GQ.Q8_0)
    return [
        TensorEntry("a.f32", GGMLType.F32, (3, 8), load=lambda: f32),
        TensorEntry("b.f16", GGMLType.F16, (2, 4, 8), load=lambda: f16),
        TensorEntry("c.q4_0", GGMLType.Q4_0, (4, 64), load=lambda: q4),
        TensorEntry("d.q8_0", GGMLType.Q8_0, (4, 64), load=lambda: q8),
    ]


def flatten(mv: MetaValue) -> tuple[list[int], list]:
    """gguf-py's view of a field: its type chain (first element's path) and flattened contents."""
    if mv.type != V.ARRAY:
        return [int(mv.type)], mv.value
    if mv.item_type != V.ARRAY:
        return [int(V.ARRAY), int(mv.item_type)], list(mv.value)
    types = [int(V.ARRAY)] + flatten(mv.value[0])[0]
    return types, [x for inner in mv.value for x in flatten(inner)[1]]


def assert_gguf_py_fields_match(reader, meta: Metadata) -> None:
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(meta)
    for key, field in fields.items():
        types, values = flatten(meta[key])
        assert [int(t) for t in field.types] == types, key
        assert field.contents() == values, key


def native_values(tensor_data: np.ndarray) -> np.ndarray:
    return tensor_data.astype(tensor_data.dtype.newbyteorder("="))


@pytest.mark.parametrize("version,endian", [(2, "<"), (3, "<"), (3, ">")])
def test_smolq_written_reads_in_gguf_py(tmp_path, version, endian):
    meta, tensors = sample_metadata(), sample_tensors()
    out = tmp_path / "x.gguf"
    write_gguf(out, meta, tensors, version=version, endian=endian)
    r = gguf.GGUFReader(out)
    assert int(r.fields["GGUF.version"].parts[0][0]) == version
    assert r.endianess == (gguf.GGUFEndian.BIG if endian == ">" else gguf.GGUFEndian.LITTLE)
    assert_gguf_py_fields_match(r, meta)
    assert [t.name for t in r.tensors] == [t.name for t in tensors]
    for rt, t in zip(r.tensors, tensors):
        assert int(rt.tensor_type) == int(t.type)
        assert tuple(reversed(rt.shape.tolist())) == t.shape
        if t.type in (GGMLType.F32, GGMLType.F16):
            np.testing.assert_array_equal(native_values(rt.data), t.load())  # swapped back when BE
        else:
            assert rt.data.tobytes() == t.load().tobytes()  # BE: block bytes kept as stored


@pytest.mark.parametrize("big", [False, True])
def test_gguf_py_written_reads_in_smolq(tmp_path, big):
    out = tmp_path / "y.gguf"
    w = gguf.GGUFWriter(out, "llama", endianess=gguf.GGUFEndian.BIG if big else gguf.GGUFEndian.LITTLE)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 3_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 0.3)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**50))
    w.add_float64("t.f64", 0.3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "ok")
    w.add_key_value("t.arr.u16", [1, 2, 3], GV.ARRAY, sub_type=GV.UINT16)
    w.add_key_value("t.arr.f32", [0.25, 0.1], GV.ARRAY, sub_type=GV.FLOAT32)
    w.add_key_value("t.arr.bool", [False, True], GV.ARRAY, sub_type=GV.BOOL)
    w.add_array("t.arr.str", ["x", "yz"])
    w.add_key_value("t.nested", [[1, 2], [3]], GV.ARRAY)
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((2, 32)).astype(np.float32)
    f16 = rng.standard_normal((5, 3)).astype(np.float16)
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), GQ.Q8_0)
    w.add_tensor("f32", f32)
    w.add_tensor("f16", f16)
    w.add_tensor("q8", q8, raw_dtype=GQ.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    with read_gguf(out) as f:
        assert f.version == 3 and f.endian == (">" if big else "<")
        m = f.metadata
        expect = {
            "general.architecture": (V.STRING, "llama"), "t.u8": (V.UINT8, 200), "t.i8": (V.INT8, -3),
            "t.u16": (V.UINT16, 60000), "t.i16": (V.INT16, -300), "t.u32": (V.UINT32, 3_000_000_000),
            "t.i32": (V.INT32, -5), "t.f32": (V.FLOAT32, float(np.float32(0.3))), "t.u64": (V.UINT64, 2**60),
            "t.i64": (V.INT64, -(2**50)), "t.f64": (V.FLOAT64, 0.3), "t.bool": (V.BOOL, True),
            "t.str": (V.STRING, "ok"),
        }
        for key, (t, value) in expect.items():
            assert (m[key].type, m[key].value) == (t, value), key
        assert (m["t.arr.u16"].item_type, m["t.arr.u16"].value) == (V.UINT16, [1, 2, 3])
        assert m["t.arr.f32"].value == [float(np.float32(0.25)), float(np.float32(0.1))]
        assert (m["t.arr.bool"].item_type, m["t.arr.bool"].value) == (V.BOOL, [False, True])
        assert (m["t.arr.str"].item_type, m["t.arr.str"].value) == (V.STRING, ["x", "yz"])
        nested = m["t.nested"]
        assert nested.item_type == V.ARRAY
        assert [(x.item_type, x.value) for x in nested.value] == [(V.INT32, [1, 2]), (V.INT32, [3])]
        assert list(m) == [*expect, "t.arr.u16", "t.arr.f32", "t.arr.bool", "t.arr.str", "t.nested"]

        got = {t.name: t for t in f.tensors}
        assert [t.name for t in f.tensors] == ["f32", "f16", "q8"]
        assert (got["f32"].type, got["f32"].shape) == (GGMLType.F32, (2, 32))
        assert (got["f16"].type, got["f16"].shape) == (GGMLType.F16, (5, 3))
        assert (got["q8"].type, got["q8"].shape) == (GGMLType.Q8_0, (2, 64))
        np.testing.assert_array_equal(got["f32"].load().view(np.float32).reshape(2, 32), f32)
        np.testing.assert_array_equal(got["f16"].load().view(np.float16).reshape(5, 3), f16)
        assert got["q8"].load().tobytes() == q8.tobytes()


def test_key_order_from_gguf_py(tmp_path):
    out = tmp_path / "o.gguf"
    w = gguf.GGUFWriter(out, "llama")
    for i in range(5):
        w.add_uint32(f"k{4 - i}", i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with read_gguf(out) as f:
        assert list(f.metadata) == ["general.architecture", "k4", "k3", "k2", "k1", "k0"]
        assert f.tensors == []


def test_real_file_matches_gguf_py(smollm2_gguf):
    r = gguf.GGUFReader(smollm2_gguf)
    with read_gguf(smollm2_gguf) as f:
        assert f.data_offset == r.data_offset
        assert f.alignment == r.alignment
        assert_gguf_py_fields_match(r, f.metadata)
        assert len(f.tensors) == len(r.tensors)
        for t, rt in zip(f.tensors, r.tensors):
            assert t.name == rt.name
            assert int(t.type) == int(rt.tensor_type)
            assert t.shape == tuple(reversed(rt.shape.tolist()))
            assert t.offset == rt.data_offset
            assert t.nbytes == rt.n_bytes
        # Bytes of a few tensors (zero-copy views of the same mmap region).
        for t, rt in list(zip(f.tensors, r.tensors))[:3]:
            assert t.load().tobytes() == rt.data.tobytes()


def test_real_file_rewrites_byte_identical(smollm2_gguf, tmp_path):
    """Reading and writing back reproduces llama.cpp's file exactly (order, types, padding)."""
    out = tmp_path / "copy.gguf"
    with read_gguf(smollm2_gguf) as f:
        write_gguf(out, f.metadata, f.tensors)
    assert_same_bytes(out, smollm2_gguf)


def test_gemma_q4_k_m_rewrites_byte_identical(gemma_gguf, tmp_path):
    """A llama.cpp Q4_K_M file (K-quants, Q5_0, Q8_0, 262k-token vocabulary) survives read + write exactly.

    (gguf-py's reader needs about a minute for this vocabulary, so here the
    file itself, as llama.cpp wrote it, is the independent reference.)
    """
    out = tmp_path / "copy.gguf"
    with read_gguf(gemma_gguf) as f:
        assert f.version == 3 and f.metadata.value("general.architecture") == "gemma3"
        assert {t.type for t in f.tensors} >= {GGMLType.Q4_K, GGMLType.Q6_K}
        write_gguf(out, f.metadata, f.tensors)
    assert_same_bytes(out, gemma_gguf)


def assert_same_bytes(a, b):
    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            u, v = x.read(1 << 22), y.read(1 << 22)
            assert u == v
            if not u:
                break
