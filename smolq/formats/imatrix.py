"""llama.cpp's importance-matrix files, both ways, byte for byte.

Two containers, told apart by their bytes (formats.md; tools/imatrix and
common/imatrix-loader in llama.cpp):

- GGUF (what llama-imatrix writes today): v3, general.type "imatrix",
  imatrix.datasets (array of strings), imatrix.chunk_count and
  imatrix.chunk_size (u32); per weight W, in sorted name order, two F32
  tensors: "W.in_sum2" (ne [n_per_row, n_mat]: raw sums of squared inputs, one
  row per expert) and "W.counts" (ne [1, n_mat]: tokens seen, as floats).
  ggml drops trailing 1-dims, so a dense weight's tensors are 1-D.
- legacy .dat: i32 n_entries; per entry i32 name length, the name, i32 ncall,
  i32 nval, nval f32 (mean square x ncall); then, optionally, i32 chunk count
  and i32 length + dataset name.

`Imatrix` keeps what the file holds (raw sums and token counts, or the legacy
scaled means and ncall) so a file read and written again is the same file;
`importance(name)` is the per-column vector llama-quantize hands to the
quantizer, computed with its float32 operations.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from smolq.atomic import atomic_output
from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import Metadata, MetaValue, read_gguf, write_gguf
from smolq.ggml_types import GGMLType
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's --ctx-size default: a legacy file's tokens per chunk
FORMATS = ("gguf", "dat")
# Sanity bounds for telling a .dat file from other bytes (not limits of the format).
DAT_MAX_ENTRIES = 1 << 20
DAT_MAX_NAME = 4096


@dataclass
class ImatrixEntry:
    """One weight's statistics: `sums` [n_mat, n_per_row] float32, `counts` [n_mat] int64.

    GGUF files: raw sums of squared activations and the tokens behind them.
    Legacy files: mean squares times ncall, and counts == [ncall]."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_per_row(self) -> int:
        return int(self.sums.shape[1])

    @property
    def size(self) -> int:
        return int(self.sums.size)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0  # tokens per chunk; 0 where the file does not say (legacy)
    legacy: bool = False  # entries hold the legacy scaled means (see ImatrixEntry)
    path: Path | None = None

    @property
    def format(self) -> str:
        return "dat" if self.legacy else "gguf"

    def importance(self, name: str) -> np.ndarray | None:
        """The flat float32 vector llama-quantize uses for weight `name` (None: no entry).

        GGUF: sums / count per expert, 1 where an expert saw no token; legacy:
        the stored values / ncall (as stored when ncall is 0)."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            return (e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()).reshape(-1)
        out = np.ones_like(e.sums)
        for j, count in enumerate(e.counts):
            if count > 0:
                out[j] = e.sums[j] / np.float32(count)
        return out.reshape(-1)

    def select(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> "Imatrix":
        """llama-quantize's --include-weights / --exclude-weights: substring matches on entry names."""
        names = [n for n in self.entries if not any(s in n for s in exclude)]
        if include:
            names = [n for n in names if any(s in n for s in include)]
        return Imatrix({n: self.entries[n] for n in names}, list(self.datasets), self.chunk_count,
                       self.chunk_size, self.legacy, self.path)

    def as_raw(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> "Imatrix":
        """In the GGUF form (raw sums and token counts), as llama-imatrix --in-file rebuilds a legacy file."""
        if not self.legacy:
            return self
        cs = self.chunk_size or chunk_size
        entries = {n: ImatrixEntry((e.sums * np.float32(cs)).astype(np.float32),
                                   np.full(1, int(e.counts[0]) * cs, dtype=np.int64))
                   for n, e in self.entries.items()}
        return Imatrix(entries, list(self.datasets), self.chunk_count, cs, False, self.path)


# --- reading -----------------------------------------------------------------------------

def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Either container, decided by the bytes; FormatError naming the file on any defect."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise InputError(p, "imatrix file not found") from None
    except IsADirectoryError:
        raise InputError(p, "is a directory, not an imatrix file") from None
    except OSError as exc:
        raise InputError(p, f"cannot read the imatrix file: {exc.strerror or exc}") from None
    if head == b"GGUF":
        return _read_gguf_imatrix(p)
    return _read_dat(p)


def is_imatrix(path: str | os.PathLike) -> bool:
    """True for a GGUF with general.type "imatrix" and for anything that parses as a .dat imatrix."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    if head[:4] == b"GGUF":
        return _gguf_type(p) == "imatrix"
    if not _dat_head_plausible(head):
        return False
    try:
        _read_dat(p)
    except (FormatError, InputError):
        return False
    return True


def _gguf_type(path: Path) -> str | None:
    try:
        with read_gguf(path, whole_set=False) as gf:
            return gf.metadata.value(KEY_TYPE)
    except (FormatError, InputError):
        return None


def _dat_head_plausible(head: bytes) -> bool:
    if len(head) < 8:
        return False
    n_entries, name_len = struct.unpack("<ii", head[:8])
    return 1 <= n_entries <= DAT_MAX_ENTRIES and 1 <= name_len <= DAT_MAX_NAME


def _read_gguf_imatrix(path: Path) -> Imatrix:
    with read_gguf(path, whole_set=False) as gf:
        meta = gf.metadata
        kind = meta.value(KEY_TYPE)
        if kind is not None and kind != "imatrix":
            raise FormatError(path, f"a GGUF with general.type {kind!r}, not an imatrix file")
        pairs = _pair_tensors(path, gf.tensors)
        if not pairs:
            raise FormatError(path, "imatrix GGUF has no .in_sum2/.counts tensors" if kind == "imatrix"
                              else "a GGUF model, not an imatrix file (no .in_sum2/.counts tensors)")
        entries = {name: _gguf_entry(path, name, s, c) for name, (s, c) in sorted(pairs.items())}
        datasets = meta.value(KEY_DATASETS) or []
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise FormatError(path, f"{KEY_DATASETS} must be an array of strings")
        return Imatrix(entries, list(datasets), _u32(path, meta, KEY_CHUNK_COUNT), _u32(path, meta, KEY_CHUNK_SIZE),
                       legacy=False, path=path)


def _u32(path: Path, meta: Metadata, key: str) -> int:
    value = meta.value(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(path, f"{key} must be a non-negative integer, not {value!r}")
    return value


def _pair_tensors(path: Path, tensors: Iterable[TensorEntry]) -> dict[str, list[TensorEntry | None]]:
    pairs: dict[str, list[TensorEntry | None]] = {}
    for t in tensors:
        for slot, suffix in enumerate((SUM_SUFFIX, COUNT_SUFFIX)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    for name, (sums, counts) in pairs.items():
        if sums is None or counts is None:
            raise FormatError(path, f"entry {name} has {'no .in_sum2' if sums is None else 'no .counts'} tensor")
    return pairs


def _gguf_entry(path: Path, name: str, sums_t: TensorEntry, counts_t: TensorEntry) -> ImatrixEntry:
    for t in (sums_t, counts_t):
        if t.type != GGMLType.F32:
            raise FormatError(path, f"tensor {t.name} is {t.type.name}; imatrix tensors are F32")
    n_mat = int(np.prod(counts_t.shape))
    if n_mat < 1 or sums_t.n_elements % n_mat:
        raise FormatError(path, f"entry {name}: {sums_t.n_elements} sums do not split into {n_mat} counts")
    sums = np.frombuffer(bytes(sums_t.load()), dtype="<f4").astype(np.float32).reshape(n_mat, -1)
    raw_counts = np.frombuffer(bytes(counts_t.load()), dtype="<f4")
    if not np.isfinite(raw_counts).all() or (raw_counts < 0).any():
        raise FormatError(path, f"entry {name}: counts must be finite and >= 0")
    return ImatrixEntry(sums, np.round(raw_counts).astype(np.int64))  # the loader's lround


class _DatReader:
    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.remaining() < n:
            raise FormatError(self.path, f"truncated imatrix: {what} needs {n} bytes at offset {self.pos}, "
                                         f"{self.remaining()} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    r = _DatReader(path, data)
    if not _dat_head_plausible(data[:8]):
        raise FormatError(path, "not an imatrix file: neither a GGUF nor a legacy .dat (bad entry count "
                                "or first name length)")
    n_entries = r.i32("the entry count")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        name_len = r.i32(f"entry {i + 1}'s name length")
        if not 1 <= name_len <= DAT_MAX_NAME:
            raise FormatError(path, f"entry {i + 1}: name length {name_len} is not plausible")
        name = r.take(name_len, f"entry {i + 1}'s name").decode("utf-8", "replace")
        ncall = r.i32(f"entry {name}'s ncall")
        nval = r.i32(f"entry {name}'s value count")
        if nval < 1:
            raise FormatError(path, f"entry {name}: {nval} values")
        values = np.frombuffer(r.take(4 * nval, f"entry {name}'s {nval} values"), dtype="<f4")
        entries[name] = ImatrixEntry(values.astype(np.float32).reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if r.remaining():  # the trailer is optional; when present it must be whole
        chunk_count = r.i32("the chunk count")
        if r.remaining():
            n = r.i32("the dataset name's length")
            if n > 0:
                datasets.append(r.take(n, "the dataset name").decode("utf-8", "replace"))
        if r.remaining():
            raise FormatError(path, f"{r.remaining()} stray bytes after the imatrix trailer")
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True, path=path)


# --- writing -----------------------------------------------------------------------------

def write_imatrix(path: str | os.PathLike, im: Imatrix, format: str | None = None) -> int:
    """Write `im` atomically as "gguf" or "dat" (None: "dat" for a .dat suffix, else GGUF)."""
    p = Path(path)
    fmt = (format or ("dat" if p.suffix.lower() == ".dat" else "gguf")).lower()
    if fmt not in FORMATS:
        raise InputError(p, f"unknown imatrix format {format!r}; choose gguf or dat")
    if not im.entries:
        raise InputError(p, "the importance matrix has no entries to write")
    return _write_dat(p, im) if fmt == "dat" else _write_gguf(p, im)


def _write_gguf(path: Path, im: Imatrix) -> int:
    raw = im.as_raw()
    meta = Metadata()
    meta[KEY_TYPE] = MetaValue.string("imatrix")
    meta[KEY_DATASETS] = MetaValue.array(list(raw.datasets), "string")
    meta[KEY_CHUNK_COUNT] = MetaValue.u32(raw.chunk_count)
    meta[KEY_CHUNK_SIZE] = MetaValue.u32(raw.chunk_size)
    tensors = []
    for name in sorted(raw.entries):
        e = raw.entries[name]
        tensors.append(_f32_entry(name + SUM_SUFFIX, e.sums, _ggml_shape(e.n_mat, e.n_per_row)))
        tensors.append(_f32_entry(name + COUNT_SUFFIX, e.counts.astype(np.float32), _ggml_shape(e.n_mat, 1)))
    return write_gguf(path, meta, tensors)


def _ggml_shape(n_mat: int, n: int) -> tuple[int, ...]:
    """PyTorch-order shape of a ggml [n, n_mat] tensor as GGUF stores it: trailing 1-dims dropped."""
    return (n_mat, n) if n_mat > 1 else (n,)


def _f32_entry(name: str, values: np.ndarray, shape: tuple[int, ...]) -> TensorEntry:
    data = np.ascontiguousarray(values, dtype="<f4").reshape(-1).view(np.uint8)
    return TensorEntry(name, GGMLType.F32, shape, load=lambda: data)


def dat_ncall(counts: np.ndarray, chunk_size: int) -> int:
    """llama-imatrix's ncall of a legacy entry: chunks seen, rounded up so none is 0."""
    return int((int(counts.max()) + chunk_size - 1) // chunk_size)


def _legacy_values(e: ImatrixEntry, chunk_size: int) -> tuple[int, np.ndarray]:
    """(ncall, mean squares x ncall) as save_imatrix_legacy computes them, in float32."""
    ncall = dat_ncall(e.counts, chunk_size)
    out = np.empty_like(e.sums)
    for j, count in enumerate(e.counts):
        if count == 0:
            out[j] = np.float32(ncall)  # an expert that saw no token: value 1, count 1
        else:
            out[j] = (e.sums[j] / np.float32(count)) * np.float32(ncall)
    return ncall, out


def _write_dat(path: Path, im: Imatrix) -> int:
    chunk_size = im.chunk_size or DEFAULT_CHUNK_SIZE
    rows = []
    for name in sorted(im.entries):
        e = im.entries[name]
        if im.legacy:
            rows.append((name, int(e.counts[0]), e.sums))
        elif (e.counts > 0).any():  # llama-imatrix skips entries with no data at all
            rows.append((name, *_legacy_values(e, chunk_size)))
    parts = [struct.pack("<i", len(rows))]
    for name, ncall, values in rows:
        raw = name.encode("utf-8")
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size),
                  np.ascontiguousarray(values, dtype="<f4").tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    parts += [struct.pack("<i", im.chunk_count), struct.pack("<i", len(dataset)), dataset]
    blob = b"".join(parts)
    with atomic_output(path) as fh:
        fh.write(blob)
    return len(blob)


def from_sums(sums: Mapping[str, np.ndarray], counts: Mapping[str, int], *, datasets: Sequence[str],
              chunk_count: int, chunk_size: int) -> Imatrix:
    """An Imatrix in the GGUF form from per-weight sums of squares and token counts (dense weights)."""
    entries = {name: ImatrixEntry(np.asarray(v, dtype=np.float32).reshape(1, -1),
                                  np.array([counts[name]], dtype=np.int64)) for name, v in sums.items()}
    return Imatrix(entries, list(datasets), chunk_count, chunk_size)


# --- what `inspect` shows ----------------------------------------------------------------

def describe_imatrix(im: Imatrix, top: int = 5) -> dict:
    """Plain JSON-able data: the file's fields and, per entry, its size, tokens and top columns."""
    rows = []
    for name in sorted(im.entries):
        e = im.entries[name]
        imp = im.importance(name)
        order = np.argsort(-imp, kind="stable")[:top]
        rows.append({"name": name, "n_per_row": e.n_per_row, "n_mat": e.n_mat,
                     "counts": [int(c) for c in e.counts],
                     "mean": float(imp.mean()), "max": float(imp.max()),
                     "top_columns": [[int(i % e.n_per_row), float(imp[i])] for i in order]})
    return {"file": str(im.path) if im.path else None, "container": "imatrix", "format": im.format,
            "n_entries": len(im.entries), "chunk_count": im.chunk_count, "chunk_size": im.chunk_size,
            "datasets": list(im.datasets), "entries": rows}
