"""What every container hands out and takes in: lazy tensors and metadata.

Shapes are in PyTorch order (outermost first, last dimension contiguous);
containers store them reversed (ggml's ne[]) and convert at the boundary.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from smolq.errors import InputError
from smolq.fileio import FileSpan, phase, span_of
from smolq.ggml_types import GGMLType, tensor_nbytes
from smolq.lazy import lazy_module

np = lazy_module("numpy")


@dataclass
class TensorEntry:
    """One tensor: its description plus a way to get its raw bytes lazily.

    `load()` returns exactly `nbytes` bytes (bytes, memoryview or a uint8
    numpy array) in the block layout `layout`. Readers back it with a view
    of an mmap; converters with a function that reads and transforms one
    checkpoint tensor. Nothing is read until a sink asks.
    """

    name: str
    type: GGMLType
    shape: tuple[int, ...]
    load: Callable[[], Any] | None = None
    layout: str = "v3"
    offset: int | None = None  # absolute file offset of the data, when read from a file
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape, self.layout)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def find_tensor(tensors: Iterable[TensorEntry], name: str) -> TensorEntry:
    """The first tensor called `name` (a reader's `tensor(name)`); KeyError if none."""
    for t in tensors:
        if t.name == name:
            return t
    raise KeyError(name)


def as_bytes(data: Any) -> memoryview:
    """A flat byte view of whatever a load() returned (bytes, memoryview, numpy array, ...), copy-free when possible."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    try:
        mv = memoryview(data)
    except TypeError:
        return memoryview(np.ascontiguousarray(np.asarray(data)).reshape(-1).view(np.uint8))
    if not mv.c_contiguous:
        return memoryview(mv.tobytes())
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def tensor_payload(path: str | os.PathLike, entry: TensorEntry, layout: str,
                   copyable: bool = True) -> FileSpan | memoryview:
    """What a writer stores for `entry` in block layout `layout`: the file span its
    bytes already are (copied file to file), or its loaded bytes, checked for size.
    `copyable` False when the writer must transform the bytes (byte swapping)."""
    expected = tensor_nbytes(entry.type, entry.shape, layout)
    span = span_of(entry.load)
    if copyable and span is not None and span.nbytes == expected and entry.layout == layout:
        return span
    with phase("produce"):
        data = as_bytes(entry.load())
    if data.nbytes != expected:
        raise InputError(path, f"tensor {entry.name!r}: load() returned {data.nbytes} bytes, "
                               f"{GGMLType(entry.type).name} {list(entry.shape)} needs {expected} in layout {layout}")
    return data
