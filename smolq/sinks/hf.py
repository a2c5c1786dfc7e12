"""A Hugging Face checkpoint directory: safetensors shards (+ index), config and tokenizer files.

The safetensors files are written here, byte by byte, so that the directory
streams like every other sink: the header of a shard (names, dtypes, shapes,
offsets) is known from the shapes alone, then each tensor's `load()` runs
once and its bytes go straight to disk. Layout (safetensors' format): an
8-byte little-endian header length, the JSON header padded with spaces to a
multiple of 8, then the tensors' bytes back to back in header order.

One file `model.safetensors` when everything fits `max_shard_bytes`, else
`model-0000i-of-0000N.safetensors` and `model.safetensors.index.json` (a
tensor larger than the limit gets a shard of its own, as transformers does).
The directory appears only when complete (atomic.atomic_directory).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from smolq.atomic import atomic_directory
from smolq.errors import InputError
from smolq.formats import safetensors_file
from smolq.ggml_types import GGMLType
from smolq.kernels import quantize
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# --outtype -> (safetensors dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {"f32": ("F32", 4), "f16": ("F16", 2), "bf16": ("BF16", 2)}
TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that mark a directory as a checkpoint this sink may replace.
CHECKPOINT_MARKS = ("config.json", SINGLE_FILE, INDEX_FILE)


@dataclass
class HFTensor:
    """One output tensor: its HF name and shape, and a load() giving float32 data in that shape."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], Any]

    def nbytes(self, dtype: str) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * DTYPES[dtype][1]


def check_output_dir(out: Path, src: Path) -> None:
    """OUT is new, empty, or an earlier checkpoint (replaced whole); never a file or an unrelated directory."""
    if out.is_file():
        raise InputError(out, "--format hf writes a directory; OUT is a file")
    if out.is_dir() and src.exists() and src.resolve().is_relative_to(out.resolve()):
        raise InputError(out, "the output directory holds the input; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not any((out / n).exists() for n in CHECKPOINT_MARKS):
        raise InputError(out, "directory is not empty and holds no Hugging Face checkpoint; "
                              "choose a new or empty directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(out, f"cannot write output: directory {parent} does not exist")


def plan_shards(tensors: list[HFTensor], dtype: str, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Tensors in order, a new shard whenever the next would pass the limit."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes(dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _encode(x: Any, dtype: str, shape: tuple[int, ...], name: str) -> Any:
    """float data -> the little-endian bytes of `dtype` (bf16: the kernel's round-to-nearest-even)."""
    a = np.asarray(x, dtype=np.float32)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: load() gave shape {a.shape}, expected {shape}")
    if dtype == "f32":
        return np.ascontiguousarray(a, dtype="<f4")
    if dtype == "f16":
        return np.ascontiguousarray(a.astype("<f2"))
    return quantize(np.ascontiguousarray(a).reshape(1, -1), GGMLType.BF16)


def _header(tensors: list[HFTensor], dtype: str) -> bytes:
    st_dtype = DTYPES[dtype][0]
    return safetensors_file.header(((t.name, st_dtype, t.shape, t.nbytes(dtype)) for t in tensors), {"format": "pt"})


def write_safetensors(path: Path, tensors: list[HFTensor], dtype: str,
                      on_tensor: Callable[[HFTensor], None] | None = None) -> int:
    """One safetensors file, each tensor loaded once; returns its size."""
    with open(path, "wb") as fh:
        size = fh.write(_header(tensors, dtype))
        for t in tensors:
            data = _encode(t.load(), dtype, t.shape, t.name)
            size += fh.write(memoryview(data).cast("B"))
            del data
            if on_tensor is not None:
                on_tensor(t)
    return size


def write(out: Path, tensors: Iterable[HFTensor], dtype: str, max_shard_bytes: int, *,
          json_files: dict[str, Any], tokenizer: Any = None, raw_files: dict[str, bytes] | None = None,
          on_tensor: Callable[[HFTensor], None] | None = None) -> int:
    """Write the checkpoint directory atomically; returns the bytes written.

    json_files: file name -> object (config.json, tokenizer_config.json ...);
    tokenizer: a `tokenizers.Tokenizer` saved as tokenizer.json (None: no tokenizer);
    raw_files: file name -> bytes (tokenizer.model).
    """
    if dtype not in DTYPES:
        raise InputError(out, f"--format hf stores f32, f16 or bf16, not {dtype}")
    tensors = list(tensors)
    shards = plan_shards(tensors, dtype, max_shard_bytes)
    names = shard_names(len(shards))
    total = 0
    with atomic_directory(out) as tmp:
        for fname, obj in json_files.items():
            text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
            (tmp / fname).write_text(text, encoding="utf-8")
            total += len(text.encode("utf-8"))
        for fname, data in (raw_files or {}).items():
            total += (tmp / fname).write_bytes(data)
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            total += (tmp / "tokenizer.json").stat().st_size
        for fname, shard in zip(names, shards):
            total += write_safetensors(tmp / fname, shard, dtype, on_tensor)
        if len(shards) > 1:
            weight_map = {t.name: fname for fname, shard in zip(names, shards) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes(dtype) for t in tensors)}, "weight_map": weight_map}
            text = json.dumps(index, indent=2) + "\n"
            (tmp / INDEX_FILE).write_text(text)
            total += len(text)
    return total
