"""GGUF v1, v2 and v3: one reader and one writer, parameterised by a version table.

Layout (formats.md 6.1):

    magic "GGUF" | version u32 | n_tensors | n_kv | KV pairs | tensor infos
    | zero padding to ALIGNMENT | tensor data (each tensor padded to ALIGNMENT)

What changes between versions is only the width of counts, lengths and dims
and which value types exist (VERSIONS below). v3 adds big-endian files: every
multi-byte field swapped except the magic, with no flag saying so; we detect
them as gguf-py does (the version's low 16 bits read as zero little-endian).

Byte order of tensor data. smolq hands tensor bytes around in the
little-endian ggml layout. Element-typed tensors (block size 1: F32, F16,
BF16, I8..I64, F64) are swapped to/from big-endian at the file boundary.
Block-quantized tensors in big-endian files are kept byte for byte as stored
and their entries carry extra["be_blocks_as_stored"] = True: gguf-py's
GGUFWriter writes them unswapped (a uint8 byteswap is a no-op), while its
gguf_convert_endian.py script swaps the f16 scales inside Q4_0/Q8_0/Q4_K/Q6_K
blocks. Without a flag in the file the two cannot be told apart, so we do not
guess.
"""
from __future__ import annotations

import mmap
import operator
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable

from smolq.atomic import atomic_output, atomic_outputs
from smolq.errors import FormatError, InputError
from smolq.fileio import FileSpan, MappedWindow, SpanLoad, phase, produce_ahead
from smolq.formats.base import TensorEntry, find_tensor, tensor_payload
from smolq.ggml_types import TYPE_INFO, GGMLType
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the NUL
MAX_KEY_BYTES = 65535  # spec
MAX_ARRAY_DEPTH = 16  # the spec allows nesting; bound it so a crafted file cannot blow the stack


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


V = GGUFValueType

# struct codes of the fixed-size value types.
SCALAR_CODES: dict[GGUFValueType, str] = {
    V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
    V.FLOAT32: "f", V.BOOL: "B", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d",
}
INT_RANGES: dict[GGUFValueType, tuple[int, int]] = {
    V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1),
    V.UINT16: (0, 2**16 - 1), V.INT16: (-(2**15), 2**15 - 1),
    V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
    V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1),
}
FLOAT_TYPES = frozenset({V.FLOAT32, V.FLOAT64})


@dataclass(frozen=True)
class GGUFVersion:
    """What one GGUF version fixes: widths (struct codes) and the value types that exist."""

    number: int
    count: str  # n_tensors and n_kv
    length: str  # string lengths and array element counts
    dim: str  # each tensor dimension ne[i]
    value_types: frozenset[GGUFValueType]


_V1_TYPES = frozenset(t for t in GGUFValueType if t <= V.ARRAY)
_ALL_TYPES = frozenset(GGUFValueType)

# formats.md 6.2. The fields not listed (version, n_dims, value and tensor type
# ids: u32; tensor offset: u64) are the same in every version.
VERSIONS: dict[int, GGUFVersion] = {
    1: GGUFVersion(1, count="I", length="I", dim="I", value_types=_V1_TYPES),
    2: GGUFVersion(2, count="Q", length="Q", dim="Q", value_types=_ALL_TYPES),
    3: GGUFVersion(3, count="Q", length="Q", dim="Q", value_types=_ALL_TYPES),
}

# Ids that are ggml types but never appear in GGUF (removed before GGUF existed).
GGUF_TENSOR_TYPES = frozenset(GGMLType) - {GGMLType.Q4_2, GGMLType.Q4_3}

_ENDIANS = {"<": "<", ">": ">", "little": "<", "big": ">"}


# ---------------------------------------------------------------- metadata model

_TYPE_ALIASES: dict[str, GGUFValueType] = {
    "u8": V.UINT8, "i8": V.INT8, "u16": V.UINT16, "i16": V.INT16, "u32": V.UINT32,
    "i32": V.INT32, "f32": V.FLOAT32, "u64": V.UINT64, "i64": V.INT64, "f64": V.FLOAT64,
    "bool": V.BOOL, "str": V.STRING, "string": V.STRING, "array": V.ARRAY,
}


def value_type(t: GGUFValueType | int | str) -> GGUFValueType:
    """A value type from an enum member, its id, its name ("UINT32") or a short alias ("u32")."""
    if isinstance(t, str):
        alias = _TYPE_ALIASES.get(t.lower())
        if alias is not None:
            return alias
        try:
            return GGUFValueType[t.upper()]
        except KeyError:
            raise ValueError(f"unknown GGUF value type {t!r}") from None
    try:
        return GGUFValueType(t)
    except ValueError:
        raise ValueError(f"unknown GGUF value type {t!r}") from None


def _round_f32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        raise ValueError(f"{x!r} does not fit in FLOAT32") from None


def _normalize_scalar(t: GGUFValueType, v: Any) -> Any:
    """The exact python value a field of type `t` holds (FLOAT32 rounded to f32), or ValueError."""
    if t in INT_RANGES:
        if isinstance(v, (bool, np.bool_)) or isinstance(v, float):
            raise ValueError(f"{t.name} needs an int, got {v!r}")
        try:
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"{t.name} needs an int, got {type(v).__name__}") from None
        lo, hi = INT_RANGES[t]
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range for {t.name}")
        return v
    if t == V.FLOAT32:
        return _round_f32(float(v))
    if t == V.FLOAT64:
        return float(v)
    if t == V.BOOL:
        if isinstance(v, (bool, np.bool_)) or v in (0, 1):
            return bool(v)
        raise ValueError(f"BOOL needs True/False, got {v!r}")
    if t == V.STRING:
        if isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v).decode("utf-8", "surrogateescape")
        if isinstance(v, str):
            return v
        raise ValueError(f"STRING needs str or bytes, got {type(v).__name__}")
    raise ValueError(f"{t.name} is not a scalar type")


@dataclass(frozen=True)
class MetaValue:
    """One metadata value with its exact GGUF type.

    Scalars hold int / float / bool / str. An ARRAY holds a list of python
    values of `item_type`; an array of arrays holds a list of ARRAY MetaValues
    (each inner array has its own element type in the file). FLOAT32 values
    are rounded to float32 on construction so a round trip compares equal.
    """

    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None

    def __post_init__(self) -> None:
        t = value_type(self.type)
        object.__setattr__(self, "type", t)
        if t != V.ARRAY:
            if self.item_type is not None:
                raise ValueError(f"item_type is only for ARRAY values, not {t.name}")
            object.__setattr__(self, "value", _normalize_scalar(t, self.value))
            return
        if self.item_type is None:
            raise ValueError("an ARRAY MetaValue needs item_type")
        it = value_type(self.item_type)
        object.__setattr__(self, "item_type", it)
        if isinstance(self.value, (str, bytes)) or not isinstance(self.value, (Sequence, np.ndarray)):
            raise ValueError(f"ARRAY needs a sequence of values, got {type(self.value).__name__}")
        if it == V.ARRAY:
            items = [_as_inner_array(x) for x in self.value]
        else:
            items = [_normalize_scalar(it, x) for x in self.value]
        object.__setattr__(self, "value", items)

    @classmethod
    def _trusted(cls, t: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> "MetaValue":
        """Build without normalising: for values the reader decoded from a file."""
        mv = object.__new__(cls)
        object.__setattr__(mv, "type", t)
        object.__setattr__(mv, "value", value)
        object.__setattr__(mv, "item_type", item_type)
        return mv

    @classmethod
    def of(cls, value: Any, vtype: GGUFValueType | int | str | None = None,
           item_type: GGUFValueType | int | str | None = None) -> "MetaValue":
        """A value with an explicit type, or inferred as gguf-py does when `vtype` is None.

        A list/tuple/ndarray with a scalar `vtype` is an ARRAY of that type:
        MetaValue.of([1, 2], "u16") == MetaValue.array([1, 2], "u16").
        Inference: bool -> BOOL, int -> INT32 (INT64 beyond its range), float ->
        FLOAT32, str/bytes -> STRING, list -> ARRAY of the (common) inferred
        type of its items; nested lists -> arrays of arrays.
        """
        if isinstance(value, MetaValue):
            return value
        if vtype is None:
            return _infer(value)
        t = value_type(vtype)
        if t != V.ARRAY and isinstance(value, (list, tuple, np.ndarray)):
            t, item_type = V.ARRAY, t
        if t == V.ARRAY and item_type is None:
            return _infer(value)
        return cls(t, value, None if item_type is None else value_type(item_type))

    @classmethod
    def array(cls, values: Sequence[Any], item_type: GGUFValueType | int | str) -> "MetaValue":
        return cls.of(values, V.ARRAY, item_type)

    def to_python(self) -> Any:
        """The plain python value (nested arrays as nested lists)."""
        if self.type == V.ARRAY and self.item_type == V.ARRAY:
            return [x.to_python() for x in self.value]
        return self.value

    @classmethod
    def u8(cls, v: int) -> "MetaValue":
        return cls(V.UINT8, v)

    @classmethod
    def i8(cls, v: int) -> "MetaValue":
        return cls(V.INT8, v)

    @classmethod
    def u16(cls, v: int) -> "MetaValue":
        return cls(V.UINT16, v)

    @classmethod
    def i16(cls, v: int) -> "MetaValue":
        return cls(V.INT16, v)

    @classmethod
    def u32(cls, v: int) -> "MetaValue":
        return cls(V.UINT32, v)

    @classmethod
    def i32(cls, v: int) -> "MetaValue":
        return cls(V.INT32, v)

    @classmethod
    def u64(cls, v: int) -> "MetaValue":
        return cls(V.UINT64, v)

    @classmethod
    def i64(cls, v: int) -> "MetaValue":
        return cls(V.INT64, v)

    @classmethod
    def f32(cls, v: float) -> "MetaValue":
        return cls(V.FLOAT32, v)

    @classmethod
    def f64(cls, v: float) -> "MetaValue":
        return cls(V.FLOAT64, v)

    @classmethod
    def boolean(cls, v: bool) -> "MetaValue":
        return cls(V.BOOL, v)

    @classmethod
    def string(cls, v: str | bytes) -> "MetaValue":
        return cls(V.STRING, v)


def _as_inner_array(x: Any) -> MetaValue:
    if isinstance(x, MetaValue):
        if x.type != V.ARRAY:
            raise ValueError(f"an array of arrays holds ARRAY values, got {x.type.name}")
        return x
    inferred = _infer(x)
    if inferred.type != V.ARRAY:
        raise ValueError(f"an array of arrays holds arrays, got {x!r}")
    return inferred


def _infer_type(v: Any) -> GGUFValueType:
    if isinstance(v, (bool, np.bool_)):
        return V.BOOL
    if isinstance(v, (str, bytes)):
        return V.STRING
    if isinstance(v, (int, np.integer)):
        lo, hi = INT_RANGES[V.INT32]
        return V.INT32 if lo <= int(v) <= hi else V.INT64
    if isinstance(v, (float, np.floating)):
        return V.FLOAT32
    if isinstance(v, (list, tuple, np.ndarray)):
        return V.ARRAY
    raise ValueError(f"cannot infer a GGUF type for {type(v).__name__}; pass one explicitly")


def _infer(value: Any) -> MetaValue:
    t = _infer_type(value)
    if t != V.ARRAY:
        return MetaValue(t, value)
    if len(value) == 0:
        raise ValueError("cannot infer the item type of an empty array; pass item_type")
    item_types = {_infer_type(x) for x in value}
    if item_types == {V.INT32, V.INT64}:
        item_types = {V.INT64}
    if len(item_types) != 1:
        raise ValueError(f"array items have mixed types {sorted(t.name for t in item_types)}")
    it = item_types.pop()
    if it == V.ARRAY:
        return MetaValue(V.ARRAY, [_infer(x) for x in value], V.ARRAY)
    return MetaValue(V.ARRAY, value, it)


class Metadata(MutableMapping[str, MetaValue]):
    """Ordered key -> MetaValue. Assign MetaValues, or use set() with a plain value and a type."""

    def __init__(self, items: Mapping[str, MetaValue] | Iterable[tuple[str, MetaValue]] | None = None):
        self._d: dict[str, MetaValue] = {}
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for k, v in pairs:
                self[k] = v

    def __getitem__(self, key: str) -> MetaValue:
        return self._d[key]

    def __setitem__(self, key: str, value: MetaValue) -> None:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys are str, got {type(key).__name__}")
        if not isinstance(value, MetaValue):
            raise TypeError(f"metadata[{key!r}] needs a MetaValue (e.g. MetaValue.u32(n) or "
                            f"MetaValue.of(value, 'u32')), got {type(value).__name__}")
        self._d[key] = value

    def __delitem__(self, key: str) -> None:
        del self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Metadata({self._d!r})"

    def set(self, key: str, value: Any, vtype: GGUFValueType | int | str | None = None,
            item_type: GGUFValueType | int | str | None = None) -> None:
        """metadata.set("llama.context_length", 2048, "u32"); type inferred when omitted."""
        self[key] = MetaValue.of(value, vtype, item_type)

    def value(self, key: str, default: Any = None) -> Any:
        """The plain python value of `key`, or `default` when absent."""
        mv = self._d.get(key)
        return default if mv is None else mv.to_python()


# ---------------------------------------------------------------- reading


def _struct(endian: str, code: str) -> struct.Struct:
    return _STRUCTS[endian + code]


_STRUCTS = {e + c: struct.Struct(e + c) for e in "<>" for c in "BbHhIiQqfd"}


def _min_value_size(t: GGUFValueType, version: GGUFVersion) -> int:
    """Fewest bytes one value of type `t` can occupy: what a claimed count is checked against."""
    if t == V.STRING:
        return _struct("<", version.length).size
    if t == V.ARRAY:
        return 4 + _struct("<", version.length).size
    return _struct("<", SCALAR_CODES[t]).size


class _Cursor:
    """Bounds-checked reads from a buffer; every failure is a FormatError naming the file."""

    def __init__(self, path: Path, buf: Any, size: int, endian: str, pos: int):
        self.path, self.buf, self.size, self.endian, self.pos = path, buf, size, endian, pos

    def error(self, message: str) -> FormatError:
        return FormatError(self.path, message)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.error(f"truncated: {what} at offset {self.pos} needs {n} bytes, "
                             f"only {self.remaining} left in the file")

    def unpack(self, code: str, what: str) -> Any:
        s = _struct(self.endian, code)
        self.need(s.size, what)
        v = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return v

    def count(self, code: str, min_item_size: int, what: str) -> int:
        """A count of items that must each take at least `min_item_size` bytes of what is left."""
        at = self.pos
        n = self.unpack(code, what)
        if n * min_item_size > self.remaining:
            raise self.error(f"truncated or corrupt: {what} at offset {at} claims {n} items, more than "
                             f"the {self.remaining} bytes left in the file can hold")
        return n

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def string(self, version: GGUFVersion, what: str) -> bytes:
        n = self.count(version.length, 1, f"length of {what}")
        return self.raw(n, what)

    def text(self, version: GGUFVersion, what: str) -> str:
        """A key or tensor name: must be valid UTF-8."""
        at = self.pos
        b = self.string(version, what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at offset {at} is not valid UTF-8: {b[:40]!r}") from None


def _read_value_type(cur: _Cursor, version: GGUFVersion, what: str) -> GGUFValueType:
    at = cur.pos
    raw = cur.unpack("I", f"value type of {what}")
    try:
        t = GGUFValueType(raw)
    except ValueError:
        raise cur.error(f"unknown value type {raw} for {what} at offset {at}") from None
    if t not in version.value_types:
        raise cur.error(f"value type {t.name} of {what} does not exist in GGUF v{version.number}")
    return t


def _read_scalar(cur: _Cursor, version: GGUFVersion, t: GGUFValueType, what: str) -> Any:
    if t == V.STRING:
        return cur.string(version, what).decode("utf-8", "surrogateescape")
    at = cur.pos
    v = cur.unpack(SCALAR_CODES[t], what)
    if t == V.BOOL:
        if v > 1:
            raise cur.error(f"{what} at offset {at}: BOOL byte is {v}, not 0 or 1")
        return bool(v)
    return v


def _read_array(cur: _Cursor, version: GGUFVersion, what: str, depth: int) -> MetaValue:
    if depth > MAX_ARRAY_DEPTH:
        raise cur.error(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    it = _read_value_type(cur, version, f"items of {what}")
    n = cur.count(version.length, _min_value_size(it, version), f"item count of {what}")
    if it == V.ARRAY:
        items = [_read_array(cur, version, f"{what}[{i}]", depth + 1) for i in range(n)]
    elif it == V.STRING:
        items = _read_string_items(cur, version, n, what)
    else:
        items = _read_numeric_items(cur, it, n, what)
    return MetaValue._trusted(V.ARRAY, items, it)


def _read_string_items(cur: _Cursor, version: GGUFVersion, n: int, what: str) -> list[str]:
    """n length-prefixed strings. A vocabulary is tens of thousands of them, so this is one
    tight loop (the error path re-reads the failing item through the checked cursor)."""
    length = _struct(cur.endian, version.length)
    unpack_from, width, buf, size = length.unpack_from, length.size, cur.buf, cur.size
    items, pos = [], cur.pos
    for i in range(n):
        if pos + width > size:
            break
        (k,) = unpack_from(buf, pos)
        if pos + width + k > size:
            break
        items.append(bytes(buf[pos + width:pos + width + k]).decode("utf-8", "surrogateescape"))
        pos += width + k
    cur.pos = pos
    if len(items) < n:
        cur.string(version, f"{what}[{len(items)}]")  # raises the one-line truncation error
    return items


def _read_numeric_items(cur: _Cursor, it: GGUFValueType, n: int, what: str) -> list[Any]:
    dtype = np.dtype(cur.endian + SCALAR_CODES[it])
    at = cur.pos
    cur.need(n * dtype.itemsize, f"items of {what}")
    items = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=cur.pos).tolist()  # no view outlives this line
    cur.pos += n * dtype.itemsize
    if it == V.BOOL:
        if any(x > 1 for x in items):
            raise cur.error(f"{what} at offset {at}: BOOL array holds a byte other than 0 or 1")
        return [bool(x) for x in items]
    return items


def _read_value(cur: _Cursor, version: GGUFVersion, t: GGUFValueType, what: str) -> MetaValue:
    if t == V.ARRAY:
        return _read_array(cur, version, what, 1)
    return MetaValue._trusted(t, _read_scalar(cur, version, t, what))


def _read_metadata(cur: _Cursor, version: GGUFVersion, n_kv: int) -> Metadata:
    meta = Metadata()
    for i in range(n_kv):
        at = cur.pos
        key = cur.text(version, f"key of KV pair {i}")
        if key in meta:
            raise cur.error(f"duplicate metadata key {key!r} at offset {at}")
        t = _read_value_type(cur, version, f"key {key!r}")
        meta._d[key] = _read_value(cur, version, t, f"key {key!r}")
    return meta


@dataclass
class _TensorInfo:
    name: str
    type: GGMLType
    ne: tuple[int, ...]  # ggml order
    offset: int  # relative to the data blob
    at: int  # file offset of the info, for messages


def _read_tensor_info(cur: _Cursor, version: GGUFVersion, i: int) -> _TensorInfo:
    at = cur.pos
    name = cur.text(version, f"name of tensor {i}")
    n_dims = cur.unpack("I", f"n_dims of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise cur.error(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
    ne = tuple(cur.unpack(version.dim, f"dimension {d} of tensor {name!r}") for d in range(n_dims))
    if any(d >= 2**63 for d in ne):
        raise cur.error(f"tensor {name!r} has a dimension >= 2^63: {ne}")
    raw_type = cur.unpack("I", f"type of tensor {name!r}")
    try:
        ggml_type = GGMLType(raw_type)
    except ValueError:
        ggml_type = None
    if ggml_type not in GGUF_TENSOR_TYPES:
        raise cur.error(f"tensor {name!r} has unknown or removed ggml type id {raw_type}")
    offset = cur.unpack("Q", f"data offset of tensor {name!r}")
    bs = TYPE_INFO[ggml_type].block_size
    ne0 = ne[0] if ne else 1
    if ne0 % bs:
        raise cur.error(f"tensor {name!r}: row of {ne0} elements is not a multiple of "
                        f"{ggml_type.name}'s block of {bs}")
    return _TensorInfo(name, ggml_type, ne, offset, at)


def _read_alignment(path: Path, meta: Metadata) -> int:
    mv = meta.get(ALIGNMENT_KEY)
    if mv is None:
        return DEFAULT_ALIGNMENT
    if mv.type != V.UINT32:
        raise FormatError(path, f"{ALIGNMENT_KEY} has type {mv.type.name}; it must be UINT32")
    a = mv.value
    if a == 0 or a & (a - 1):
        raise FormatError(path, f"{ALIGNMENT_KEY} = {a} is not a power of two")
    return a


def _detect_endian(buf: Any) -> tuple[str, int]:
    """(endian, version) as gguf-py decides: a version whose low 16 bits read 0 is big-endian."""
    le = _struct("<", "I").unpack_from(buf, 4)[0]
    if le & 0xFFFF == 0:
        return ">", _struct(">", "I").unpack_from(buf, 4)[0]
    return "<", le


def _is_element_type(t: GGMLType) -> bool:
    return TYPE_INFO[t].block_size == 1


def _element_dtype(t: GGMLType, endian: str) -> np.dtype:
    """An integer dtype of the element's width: byte swapping needs only the width."""
    return np.dtype(endian + {1: "u1", 2: "u2", 4: "u4", 8: "u8"}[TYPE_INFO[t].type_size])


class GGUFFile:
    """A parsed GGUF file backed by a read-only mmap; tensors load lazily as views of it."""

    def __init__(self, path: Path, mm: mmap.mmap | None, version: int, endian: str, alignment: int,
                 metadata: Metadata, tensors: list[TensorEntry], data_offset: int, size: int):
        self.path = path
        self._mm = mm
        self._window = MappedWindow(mm) if mm is not None else None
        self.version = version
        self.endian = endian
        self.alignment = alignment
        self.metadata = metadata
        self.tensors = tensors
        self.data_offset = data_offset  # absolute offset of the tensor-data blob
        self.size = size
        self.parts: list[GGUFFile] = []  # the other shards of a split set (their tensors are in `tensors`)
        self.split: SplitInfo | None = None  # set when the file is (the first shard of) a split GGUF

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            _close_map(mm)
        for part in self.parts:
            part.close()

    def tensor(self, name: str) -> TensorEntry:
        return find_tensor(self.tensors, name)

    @property
    def byte_order(self) -> str:
        return "little" if self.endian == "<" else "big"

    def _loader(self, offset: int, nbytes: int, ggml_type: GGMLType) -> Callable[[], np.ndarray]:
        swap = _needs_swap(ggml_type, self.endian)

        def load() -> np.ndarray:
            if self._mm is None:
                raise ValueError(f"{self.path}: GGUF file is closed")
            if nbytes == 0:
                return np.empty(0, dtype=np.uint8)
            view = np.frombuffer(self._window.view(offset, nbytes), dtype=np.uint8)
            if not swap:
                return view
            # Element data in a big-endian file: hand out the little-endian layout (a copy).
            return view.view(_element_dtype(ggml_type, ">")).astype(_element_dtype(ggml_type, "<")).view(np.uint8)

        # Unswapped, load() is exactly the file's bytes there: a sink may copy them file to file.
        return load if swap else SpanLoad(FileSpan(self.path, offset, nbytes), load)


def read_gguf(path: str | os.PathLike, whole_set: bool = True) -> GGUFFile:
    """Parse a GGUF v1/v2/v3 file (either byte order). Raises FormatError on any defect.

    The first shard of a split GGUF (split.count > 1) brings the whole set: its
    tensors are every shard's, in order, and `split` says where they live. The
    split.* keys are not in `metadata` (they describe files, not the model).
    whole_set=False reads the one file as it is, split keys included.
    """
    gf = _read_one(Path(path))
    if not whole_set:
        return gf
    try:
        return _open_split(gf)
    except BaseException:
        gf.close()
        raise


def _read_one(path: Path) -> GGUFFile:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise FormatError(path, f"cannot open: {exc.strerror or exc}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            head = fh.read(4)
            if len(head) == 4 and head != MAGIC:
                raise FormatError(path, f"not a GGUF file (magic {head!r}, expected b'GGUF')")
            raise FormatError(path, f"truncated: {size} bytes is too short for a GGUF header")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mm, size)
    except BaseException:
        _close_map(mm)
        raise


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # numpy views still alive (tensor loads, a traceback's frames); it closes when they go


def _parse(path: Path, mm: mmap.mmap, size: int) -> GGUFFile:
    if mm[:4] != MAGIC:
        raise FormatError(path, f"not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF')")
    endian, number = _detect_endian(mm)
    version = VERSIONS.get(number)
    if version is None:
        raise FormatError(path, f"unsupported GGUF version {number} (smolq reads versions 1, 2 and 3)")
    cur = _Cursor(path, mm, size, endian, 8)
    min_info = _struct("<", version.length).size + 4 + 4 + 8
    min_kv = _struct("<", version.length).size + 4 + 1
    n_tensors = cur.count(version.count, min_info, "tensor count")
    n_kv = cur.count(version.count, min_kv, "metadata KV count")
    metadata = _read_metadata(cur, version, n_kv)
    infos = [_read_tensor_info(cur, version, i) for i in range(n_tensors)]
    alignment = _read_alignment(path, metadata)
    data_offset = _align(cur.pos, alignment)
    gf = GGUFFile(path, mm, number, endian, alignment, metadata, [], data_offset, size)
    gf.tensors = _tensor_entries(gf, infos)
    return gf


def _tensor_entries(gf: GGUFFile, infos: list[_TensorInfo]) -> list[TensorEntry]:
    seen: set[str] = set()
    entries = []
    for info in infos:
        if info.name in seen:
            raise FormatError(gf.path, f"duplicate tensor name {info.name!r} (tensor info at offset {info.at})")
        seen.add(info.name)
        if info.offset % gf.alignment:
            raise FormatError(gf.path, f"tensor {info.name!r}: data offset {info.offset} is not a multiple "
                                       f"of the alignment {gf.alignment}")
        entry = TensorEntry(info.name, info.type, tuple(reversed(info.ne)), layout="v3")
        nbytes = entry.nbytes
        start = gf.data_offset + info.offset
        if start + nbytes > gf.size:
            raise FormatError(gf.path, f"tensor {info.name!r}: data at offset {start} + {nbytes} bytes "
                                       f"runs past the end of the file ({gf.size} bytes)")
        entry.offset = start
        entry.load = gf._loader(start, nbytes, info.type)
        entry.extra["gguf_offset"] = info.offset
        if gf.endian == ">" and not _is_element_type(info.type):
            entry.extra["be_blocks_as_stored"] = True
        entries.append(entry)
    return entries


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------- writing


class _Packer:
    """Encodes header fields and values for one version and byte order into a bytearray."""

    def __init__(self, path: Path, version: GGUFVersion, endian: str):
        self.path, self.version, self.endian = path, version, endian
        self.out = bytearray()

    def error(self, message: str) -> InputError:
        return InputError(self.path, message)

    def pack(self, code: str, value: int, what: str) -> None:
        try:
            self.out += _struct(self.endian, code).pack(value)
        except struct.error:
            raise self.error(f"{what} = {value} does not fit in GGUF v{self.version.number}'s "
                             f"{_struct('<', code).size * 8}-bit field") from None

    def string(self, s: str, what: str, errors: str = "surrogateescape") -> None:
        try:
            b = s.encode("utf-8", errors)
        except UnicodeEncodeError:
            raise self.error(f"{what} cannot be encoded as UTF-8") from None
        self.pack(self.version.length, len(b), f"length of {what}")
        self.out += b

    def _strings(self, items: list[str], what: str) -> None:
        """Length-prefixed strings, one join for a whole vocabulary (tens of thousands of
        tokens: a tenth of a second item by item); any item that cannot be written is
        found and named by the item-by-item path."""
        try:
            pack = _struct(self.endian, self.version.length).pack
            encoded = [s.encode("utf-8", "surrogateescape") for s in items]
            self.out += b"".join([pack(len(b)) + b for b in encoded])
        except (UnicodeEncodeError, struct.error, AttributeError):
            for i, s in enumerate(items):
                self.string(s, f"{what}[{i}]")

    def value_type(self, t: GGUFValueType, what: str) -> None:
        if t not in self.version.value_types:
            raise self.error(f"{what}: value type {t.name} does not exist in GGUF v{self.version.number}")
        self.pack("I", int(t), f"type of {what}")

    def value(self, mv: MetaValue, what: str) -> None:
        if mv.type == V.ARRAY:
            self.array(mv, what)
        elif mv.type == V.STRING:
            self.string(mv.value, what)
        else:
            self.pack(SCALAR_CODES[mv.type], mv.value, what)

    def array(self, mv: MetaValue, what: str) -> None:
        it = mv.item_type
        self.value_type(it, f"items of {what}")
        self.pack(self.version.length, len(mv.value), f"item count of {what}")
        if it == V.ARRAY:
            for i, inner in enumerate(mv.value):
                self.array(inner, f"{what}[{i}]")
        elif it == V.STRING:
            self._strings(mv.value, what)
        else:
            self.out += np.asarray(mv.value, dtype=self.endian + SCALAR_CODES[it]).tobytes()


def _effective_metadata(path: Path, metadata: Mapping[str, MetaValue], alignment: int | None) -> tuple[Metadata, int]:
    """Metadata to write and the alignment it implies; general.alignment is appended if needed."""
    meta = Metadata(metadata)
    declared = meta.get(ALIGNMENT_KEY)
    if declared is not None and declared.type != V.UINT32:
        raise InputError(path, f"{ALIGNMENT_KEY} must be UINT32, got {declared.type.name}")
    if alignment is None:
        alignment = declared.value if declared is not None else DEFAULT_ALIGNMENT
    elif declared is not None and declared.value != alignment:
        raise InputError(path, f"alignment={alignment} contradicts metadata {ALIGNMENT_KEY} = {declared.value}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise InputError(path, f"alignment {alignment} is not a power of two")
    if declared is None and alignment != DEFAULT_ALIGNMENT:
        meta[ALIGNMENT_KEY] = MetaValue.u32(alignment)
    return meta, alignment


def _check_tensor(path: Path, entry: TensorEntry) -> None:
    name_bytes = entry.name.encode("utf-8", "surrogateescape")  # strictness is checked when packing
    if len(name_bytes) > MAX_NAME_BYTES:
        raise InputError(path, f"tensor name {entry.name!r} is {len(name_bytes)} bytes; "
                               f"ggml allows at most {MAX_NAME_BYTES}")
    if entry.type not in GGUF_TENSOR_TYPES:
        raise InputError(path, f"tensor {entry.name!r}: type {GGMLType(entry.type).name} cannot be stored in GGUF")
    if entry.layout != "v3":
        raise InputError(path, f"tensor {entry.name!r} is in block layout {entry.layout!r}; "
                               "GGUF stores layout 'v3' (requantize or migrate its blocks first)")
    if len(entry.shape) > MAX_DIMS:
        raise InputError(path, f"tensor {entry.name!r} has {len(entry.shape)} dimensions; GGUF allows {MAX_DIMS}")
    bs = TYPE_INFO[entry.type].block_size
    ne0 = entry.shape[-1] if entry.shape else 1
    if ne0 % bs:
        raise InputError(path, f"tensor {entry.name!r}: row of {ne0} elements is not a multiple of "
                               f"{GGMLType(entry.type).name}'s block of {bs}")


def _encode_head(path: Path, version: GGUFVersion, endian: str, meta: Metadata,
                 tensors: list[TensorEntry], alignment: int) -> bytes:
    """Header, KV pairs and tensor infos (offsets are running sums of padded sizes)."""
    p = _Packer(path, version, endian)
    p.out += MAGIC
    p.pack("I", version.number, "version")
    p.pack(version.count, len(tensors), "tensor count")
    p.pack(version.count, len(meta), "metadata KV count")
    for key, mv in meta.items():
        p.string(key, f"key {key!r}", errors="strict")
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise p.error(f"metadata key {key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
        p.value_type(mv.type, f"key {key!r}")
        p.value(mv, f"key {key!r}")
    offset = 0
    for t in tensors:
        p.string(t.name, f"tensor name {t.name!r}", errors="strict")
        p.pack("I", len(t.shape), f"n_dims of {t.name!r}")
        for d in reversed(t.shape):
            p.pack(version.dim, d, f"dimension of tensor {t.name!r}")
        p.pack("I", int(t.type), f"type of {t.name!r}")
        p.pack("Q", offset, f"data offset of {t.name!r}")
        offset += _align(t.nbytes, alignment)
    return bytes(p.out)


_SWAP_CHUNK = 1 << 24  # bytes per chunk when byte swapping, so a swap never copies a whole tensor


def _write_tensor_data(fh: Any, entry: TensorEntry, data: memoryview, endian: str) -> None:
    width = TYPE_INFO[entry.type].type_size
    if endian == "<" or not _is_element_type(entry.type) or width == 1:
        fh.write(data)
        return
    src, dst = _element_dtype(entry.type, "<"), _element_dtype(entry.type, ">")
    for start in range(0, len(data), _SWAP_CHUNK):
        chunk = np.frombuffer(data[start:start + _SWAP_CHUNK], dtype=src)
        fh.write(chunk.astype(dst).tobytes())


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, MetaValue], tensors: Iterable[TensorEntry],
               version: int = 3, endian: str = "<", alignment: int | None = None,
               on_tensor: Callable[[TensorEntry, int], None] | None = None) -> int:
    """Write a GGUF file atomically, streaming one tensor's load() at a time.

    `alignment` None means: metadata's general.alignment, else 32. A non-default
    alignment missing from the metadata is appended as general.alignment.
    `endian` "<"/"little" or ">"/"big". `on_tensor(entry, nbytes)` is called after
    each tensor is written. Returns the file size. Raises InputError for requests
    GGUF cannot represent (64-bit value in v1, long names, bad shapes, wrong byte counts).
    """
    path = Path(path)
    spec, order = _version_and_order(path, version, endian)
    tensors = list(tensors)
    meta, alignment = _effective_metadata(path, metadata, alignment)
    _check_tensors(path, tensors)
    head = _encode_head(path, spec, order, meta, tensors, alignment)
    with atomic_output(path) as fh:
        return _write_body(fh, path, head, tensors, order, alignment, on_tensor)


def gguf_head_size(metadata: Mapping[str, MetaValue], tensors: Iterable[TensorEntry], version: int = 3,
                   endian: str = "<") -> tuple[int, int]:
    """(bytes before the tensor data, alignment) of the GGUF write_gguf would write: the file's size
    is that plus each tensor's nbytes rounded up to the alignment (tensor types and sizes do not
    change the header's length). Nothing is read or written."""
    path = Path("<size estimate>")
    spec, order = _version_and_order(path, version, endian)
    meta, alignment = _effective_metadata(path, metadata, None)
    head = _encode_head(path, spec, order, meta, list(tensors), alignment)
    return _align(len(head), alignment), alignment


def aligned(nbytes: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
    """nbytes rounded up to the alignment: what a tensor's data takes in a GGUF file."""
    return _align(nbytes, alignment)


def _version_and_order(path: Path, version: int, endian: str):
    """The version's field table and the struct byte order, or a one-line InputError."""
    spec = VERSIONS.get(version)
    if spec is None:
        raise InputError(path, f"unsupported GGUF version {version} (smolq writes 1, 2 and 3)")
    order = _ENDIANS.get(endian)
    if order is None:
        raise InputError(path, f"endian must be '<' or '>', got {endian!r}")
    return spec, order


def _check_tensors(path: Path, tensors: list[TensorEntry]) -> None:
    seen: set[str] = set()
    for t in tensors:
        _check_tensor(path, t)
        if t.name in seen:
            raise InputError(path, f"duplicate tensor name {t.name!r}")
        seen.add(t.name)


def _write_body(fh: Any, path: Path, head: bytes, tensors: list[TensorEntry], order: str, alignment: int,
                on_tensor: Callable[[TensorEntry, int], None] | None) -> int:
    """Header bytes, padding, then each tensor's data padded to `alignment`; returns the size.

    Bytes stored unchanged (a SpanLoad in this file's byte order) are copied
    file to file; the rest are produced one tensor ahead of the write."""
    fh.write(head)
    pos = _pad(fh, len(head), alignment)
    def payload(t: TensorEntry):
        return tensor_payload(path, t, t.layout, copyable=not _needs_swap(t.type, order))

    for t, data in produce_ahead(tensors, payload):
        if isinstance(data, FileSpan):
            fh.copy_span(data)
        else:
            with phase("write"):
                _write_tensor_data(fh, t, data, order)
        del data
        pos = _pad(fh, pos + t.nbytes, alignment)
        if on_tensor is not None:
            on_tensor(t, t.nbytes)
    return pos


def _needs_swap(ggml_type: GGMLType, order: str) -> bool:
    return order != "<" and _is_element_type(ggml_type) and TYPE_INFO[ggml_type].type_size > 1


def _pad(fh: Any, pos: int, alignment: int) -> int:
    n = _align(pos, alignment) - pos
    if n:
        fh.write(b"\0" * n)
    return pos + n


# ---------------------------------------------------------------- split files
#
# A split GGUF is what llama.cpp's gguf-split and gguf-py's GGUFWriter write
# (formats.md, "split"): shards named PREFIX-00001-of-00003.gguf, each a
# complete GGUF file. Every shard carries split.no (u16, 0-based),
# split.count (u16) and split.tensors.count (i32, tensors in the whole set);
# the first shard also carries all the model's other KVs, before the split
# keys. Tensors keep their order across the shards; each shard's data is
# padded to the alignment. llama.cpp loads the set given its first shard.

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
_SHARD_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


@dataclass(frozen=True)
class Split:
    """How to shard a GGUF output: at most `max_tensors` tensors and/or
    `max_bytes` bytes of (padded) tensor data per shard; 0 means no limit."""

    max_tensors: int = 0
    max_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_tensors < 0 or self.max_bytes < 0:
            raise InputError(None, "split limits must be positive")

    def __bool__(self) -> bool:
        return bool(self.max_tensors or self.max_bytes)

    @classmethod
    def of(cls, max_size: int | str | None = None, max_tensors: int | None = None) -> "Split | None":
        """A Split from CLI/API values (size "2G", "500M", bytes as int); None when neither is given."""
        split = cls(max_tensors or 0, parse_size(max_size) if max_size is not None else 0)
        return split or None


def parse_size(text: int | str) -> int:
    """Bytes from "2G" / "500M" / "64K" / "123" (decimal units, as llama.cpp's converter reads them)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise InputError(None, f"--split-max-size {text!r}: give a number of bytes with an optional "
                                   "K, M or G suffix (decimal: 2G = 2,000,000,000 bytes)")
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if n <= 0:
        raise InputError(None, f"--split-max-size {text!r}: the size must be positive")
    return n


def shard_path(prefix: str | os.PathLike, index: int, count: int) -> Path:
    """PREFIX-00001-of-00003.gguf for index 0 of 3 (llama.cpp's llama_split_path)."""
    return Path(f"{os.fspath(prefix)}-{index + 1:05d}-of-{count:05d}.gguf")


def shard_prefix(out: str | os.PathLike) -> Path:
    """The shard prefix of an output path: its name without a .gguf suffix (out.gguf -> out)."""
    p = Path(out)
    return p.with_suffix("") if p.suffix.lower() == ".gguf" else p


def plan_shards(tensors: Sequence[TensorEntry], split: Split, alignment: int = DEFAULT_ALIGNMENT) -> list[list[TensorEntry]]:
    """Tensors grouped into shards as gguf-split groups them: a new shard when the
    current one holds max_tensors, or when the next tensor's padded size would take
    its data past max_bytes. A tensor larger than max_bytes gets a shard of its own
    (gguf-split refuses that for the very first tensor; gguf-py allows it)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for t in tensors:
        n = _align(t.nbytes, alignment)
        cur = shards[-1]
        if cur and ((split.max_tensors and len(cur) >= split.max_tensors)
                    or (split.max_bytes and size + n > split.max_bytes)):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def split_metadata(metadata: Mapping[str, MetaValue], index: int, count: int, n_tensors: int) -> Metadata:
    """A shard's KVs: the model's (first shard only, any old split keys dropped), then split.*."""
    meta = Metadata()
    if index == 0:
        for key, mv in metadata.items():
            if key not in SPLIT_KEYS:
                meta[key] = mv
    meta[SPLIT_NO] = MetaValue.u16(index)
    meta[SPLIT_COUNT] = MetaValue.u16(count)
    meta[SPLIT_TENSORS_COUNT] = MetaValue.i32(n_tensors)
    return meta


def write_gguf_shards(prefix: str | os.PathLike, metadata: Mapping[str, MetaValue], tensors: Iterable[TensorEntry],
                      split: Split, version: int = 3, endian: str = "<", alignment: int | None = None,
                      on_tensor: Callable[[TensorEntry, int], None] | None = None) -> list[tuple[Path, int]]:
    """Write PREFIX-0000i-of-0000N.gguf shards (always with split.* keys, even for one shard).

    All shards are written under temporary names and renamed only when every one
    is complete; nothing is left behind on failure. Returns [(path, size)].
    """
    first = shard_path(prefix, 0, 1)
    spec, order = _version_and_order(first, version, endian)
    tensors = list(tensors)
    meta, alignment = _effective_metadata(first, metadata, alignment)
    _check_tensors(first, tensors)
    shards = plan_shards(tensors, split, alignment)
    count = len(shards)
    if count > INT_RANGES[V.UINT16][1]:
        raise InputError(first, f"{count} shards: split.count is a u16; raise the split limits")
    paths = [shard_path(prefix, i, count) for i in range(count)]
    heads = [_encode_head(paths[i], spec, order, split_metadata(meta, i, count, len(tensors)), shard, alignment)
             for i, shard in enumerate(shards)]
    written = []
    with atomic_outputs() as files:
        for path, head, shard in zip(paths, heads, shards):
            fh = files.open(path)
            written.append((path, _write_body(fh, path, head, shard, order, alignment, on_tensor)))
            files.finish(fh)
    return written


@dataclass(frozen=True)
class SplitInfo:
    """Where a GGUF's tensors came from when it is (part of) a split set."""

    count: int  # split.count of the set
    tensors_count: int  # split.tensors.count
    paths: tuple[Path, ...]  # every shard, in order


def _int_key(gf: GGUFFile, key: str) -> int | None:
    mv = gf.metadata.get(key)
    if mv is None:
        return None
    if mv.type not in INT_RANGES:
        raise FormatError(gf.path, f"{key} is {mv.type.name}, expected an integer")
    return int(mv.value)


def _open_split(first: GGUFFile) -> GGUFFile:
    """`first` with the rest of its split set attached (a plain file comes back as it is)."""
    count = _int_key(first, SPLIT_COUNT)
    if count is None:
        return first
    no = _int_key(first, SPLIT_NO) or 0
    total = _int_key(first, SPLIT_TENSORS_COUNT)
    m = _SHARD_SUFFIX.search(first.path.name)
    if no != 0:
        hint = f"; give the first shard, {first.path.name[:m.start()]}-00001-of-{count:05d}.gguf" if m else ""
        raise FormatError(first.path, f"is shard {no + 1} of {count} of a split GGUF{hint}")
    for key in SPLIT_KEYS:
        first.metadata.pop(key, None)
    if count <= 1:  # one shard (gguf-split's n=1), or llama.cpp's merged output (count 0)
        first.split = SplitInfo(max(count, 1), len(first.tensors), (first.path,))
        return first
    if m is None or int(m.group(1)) != 1 or int(m.group(2)) != count:
        raise FormatError(first.path, f"first shard of a split GGUF of {count} shards, but its name does not "
                                      f"end in -00001-of-{count:05d}.gguf, so the other shards cannot be found")
    prefix = first.path.with_name(first.path.name[:m.start()])
    paths = [first.path] + [shard_path(prefix, i, count) for i in range(1, count)]
    parts: list[GGUFFile] = []
    try:
        for i, path in enumerate(paths[1:], start=1):
            if not path.exists():
                raise FormatError(path, f"missing shard {i + 1} of {count} of the split GGUF {first.path.name}")
            part = read_gguf(path, whole_set=False)
            parts.append(part)
            _check_shard(first, part, i, count, total)
        tensors = list(first.tensors)
        seen = {t.name: first.path for t in tensors}
        for part in parts:
            for t in part.tensors:
                if t.name in seen:
                    raise FormatError(part.path, f"foreign shard: tensor {t.name!r} is also in {seen[t.name].name}; "
                                                 f"the shards of {first.path.name} are from different splits")
                seen[t.name] = part.path
                tensors.append(t)
        if total is not None and len(tensors) != total:
            raise FormatError(first.path, f"split set holds {len(tensors)} tensors, but split.tensors.count "
                                          f"says {total}")
    except BaseException:
        for part in parts:
            part.close()
        raise
    first.tensors = tensors
    first.parts = parts
    first.split = SplitInfo(count, len(tensors), tuple(paths))
    return first


def _check_shard(first: GGUFFile, part: GGUFFile, index: int, count: int, total: int | None) -> None:
    what = f"foreign shard (not part of the split set of {first.path.name}):"
    part_count = _int_key(part, SPLIT_COUNT)
    if part_count is None:
        raise FormatError(part.path, f"{what} it has no {SPLIT_COUNT}")
    if part_count != count:
        raise FormatError(part.path, f"{what} {SPLIT_COUNT} is {part_count}, the first shard says {count}")
    part_no = _int_key(part, SPLIT_NO)
    if part_no != index:
        raise FormatError(part.path, f"{what} {SPLIT_NO} is {part_no}, expected {index}")
    part_total = _int_key(part, SPLIT_TENSORS_COUNT)
    if total is not None and part_total != total:
        raise FormatError(part.path, f"{what} {SPLIT_TENSORS_COUNT} is {part_total}, the first shard says {total}")
