"""bitsandbytes 4-bit checkpoints, as transformers saves a model loaded with
BitsAndBytesConfig(load_in_4bit=True) (bitsandbytes QuantState.as_dict(packed=True)).

Per quantized Linear `P` (weight shape [out, in], n = out*in values):
  P.weight                          uint8 [ceil(n/2), 1]  two 4-bit indices per byte, first in the high nibble
  P.weight.absmax                   float32 [blocks]      (double quant: uint8, the 8-bit dynamic-map indices)
  P.weight.quant_map                float32 [16]          the NF4 / FP4 code
  P.weight.nested_absmax            float32 [ceil(blocks/256)]   double quant only
  P.weight.nested_quant_map         float32 [256]                double quant only (dynamic map)
  P.weight.quant_state.bitsandbytes__nf4 (or __fp4)  uint8: UTF-8 JSON of quant_type, blocksize,
      dtype, shape (+ nested_blocksize, nested_dtype, nested_offset)
Everything else (embeddings, norms, lm_head, biases) stays in the compute dtype.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from smolq.formats import safetensors_file
from smolq.lazy import lazy_module

np = lazy_module("numpy")

NESTED_BLOCKSIZE = 256
BNB_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def quant_state_blob(quant_type: str, blocksize: int, dtype: str, shape: tuple[int, ...],
                     nested_offset: float | None) -> np.ndarray:
    """The JSON-in-uint8 tensor bitsandbytes packs (key order and float repr as json.dumps writes them)."""
    d: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if nested_offset is not None:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(nested_offset))
    return np.frombuffer(json.dumps(d).encode("utf-8"), dtype=np.uint8).copy()


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str) -> dict[str, Any]:
    """config.json's quantization_config, as transformers' BitsAndBytesConfig.to_dict() writes it."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant), "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


class SafetensorsStream:
    """A safetensors file written one tensor at a time: data goes to `spool` (a file beside the
    output) as it comes; finish() writes the header and then the spooled data into `fh`."""

    def __init__(self, spool: Path):
        self._spool_path = spool
        self._spool: BinaryIO = open(spool, "wb")
        self._entries: list[tuple[str, str, tuple[int, ...], int]] = []
        self._at = 0

    def add(self, name: str, array: np.ndarray, dtype: str | None = None) -> int:
        a = np.ascontiguousarray(array)
        st = dtype or safetensors_file.ST_DTYPES[a.dtype.name]  # uint16 carries bf16 bits
        self._entries.append((name, st, a.shape, a.nbytes))
        self._spool.write(a.tobytes())
        self._at += a.nbytes
        return a.nbytes

    def finish(self, fh: BinaryIO) -> int:
        self._spool.close()
        header = safetensors_file.header(self._entries, {"format": "pt"})
        fh.write(header)
        with open(self._spool_path, "rb") as src:
            while chunk := src.read(1 << 24):
                fh.write(chunk)
        os.unlink(self._spool_path)
        return len(header) + self._at

    def discard(self) -> None:
        self._spool.close()
        if self._spool_path.exists():
            os.unlink(self._spool_path)
