"""GPTQ checkpoints as gptq.md describes them, written here for the tests (never
smolq's own unpacker): safetensors directories, packed words, dequantization."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in `directory`."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Values packed along axis 0 (gptq.md 2.2/2.3): every 32 values are one `bits`·32-bit
    little-endian integer with value k at bit bits·k, split into int32 words."""
    w = words.view(np.uint32).astype(object)
    m = words.shape[1]
    out = np.zeros((n, m), dtype=np.int64)
    for blk in range(n // 32):
        big = sum(w[blk * bits + i] << (32 * i) for i in range(bits))  # per column, arbitrary precision
        for k in range(32):
            out[blk * 32 + k] = np.array([(int(x) >> (bits * k)) & ((1 << bits) - 1) for x in big])
    return out


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `unpack`: [n, m] levels -> [n/32·bits, m] int32 words."""
    n, m = values.shape
    out = np.zeros((n // 32 * bits, m), dtype=np.uint32)
    for blk in range(n // 32):
        for col in range(m):
            big = 0
            for k in range(32):
                big |= int(values[blk * 32 + k, col]) << (bits * k)
            for i in range(bits):
                out[blk * bits + i, col] = (big >> (32 * i)) & 0xFFFFFFFF
    return out.view(np.int32)


def levels(t: dict, prefix: str, bits: int, v1: bool = True):
    """(q [out, in], scale [G, out] f32, zero [G, out], g_idx [in]); v1 stores zero − 1 (gptq.md 2.4)."""
    g_idx, scales = t[f"{prefix}.g_idx"].astype(np.int64), t[f"{prefix}.scales"].astype(np.float32)
    q = unpack(t[f"{prefix}.qweight"], bits, g_idx.shape[0]).T
    z = unpack(t[f"{prefix}.qzeros"].T.copy(), bits, scales.shape[1]).T + (1 if v1 else 0)
    return q, scales, z, g_idx


def dequantize(t: dict, prefix: str, bits: int) -> np.ndarray:
    """W [out, in] = scale[g_idx] · (q − zero[g_idx])."""
    q, s, z, g = levels(t, prefix, bits)
    return (s[g].T * (q - z[g].T)).astype(np.float32)
