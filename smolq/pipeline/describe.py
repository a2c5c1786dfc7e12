"""What a model file is: container, version, header, metadata and tensors, as plain JSON-able data.

describe() is what `smolq inspect` shows (the table and --json); it reads
headers and tensor infos only, never tensor data.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

from smolq.formats.detect import ModelFile, open_model, sniff_kind
from smolq.formats.imatrix import describe_imatrix, read_imatrix
from smolq.plan.mix import FTYPE_NAME

ARRAY_PREVIEW = 8  # items of a long array kept unless full
IMATRIX_TOP = 5  # an imatrix entry's most important columns shown (IMATRIX_TOP_FULL with --all)
IMATRIX_TOP_FULL = 20


def describe_file(path: str | os.PathLike, full: bool = False) -> dict[str, Any]:
    """Open `path` (GGUF v1-v3 or any legacy container, or an imatrix file) and describe it."""
    if sniff_kind(path) == "imatrix":
        return describe_imatrix(read_imatrix(path), top=IMATRIX_TOP_FULL if full else IMATRIX_TOP)
    with open_model(path) as mf:
        return describe(mf, full=full)


def describe(mf: ModelFile, full: bool = False) -> dict[str, Any]:
    """Everything `inspect` shows, as plain JSON-able data (long arrays shortened unless `full`)."""
    report: dict[str, Any] = {
        "file": str(mf.path),
        "container": mf.container,
        "version": mf.version,
        "format": mf.format_name,
        "endian": mf.endian,
        "alignment": mf.alignment,
        "architecture": mf.architecture,
        "vocab_size": mf.vocab_size,
        "file_type": mf.ftype,
        "file_type_name": FTYPE_NAME.get(mf.ftype) if isinstance(mf.ftype, int) else None,
        "header": dict(mf.header),
    }
    if mf.is_gguf:
        report["metadata"] = {k: _meta_entry(mv, full) for k, mv in mf.raw.metadata.items()}
    else:
        report["hyperparameters"] = dict(mf.metadata)
        report["vocab"] = _legacy_vocab(mf.raw.vocab, full)
    report["tensors"] = [_tensor_row(t) for t in mf.tensors]
    types = Counter(t.type.name for t in mf.tensors)
    report["summary"] = {
        "n_tensors": len(mf.tensors),
        "n_bytes": sum(t.nbytes for t in mf.tensors),
        "n_elements": sum(t.n_elements for t in mf.tensors),
        "types": dict(sorted(types.items())),
    }
    return report


def _meta_entry(mv: Any, full: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": mv.type.name}
    value = mv.to_python()
    if mv.type.name == "ARRAY":
        entry["item_type"] = mv.item_type.name
        entry["count"] = len(value)
        if not full and len(value) > ARRAY_PREVIEW:
            value = value[:ARRAY_PREVIEW]
            entry["truncated"] = True
    entry["value"] = value
    return entry


def _legacy_vocab(vocab: list[tuple[bytes, float | None]], full: bool) -> dict[str, Any]:
    shown = vocab if full else vocab[:ARRAY_PREVIEW]
    out: dict[str, Any] = {
        "count": len(vocab),
        "tokens": [tok.decode("utf-8", "backslashreplace") for tok, _ in shown],
        "scores": [score for _, score in shown] if vocab and vocab[0][1] is not None else None,
    }
    if len(shown) < len(vocab):
        out["truncated"] = True
    return out


def _tensor_row(t: Any) -> dict[str, Any]:
    return {
        "name": t.name,
        "type": t.type.name,
        "shape": list(t.shape),
        "offset": t.offset,
        "bytes": t.nbytes,
    }
