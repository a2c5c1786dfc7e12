"""What decides whether an output must be rebuilt, and which shard builds it.

An output's key is a hash of everything its bytes depend on: the source's
tensors (the C kernel's checksum of each tensor's raw bytes) and its other
files (config, tokenizer), the output's options, the calibration text, and
the versions of smolq and of the kernel ABI. Equal key: the bytes would be
equal, so the build is skipped.

Checksumming a 13B source takes a while, so a source's fingerprint is cached
by (path, size, mtime) of its files; the cache lives beside the lock file
and is only an accelerator (delete it and the keys are recomputed).

Sharding hashes the output's identity ("model/output"), not its key, so an
output stays on the same CI shard when its inputs change.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import smolq
from smolq import kernels
from smolq.errors import InputError
from smolq.formats.detect import open_model
from smolq.kernels import checksum
from smolq.sources.checkpoint import open_checkpoint

ZOO_SCHEMA = 1  # bump when what a key covers changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CHECKSUM_CHUNK = 64 << 20


def versions() -> dict[str, Any]:
    """The code versions that every key includes."""

    return {"smolq": smolq.__version__, "kernel_abi": kernels._ABI_VERSION, "zoo_schema": ZOO_SCHEMA}


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_checksum(path: str | os.PathLike) -> str:
    """The kernel checksum of a file's bytes (mapped, never read whole), as 16 hex digits.

    Files larger than one chunk are checksummed chunk by chunk and the chunk
    sums hashed, so memory stays bounded whatever the file's size.
    """
    import mmap


    size = os.path.getsize(path)
    if size == 0:
        return f"{checksum(b''):016x}"
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            if size <= CHECKSUM_CHUNK:
                return f"{checksum(view):016x}"
            parts = [f"{checksum(view[i:i + CHECKSUM_CHUNK]):016x}" for i in range(0, size, CHECKSUM_CHUNK)]
        finally:
            view.release()
    return hashlib.sha256(",".join(parts).encode()).hexdigest()[:16]


def tree_checksum(path: Path) -> dict[str, str]:
    """Relative path -> checksum of every file in a directory (or the file itself)."""
    if path.is_file():
        return {path.name: file_checksum(path)}
    return {str(p.relative_to(path)): file_checksum(p) for p in sorted(path.rglob("*")) if p.is_file()}


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stat_signature(path: Path) -> list[Any]:
    """(name, size, mtime_ns) of a file or of every file in a directory: the fingerprint cache key."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# --------------------------------------------------------------------------- source fingerprints

def hf_fingerprint(src: Path) -> dict[str, Any]:
    """Tensor checksums of an HF checkpoint (resharding or re-saving keeps them) and its other files."""

    ckpt = open_checkpoint(src)
    try:
        tensors = {}
        largest = 0
        for name in sorted(ckpt.tensors):
            t = ckpt.tensors[name]
            raw = t.load_raw()
            tensors[name] = [t.dtype, list(t.shape), f"{checksum(raw):016x}"]
            largest = max(largest, _float32_bytes(t.shape))
            del raw
    finally:
        ckpt.close()
    others = {p.name: file_checksum(p) for p in sorted(src.iterdir())
              if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json")}
    total = sum(_float32_bytes(s) for _, s, _ in tensors.values())
    return {"kind": "hf", "digest": digest({"tensors": tensors, "files": others}),
            "f32_bytes": total, "largest_f32_bytes": largest, "n_tensors": len(tensors)}


def file_fingerprint(src: Path) -> dict[str, Any]:
    """A GGUF / legacy file: its bytes are its identity (metadata and tensors alike)."""

    with open_model(src) as mf:
        shapes = [tuple(t.shape) for t in mf.tensors]
    total = sum(_float32_bytes(s) for s in shapes)
    largest = max((_float32_bytes(s) for s in shapes), default=0)
    return {"kind": "file", "digest": file_checksum(src), "f32_bytes": total, "largest_f32_bytes": largest,
            "n_tensors": len(shapes)}


def _float32_bytes(shape: Iterable[int]) -> int:
    n = 4
    for d in shape:
        n *= int(d)
    return n


def source_fingerprint(src: Path, cache: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a source, from `cache` when no file changed (the cache is updated)."""
    sig = stat_signature(src)
    entry = cache.get(str(src))
    if entry and entry.get("stat") == sig:
        return entry["fingerprint"]
    fp = hf_fingerprint(src) if src.is_dir() else file_fingerprint(src)
    cache[str(src)] = {"stat": sig, "fingerprint": fp}
    return fp


# --------------------------------------------------------------------------- outputs

def output_key(source_digest: str, options: dict[str, Any], calibration_digest: str | None) -> str:
    return digest({"source": source_digest, "options": options, "calibration": calibration_digest,
                   "versions": versions()})


def metrics_key(build_key: str, reference_digest: str | None, eval_digest: str | None) -> str:
    """Metrics are recomputed (without a rebuild) when the reference or evaluation text changes."""
    return digest({"build": build_key, "reference": reference_digest, "eval": eval_digest, "versions": versions()})


def shard_of(output_id: str, n_shards: int) -> int:
    """The 1-based shard that builds `output_id`: stable, independent of content and run order."""
    h = int.from_bytes(hashlib.sha256(output_id.encode()).digest()[:8], "big")
    return h % n_shards + 1


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N) with 1 <= K <= N."""

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(None, f"--shard {text!r}: expected K/N, e.g. 2/3") from None
    if not 1 <= k <= n:
        raise InputError(None, f"--shard {text!r}: K must be between 1 and N")
    return k, n
