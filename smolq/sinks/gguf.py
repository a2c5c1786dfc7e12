"""The GGUF sink: the one metadata builder, and the atomic streaming write
(one file, or with `split` the shards llama.cpp's gguf-split writes).

`gguf_metadata` is every key `smolq convert` writes for a family, in its
order; convert, GPTQ and migrate (from a legacy file) all build their GGUF
header through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from smolq.arch import Arch
from smolq.arch.base import meta
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import (
    ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT,
    Split,
    plan_shards,
    shard_path,
    shard_prefix,
    write_gguf,
    write_gguf_shards,
)
from smolq.sources.checkpoint import Checkpoint
from smolq.sources.vocab import Vocab

GGML_QUANT_VERSION = 2  # general.quantization_version written by llama.cpp


def model_name(ckpt: Checkpoint) -> str:
    """general.name of a checkpoint: its config's _name_or_path, else the directory's name."""
    name = ckpt.config.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        return Path(name.rstrip("/")).name
    return ckpt.path.resolve().name


def gguf_metadata(arch: Arch, vocab: Vocab, ckpt: Checkpoint | None, file_type: int | None,
                  name: str | None = None) -> dict[str, Any]:
    """Every key `smolq convert` writes, in its order. `name` overrides the
    checkpoint-derived general.name (migrate has no checkpoint)."""

    md: dict[str, Any] = {
        "general.architecture": meta("str", arch.gguf_arch),
        "general.type": meta("str", "model"),
        "general.name": meta("str", name if name is not None else model_name(ckpt)),
    }
    md.update(arch.hparam_keys())
    if file_type is not None:
        md["general.file_type"] = meta("u32", file_type)
    md["general.quantization_version"] = meta("u32", GGML_QUANT_VERSION)
    md.update(vocab.tokenizer_keys(arch.family))
    if arch.add_space_prefix is not None:  # Gemma: the SentencePiece model adds no dummy prefix
        md["tokenizer.ggml.add_space_prefix"] = meta("bool", arch.add_space_prefix)
    return md


def write(out: Path, version: int, metadata: Mapping[str, Any], entries: Iterable[TensorEntry], *,
          endian: str = "<", on_tensor: Callable[..., None] | None = None, split: Split | None = None) -> int:
    """Write GGUF `version` atomically, one entry's load() at a time; returns the bytes written.

    With `split`, OUT.gguf becomes OUT-00001-of-0000N.gguf ... (all shards or
    none); a model that fits one shard is written to OUT unsplit, as gguf-py does.
    """
    entries = list(entries)
    if split and len(plan_shards(entries, split, _alignment(metadata))) > 1:
        shards = write_gguf_shards(shard_prefix(out), metadata, entries, split, version=version, endian=endian,
                                   on_tensor=on_tensor)
        return sum(size for _, size in shards)
    return write_gguf(out, metadata, entries, version=version, endian=endian, on_tensor=on_tensor)


def output_paths(out: Path, metadata: Mapping[str, Any], entries: Iterable[TensorEntry],
                 split: Split | None) -> list[Path]:
    """The files `write` produces for these entries: [out], or the shard names."""
    if not split:
        return [Path(out)]
    n = len(plan_shards(list(entries), split, _alignment(metadata)))
    return [Path(out)] if n == 1 else [shard_path(shard_prefix(out), i, n) for i in range(n)]


def _alignment(metadata: Mapping[str, Any]) -> int:
    mv = metadata.get(ALIGNMENT_KEY)
    return int(mv.value) if mv is not None else DEFAULT_ALIGNMENT
