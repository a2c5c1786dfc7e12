"""HF checkpoint -> MLC-LLM weights (`--format mlc`), one parameter at a time.

    source (checkpoint.py) -> arch.mlc_params (MLC's names, fused q/k/v and gate/up)
    -> plan (formats.mlc.QUANTS: q4f16_1, q4f16_0, q3f16_1, q0f16)
    -> transform (transforms.mlc.group_quantize, MLC's float16 arithmetic)
    -> sink (sinks.mlc: params_shard_*.bin, tensor-cache.json, mlc-chat-config.json)

Every refusal (a family without an MLC model, an unknown quantization name, an
unrelated OUT directory, RoPE scaling MLC's LLaMA lacks) comes before anything
is written. Peak memory is a few copies of the largest source tensor.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from smolq.arch import Arch, MLCParam
from smolq.errors import InputError
from smolq.formats.mlc import MLCQuant, quantized_shapes
from smolq.lazy import lazy_module
from smolq.plan.targets import MLC_FORMAT, mlc_quant
from smolq.sinks.mlc import TOKENIZER_FILES, ParamGroup, chat_config, check_output_dir
from smolq.sinks.mlc import write as write_mlc
from smolq.sources.checkpoint import Checkpoint
from smolq.transforms.mlc import group_quantize

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

_DTYPE_BYTES = {"float16": 2, "float32": 4, "uint32": 4}


def plan_groups(arch: Arch, ckpt: Checkpoint, q: MLCQuant) -> list[tuple[MLCParam, ParamGroup]]:
    """Each MLC parameter with the arrays it becomes and how to compute them."""
    return [(p, ParamGroup(_outputs(p, q), _loader(p, q, ckpt),
                           sum(ckpt.tensors[s].n_elements for s in p.sources)))
            for p in arch.mlc_params()]


def _outputs(p: MLCParam, q: MLCQuant) -> list[tuple[str, tuple[int, ...], str]]:
    if p.kind == "norm" or not q.quantized:
        return [(f"{p.name}.weight", p.shape, q.model_dtype)]
    w, s = quantized_shapes(q, p.shape[0], p.shape[1], linear=p.kind == "linear")
    return [(f"{p.name}.q_weight", w, "uint32"), (f"{p.name}.q_scale", s, q.model_dtype)]


def _loader(p: MLCParam, q: MLCQuant, ckpt: Checkpoint) -> Callable[[], list[Any]]:
    sources = [ckpt.tensors[s] for s in p.sources]

    def load() -> list[Any]:
        if p.kind == "norm" or not q.quantized:  # the loader's concatenate(...).astype(model dtype)
            parts = [t.load().astype(q.model_dtype) for t in sources]
            return [parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)]
        done = [group_quantize(t.load(), q) for t in sources]  # rows are independent: fuse after
        words = np.concatenate([w for w, _ in done], axis=0) if len(done) > 1 else done[0][0]
        scales = np.concatenate([s for _, s in done], axis=0) if len(done) > 1 else done[0][1]
        if p.kind == "linear" and q.layout == "KN":
            words, scales = np.ascontiguousarray(words.T), np.ascontiguousarray(scales.T)
        return [words, scales]

    return load


def _tokenizer_info(src: Path) -> dict[str, Any]:
    """What MLC-LLM's Tokenizer.DetectTokenizerInfo reads from tokenizer.json's decoder."""
    info = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False, "strip_space_in_decode": False}
    try:
        decoder = json.loads((src / "tokenizer.json").read_text(encoding="utf-8")).get("decoder") or {}
    except (OSError, ValueError):
        return info
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("ByteLevel", "ByteFallback"):
            info["token_postproc_method"] = "byte_level" if kind == "ByteLevel" else "byte_fallback"
            break
    return info


def _generation_defaults(src: Path, config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json first, then config.json (gen_config's order)."""
    found: dict[str, Any] = {}
    path = src / "generation_config.json"
    if path.exists():
        try:
            found.update({k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if v is not None})
        except ValueError:
            pass
    for k, v in config.items():
        if v is not None:
            found.setdefault(k, v)
    return found


def convert_mlc(ckpt: Checkpoint, arch: Arch, out: Path, outtype: str | None, *, vocab_only: bool = False,
                dry_run: bool = False, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write MLC-LLM weights for `ckpt` into the directory `out`; returns the summary."""
    started = time.perf_counter()
    q = mlc_quant(outtype, out)
    if vocab_only:
        raise InputError(out, "--vocab-only has no MLC-LLM form (the tokenizer files travel with the weights)")
    check_output_dir(out, ckpt.path)
    model_config = arch.mlc_model_config()
    maps = arch.tensor_maps(set(ckpt.tensors))
    if getattr(ckpt, "linears", None):
        ckpt.drop_zero_biases({m.source for m in maps})
    arch.check_tensors(maps, ckpt.tensors, ckpt.file_of)
    planned = plan_groups(arch, ckpt, q)
    tokenizer_files = [n for n in TOKENIZER_FILES if (ckpt.path / n).is_file()]
    config = chat_config(arch.mlc_model_type, q.name, model_config, _generation_defaults(ckpt.path, ckpt.config),
                         tokenizer_files, _tokenizer_info(ckpt.path))
    summary = _summary(ckpt, arch, out, q, planned)
    if dry_run:
        summary["dry_run"] = True
        return summary
    if on_progress is not None:
        on_progress({"event": "start", "n_tensors": summary["n_tensors"], "n_bytes": summary["tensor_bytes"]})

    def on_param(name: str, nbytes: int) -> None:
        if on_progress is not None:
            on_progress({"event": "tensor", "name": name, "nbytes": nbytes})

    size = write_mlc(out, [g for _, g in planned], config, ckpt.path, on_param)
    summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
    if on_progress is not None:
        on_progress({"event": "done", "bytes": size})
    return summary


def _summary(ckpt: Checkpoint, arch: Arch, out: Path, q: MLCQuant, planned) -> dict[str, Any]:
    tensors = []
    for p, group in planned:
        for name, shape, dtype in group.outputs:
            tensors.append({"name": name, "source": ", ".join(p.sources),
                            "source_dtype": ckpt.tensors[p.sources[0]].dtype, "shape": list(shape),
                            "type": dtype, "bytes": int(np.prod(shape)) * _DTYPE_BYTES[dtype]})
    notes = list(arch.notes) + ["running these weights needs MLC-LLM's model library compiled for "
                                f"{arch.mlc_model_type} {q.name} (mlc_llm compile); smolq does not build it"]
    return {
        "source": str(ckpt.path), "output": str(out), "format": MLC_FORMAT,
        "architecture": arch.family, "hf_architecture": (ckpt.config.get("architectures") or [None])[0],
        "checkpoint": ckpt.kind, "outtype": q.name, "quantization": q.name, "n_tensors": len(tensors),
        "tensor_bytes": sum(t["bytes"] for t in tensors), "n_vocab": arch.n_vocab,
        "guesses": list(arch.guesses), "notes": notes, "warnings": [], "tensors": tensors,
        "n_quantized": sum(t["type"] == "uint32" for t in tensors),
    }
