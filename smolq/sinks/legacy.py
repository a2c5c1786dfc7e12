"""The legacy sink: a model written as one legacy container version, atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from smolq.formats.base import TensorEntry
from smolq.formats.legacy import write_legacy
from smolq.plan.targets import Target

Token = tuple[bytes, "float | None", bool]  # on-disk text, score, special


def write(out: Path, target: Target, family: str, hparams: Mapping[str, Any], tokens: Sequence[Token],
          entries: Iterable[TensorEntry], *, ftype: int | None = None,
          on_tensor: Callable[..., None] | None = None) -> int:
    """Write `target` (a legacy Target) atomically, one entry's load() at a time; returns the file size.

    tokens: (text, score, special) in id order. ftype: the header's file type
    (None: the writer infers it from the tensors). target.qntvr: the ggml
    examples' quantization version (None: from the tensors' block layout).
    """
    lt = target.legacy
    assert lt is not None, "a legacy target"
    write_legacy(out, lt.container, lt.version, family, hparams, [(text, score) for text, score, _ in tokens],
                 entries, dialect=lt.dialect, ftype=ftype, on_tensor=on_tensor, qntvr=target.qntvr,
                 special_tokens=[i for i, (_, _, special) in enumerate(tokens) if special])
    return Path(out).stat().st_size
