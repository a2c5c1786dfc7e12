"""`smolq quantize ./hf-model OUT --format nf4|fp4`: the checkpoint transformers saves for
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=...).

    source (sources.checkpoint, lazy) -> plan (which tensors: the Linear weights of the decoder
    blocks, as transformers replaces them; embeddings, norms, lm_head and biases stay in the
    compute dtype) -> transform (transforms.bnb, the C kernel) -> sink (sinks.bnb, atomic)
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from smolq.arch import arch_for_config
from smolq.errors import InputError
from smolq.formats.bnb_ckpt import BNB_DTYPES, quantization_config
from smolq.lazy import lazy_module
from smolq.pipeline.convert import open_source
from smolq.progress import WorkProgress
from smolq.sinks import bnb as bnb_sink
from smolq.transforms.bnb import quantize_weight, torch_reduction

np = lazy_module("numpy")

BNB_FORMATS = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# A Linear weight inside a decoder block (LLaMA model.layers.N, GPT-J transformer.h.N, MPT transformer.blocks.N).
_BLOCK_LINEAR = re.compile(r"^(model\.layers|transformer\.h|transformer\.blocks)\.\d+\..+\.weight$")


def is_quantized_name(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and bool(_BLOCK_LINEAR.match(name))


def _model_dtype(config: dict[str, Any], ckpt: Any) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is None:
        stored = {t.dtype for t in ckpt.tensors.values()}
        dtype = next((k for k, v in BNB_DTYPES.items() if {v} == stored), "float32")
    if dtype not in BNB_DTYPES:
        raise InputError(ckpt.path / "config.json", f"dtype {dtype!r}: bitsandbytes computes in "
                                                    f"{', '.join(BNB_DTYPES)}")
    return dtype


def _as_dtype(x: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """Float values cast to the compute dtype (round to nearest even), as torch's .to(dtype) does."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32), "F32"
    if dtype == "float16":
        return np.ascontiguousarray(x).astype(np.float16), "F16"
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16), "BF16"


def _as_f32(a: np.ndarray, st: str) -> np.ndarray:
    if st == "BF16":
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float32)


def quantize_hf_bnb(src: Path, out: Path, *, quant_type: str, double_quant: bool = True, blocksize: int = 64,
                    threads: int = 0, dry_run: bool = False, quiet: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    if quant_type not in BNB_FORMATS:
        raise InputError(None, f"unknown bitsandbytes type {quant_type!r}; choose nf4 or fp4")
    if blocksize not in BLOCKSIZES:
        raise InputError(None, f"--blocksize {blocksize}: bitsandbytes takes {', '.join(map(str, BLOCKSIZES))}")
    lanes, torch_threads = torch_reduction()
    with open_source(src) as ckpt:
        arch_for_config(ckpt.config, ckpt.path / "config.json")  # a family smolq knows, or one line
        dtype = _model_dtype(ckpt.config, ckpt)
        rows, groups = [], []
        for name, t in ckpt.tensors.items():
            quant = is_quantized_name(name, tuple(t.shape))
            n = int(np.prod(t.shape, dtype=np.int64))
            nbytes = (n + 1) // 2 if quant else n * (4 if dtype == "float32" else 2)
            rows.append({"name": name, "shape": list(t.shape), "source_type": t.dtype,
                         "type": quant_type.upper() if quant else BNB_DTYPES[dtype], "bytes": nbytes})

            def load(name=name, t=t, quant=quant) -> dict[str, tuple[Any, str | None]]:
                values, st = _as_dtype(t.load(), dtype)
                if not quant:
                    return {name: (values, st)}
                parts = quantize_weight(_as_f32(values, st), quant_type, blocksize, double_quant, dtype,
                                        lanes, torch_threads, threads)
                return {name + suffix: (a, None) for suffix, a in parts.items()}

            groups.append((name, load))
        config = dict(ckpt.config)
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config["quantization_config"] = quantization_config(quant_type, double_quant, dtype)
        summary = {
            "source": str(src), "output": str(out), "input_format": "hf", "format": quant_type, "method": "rtn",
            "preset": quant_type, "double_quant": double_quant, "blocksize": blocksize, "dtype": dtype,
            "n_tensors": len(rows), "n_quantized": sum(r["type"] == quant_type.upper() for r in rows),
            "tensor_bytes": sum(r["bytes"] for r in rows), "notes": [], "tensors": rows,
        }
        if dry_run:
            summary["dry_run"] = True
            return summary
        with WorkProgress(len(groups), summary["tensor_bytes"], "quantize", quiet=quiet) as bar:
            def on_tensor(name: str, size: int) -> None:
                bar.start(name)
                bar.done(size)

            size = bnb_sink.write(out, ckpt.path, config, groups, on_tensor=on_tensor)
    summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
    return summary
