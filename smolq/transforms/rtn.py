"""Round-to-nearest quantization of a tensor stream, lazily, through the C kernel.

Each output TensorEntry's load() reads its source tensor (a view of the input
file's mmap), decodes it to float32 when its type changes, and quantizes it
to the planned type and block layout. Nothing runs until the writer asks for
that tensor, and the writer drops the bytes before asking for the next. A
tensor is decoded and quantized a row at a time inside the kernel
(kernels.requantize), so peak memory is one tensor's output, not a float32
copy of the tensor (262 MB for a 32000 x 2048 embedding), and the input is
read once.
"""
from __future__ import annotations

from typing import Any, Sequence

from smolq import kernels
from smolq.errors import InputError
from smolq.formats.base import TensorEntry
from smolq.ggml_types import VERSIONED_TYPES, GGMLType
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

T = GGMLType


def _raw(entry: TensorEntry) -> Any:
    data = entry.load()
    if data is None:
        raise InputError(None, f"tensor {entry.name} has no data")
    return data


def to_float32(entry: TensorEntry, threads: int = 0) -> np.ndarray:
    """The tensor's values as float32 in its PyTorch-order shape."""

    if entry.extra.get("be_blocks_as_stored"):
        raise InputError(None, f"tensor {entry.name}: {entry.type.name} blocks in a big-endian GGUF "
                               f"cannot be decoded unambiguously (convert the file to little-endian first)")
    data = _raw(entry)
    if entry.type == T.F32:
        raw = np.frombuffer(memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data,
                            dtype=np.uint8)
        return raw.view("<f4").reshape(entry.shape)
    return kernels.dequantize(data, entry.type, entry.shape, layout=entry.layout, threads=threads)


def _same_type_loader(src: TensorEntry, layout: str):
    """Keep the type; only Q4_0/Q4_1/Q5_x/Q8_0 between ggjt-era layouts need re-packing."""
    if src.type not in VERSIONED_TYPES or src.layout == layout:
        return src.load

    def load() -> np.ndarray:

        out, _lossless = kernels.relayout(_raw(src), src.type, src.layout, layout)
        return out

    return load


def quantize_rows(src: TensorEntry, dst: GGMLType, layout: str, threads: int = 0,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """src's stored rows decoded and quantized to dst in one kernel pass (each row decoded into
    a per-thread buffer and quantized from there), so no float32 copy of the tensor exists."""
    if src.extra.get("be_blocks_as_stored"):
        to_float32(src)  # raises the explanation
    data = _raw(src)
    out = kernels.requantize(data, src.type, src.shape, dst, src_layout=src.layout, layout=layout,
                             imatrix=imatrix, threads=threads)
    return out.reshape(-1)


def _quantize_loader(src: TensorEntry, dst: GGMLType, layout: str, threads: int,
                     imatrix: np.ndarray | None):
    def load() -> np.ndarray:
        try:
            return quantize_rows(src, dst, layout, threads, imatrix)
        except ValueError as exc:  # a row llama.cpp would abort on (IQ2/IQ1 search overflow), a missing imatrix
            raise InputError(None, f"tensor {src.name}: cannot quantize to {dst.name}: {exc}") from None

    return load


def quantize_entry(src: TensorEntry, dst: GGMLType, layout: str = "v3", threads: int = 0,
                   imatrix: np.ndarray | None = None) -> TensorEntry:
    """An entry of type `dst` in block layout `layout` whose load() produces src's values."""
    if dst == src.type:
        load = _same_type_loader(src, layout)
    else:
        load = _quantize_loader(src, dst, layout, threads, imatrix)
    extra = {"source_type": src.type.name}
    return TensorEntry(src.name, dst, tuple(src.shape), load=load, layout=layout, extra=extra)


def quantize_entries(entries: Sequence[TensorEntry], types: Sequence[GGMLType], layout: str = "v3",
                     threads: int = 0, names: Sequence[str] | None = None,
                     imatrices: Sequence[np.ndarray | None] | None = None) -> list[TensorEntry]:
    """One lazy output entry per input entry, with the planned types (and optional new names,
    and per-tensor importance vectors, llama.cpp's quant_weights)."""
    if len(entries) != len(types):
        raise ValueError(f"{len(entries)} tensors but {len(types)} planned types")
    imatrices = imatrices if imatrices is not None else [None] * len(entries)
    out = []
    for i, (entry, t) in enumerate(zip(entries, types)):
        q = quantize_entry(entry, t, layout, threads, imatrices[i])
        if names is not None:
            q.name = names[i]
        out.append(q)
    return out
