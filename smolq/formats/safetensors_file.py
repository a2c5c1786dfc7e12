"""The safetensors header, for every writer that streams tensors into a file itself.

Layout: an 8-byte little-endian header length, the JSON header (names -> dtype, shape and
[begin, end) byte offsets into the data that follows; "__metadata__" first), space-padded
to a multiple of 8, then the tensors' bytes back to back in header order. Writing it here
lets a writer put each tensor's bytes straight into its file: the library's `save` builds
the whole file as one bytes object first (a second copy of everything in memory).
"""
from __future__ import annotations

import json
import struct
from typing import Any, Iterable, Sequence

# numpy dtype name -> safetensors dtype (uint16 arrays carry bf16 bits where a writer says so).
ST_DTYPES = {"float32": "F32", "float16": "F16", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32",
             "int64": "I64", "uint16": "BF16", "bool": "BOOL", "float64": "F64"}


def header(entries: Iterable[tuple[str, str, Sequence[int], int]], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and header for (name, safetensors dtype, shape, nbytes) entries, in
    the order their data will follow."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata is not None else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        head[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(head, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_arrays(fh, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> int:
    """numpy arrays (C-contiguous) as one safetensors file into `fh`, each written from its own
    memory (a mapped input's pages included: no copy); returns the bytes written. The data is
    laid out as the library lays it out, widest element first, then by name, so every
    tensor's offset is a multiple of its element size (the header is padded to 8)."""
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    head = header(((k, ST_DTYPES[arrays[k].dtype.name], arrays[k].shape, arrays[k].nbytes) for k in order), metadata)
    size = fh.write(head)
    for k in order:
        size += fh.write(memoryview(arrays[k]).cast("B"))
    return size
