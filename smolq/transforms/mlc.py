"""MLC-LLM's group quantization (q4f16_1, q4f16_0, q3f16_1), computed as MLC-LLM computes it.

MLC-LLM first casts the weight to the model dtype (float16) and does every
step of `GroupQuantize._quantize` in it: scale = max|w| / max_int, then
round(w / scale + max_int), clamped to [0, 2*max_int]. Each float16 operation
is emulated here as float32 arithmetic rounded back to float16 (exact for one
+, -, * or /: float32 has more than twice float16's precision), and round()
is round-half-to-even (TVM lowers it to nearbyint). A group that is all
zeros has scale 0; MLC-LLM would divide 0 by 0 there, smolq writes the zero
code (max_int), which decodes to 0 just the same.

Rows are quantized a slice at a time, so temporaries stay a few MB whatever
the tensor's size; the bit packing is formats.mlc.pack_codes.
"""
from __future__ import annotations

from smolq.formats.mlc import MLCQuant, pack_codes
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

_CHUNK_ELEMENTS = 1 << 22


def _f16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to float16 and back (one float16 operation's result)."""
    return x.astype(np.float16).astype(np.float32)


def _quantize_rows(w: np.ndarray, q: MLCQuant) -> tuple[np.ndarray, np.ndarray]:
    rows, k = w.shape
    g = q.n_groups(k)
    x = np.zeros((rows, g * q.group_size), dtype=np.float32)
    x[:, :k] = _f16(w.astype(np.float32, copy=False))  # the weight in the model dtype
    x = x.reshape(rows, g, q.group_size)
    max_int = np.float32(q.max_int)
    scale = _f16(np.abs(x).max(axis=-1) / max_int)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = _f16(_f16(x / scale[:, :, None]) + max_int)
    codes = np.clip(np.rint(y), 0, 2 * q.max_int)
    codes[scale == 0] = q.max_int
    codes = codes.reshape(rows, -1)[:, :k].astype(np.uint32)
    return pack_codes(codes, q), scale.astype(np.float16)


def group_quantize(w: np.ndarray, q: MLCQuant) -> tuple[np.ndarray, np.ndarray]:
    """A float weight [rows, k] -> (q_weight uint32 [rows, words], q_scale float16 [rows, groups])."""
    rows, k = w.shape
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    words = np.empty((rows, q.n_words(k)), dtype=np.uint32)
    scales = np.empty((rows, q.n_groups(k)), dtype=np.float16)
    for r in range(0, rows, step):
        words[r:r + step], scales[r:r + step] = _quantize_rows(w[r:r + step], q)
    return words, scales
