"""Round-to-nearest quantization of a tensor stream, lazily, through the C kernel.

Each output TensorEntry's load() reads its source tensor (a view of the input
file's mmap), decodes it to float32 when its type changes, and quantizes it
to the planned type and block layout. Nothing runs until the writer asks for
that tensor, and the writer drops the bytes before asking for the next. A
tensor is decoded and quantized a slice of rows at a time through one reused
float32 buffer, so peak memory is one tensor's output plus that buffer, not a
float32 copy of the tensor (262 MB for a 32000 x 2048 embedding), and no time
goes to faulting in fresh pages for it.
"""
from __future__ import annotations

import math
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


# float32 bytes decoded per step: large enough that each kernel call splits well across threads,
# small enough to stay one reused allocation.
CHUNK_BYTES = 16 << 20


def quantize_rows(src: TensorEntry, dst: GGMLType, layout: str, threads: int = 0,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """src's rows decoded and quantized to dst, CHUNK_BYTES of float32 at a time (every ggml
    quantizer works row by row, so the bytes equal those of one call over the whole tensor)."""
    if src.extra.get("be_blocks_as_stored"):
        to_float32(src)  # raises the explanation
    shape = tuple(int(d) for d in src.shape) or (1,)
    n_per_row, nrows = shape[-1], math.prod(shape[:-1])
    data = _raw(src)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) \
        else np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    in_row = kernels.row_size(src.type, n_per_row, src.layout)
    if raw.size != nrows * in_row:
        raise ValueError(f"{src.type.name} tensor of shape {shape} needs {nrows * in_row} bytes, got {raw.size}")
    out = np.empty((nrows, kernels.row_size(dst, n_per_row, layout)), dtype=np.uint8)
    step = max(1, CHUNK_BYTES // (4 * n_per_row))
    scratch = np.empty((min(step, nrows), n_per_row), dtype=np.float32)
    for r0 in range(0, nrows, step):
        r1 = min(nrows, r0 + step)
        x = scratch[:r1 - r0]
        kernels.dequantize(raw[r0 * in_row:r1 * in_row], src.type, x.shape, layout=src.layout,
                           threads=threads, out=x)
        kernels.quantize(x, dst, layout=layout, imatrix=imatrix, threads=threads, out=out[r0:r1])
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
