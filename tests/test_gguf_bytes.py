"""GGUF bytes from the spec table (formats.md 6.1/6.2), built here with struct.pack, vs smolq.

The expected files are assembled field by field in this test, independently of
smolq's writer; the writer must produce exactly them and the reader must read
them back. Then: round trips for v1/v2/v3 x LE/BE, every reader rejection, writer
rejections, and atomic output.
"""
from __future__ import annotations

import os
import struct
import tracemalloc

import numpy as np
import pytest

from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import GGUFValueType, Metadata, MetaValue, read_gguf, write_gguf
from smolq.ggml_types import GGMLType

V = GGUFValueType

# ---- the spec table, transcribed (formats.md 6.1, 6.2) ----
# per version: struct codes of n_tensors/n_kv, string length / array count, tensor dims
WIDTHS = {1: ("I", "I", "I"), 2: ("Q", "Q", "Q"), 3: ("Q", "Q", "Q")}
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
TYPE_F32, TYPE_F16, TYPE_Q4_0, TYPE_Q8_0 = 0, 1, 2, 8


class Spec:
    """Little helpers that pack single spec fields for one version and byte order."""

    def __init__(self, version: int, endian: str):
        self.version, self.e = version, endian
        self.count, self.length, self.dim = WIDTHS[version]

    def p(self, code: str, *values) -> bytes:
        return struct.pack(self.e + code, *values)

    def string(self, s: str | bytes) -> bytes:
        b = s.encode() if isinstance(s, str) else s
        return self.p(self.length, len(b)) + b

    def header(self, n_tensors: int, n_kv: int) -> bytes:
        return b"GGUF" + self.p("I", self.version) + self.p(self.count, n_tensors) + self.p(self.count, n_kv)

    def kv(self, key: str, type_id: int, payload: bytes) -> bytes:
        return self.string(key) + self.p("I", type_id) + payload

    def array(self, item_type: int, n: int, items: bytes) -> bytes:
        return self.p("I", item_type) + self.p(self.length, n) + items

    def tensor_info(self, name: str, ne: list[int], type_id: int, offset: int) -> bytes:
        return (self.string(name) + self.p("I", len(ne)) + b"".join(self.p(self.dim, d) for d in ne)
                + self.p("I", type_id) + self.p("Q", offset))


def pad_to(b: bytes, alignment: int) -> bytes:
    return b + b"\0" * (-len(b) % alignment)


def build(spec: Spec, kvs: list[bytes], infos: list[bytes], blobs: list[bytes], alignment: int = 32) -> bytes:
    """header | KVs | infos | pad | each blob padded (formats.md 6.1)."""
    head = spec.header(len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return pad_to(head, alignment) + b"".join(pad_to(b, alignment) for b in blobs)


# ---- the small file, once as spec bytes and once as smolq objects ----

F32_VALUES = [1.0, -2.5, 3.25, 0.0, 1e-3, -7.0]
Q8_BLOCK = bytes(range(34))  # one Q8_0 block: f16 scale + 32 int8; arbitrary bytes are fine here


def expected_small(version: int, endian: str, alignment: int | None) -> bytes:
    s = Spec(version, endian)
    kvs = [s.kv("general.architecture", T_STR, s.string("llama"))]
    if alignment is not None:
        kvs.append(s.kv("general.alignment", T_U32, s.p("I", alignment)))
    kvs += [
        s.kv("t.u32", T_U32, s.p("I", 7)),
        s.kv("t.i16", T_I16, s.p("h", -2)),
        s.kv("t.f32", T_F32, s.p("f", 1.5)),
        s.kv("t.bool", T_BOOL, b"\x01"),
        s.kv("t.tokens", T_ARR, s.array(T_STR, 2, s.string("a") + s.string("bc"))),
        s.kv("t.scores", T_ARR, s.array(T_F32, 2, s.p("2f", 0.5, -2.0))),
    ]
    if version >= 2:
        kvs.append(s.kv("t.u64", T_U64, s.p("Q", 2**40)))
    a = alignment or 32
    f32_blob = s.p("6f", *F32_VALUES)  # element data follows the file's byte order
    infos = [s.tensor_info("w", [3, 2], TYPE_F32, 0),
             s.tensor_info("q", [32, 1], TYPE_Q8_0, -(-len(f32_blob) // a) * a)]
    return build(s, kvs, infos, [f32_blob, Q8_BLOCK], a)


def small_objects(version: int, alignment: int | None) -> tuple[Metadata, list[TensorEntry]]:
    m = Metadata()
    m["general.architecture"] = MetaValue.string("llama")
    if alignment is not None:
        m["general.alignment"] = MetaValue.u32(alignment)
    m["t.u32"] = MetaValue.u32(7)
    m["t.i16"] = MetaValue.i16(-2)
    m["t.f32"] = MetaValue.f32(1.5)
    m["t.bool"] = MetaValue.boolean(True)
    m["t.tokens"] = MetaValue.array(["a", "bc"], "string")
    m["t.scores"] = MetaValue.array([0.5, -2.0], "f32")
    if version >= 2:
        m["t.u64"] = MetaValue.u64(2**40)
    w = np.array(F32_VALUES, dtype="<f4").reshape(2, 3)
    tensors = [TensorEntry("w", GGMLType.F32, (2, 3), load=lambda: w),
               TensorEntry("q", GGMLType.Q8_0, (1, 32), load=lambda: Q8_BLOCK)]
    return m, tensors


VERSIONS_ENDIANS = [(v, e) for v in (1, 2, 3) for e in "<>"]


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("version,endian", VERSIONS_ENDIANS)
def test_writer_produces_spec_bytes(tmp_path, version, endian, alignment):
    meta, tensors = small_objects(version, alignment)
    out = tmp_path / "s.gguf"
    size = write_gguf(out, meta, tensors, version=version, endian=endian)
    expected = expected_small(version, endian, alignment)
    assert out.read_bytes() == expected
    assert size == len(expected)


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("version,endian", VERSIONS_ENDIANS)
def test_reader_reads_spec_bytes(tmp_path, version, endian, alignment):
    path = tmp_path / "s.gguf"
    path.write_bytes(expected_small(version, endian, alignment))
    meta, tensors = small_objects(version, alignment)
    with read_gguf(path) as f:
        assert (f.version, f.endian, f.alignment) == (version, endian, alignment or 32)
        assert f.metadata == meta
        assert [(t.name, t.type, t.shape) for t in f.tensors] == [("w", GGMLType.F32, (2, 3)),
                                                                  ("q", GGMLType.Q8_0, (1, 32))]
        a = alignment or 32
        assert [t.offset for t in f.tensors] == [f.data_offset, f.data_offset + a]
        assert f.tensors[0].load().tobytes() == struct.pack("<6f", *F32_VALUES)  # LE in memory
        assert f.tensors[1].load().tobytes() == Q8_BLOCK
        if endian == ">":
            assert f.tensors[1].extra.get("be_blocks_as_stored") is True


def test_alignment_argument_adds_the_key(tmp_path):
    """alignment=64 without the key in metadata: the key is appended so readers agree."""
    meta, tensors = small_objects(3, None)
    out = tmp_path / "a.gguf"
    write_gguf(out, meta, tensors, alignment=64)
    with read_gguf(out) as f:
        assert f.alignment == 64
        assert list(f.metadata)[-1] == "general.alignment"
        assert f.metadata["general.alignment"] == MetaValue.u32(64)
        assert f.data_offset % 64 == 0 and all(t.offset % 64 == 0 for t in f.tensors)


# ---- round trips v1/v2/v3 x LE/BE ----

def roundtrip_metadata(version: int) -> Metadata:
    m = Metadata()
    m.set("general.architecture", "llama", "str")
    for name, value in [("u8", 250), ("i8", -100), ("u16", 65000), ("i16", -30000), ("u32", 2**32 - 2),
                        ("i32", -(2**31)), ("f32", 3.14159), ("bool", False), ("str", "ünïcode")]:
        m.set(f"t.{name}", value, name)
        m.set(f"t.arr.{name}", [value, value], name)
    m["t.empty"] = MetaValue.array([], "u32")
    m["t.nested"] = MetaValue.array([MetaValue.array(["x"], "str"),
                                     MetaValue.array([MetaValue.array([1.5], "f32")], "array")], "array")
    if version >= 2:
        for name, value in [("u64", 2**64 - 1), ("i64", -(2**63)), ("f64", 2.0**-1074)]:
            m.set(f"t.{name}", value, name)
            m.set(f"t.arr.{name}", [value], name)
    return m


def roundtrip_tensors() -> list[TensorEntry]:
    rng = np.random.default_rng(7)
    arrays = {
        GGMLType.F32: rng.standard_normal((2, 5)).astype("<f4"),
        GGMLType.F16: rng.standard_normal((3, 4)).astype("<f2"),
        GGMLType.BF16: rng.integers(0, 2**16, (2, 3)).astype("<u2"),
        GGMLType.F64: rng.standard_normal((3,)).astype("<f8"),
        GGMLType.I8: rng.integers(-128, 128, (7,)).astype("i1"),
        GGMLType.I16: rng.integers(-(2**15), 2**15, (2, 2)).astype("<i2"),
        GGMLType.I32: rng.integers(-(2**31), 2**31, (5,)).astype("<i4"),
        GGMLType.I64: rng.integers(-(2**62), 2**62, (1, 1, 2, 3)).astype("<i8"),
        GGMLType.Q4_0: rng.integers(0, 256, (2 * 18,)).astype("u1"),
    }
    shapes = {GGMLType.Q4_0: (2, 32)}
    return [TensorEntry(f"t.{t.name.lower()}", t, shapes.get(t, a.shape), load=lambda a=a: a)
            for t, a in arrays.items()]


@pytest.mark.parametrize("version,endian", VERSIONS_ENDIANS)
def test_roundtrip(tmp_path, version, endian):
    meta, tensors = roundtrip_metadata(version), roundtrip_tensors()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(a, meta, tensors, version=version, endian=endian)
    raw = a.read_bytes()
    with read_gguf(a) as f:
        assert (f.version, f.endian) == (version, endian)
        assert f.metadata == meta
        for key in meta:
            assert f.metadata[key].type == meta[key].type and f.metadata[key].item_type == meta[key].item_type
        assert [(t.name, t.type, t.shape) for t in f.tensors] == [(t.name, t.type, t.shape) for t in tensors]
        for got, want in zip(f.tensors, tensors):
            arr = want.load()
            assert got.load().tobytes() == arr.tobytes()
            # In the file, element data is in the file's byte order; block data is as given.
            stored = raw[got.offset:got.offset + got.nbytes]
            swap = endian == ">" and got.type != GGMLType.Q4_0
            assert stored == (arr.astype(arr.dtype.newbyteorder(">")).tobytes() if swap else arr.tobytes())
        write_gguf(b, f.metadata, f.tensors, version=version, endian=endian)
    assert b.read_bytes() == raw


def test_loads_are_zero_copy_views(tmp_path):
    meta, tensors = small_objects(3, None)
    out = tmp_path / "z.gguf"
    write_gguf(out, meta, tensors)
    with read_gguf(out) as f:
        arr = f.tensors[0].load()
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
        assert not arr.flags.owndata and not arr.flags.writeable
        del arr
    with pytest.raises(ValueError):
        f.tensors[0].load()


def test_on_tensor_progress(tmp_path):
    meta, tensors = small_objects(3, None)
    seen = []
    write_gguf(tmp_path / "p.gguf", meta, tensors, on_tensor=lambda e, n: seen.append((e.name, n)))
    assert seen == [("w", 24), ("q", 34)]


# ---- metadata model ----

def test_metavalue_constructors_validate_and_normalise():
    assert MetaValue.u32(2048) == MetaValue(V.UINT32, 2048)
    assert MetaValue.f32(0.1).value == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    assert MetaValue.of([1, 2], "u16") == MetaValue.array([1, 2], V.UINT16)
    for bad in [lambda: MetaValue.u8(256), lambda: MetaValue.i8(-129), lambda: MetaValue.u64(-1),
                lambda: MetaValue.u32(1.5), lambda: MetaValue.u32(True), lambda: MetaValue.f32(1e39),
                lambda: MetaValue.boolean(2), lambda: MetaValue(V.ARRAY, [1]),
                lambda: MetaValue.array([1, "x"], "i32"), lambda: MetaValue.of(1, "nope"),
                lambda: MetaValue.array([1], "array")]:
        with pytest.raises(ValueError):
            bad()


def test_metavalue_inference_like_gguf_py():
    assert MetaValue.of(True).type == V.BOOL
    assert MetaValue.of(5).type == V.INT32
    assert MetaValue.of(2**40).type == V.INT64
    assert MetaValue.of(1.0).type == V.FLOAT32
    assert MetaValue.of("s").type == V.STRING
    assert MetaValue.of([1, 2]).item_type == V.INT32
    nested = MetaValue.of([[1], ["a", "b"]])
    assert nested.item_type == V.ARRAY and [x.item_type for x in nested.value] == [V.INT32, V.STRING]
    assert nested.to_python() == [[1], ["a", "b"]]


def test_metadata_mapping():
    m = Metadata()
    m["b"] = MetaValue.u32(1)
    m.set("a", 2.5, "f64")
    m.set("c", ["x"])
    assert list(m) == ["b", "a", "c"]
    assert m.value("a") == 2.5 and m.value("missing", 9) == 9
    assert m["c"] == MetaValue.array(["x"], "string")
    with pytest.raises(TypeError):
        m["d"] = 3


# ---- reader rejections ----

def small_spec_file(version=3, endian="<", kvs=None, infos=None, blobs=None, alignment=32) -> bytes:
    s = Spec(version, endian)
    if kvs is None:
        kvs = [s.kv("general.architecture", T_STR, s.string("llama"))]
    if infos is None:
        infos = [s.tensor_info("w", [8], TYPE_F32, 0)]
    if blobs is None:
        blobs = [bytes(32)]
    return build(s, kvs, infos, blobs, alignment)


S3, S1 = Spec(3, "<"), Spec(1, "<")


def nested_arrays(depth: int) -> bytes:
    payload = S3.array(T_U8, 1, b"\x05")
    for _ in range(depth - 1):
        payload = S3.array(T_ARR, 1, payload)
    return payload


BAD_FILES = {
    "empty": (b"", "too short"),
    "wrong magic": (b"GGML" + bytes(20), "not a GGUF file"),
    "truncated header": (b"GGUF" + struct.pack("<I", 3) + b"\0\0\0", "truncated"),
    "unsupported version": (b"GGUF" + struct.pack("<IQQ", 4, 0, 0), "unsupported GGUF version 4"),
    "huge kv count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60), "claims"),
    "huge tensor count": (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), "claims"),
    "huge key length": (S3.header(0, 1) + S3.p("Q", 2**62) + b"abc", "claims"),
    "huge string array": (small_spec_file(kvs=[S3.kv("k", T_ARR, S3.array(T_STR, 2**60, b""))]), "claims"),
    "huge u64 array": (small_spec_file(kvs=[S3.kv("k", T_ARR, S3.array(T_U64, 2**61, b""))]), "claims"),
    "huge string value": (small_spec_file(kvs=[S3.kv("k", T_STR, S3.p("Q", 2**63))]), "claims"),
    "unknown value type": (small_spec_file(kvs=[S3.kv("k", 13, b"\0")]), "unknown value type 13"),
    "unknown array item type": (small_spec_file(kvs=[S3.kv("k", T_ARR, S3.array(99, 0, b""))]),
                                "unknown value type 99"),
    "u64 in v1": (small_spec_file(1, kvs=[S1.kv("k", T_U64, S1.p("Q", 1))],
                                  infos=[S1.tensor_info("w", [8], TYPE_F32, 0)]), "does not exist in GGUF v1"),
    "duplicate key": (small_spec_file(kvs=[S3.kv("k", T_U8, b"\1"), S3.kv("k", T_U8, b"\2")]),
                      "duplicate metadata key 'k'"),
    "bad bool": (small_spec_file(kvs=[S3.kv("k", T_BOOL, b"\2")]), "not 0 or 1"),
    "bad bool array": (small_spec_file(kvs=[S3.kv("k", T_ARR, S3.array(T_BOOL, 2, b"\1\7"))]), "0 or 1"),
    "deep nesting": (small_spec_file(kvs=[S3.kv("k", T_ARR, nested_arrays(17))]), "nested deeper"),
    "key not utf-8": (small_spec_file(kvs=[S3.string(b"\xff\xfe") + S3.p("I", T_U8) + b"\0"]), "not valid UTF-8"),
    "alignment not u32": (small_spec_file(kvs=[S3.kv("general.alignment", T_U64, S3.p("Q", 32))]), "must be UINT32"),
    "alignment not power of 2": (small_spec_file(kvs=[S3.kv("general.alignment", T_U32, S3.p("I", 48))]),
                                 "not a power of two"),
    "five dims": (small_spec_file(infos=[S3.tensor_info("w", [1, 1, 1, 1, 8], TYPE_F32, 0)]), "at most 4"),
    "dim over 2^63": (small_spec_file(infos=[S3.tensor_info("w", [2**63], TYPE_F32, 0)]), "2^63"),
    "unknown tensor type": (small_spec_file(infos=[S3.tensor_info("w", [8], 31, 0)]), "type id 31"),
    "removed tensor type": (small_spec_file(infos=[S3.tensor_info("w", [32], 4, 0)]), "type id 4"),
    "row not block multiple": (small_spec_file(infos=[S3.tensor_info("w", [33], TYPE_Q8_0, 0)]),
                               "not a multiple of Q8_0's block of 32"),
    "misaligned offset": (small_spec_file(infos=[S3.tensor_info("w", [2], TYPE_F32, 8)]), "not a multiple of the alignment"),
    "data past EOF": (small_spec_file(infos=[S3.tensor_info("w", [9], TYPE_F32, 0)]), "past the end"),
    "huge dims past EOF": (small_spec_file(infos=[S3.tensor_info("w", [2**40, 2**20], TYPE_F32, 0)]), "past the end"),
    "duplicate tensor": (small_spec_file(infos=[S3.tensor_info("w", [8], TYPE_F32, 0),
                                                S3.tensor_info("w", [8], TYPE_F32, 32)], blobs=[bytes(32)] * 2),
                         "duplicate tensor name 'w'"),
    "truncated kv": (small_spec_file()[:30], "truncated"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_reader_rejects(tmp_path, case):
    data, message = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) as info:
            read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in info.value.message
    assert str(path) in str(info.value)
    assert peak < 1 << 20  # a claimed 2^60 items never turns into an allocation


def test_big_endian_detected_without_flag(tmp_path):
    path = tmp_path / "be.gguf"
    path.write_bytes(small_spec_file(3, ">", kvs=[Spec(3, ">").kv("k", T_U16, struct.pack(">H", 0x0102))],
                                     infos=[Spec(3, ">").tensor_info("w", [8], TYPE_F32, 0)]))
    with read_gguf(path) as f:
        assert f.endian == ">" and f.metadata["k"] == MetaValue.u16(0x0102)
        assert f.tensors[0].shape == (8,)


def test_non_utf8_string_values_survive_a_round_trip(tmp_path):
    """String values are raw bytes in GGUF (nominally UTF-8); old vocabularies hold broken UTF-8."""
    src, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    src.write_bytes(small_spec_file(kvs=[S3.kv("k", T_STR, S3.string(b"a\xff")),
                                         S3.kv("t", T_ARR, S3.array(T_STR, 1, S3.string(b"\xc3")))]))
    with read_gguf(src) as f:
        assert f.metadata["k"].value.encode("utf-8", "surrogateescape") == b"a\xff"
        write_gguf(out, f.metadata, f.tensors)
    assert out.read_bytes() == src.read_bytes()


def test_missing_file_is_format_error(tmp_path):
    with pytest.raises(FormatError, match="cannot open"):
        read_gguf(tmp_path / "nope.gguf")


# ---- writer rejections and atomic output ----

def entry(name="w", t=GGMLType.F32, shape=(8,), data=None, layout="v3"):
    payload = bytes(32) if data is None else data
    return TensorEntry(name, t, shape, load=lambda: payload, layout=layout)


BAD_WRITES = {
    "u64 in v1": (dict(metadata={"k": MetaValue.u64(1)}, tensors=[], version=1), "does not exist in GGUF v1"),
    "u64 array in v1": (dict(metadata={"k": MetaValue.array([1], "u64")}, tensors=[], version=1),
                        "does not exist in GGUF v1"),
    "long name": (dict(metadata={}, tensors=[entry("n" * 64)]), "at most 63"),
    "row not block multiple": (dict(metadata={}, tensors=[entry(t=GGMLType.Q8_0, shape=(2, 33))]),
                               "not a multiple of Q8_0's block of 32"),
    "wrong byte count": (dict(metadata={}, tensors=[entry(data=bytes(31))]), "load() returned 31 bytes"),
    "duplicate tensor": (dict(metadata={}, tensors=[entry(), entry()]), "duplicate tensor name"),
    "old block layout": (dict(metadata={}, tensors=[entry(t=GGMLType.Q4_0, shape=(32,), data=bytes(20), layout="v1")]),
                         "layout 'v1'"),
    "alignment contradiction": (dict(metadata={"general.alignment": MetaValue.u32(64)}, tensors=[], alignment=32),
                                "contradicts"),
    "alignment type": (dict(metadata={"general.alignment": MetaValue.u64(64)}, tensors=[]), "must be UINT32"),
    "alignment value": (dict(metadata={}, tensors=[], alignment=24), "power of two"),
    "version": (dict(metadata={}, tensors=[], version=4), "unsupported GGUF version 4"),
    "endian": (dict(metadata={}, tensors=[], endian="middle"), "endian"),
    "five dims": (dict(metadata={}, tensors=[entry(shape=(1, 1, 1, 1, 8))]), "GGUF allows 4"),
    "key not utf-8": (dict(metadata={"\udcff": MetaValue.u8(1)}, tensors=[]), "cannot be encoded as UTF-8"),
    "name not utf-8": (dict(metadata={}, tensors=[entry("\udcff")]), "cannot be encoded as UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_writer_rejects(tmp_path, case):
    kwargs, message = BAD_WRITES[case]
    out = tmp_path / "out.gguf"
    with pytest.raises(InputError) as info:
        write_gguf(out, **kwargs)
    assert message in info.value.message and str(out) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_name_of_63_bytes_is_fine(tmp_path):
    write_gguf(tmp_path / "ok.gguf", {}, [entry("n" * 63)])
    with read_gguf(tmp_path / "ok.gguf") as f:
        assert f.tensors[0].name == "n" * 63


def test_failing_load_leaves_no_file(tmp_path):
    out = tmp_path / "model.gguf"

    def explode():
        raise RuntimeError("source vanished")

    tensors = [entry("a"), TensorEntry("b", GGMLType.F32, (8,), load=explode)]
    with pytest.raises(RuntimeError, match="source vanished"):
        write_gguf(out, {"general.architecture": MetaValue.string("llama")}, tensors)
    assert os.listdir(tmp_path) == []

    out.write_bytes(b"previous")  # an existing target survives a failed write untouched
    with pytest.raises(RuntimeError):
        write_gguf(out, {}, tensors)
    assert os.listdir(tmp_path) == ["model.gguf"] and out.read_bytes() == b"previous"
