"""Reader and writer for the pre-GGUF containers: 'ggml', 'ggmf' v1, 'ggjt' v1-v3, 'ggmm'.

File layout (formats.md 1-4): magic u32, [version u32], hyperparameter header,
[token count], tokens, then tensor records back to back until EOF (no count):
n_dims, name_len, type id, ne[n_dims] (reversed PyTorch shape), name,
['ggjt': zero padding to a 32-byte file offset], data.

What varies between containers, versions, families and dialects is data in
legacy_tables.py; this module interprets it. The reader validates every
length against the file size before trusting it, and hands out tensors as
zero-copy views of an mmap.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from smolq.atomic import atomic_output
from smolq.errors import FormatError, InputError
from smolq.fileio import FileSpan, MappedWindow, SpanLoad, phase, produce_ahead
from smolq.formats.base import TensorEntry, find_tensor, tensor_payload
from smolq.formats.legacy_tables import (
    ALIGNMENT,
    CONTAINER_BY_MAGIC,
    CONTAINERS,
    ERA_BY_QNTVR,
    FAMILIES,
    FORMAT_SPECS,
    GPT4ALL_GPTJ_VOCAB,
    OTHER_MAGICS,
    QNTVR_FACTOR,
    SPECIAL_BIT,
    Era,
    FormatSpec,
    find_spec,
)
from smolq.ggml_types import (
    VERSIONED_TYPES,
    GGMLType,
    block_size,
    is_quantized,
    tensor_nbytes,
)
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

__all__ = [
    "CONTAINERS",
    "LegacyFile",
    "read_legacy",
    "write_legacy",
    "layout_for",
    "storable_types",
    "check_predates",
    "LEGACY_TYPES",
    "format_name",
    "llama_n_ff",
    "find_n_mult",
]

MAX_DIMS = 4
LAYOUT_OF_QNTVR = {era.layout: qntvr for qntvr, era in ERA_BY_QNTVR.items()}


@dataclass
class LegacyFile:
    """A legacy model file, read lazily: tensors are views of an mmap of `path`.

    `hparams` holds the header fields in file order except `ftype` (and the
    token count), which depend on the dialect: `ftype` is the plain file type
    and `qntvr` the quantization version (ggml examples only, else None).
    `vocab` is (on-disk token bytes, score or None) in id order; `special_tokens`
    are the ids whose 'ggmm' length word had bit 31 set.
    """

    path: str
    container: str
    version: int | None
    family: str
    dialect: str
    hparams: dict[str, int | float]
    ftype: int
    qntvr: int | None
    vocab: list[tuple[bytes, float | None]]
    tensors: list[TensorEntry]
    layout: str = "v1"
    special_tokens: frozenset[int] = frozenset()
    parts: tuple[str, ...] = ()  # paths of parts 1.. of a multi-part LLaMA model
    _mmap: Any = field(default=None, repr=False, compare=False)
    _part_files: list = field(default_factory=list, repr=False, compare=False)

    @property
    def n_vocab(self) -> int:
        return int(self.hparams["n_vocab"])

    @property
    def stored_ftype(self) -> int:
        """The header's ftype word as stored (qntvr*1000 + ftype for ggml examples)."""
        return (self.qntvr or 0) * QNTVR_FACTOR + self.ftype

    @property
    def format_name(self) -> str:
        return format_name(self.container, self.version, self.qntvr)

    def tensor(self, name: str) -> TensorEntry:
        return find_tensor(self.tensors, name)

    def close(self) -> None:
        """Release the mmap now, unless tensor views are still alive (then the GC does)."""
        for part in self._part_files:
            part.close()
        if self._mmap is not None:
            _close_quietly(self._mmap)
            self._mmap = None

    def __enter__(self) -> "LegacyFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- small table helpers ---------------------------------------------------------------------

def format_name(container: str, version: int | None = None, qntvr: int | None = None) -> str:
    """Human name: "ggjt v3", "ggml", "ggml (qntvr 2)"."""
    name = f"'{container}'" if version is None else f"'{container}' v{version}"
    return f"{name} (qntvr {qntvr})" if qntvr else name


def _era(container: str, version: int | None, qntvr: int | None) -> Era:
    if container not in CONTAINERS:
        raise ValueError(f"unknown legacy container {container!r} (known: {', '.join(CONTAINERS)})")
    if qntvr is not None and container == "ggml":
        if qntvr not in ERA_BY_QNTVR:
            raise ValueError(f"unknown quantization version {qntvr} (known: 0, 1, 2)")
        return ERA_BY_QNTVR[qntvr]
    for spec in FORMAT_SPECS:
        if spec.container == container and version in spec.eras:
            return spec.eras[version]
    raise ValueError(f"{format_name(container)} has no version {version}")


def layout_for(container: str, version: int | None = None, qntvr: int | None = None) -> str:
    """Block layout ("v1"/"v2"/"v3") of Q4_0/Q4_1/Q5_x/Q8_0 in this container version.

    'ggml' with a qntvr (ggml examples): 0 -> v1, 1 -> v2, 2 -> v3; without: v1.
    """
    return _era(container, version, qntvr).layout


def storable_types(container: str, version: int | None = None, family: str | None = None,
                   dialect: str | None = None, qntvr: int | None = None) -> frozenset[GGMLType]:
    """Canonical types that a file of this container/version/family/dialect can hold."""
    if family is None:
        return frozenset(_era(container, version, qntvr).type_ids.values())
    spec = _spec_or_raise(None, container, family, dialect, ValueError)
    versions = CONTAINERS[container].versions
    if version is None and len(versions) == 1:
        version = versions[0]
    if (qntvr or 0) not in spec.eras if spec.qntvr_in_ftype else version not in spec.eras:
        raise ValueError(f"{format_name(container, version, qntvr)} is not a {family} format version")
    return frozenset(_spec_era(spec, version, qntvr or 0).type_ids.values())


# Every type some legacy container version can hold. The i-quants and MXFP4 came after GGUF
# had replaced these containers: no loader of theirs knows them.
LEGACY_TYPES = frozenset(
    t for eras in [*(spec.eras.values() for spec in FORMAT_SPECS), ERA_BY_QNTVR.values()]
    for era in eras for t in era.type_ids.values()
)


def check_predates(path, container: str, version: int | None, t: GGMLType) -> None:
    """A block type no legacy container can hold is refused in one line: "ggjt v3 predates IQ3_S; use GGUF".
    (A float type they lack, BF16, gets the usual "cannot hold ... it holds F32, F16" instead.)"""
    if is_quantized(t) and t not in LEGACY_TYPES:
        name = container if version is None else f"{container} v{version}"
        raise InputError(path, f"{name} predates {t.name}; use GGUF")


def _spec_or_raise(path, container: str, family: str, dialect: str | None, error=InputError) -> FormatSpec:
    spec = find_spec(family, container, dialect)
    if spec is not None:
        return spec
    known = ", ".join(f"{s.family}/{s.container}/{s.dialect}" for s in FORMAT_SPECS)
    message = f"no legacy format for family={family!r} container={container!r} dialect={dialect!r} (known: {known})"
    if error is ValueError:
        raise ValueError(message)
    raise error(path, message)


def _spec_era(spec: FormatSpec, version: int | None, qntvr: int) -> Era:
    return spec.eras[qntvr] if spec.qntvr_in_ftype else spec.eras[version]


# --- LLaMA's n_mult (formats.md 2.1) ----------------------------------------------------------

def llama_n_ff(n_embd: int, n_mult: int) -> int:
    """The feed-forward width a legacy LLaMA loader rebuilds from n_embd and n_mult."""
    return ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult


def find_n_mult(n_embd: int, intermediate_size: int) -> int:
    """The largest n_mult (8192 down to 1, as convert.py searched) that reproduces intermediate_size."""
    for n_mult in range(8192, 0, -1):
        if llama_n_ff(n_embd, n_mult) == intermediate_size:
            return n_mult
    raise InputError(None, f"no n_mult reproduces intermediate_size {intermediate_size} for n_embd {n_embd}; "
                           "a legacy LLaMA header cannot describe this model")


# --- reading ----------------------------------------------------------------------------------

class _Cursor:
    """Bounds-checked reads from an mmap; every failure is a FormatError naming the file."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.size = len(buf)
        self.path = path
        self.pos = 0
        self.window = MappedWindow(buf) if isinstance(buf, mmap.mmap) else None

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, message: str) -> FormatError:
        return FormatError(self.path, message)

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        if n > self.remaining:
            raise self.fail(f"truncated {what} at offset {self.pos} ({self.remaining} of {n} bytes left)")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining:
            raise self.fail(f"{what} of {n} bytes at offset {self.pos} runs past the end of the file "
                            f"({self.remaining} bytes left)")
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return data


def _open_mmap(path: str):
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 4:
                raise FormatError(path, f"file of {size} bytes is too short for a model file")
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a legacy model file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None


def _read_magic(cur: _Cursor) -> tuple[str, int | None]:
    (magic,) = cur.unpack("<I", "magic")
    container = CONTAINER_BY_MAGIC.get(magic)
    if container is None:
        raw = bytes(cur.buf[0:4])
        known = OTHER_MAGICS.get(magic)
        what = f"this is {known}, not" if known else "not"
        raise cur.fail(f"{what} a legacy ggml/ggmf/ggjt/ggmm model file (magic {raw!r} = 0x{magic:08x})")
    if not container.has_version:
        return container.name, None
    (version,) = cur.unpack("<I", f"'{container.name}' version")
    if version not in container.versions:
        known = ", ".join(str(v) for v in container.versions)
        raise cur.fail(f"unsupported '{container.name}' version {version} (known: {known})")
    return container.name, version


def _read_header(cur: _Cursor, spec: FormatSpec) -> dict[str, int | float]:
    values = cur.unpack(spec.header_struct, f"{spec.family} header")
    return dict(zip((name for name, _ in spec.fields), values))


def _split_ftype(cur: _Cursor, spec: FormatSpec, stored: int, version: int | None) -> tuple[int, int | None, Era]:
    if spec.dialect == "gpt4all" and stored not in spec.ftype_of.values():
        known = ", ".join(str(v) for v in sorted(set(spec.ftype_of.values())))
        raise cur.fail(f"ftype {stored} is not a GPT4All {spec.family} file type (known: {known})")
    if not spec.qntvr_in_ftype:
        return stored, None, spec.eras[version]
    if stored < 0:
        raise cur.fail(f"negative ftype {stored} in header")
    qntvr, ftype = divmod(stored, QNTVR_FACTOR)
    if qntvr not in spec.eras:
        raise cur.fail(f"unknown quantization version {qntvr} (ftype word {stored}; known: 0, 1, 2)")
    return ftype, qntvr, spec.eras[qntvr]


def _read_vocab(cur: _Cursor, spec: FormatSpec, n_vocab: int) -> tuple[list, frozenset[int]]:
    vs = spec.vocab
    if vs.count_code is not None:
        (count,) = cur.unpack("<" + vs.count_code, "token count")
        if count != n_vocab:
            raise cur.fail(f"token count {count} does not match n_vocab {n_vocab} in the header")
    if n_vocab < 0 or n_vocab * vs.min_entry_bytes > cur.remaining:
        raise cur.fail(f"n_vocab {n_vocab} needs at least {max(n_vocab, 0) * vs.min_entry_bytes} bytes "
                       f"of vocabulary, but only {cur.remaining} bytes follow the header")
    vocab: list[tuple[bytes, float | None]] = []
    special: set[int] = set()
    for i in range(n_vocab):
        (length,) = cur.unpack("<I", f"length of token {i}")
        if vs.special_bit and length & SPECIAL_BIT:
            special.add(i)
            length &= ~SPECIAL_BIT
        text = cur.take(length, f"token {i}")
        score = cur.unpack("<f", f"score of token {i}")[0] if vs.scores else None
        vocab.append((text, score))
    return vocab, frozenset(special)


def _read_tensor(cur: _Cursor, era: Era, aligned: bool, index: int, fmt: str) -> tuple[TensorEntry, int]:
    """One tensor record; returns the entry and its data size (not yet skipped)."""
    start = cur.pos
    n_dims, name_len, type_id = cur.unpack("<iii", f"tensor record #{index}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor record #{index} at offset {start}: n_dims {n_dims} is not in 1..{MAX_DIMS}")
    if type_id not in era.type_ids:
        known = ", ".join(f"{i}={t.name}" for i, t in era.type_ids.items())
        raise cur.fail(f"tensor record #{index} at offset {start}: type id {type_id} never existed "
                       f"in {fmt} files (known: {known})")
    ne = cur.unpack(f"<{n_dims}i", f"dimensions of tensor #{index}")
    if name_len <= 0:
        raise cur.fail(f"tensor record #{index} at offset {start}: bad name length {name_len}")
    raw_name = cur.take(name_len, f"name of tensor #{index}")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"tensor record #{index} at offset {start}: name is not UTF-8 ({raw_name[:40]!r})") from None
    shown = _shown(name)
    if any(d < 1 for d in ne):
        raise cur.fail(f"tensor {shown}: bad dimensions {list(ne)}")
    ggml_type = era.type_ids[type_id]
    shape = tuple(reversed(ne))
    if shape[-1] % block_size(ggml_type):
        raise cur.fail(f"tensor {shown}: row of {ne[0]} elements is not a multiple of "
                       f"{ggml_type.name}'s block of {block_size(ggml_type)}")
    if aligned:
        _skip_padding(cur, shown)
    nbytes = tensor_nbytes(ggml_type, shape, era.layout)
    if nbytes > cur.remaining:
        raise cur.fail(f"tensor {shown}: data of {nbytes} bytes at offset {cur.pos} is truncated "
                       f"({cur.remaining} bytes left)")
    entry = TensorEntry(name=name, type=ggml_type, shape=shape, layout=era.layout, offset=cur.pos,
                        extra={"file_type_id": type_id})
    entry.load = _mmap_view(cur, cur.pos, nbytes)
    return entry, nbytes


def _shown(name: str) -> str:
    """A tensor name fit for a one-line message (names come from untrusted files)."""
    shown = name if name.isprintable() else repr(name)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _skip_padding(cur: _Cursor, name: str) -> None:
    pad = -cur.pos % ALIGNMENT
    padding = cur.take(pad, f"alignment padding of tensor {name}")
    if padding.count(0) != pad:
        raise cur.fail(f"tensor {name}: nonzero bytes where 'ggjt' pads data to {ALIGNMENT} bytes "
                       f"at offset {cur.pos - pad} (misaligned data)")


def _mmap_view(cur: _Cursor, offset: int, nbytes: int) -> Callable[[], np.ndarray]:
    """The tensor's bytes as stored: a view of the map, which a sink may copy file to file."""
    buf, window = cur.buf, cur.window

    def load() -> np.ndarray:
        if window is None:
            return np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=offset)
        return np.frombuffer(window.view(offset, nbytes), dtype=np.uint8)

    return SpanLoad(FileSpan(Path(cur.path), offset, nbytes), load)


def _parse(buf, path: str, spec: FormatSpec, container: str, version: int | None) -> LegacyFile:
    """Parse everything after the magic/version as `spec`; FormatError at the first problem."""
    cur = _Cursor(buf, path)
    cur.pos = 8 if CONTAINERS[container].has_version else 4
    hparams = _read_header(cur, spec)
    ftype, qntvr, era = _split_ftype(cur, spec, int(hparams.pop("ftype")), version)
    vocab, special = _read_vocab(cur, spec, int(hparams["n_vocab"]))
    fmt = format_name(container, version, qntvr)
    tensors: list[TensorEntry] = []
    seen: set[str] = set()
    while cur.remaining:
        entry, nbytes = _read_tensor(cur, era, CONTAINERS[container].aligned, len(tensors), fmt)
        if entry.name in seen:
            raise cur.fail(f"tensor {_shown(entry.name)} appears twice")
        seen.add(entry.name)
        tensors.append(entry)
        cur.pos += nbytes
    return LegacyFile(path=path, container=container, version=version, family=spec.family,
                      dialect=spec.dialect, hparams=hparams, ftype=ftype, qntvr=qntvr, vocab=vocab,
                      tensors=tensors, layout=era.layout, special_tokens=special, _mmap=buf)


def _peek_header(buf, spec: FormatSpec, offset: int) -> dict | None:
    n = struct.calcsize(spec.header_struct)
    count_n = 4 if spec.vocab.count_code else 0
    if offset + n + count_n > len(buf):
        return None
    values = struct.unpack_from(spec.header_struct, buf, offset)
    header = dict(zip((name for name, _ in spec.fields), values))
    if count_n:
        header["_count"] = struct.unpack_from("<" + spec.vocab.count_code, buf, offset + n)[0]
    return header


def _divides(n_embd, n_head) -> bool:
    return n_head > 0 and n_embd > 0 and n_embd % n_head == 0


def _plausible(spec: FormatSpec, h: dict) -> bool:
    """Does this header look like `spec.family` wrote it? Used only to order the guesses."""
    if h["n_vocab"] <= 0:
        return False
    if spec.family == "llama":
        return _divides(h["n_embd"], h["n_head"]) and h["n_rot"] in (h["n_embd"] // h["n_head"], 64)
    ftype_ok = 0 <= h["ftype"] < QNTVR_FACTOR * len(ERA_BY_QNTVR)
    if spec.family == "gptj":
        return (ftype_ok and h["_count"] == h["n_vocab"] and _divides(h["n_embd"], h["n_head"])
                and 0 < h["n_rot"] <= h["n_embd"] // h["n_head"])
    d_model, n_heads = h.get("d_model", h.get("n_embd")), h.get("n_heads", h.get("n_head"))
    return (ftype_ok and _divides(d_model, n_heads)
            and math.isfinite(h["alibi_bias_max"]) and math.isfinite(h["clip_qkv"]))


def _candidates(buf, container: str, family: str | None, dialect: str | None, path: str) -> list[FormatSpec]:
    """The specs to try for this file, most likely first."""
    specs = [s for s in FORMAT_SPECS if s.container == container
             and (family is None or s.family == family) and (dialect is None or s.dialect == dialect)]
    if not specs:
        families = sorted({s.family for s in FORMAT_SPECS if s.container == container})
        raise FormatError(path, f"a {format_name(container)} file cannot hold family={family!r} "
                                f"dialect={dialect!r} (it holds: {', '.join(families)})")
    offset = 8 if CONTAINERS[container].has_version else 4
    headers = {s: _peek_header(buf, s, offset) for s in specs}

    def rank(spec: FormatSpec) -> tuple:
        h = headers[spec]
        if h is None:
            return (2, FAMILIES.index(spec.family))
        # GPT4All's rule: a 'ggml' file with n_vocab in [50300, 50400] is its GPT-J.
        gpt4all_gptj = (spec.family == "gptj" and h["n_vocab"] in GPT4ALL_GPTJ_VOCAB
                        and h["_count"] == h["n_vocab"])
        dialect_order = 0 if (spec.dialect == "gpt4all") == gpt4all_gptj else 1
        return (0 if gpt4all_gptj else 1 if _plausible(spec, h) else 2,
                FAMILIES.index(spec.family), dialect_order)

    specs.sort(key=rank)
    return specs


def read_legacy(path: str | os.PathLike, family: str | None = None, dialect: str | None = None) -> LegacyFile:
    """Read a legacy file's header, vocabulary and tensor index; tensor data stays in the mmap.

    The container comes from the magic. The family (and dialect) come from the
    magic and the header: 'ggjt'/'ggmf' are LLaMA, 'ggmm' is GPT4All MPT, and a
    'ggml' file is tried as GPT-J (GPT4All's n_vocab rule first), MPT and LLaMA
    in order of plausibility; the first that parses to the exact end of the
    file wins. `family=` / `dialect=` override the guess.

    A multi-part LLaMA model (`<path>`, `<path>.1`, ...; March 2023) is read
    as one: its tensors are merged, and their load() then assembles a copy.
    """
    path = os.fspath(path)
    if family is not None and family not in FAMILIES:
        raise InputError(path, f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    first = _read_one(path, family, dialect)
    n_parts = _n_parts(first)
    if n_parts == 1:
        return first
    try:
        return _merge_parts(first, n_parts)
    except BaseException:
        first.close()
        raise


def _read_one(path: str, family: str | None, dialect: str | None) -> LegacyFile:
    buf = _open_mmap(path)
    try:
        container, version = _read_magic(_Cursor(buf, path))
        specs = _candidates(buf, container, family, dialect, path)
        errors: list[FormatError] = []
        for spec in specs:
            try:
                return _parse(buf, path, spec, container, version)
            except FormatError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        # Report the most plausible reading's problem; say that the others failed too.
        raise FormatError(path, f"{errors[0].message} (read as {specs[0].family} {specs[0].dialect}; "
                                f"no other family's layout fits either)")
    except BaseException:
        _close_quietly(buf)
        raise


def _close_quietly(buf) -> None:
    try:
        buf.close()
    except BufferError:
        pass


# --- multi-part LLaMA files (formats.md 4.3) ---------------------------------------------------

MULTI_PART_FORMATS = {("ggml", None), ("ggmf", 1), ("ggjt", 1)}  # ggjt v1 via llama.cpp's 04-08 loader


def _n_parts(lf: LegacyFile) -> int:
    """llama.cpp's rule: n_parts = n_embd / ne[0] of the tok_embeddings.weight shard."""
    if lf.family != "llama" or (lf.container, lf.version) not in MULTI_PART_FORMATS:
        return 1
    try:
        shard_cols = lf.tensor("tok_embeddings.weight").shape[-1]
    except KeyError:
        return 1
    n_embd = int(lf.hparams["n_embd"])
    if shard_cols >= n_embd:
        return 1
    if n_embd % shard_cols:
        raise FormatError(lf.path, f"tok_embeddings.weight has {shard_cols} columns, not a part of n_embd {n_embd}")
    return n_embd // shard_cols


def _split_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """PyTorch dim a multi-part model split this tensor along: 1 = ne[0] (columns), 0 = rows, None = copied."""
    if len(shape) == 1:
        return None
    if name.startswith("tok_embeddings") or ".attention.wo." in name or ".feed_forward.w2." in name:
        return 1
    return 0


def _merge_parts(first: LegacyFile, n_parts: int) -> LegacyFile:
    parts = [first]
    for k in range(1, n_parts):
        part_path = f"{first.path}.{k}"
        if not os.path.exists(part_path):
            raise FormatError(first.path, f"tok_embeddings.weight holds 1/{n_parts} of n_embd, so this is part 0 "
                                          f"of a {n_parts}-part model, but part {k} ({part_path}) is missing")
        part = _read_one(part_path, first.family, first.dialect)
        parts.append(part)
        same = (part.container, part.version, part.hparams, part.ftype, part.vocab)
        if same != (first.container, first.version, first.hparams, first.ftype, first.vocab):
            raise FormatError(part_path, f"header or vocabulary differs from part 0 ({first.path})")
        if [t.name for t in part.tensors] != [t.name for t in first.tensors]:
            raise FormatError(part_path, f"tensor names differ from part 0 ({first.path})")
    merged = [_merge_tensor([p.tensors[i] for p in parts], parts) for i in range(len(first.tensors))]
    first.tensors = merged
    first.parts = tuple(p.path for p in parts[1:])
    first._part_files = parts[1:]
    return first


def _merge_tensor(shards: list[TensorEntry], parts: list[LegacyFile]) -> TensorEntry:
    head = shards[0]
    axis = _split_dim(head.name, head.shape)
    for shard, part in zip(shards, parts):
        fixed = [d for i, d in enumerate(shard.shape) if i != axis]
        if shard.type != head.type or fixed != [d for i, d in enumerate(head.shape) if i != axis]:
            raise FormatError(part.path, f"tensor {_shown(head.name)}: shard {shard.type.name} {list(shard.shape)} "
                                         f"does not fit part 0's {head.type.name} {list(head.shape)}")
    if axis is None:
        return head
    shape = list(head.shape)
    shape[axis] = sum(s.shape[axis] for s in shards)
    n_rows = shape[0]
    loads = [s.load for s in shards]

    def load() -> np.ndarray:
        views = [f() for f in loads]
        if axis == 0:
            return np.concatenate(views)
        return np.concatenate([v.reshape(n_rows, -1) for v in views], axis=1).reshape(-1)

    entry = TensorEntry(name=head.name, type=head.type, shape=tuple(shape), load=load, layout=head.layout,
                        offset=None, extra={"file_type_id": head.extra["file_type_id"],
                                            "parts": [(p.path, s.offset) for p, s in zip(parts, shards)]})
    if shape[-1] % block_size(head.type):
        raise FormatError(parts[0].path, f"tensor {_shown(head.name)}: merged rows do not fit its blocks")
    return entry


# --- writing ----------------------------------------------------------------------------------

def _writer_version(path, container: str, version: int | None) -> int | None:
    allowed = CONTAINERS[container].versions
    if version is None and len(allowed) == 1:
        return allowed[0]
    if version not in allowed:
        known = ", ".join(str(v) for v in allowed)
        raise InputError(path, f"{format_name(container)} has no version {version} (known: {known})")
    return version


def _infer_qntvr(path, entries: Sequence[TensorEntry]) -> int:
    """ggml examples: the converter wrote qntvr 0; the quantizer the qntvr of its block layout."""
    layouts = {e.layout for e in entries if e.type in VERSIONED_TYPES}
    if len(layouts) > 1:
        raise InputError(path, f"tensors come in mixed block layouts {sorted(layouts)}; one file holds one")
    if layouts:
        return LAYOUT_OF_QNTVR[layouts.pop()]
    return 2 if any(is_quantized(e.type) for e in entries) else 0


def infer_file_type(path, container: str, family: str, dialect: str | None,
                    tensors: Iterable[tuple[GGMLType, Sequence[int]]]) -> int:
    """The header's file type for tensors of these (type, shape), as that dialect's converter
    writes it; a one-line InputError when the dialect has no name for the file's main type.
    Plans call it before writing, so the refusal comes before any output."""
    return _infer_ftype(path, _spec_or_raise(path, container, family, dialect), tensors)


def _infer_ftype(path, spec: FormatSpec, tensors: Iterable[tuple[GGMLType, Sequence[int]]]) -> int:
    """The most common type of the 2-D (or larger) tensors names the file."""
    counts = Counter(t for t, shape in tensors if len(shape) >= 2)
    if not counts:
        return 0
    main = counts.most_common(1)[0][0]
    if main not in spec.ftype_of:
        names = ", ".join(t.name for t in spec.ftype_of)
        raise InputError(path, f"a {spec.dialect} {spec.family} {spec.container} header has no file type for a "
                               f"file of mostly {main.name} tensors (it names {names}); choose one of those types")
    return spec.ftype_of[main]


def _check_tensors(path, spec: FormatSpec, era: Era, fmt: str, entries: Sequence[TensorEntry],
                   version: int | None = None) -> list[int]:
    """Everything about the tensors that can be refused before a byte is written; their file type ids."""
    file_ids, seen = [], set()
    for e in entries:
        if e.name in seen:
            raise InputError(path, f"tensor {e.name} given twice")
        seen.add(e.name)
        if not e.name or not 1 <= len(e.shape) <= MAX_DIMS or any(not 1 <= d < 2**31 for d in e.shape):
            raise InputError(path, f"tensor {e.name!r}: shape {list(e.shape)} cannot be stored in {fmt}")
        check_predates(path, spec.container, version, e.type)
        file_id = era.file_id(e.type)
        if file_id is None:
            holds = ", ".join(t.name for t in era.type_ids.values())
            raise InputError(path, f"tensor {e.name}: {fmt} ({spec.family}, {spec.dialect}) cannot hold "
                                   f"{e.type.name} (it holds {holds})")
        if e.type in VERSIONED_TYPES and e.layout != era.layout:
            raise InputError(path, f"tensor {e.name}: {e.type.name} blocks are in layout {e.layout}, but {fmt} "
                                   f"stores layout {era.layout}; repack them first")
        if e.shape[-1] % block_size(e.type):
            raise InputError(path, f"tensor {e.name}: rows of {e.shape[-1]} are not a multiple of "
                                   f"{e.type.name}'s block of {block_size(e.type)}")
        if e.load is None:
            raise InputError(path, f"tensor {e.name} has no data (load is None)")
        file_ids.append(file_id)
    return file_ids


def _pack_header(path, spec: FormatSpec, version: int | None, hparams: Mapping, stored_ftype: int,
                 n_vocab: int) -> bytes:
    given = set(hparams) - {"ftype"}
    missing = [n for n in spec.hparam_names if n not in given]
    extra = sorted(given - set(spec.hparam_names))
    if missing or extra:
        raise InputError(path, f"{spec.family} {spec.dialect} header fields are {', '.join(spec.hparam_names)}"
                               f" (missing: {missing}, unknown: {extra})")
    if hparams["n_vocab"] != n_vocab:
        raise InputError(path, f"n_vocab {hparams['n_vocab']} does not match the {n_vocab} tokens given")
    values = [stored_ftype if name == "ftype" else hparams[name] for name, _ in spec.fields]
    container = CONTAINERS[spec.container]
    prefix = struct.pack("<I", container.magic)
    if container.has_version:
        prefix += struct.pack("<I", version)
    if spec.vocab.count_code:
        values.append(n_vocab)
    try:
        return prefix + struct.pack(spec.header_struct + (spec.vocab.count_code or ""), *values)
    except struct.error as exc:
        raise InputError(path, f"header values {dict(zip(spec.hparam_names, values))} do not fit: {exc}") from None


def _pack_vocab(path, spec: FormatSpec, vocab: Sequence, special: frozenset[int]) -> Iterable[bytes]:
    vs = spec.vocab
    for i, (text, score) in enumerate(vocab):
        text = bytes(text)
        length = len(text)
        if vs.special_bit:
            if length >= SPECIAL_BIT:
                raise InputError(path, f"token {i} is too long ({length} bytes)")
            length |= SPECIAL_BIT if i in special else 0
        if not vs.scores:
            yield struct.pack("<I", length) + text
        elif score is None:
            raise InputError(path, f"token {i} has no score, but {spec.container} stores one per token")
        else:
            yield struct.pack("<I", length) + text + struct.pack("<f", score)


def _record_head(e: TensorEntry, file_id: int) -> bytes:
    name = e.name.encode("utf-8")
    ne = tuple(reversed(e.shape))
    return struct.pack(f"<iii{len(ne)}i", len(ne), len(name), file_id, *ne) + name


def write_legacy(
    path: str | os.PathLike,
    container: str,
    version: int | None,
    family: str,
    hparams: Mapping[str, int | float],
    vocab: Sequence[tuple[bytes, float | None]],
    tensors: Iterable[TensorEntry],
    dialect: str | None = None,
    ftype: int | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
    *,
    qntvr: int | None = None,
    special_tokens: Iterable[int] = (),
) -> None:
    """Write a legacy file atomically, streaming one tensor's bytes at a time.

    `hparams`: the family's header fields (see legacy_tables; "ftype" optional).
    `ftype`: the plain file type; default hparams["ftype"], else the type of
    most 2-D tensors. `qntvr` (ggml examples only): default from the tensors'
    block layout (0 when none is quantized). Scores are written only where the
    format has them; `special_tokens` only in 'ggmm'. `on_tensor(entry)` runs
    after each tensor is written. Refuses, before writing, a tensor whose type
    the target cannot hold or whose layout differs from the target's.
    """
    path = os.fspath(path)
    if container not in CONTAINERS:
        raise InputError(path, f"unknown legacy container {container!r} (known: {', '.join(CONTAINERS)})")
    spec = _spec_or_raise(path, container, family, dialect)
    version = _writer_version(path, container, version)
    entries = list(tensors)
    if spec.qntvr_in_ftype:
        qntvr = _infer_qntvr(path, entries) if qntvr is None else qntvr
        if qntvr not in spec.eras:
            raise InputError(path, f"unknown quantization version {qntvr} (known: 0, 1, 2)")
    else:
        qntvr = 0  # the x1000 term exists only in ggml-examples files
    era = _spec_era(spec, version, qntvr)
    fmt = format_name(container, version, qntvr if spec.qntvr_in_ftype else None)
    if ftype is None:
        ftype = hparams["ftype"] if "ftype" in hparams else _infer_ftype(path, spec, [(e.type, e.shape) for e in entries])
    if spec.qntvr_in_ftype and not 0 <= ftype < QNTVR_FACTOR:
        raise InputError(path, f"ftype {ftype} is out of range 0..999 for {spec.dialect} files")
    file_ids = _check_tensors(path, spec, era, fmt, entries, version)
    header = _pack_header(path, spec, version, hparams, qntvr * QNTVR_FACTOR + ftype, len(vocab))
    special = frozenset(special_tokens)

    with atomic_output(path) as fh:
        offset = fh.write(header)
        for token in _pack_vocab(path, spec, vocab, special):
            offset += fh.write(token)
        ids = dict(zip((id(e) for e in entries), file_ids))
        for entry, data in produce_ahead(entries, lambda e: tensor_payload(path, e, era.layout)):
            offset += fh.write(_record_head(entry, ids[id(entry)]))
            if CONTAINERS[container].aligned:
                offset += fh.write(bytes(-offset % ALIGNMENT))
            if isinstance(data, FileSpan):
                offset += fh.copy_span(data)
            else:
                with phase("write"):
                    offset += fh.write(data)
            del data
            if on_tensor is not None:
                on_tensor(entry)
