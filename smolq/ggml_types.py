"""The ggml type table: ids, block sizes, bytes per block, per-version layouts.

Canonical ids are today's `enum ggml_type` (the ids GGUF stores). The removed
Q4_2/Q4_3 keep their 2023 ids 4 and 5, which nothing reused. Legacy files
used other numberings in some eras; formats/legacy.py maps those onto these.

Five block types changed their bytes over time (formats.md 5.2):
  layout "v1": ggml/ggmf/ggjt v1 (pre #1405): interleaved nibbles, f32 scales
  layout "v2": ggjt v2 (#1405): split nibbles, f32 scales for Q4_0/Q4_1/Q8_0
  layout "v3": ggjt v3 and GGUF (#1508): split nibbles, f16 scales
Every other type has one layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

QK_K = 256

LAYOUTS = ("v1", "v2", "v3")


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q4_2 = 4  # removed 2023-05-12 (ggjt v2); readable only
    Q4_3 = 5  # removed 2023-04-28 upstream; readable only
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39  # OCP microscaling FP4: E8M0 scale per 32, E2M1 values

    @classmethod
    def from_name(cls, name: str) -> "GGMLType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {name!r}") from None


@dataclass(frozen=True)
class TypeInfo:
    block_size: int  # elements per block
    type_size: int  # bytes per block in the v3 / GGUF layout
    quantized: bool


T = GGMLType
# (block elements, bytes per block) in the GGUF layout; gguf-py GGML_QUANT_SIZES.
TYPE_INFO: dict[GGMLType, TypeInfo] = {
    T.F32: TypeInfo(1, 4, False),
    T.F16: TypeInfo(1, 2, False),
    T.BF16: TypeInfo(1, 2, False),
    T.F64: TypeInfo(1, 8, False),
    T.I8: TypeInfo(1, 1, False),
    T.I16: TypeInfo(1, 2, False),
    T.I32: TypeInfo(1, 4, False),
    T.I64: TypeInfo(1, 8, False),
    T.Q4_0: TypeInfo(32, 18, True),
    T.Q4_1: TypeInfo(32, 20, True),
    T.Q4_2: TypeInfo(16, 10, True),
    T.Q4_3: TypeInfo(16, 12, True),
    T.Q5_0: TypeInfo(32, 22, True),
    T.Q5_1: TypeInfo(32, 24, True),
    T.Q8_0: TypeInfo(32, 34, True),
    T.Q8_1: TypeInfo(32, 36, True),
    T.Q2_K: TypeInfo(QK_K, 84, True),
    T.Q3_K: TypeInfo(QK_K, 110, True),
    T.Q4_K: TypeInfo(QK_K, 144, True),
    T.Q5_K: TypeInfo(QK_K, 176, True),
    T.Q6_K: TypeInfo(QK_K, 210, True),
    T.Q8_K: TypeInfo(QK_K, 292, True),
    T.IQ2_XXS: TypeInfo(QK_K, 66, True),
    T.IQ2_XS: TypeInfo(QK_K, 74, True),
    T.IQ3_XXS: TypeInfo(QK_K, 98, True),
    T.IQ1_S: TypeInfo(QK_K, 50, True),
    T.IQ4_NL: TypeInfo(32, 18, True),
    T.IQ3_S: TypeInfo(QK_K, 110, True),
    T.IQ2_S: TypeInfo(QK_K, 82, True),
    T.IQ4_XS: TypeInfo(QK_K, 136, True),
    T.IQ1_M: TypeInfo(QK_K, 56, True),
    T.TQ1_0: TypeInfo(QK_K, 54, True),
    T.TQ2_0: TypeInfo(QK_K, 66, True),
    T.MXFP4: TypeInfo(32, 17, True),
}

# Bytes per block where an older layout differs from v3 (formats.md 5.2.1-5.2.3).
# v1 and v2 share sizes; they differ in nibble order only.
OLD_LAYOUT_SIZES: dict[tuple[GGMLType, str], int] = {
    (T.Q4_0, "v1"): 20, (T.Q4_0, "v2"): 20,
    (T.Q4_1, "v1"): 24, (T.Q4_1, "v2"): 24,
    (T.Q8_0, "v1"): 36, (T.Q8_0, "v2"): 36,
    (T.Q5_0, "v1"): 22, (T.Q5_0, "v2"): 22,
    (T.Q5_1, "v1"): 24, (T.Q5_1, "v2"): 24,
}

# Types whose bytes depend on the layout version.
VERSIONED_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0})


def type_size(t: GGMLType, layout: str = "v3") -> int:
    """Bytes per block of `t` in `layout` ("v1", "v2" or "v3"/GGUF)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    return OLD_LAYOUT_SIZES.get((t, layout), TYPE_INFO[t].type_size)


def block_size(t: GGMLType) -> int:
    return TYPE_INFO[t].block_size


def row_nbytes(t: GGMLType, n_per_row: int, layout: str = "v3") -> int:
    bs = TYPE_INFO[t].block_size
    if n_per_row % bs:
        raise ValueError(f"row of {n_per_row} elements is not a multiple of {t.name}'s block of {bs}")
    return n_per_row // bs * type_size(t, layout)


def tensor_nbytes(t: GGMLType, shape: tuple[int, ...], layout: str = "v3") -> int:
    """Bytes of a tensor with PyTorch-order `shape` (last dim contiguous)."""
    if not shape:
        return row_nbytes(t, 1, layout)
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * row_nbytes(t, shape[-1], layout)


def is_quantized(t: GGMLType) -> bool:
    return TYPE_INFO[t].quantized
