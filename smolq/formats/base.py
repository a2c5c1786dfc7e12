"""What every container hands out and takes in: lazy tensors and metadata.

Shapes are in PyTorch order (outermost first, last dimension contiguous);
containers store them reversed (ggml's ne[]) and convert at the boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from smolq.ggml_types import GGMLType, tensor_nbytes


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
