"""bitsandbytes 4-bit quantization of one Linear weight (NF4 / FP4, optional double
quantization), byte-equal with bitsandbytes.functional.quantize_4bit on CPU.

The double-quantization offset is absmax.mean() in float32 as torch's CPU sum computes
it; its last bits depend on torch's vector width (8 lanes on AVX2 builds, 16 on
AVX-512) and, above 32768 blocks, on torch's thread count: pass what the reading
machine's torch uses (defaults: 8 lanes, 1 thread).
"""
from __future__ import annotations

import sys
from typing import Any

from smolq import kernels
from smolq.formats.bnb_ckpt import NESTED_BLOCKSIZE, quant_state_blob
from smolq.lazy import lazy_module

np = lazy_module("numpy")


def quantize_weight(x: np.ndarray, quant_type: str, blocksize: int = 64, double_quant: bool = True,
                    dtype: str = "float16", lanes: int = 8, torch_threads: int = 1,
                    threads: int = 0) -> dict[str, Any]:
    """The tensors saved for one weight, by key suffix ("" is the packed weight itself)."""
    shape = tuple(int(d) for d in x.shape)
    packed, absmax = kernels.bnb4_quantize(x, quant_type, blocksize, threads=threads)
    out: dict[str, Any] = {"": packed.reshape(-1, 1)}
    offset = None
    if double_quant:
        offset = np.float32(kernels.bnb_mean(absmax, lanes, torch_threads))
        q8, nested = kernels.bnb8_quantize(absmax - offset, NESTED_BLOCKSIZE)
        out[".absmax"] = q8
    else:
        out[".absmax"] = absmax
    out[".quant_map"] = kernels.bnb_code(quant_type)
    if double_quant:
        out[".nested_absmax"] = nested
        out[".nested_quant_map"] = kernels.bnb_code("dynamic")
    out[f".quant_state.bitsandbytes__{quant_type}"] = quant_state_blob(quant_type, blocksize, dtype, shape, offset)
    return out


def dequantize_weight(t: dict[str, Any], quant_type: str, shape: tuple[int, ...], blocksize: int,
                      nested_offset: float | None) -> np.ndarray:
    """Float32 values of a saved weight (the inverse, for verify and tests)."""
    n = int(np.prod(shape))
    absmax = t[".absmax"]
    if nested_offset is not None:
        absmax = kernels.bnb8_dequantize(absmax, t[".nested_absmax"], NESTED_BLOCKSIZE) + np.float32(nested_offset)
    return kernels.bnb4_dequantize(t[""], absmax, n, quant_type, blocksize).reshape(shape)


def torch_reduction() -> tuple[int, int]:
    """(vector lanes, threads) of torch's CPU sum, if torch is already loaded; else AVX2, one thread."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 8, 1
    cap = str(torch.backends.cpu.get_cpu_capability())
    return (16 if cap.startswith("AVX512") else 8), int(torch.get_num_threads())
