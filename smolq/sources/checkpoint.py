"""Hugging Face checkpoint directories: config.json plus lazy tensors.

Reads `model.safetensors`, sharded safetensors with an index, and
`pytorch_model*.bin` (+ index). Nothing is read until a tensor's `load()` is
called, and then only that tensor:

- safetensors: our own header parse (no torch needed) and one mmap per
  tensor, released when the caller drops the array, so resident memory stays
  near one tensor however big the model is;
- .bin: torch.load(mmap=True, weights_only=True); a pickle that needs more
  than tensors is refused, never executed.

Every problem is a FormatError/InputError naming the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from smolq.errors import FormatError, InputError
from smolq.fileio import FileSpan, SpanLoad
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# A safetensors JSON header larger than this is not a real checkpoint (real ones are < 1 MiB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element).
# BF16 has no numpy dtype: it is read as uint16 bits and widened to f32 exactly.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?",
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass
class SourceTensor:
    """One checkpoint tensor, described but not read.

    `dtype` is the stored type ("F32", "F16", "BF16", ...), `shape` PyTorch
    order. `load()` returns a numpy array: float16/float32 as stored, BF16
    widened to float32 (exact). `load_raw()` returns the stored bits (BF16 as
    uint16) for callers that can copy them unchanged.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    _read: Callable[[], np.ndarray] = field(repr=False)
    span: FileSpan | None = None  # where the stored bytes lie, when they are one range of `file`

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.n_elements * np.dtype(SAFETENSORS_DTYPES[self.dtype]).itemsize

    def load_raw(self) -> np.ndarray:
        return self._read()

    def raw_loader(self) -> Callable[[], np.ndarray]:
        """load_raw, as a loader a sink may copy file to file when the bytes are one stored range."""
        return SpanLoad(self.span, self._read) if self.span is not None else self._read

    def load(self) -> np.ndarray:
        if self.dtype not in FLOAT_DTYPES and self.dtype != "F64":
            raise FormatError(self.file, f"tensor {self.name} has dtype {self.dtype}; only float weights convert")
        raw = self._read()
        if self.dtype == "BF16":
            return bf16_bits_to_f32(raw)
        if self.dtype == "F64":
            return raw.astype(np.float32)
        return raw


@dataclass
class Checkpoint:
    """A checkpoint directory: its config and its tensors by name (file order)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, SourceTensor]
    files: list[Path]
    kind: str  # "safetensors" | "pytorch"
    _keepalive: list[Any] = field(default_factory=list, repr=False)

    def close(self) -> None:
        self._keepalive.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def file_of(self, name: str) -> Path:
        return self.tensors[name].file if name in self.tensors else self.path


# ------------------------------------------------------------------ config

def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(directory, "no config.json: not a Hugging Face checkpoint directory")
    return read_json_object(path)


def read_json_object(path: Path, error: type = FormatError, what: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object; `what` prefixes the message (e.g. "--config")."""
    lead = f"{what} " if what else ""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(path, f"{lead}is not valid JSON: {exc}" if what else f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise error(path, f"{what}: expected a JSON object" if what else "expected a JSON object")
    return obj


# ------------------------------------------------------------------ safetensors

def _map_bytes(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """A read-only uint8 view of path[offset:offset+nbytes], backed by its own mmap.

    The mapping is released when the last array viewing it is dropped, so a
    converter that handles one tensor at a time keeps one tensor resident.
    """
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
        mm.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor table, absolute offset of the data area), validated against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(path, f"truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise FormatError(path, f"truncated or not safetensors: header of {n} bytes in a {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(path, "safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = size - data_start
    for name, info in header.items():
        _check_safetensors_entry(path, name, info, data_size)
    return header, data_start


def _check_safetensors_entry(path: Path, name: str, info: Any, data_size: int) -> None:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = [int(d) for d in shape]
    except (KeyError, TypeError, ValueError):
        raise FormatError(path, f"tensor {name}: malformed safetensors entry") from None
    if dtype not in SAFETENSORS_DTYPES:
        raise FormatError(path, f"tensor {name}: unsupported dtype {dtype}")
    if any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise FormatError(path, f"tensor {name}: negative shape or offsets")
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if end - begin != want:
        raise FormatError(path, f"tensor {name}: {end - begin} bytes stored for shape {shape} {dtype} ({want} needed)")
    if end > data_size:
        raise FormatError(path, f"truncated: tensor {name} ends at byte {end} of data but the file holds {data_size}")


def _safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
    header, data_start = read_safetensors_header(path)
    out: dict[str, SourceTensor] = {}
    # File order (by offset) so a sequential reader walks the file front to back.
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = info["dtype"]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = info["data_offsets"]
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])

        def read(path=path, offset=data_start + begin, nbytes=end - begin, np_dtype=np_dtype, shape=shape):
            return _map_bytes(path, offset, nbytes).view(np_dtype).reshape(shape)

        out[name] = SourceTensor(name, dtype, shape, path, read, FileSpan(path, data_start + begin, end - begin))
    return out


# ------------------------------------------------------------------ pytorch .bin

_TORCH_DTYPE_NAMES = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.bool": "BOOL",
}


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise InputError(path, "reading pytorch_model*.bin needs torch (pip install torch); safetensors does not") from None
    import pickle

    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Pre-zip (legacy) torch files cannot be mapped; this reads the shard into memory.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported pickle content"
        raise FormatError(path, f"refusing to load: the pickle needs code beyond plain tensors (weights_only): {first}") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(path, f"not a readable PyTorch checkpoint: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(path, "not a state dict of tensors")
    return state


def _bin_tensors(path: Path, keepalive: list[Any]) -> dict[str, SourceTensor]:
    import torch

    state = _torch_load(path)
    keepalive.append(state)
    out: dict[str, SourceTensor] = {}
    for name, t in state.items():
        dtype = _TORCH_DTYPE_NAMES.get(str(t.dtype))
        if dtype is None:
            raise FormatError(path, f"tensor {name}: unsupported dtype {t.dtype}")

        def read(t=t, dtype=dtype):
            t = t.contiguous()
            if dtype == "BF16":
                return t.view(torch.int16).numpy().view(np.uint16)
            return t.numpy()

        out[name] = SourceTensor(name, dtype, tuple(t.shape), path, read)
    return out


# ------------------------------------------------------------------ discovery

def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise FormatError(index_path, "not a valid shard index (needs a JSON object with a weight_map)") from None
    return weight_map


def _load_sharded(directory: Path, index_path: Path, read_file, keepalive) -> tuple[dict[str, SourceTensor], list[Path]]:
    weight_map = _read_index(index_path)
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    tensors: dict[str, SourceTensor] = {}
    files: list[Path] = []
    for shard, names in shards.items():
        shard_path = directory / shard
        if Path(shard).name != shard:
            raise FormatError(index_path, f"shard name {shard!r} points outside the checkpoint directory")
        if not shard_path.is_file():
            raise InputError(shard_path, f"missing shard listed in {index_path.name}")
        found = read_file(shard_path, keepalive)
        missing = [n for n in names if n not in found]
        if missing:
            raise FormatError(shard_path, f"tensor {missing[0]} is listed in {index_path.name} but not in this shard")
        extra = [n for n in found if weight_map.get(n) != shard]
        if extra:
            raise FormatError(shard_path, f"unexpected tensor {extra[0]}: not listed for this shard in {index_path.name}")
        tensors.update(found)
        files.append(shard_path)
    return tensors, files


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face checkpoint directory (config.json + weights), reading no tensor data."""
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(directory, "not a directory (expected a Hugging Face checkpoint directory)")
    config = read_config(directory)
    keepalive: list[Any] = []

    def read_st(p: Path, _keep) -> dict[str, SourceTensor]:
        return _safetensors_tensors(p)

    if (directory / SAFETENSORS_INDEX).is_file():
        tensors, files = _load_sharded(directory, directory / SAFETENSORS_INDEX, read_st, keepalive)
        kind = "safetensors"
    elif (directory / SAFETENSORS_SINGLE).is_file():
        files = [directory / SAFETENSORS_SINGLE]
        tensors, kind = _safetensors_tensors(files[0]), "safetensors"
    elif (directory / BIN_INDEX).is_file():
        tensors, files = _load_sharded(directory, directory / BIN_INDEX, _bin_tensors, keepalive)
        kind = "pytorch"
    elif (directory / BIN_SINGLE).is_file():
        files = [directory / BIN_SINGLE]
        tensors, kind = _bin_tensors(files[0], keepalive), "pytorch"
    else:
        raise InputError(directory, "no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")
    return Checkpoint(directory, config, tensors, files, kind, keepalive)
