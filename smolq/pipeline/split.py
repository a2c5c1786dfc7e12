"""`smolq split` and `smolq merge`: re-shard a GGUF file, as llama.cpp's gguf-split does.

    source (formats.detect: a GGUF file, or a split set given its first shard)
    -> plan (formats.gguf.plan_shards: which tensors go in which shard)
    -> sink (formats.gguf.write_gguf_shards / write_gguf: bytes copied, atomically).

Tensor bytes are copied as stored; nothing is decoded. A merge drops the
split.* keys, so split -> merge gives back the unsplit file byte for byte
(llama-gguf-split --merge keeps them, with split.count set to 0).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from smolq.errors import InputError
from smolq.formats.detect import ModelFile, open_model
from smolq.formats.gguf import Split, plan_shards, shard_path, shard_prefix, write_gguf, write_gguf_shards


def _open_gguf(path: Path, what: str) -> ModelFile:
    mf = open_model(path)
    if not mf.is_gguf:
        mf.close()
        raise InputError(path, f"is a {mf.format_name} file; {what} works on GGUF (smolq migrate it to GGUF first)")
    return mf


def _inputs(mf: ModelFile) -> list[Path]:
    split = mf.raw.split
    return list(split.paths) if split is not None else [mf.path]


def _refuse_overwrite(inputs: list[Path], outputs: list[Path]) -> None:
    ins = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in ins:
            raise InputError(out, "output would overwrite an input shard; choose another output name")
    for out in outputs:
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(out, f"cannot write output: directory {parent} does not exist")


def _rows(mf: ModelFile) -> list[dict[str, Any]]:
    return [{"name": t.name, "shape": list(t.shape), "type": t.type.name, "bytes": t.nbytes} for t in mf.tensors]


def split_file(src: str | os.PathLike, prefix: str | os.PathLike, split: Split | None,
               dry_run: bool = False) -> dict[str, Any]:
    """Write SRC (a GGUF file or split set) as PREFIX-00001-of-0000N.gguf ... shards."""
    started = time.perf_counter()
    if not split:
        raise InputError(None, "give --split-max-size or --split-max-tensors")
    src, prefix = Path(src), shard_prefix(Path(prefix))
    with _open_gguf(src, "split") as mf:
        gf = mf.raw
        shards = plan_shards(gf.tensors, split, gf.alignment)
        paths = [shard_path(prefix, i, len(shards)) for i in range(len(shards))]
        _refuse_overwrite(_inputs(mf), paths)
        summary: dict[str, Any] = {
            "source": str(src), "output": str(paths[0]), "format": f"gguf-v{gf.version}",
            "n_tensors": len(gf.tensors), "tensor_bytes": sum(t.nbytes for t in gf.tensors),
            "shards": [{"path": str(p), "n_tensors": len(s), "tensor_bytes": sum(t.nbytes for t in s)}
                       for p, s in zip(paths, shards)],
            "notes": [], "tensors": _rows(mf),
        }
        if dry_run:
            summary["dry_run"] = True
            return summary
        written = write_gguf_shards(prefix, gf.metadata, gf.tensors, split, version=gf.version, endian=gf.endian,
                                    alignment=gf.alignment)
    for row, (_, size) in zip(summary["shards"], written):
        row["bytes"] = size
    summary.update(bytes=sum(size for _, size in written), seconds=round(time.perf_counter() - started, 3))
    return summary


def merge_file(first: str | os.PathLike, out: str | os.PathLike, dry_run: bool = False) -> dict[str, Any]:
    """Write the split set whose first shard is FIRST as one GGUF file OUT (split.* keys dropped)."""
    started = time.perf_counter()
    first, out = Path(first), Path(out)
    with _open_gguf(first, "merge") as mf:
        gf = mf.raw
        if gf.split is None:
            raise InputError(first, "not a split GGUF (no split.count key); nothing to merge")
        _refuse_overwrite(_inputs(mf), [out])
        summary: dict[str, Any] = {
            "source": str(first), "output": str(out), "format": f"gguf-v{gf.version}",
            "inputs": [str(p) for p in gf.split.paths], "n_tensors": len(gf.tensors),
            "tensor_bytes": sum(t.nbytes for t in gf.tensors), "notes": [], "tensors": _rows(mf),
        }
        if dry_run:
            summary["dry_run"] = True
            return summary
        size = write_gguf(out, gf.metadata, gf.tensors, version=gf.version, endian=gf.endian,
                          alignment=gf.alignment)
    summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
    return summary
