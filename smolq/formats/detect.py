"""Open any model file smolq reads, deciding the container from its bytes.

The suffix says nothing (".bin" is every legacy format, and people rename
files), so the first bytes decide: "GGUF" -> the GGUF reader; a legacy u32
magic ('ggml', 'ggmf', 'ggjt', 'ggmm') -> the legacy reader. Both readers'
results are wrapped in one small view so `inspect`, `quantize` and `verify`
do not care which container they got.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolq.errors import FormatError
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import GGUFFile, read_gguf
from smolq.formats.imatrix import is_imatrix
from smolq.formats.legacy import read_legacy
from smolq.formats.legacy_tables import ALIGNMENT, CONTAINER_BY_MAGIC, CONTAINERS, OTHER_MAGICS

GGUF_MAGIC = b"GGUF"
LEGACY_CONTAINERS = ("ggml", "ggmf", "ggjt", "ggmm")


def sniff_kind(path: str | os.PathLike) -> str:
    """"imatrix" for llama.cpp's importance-matrix files (GGUF with general.type "imatrix", or
    legacy .dat), else the model container as sniff_container says."""
    return "imatrix" if is_imatrix(path) else sniff_container(path)


def sniff_container(path: str | os.PathLike) -> str:
    """"gguf", or the legacy container name, from the file's first bytes; FormatError otherwise."""
    p = Path(path)
    if p.is_dir():
        raise FormatError(p, "is a directory, not a GGUF or ggml model file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise FormatError(p, "no such file") from None
    except OSError as exc:
        raise FormatError(p, f"cannot open: {exc.strerror or exc}") from None
    if not head:
        raise FormatError(p, "empty file, not a GGUF or ggml model")
    if head == GGUF_MAGIC:
        return "gguf"
    if len(head) < 4:
        raise FormatError(p, f"truncated: {len(head)} bytes, too short for a magic number")

    magic = struct.unpack("<I", head)[0]
    if magic in CONTAINER_BY_MAGIC:
        return CONTAINER_BY_MAGIC[magic].name
    what = OTHER_MAGICS.get(magic)
    if what is None and is_imatrix(p):
        what = "a llama.cpp imatrix .dat file; `smolq inspect` shows it"
    hint = f" ({what})" if what else ""
    raise FormatError(p, f"not a GGUF or ggml file: magic {head!r} = 0x{magic:08x}{hint}")


@dataclass
class ModelFile:
    """What every command needs to know about a model file, whatever its container."""

    path: Path
    container: str  # "gguf", "ggml", "ggmf", "ggjt", "ggmm"
    version: int | None  # GGUF 1-3, ggmf/ggjt version word, None when the container has none
    architecture: str  # GGUF general.architecture, or the legacy family ("llama", "gptj", "mpt")
    tensors: list[TensorEntry]
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF KVs or legacy hparams, plain values
    vocab_size: int | None = None
    endian: str = "little"
    alignment: int | None = None  # GGUF data alignment; 32 for ggjt; None: unaligned
    layout: str = "v3"  # block layout of Q4_0/Q4_1/Q5_x/Q8_0 tensors
    ftype: int | None = None  # general.file_type / the header's ftype
    header: dict[str, Any] = field(default_factory=dict)  # container-level fields for `inspect`
    raw: Any = None  # the reader's own object (GGUFFile or LegacyFile)

    @property
    def is_gguf(self) -> bool:
        return self.container == "gguf"

    @property
    def format_name(self) -> str:
        if self.version is None:
            return f"{self.container} (unversioned)"
        return f"{self.container} v{self.version}"

    def close(self) -> None:
        close = getattr(self.raw, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_model(path: str | os.PathLike, family: str | None = None) -> ModelFile:
    """Read any GGUF or legacy ggml model file (tensors stay lazy, backed by an mmap).

    The first shard of a split GGUF opens the whole set (formats.gguf.read_gguf)."""
    p = Path(path)
    container = sniff_container(p)
    if container == "gguf":
        return _from_gguf(p)
    return _from_legacy(p, family)


def _from_gguf(path: Path) -> ModelFile:

    gf = read_gguf(path)
    if gf.metadata.value("general.type") == "imatrix":
        gf.close()
        raise FormatError(path, "is an importance matrix (llama.cpp imatrix GGUF), not a model; "
                                "`smolq inspect` shows it, `--imatrix` takes it")
    meta = {key: mv.to_python() for key, mv in gf.metadata.items()}
    arch = str(meta.get("general.architecture", "unknown"))
    return ModelFile(
        path=path,
        container="gguf",
        version=gf.version,
        architecture=arch,
        tensors=list(gf.tensors),
        metadata=meta,
        vocab_size=_gguf_vocab_size(meta, arch),
        endian=gf.byte_order,
        alignment=gf.alignment,
        layout="v3",
        ftype=meta.get("general.file_type"),
        header=_gguf_header(gf),
        raw=gf,
    )


def _gguf_header(gf: GGUFFile) -> dict[str, Any]:
    header: dict[str, Any] = {"n_tensors": len(gf.tensors), "n_kv": len(gf.metadata)}
    if gf.split is not None:  # a split set read from its first shard: name every shard
        header["split_count"] = gf.split.count
        header["shards"] = [str(p) for p in gf.split.paths]
    return header


def _gguf_vocab_size(meta: dict[str, Any], arch: str) -> int | None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        return len(tokens)
    size = meta.get(f"{arch}.vocab_size")
    return int(size) if isinstance(size, int) else None


def _from_legacy(path: Path, family: str | None) -> ModelFile:

    lf = read_legacy(path, family=family)
    container = CONTAINERS.get(lf.container)
    return ModelFile(
        path=path,
        container=lf.container,
        version=lf.version,
        architecture=lf.family,
        tensors=list(lf.tensors),
        metadata=dict(lf.hparams),
        vocab_size=len(lf.vocab) if lf.vocab else lf.hparams.get("n_vocab"),
        endian="little",
        alignment=ALIGNMENT if container is not None and container.aligned else None,
        layout=getattr(lf, "layout", "v1"),
        ftype=lf.ftype,
        header={"family": lf.family, "dialect": lf.dialect, "ftype": lf.ftype, "qntvr": lf.qntvr,
                "n_tensors": len(lf.tensors), "n_vocab": len(lf.vocab)},
        raw=lf,
    )
