"""The MLC-LLM sink: a model directory as `mlc_llm convert_weight` + `gen_config` leave it.

    out-dir/params_shard_<n>.bin    the arrays (formats.mlc.TensorCacheWriter)
    out-dir/tensor-cache.json       their records
    out-dir/mlc-chat-config.json    model_type, quantization, model_config, generation defaults
    out-dir/tokenizer.*             copied from the checkpoint

The whole directory is built beside OUT and renamed into place at the end
(smolq.atomic.atomic_directory): a failure leaves no half model. Running the
weights needs MLC-LLM's compiled model library for the same model and
quantization, which this does not build.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from smolq.atomic import atomic_directory
from smolq.errors import InputError
from smolq.formats.mlc import CACHE_JSON, CHAT_CONFIG, CHAT_CONFIG_VERSION, OLD_CACHE_JSON, TensorCacheWriter
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# mlc_llm/interface/gen_config.py: TOKENIZER_FILES, copied when present
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer_config.json")
# MLCChatConfig's system defaults (mlc_llm/protocol/mlc_chat_config.py), used where generation_config.json is silent
SYSTEM_DEFAULTS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "temperature": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 1.0}


@dataclass
class ParamGroup:
    """Arrays computed together (a quantized weight's q_weight and q_scale): (name, shape, dtype)
    each, and `load()` returning them in that order. Nothing is computed until the sink asks."""

    outputs: list[tuple[str, tuple[int, ...], str]]
    load: Callable[[], Sequence[Any]]
    source_elements: int = 0  # checkpoint elements it is made from (BitsPerParam's denominator)


def check_output_dir(out: Path, src: Path) -> None:
    """OUT replaces an earlier MLC output or is new; never an unrelated directory, a file or the input."""
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise InputError(out, "output is the input; choose another output directory")
    if out.is_file():
        raise InputError(out, "--format mlc writes a directory; OUT is a file")
    if out.is_dir() and any(out.iterdir()) and not any((out / n).exists() for n in (CACHE_JSON, OLD_CACHE_JSON)):
        raise InputError(out, "directory is not empty and holds no MLC-LLM weights; choose a new or empty directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(out, f"cannot write output: directory {parent} does not exist")


def chat_config(model_type: str, quantization: str, model_config: dict[str, Any], generation: dict[str, Any],
                tokenizer_files: list[str], tokenizer_info: dict[str, Any]) -> dict[str, Any]:
    """mlc-chat-config.json with MLCChatConfig's fields, conversation template "LM" (plain text)."""
    gen = {k: generation.get(k, SYSTEM_DEFAULTS[k]) for k in SYSTEM_DEFAULTS}
    bos, eos = gen["bos_token_id"], gen["eos_token_id"]
    return {
        "version": CHAT_CONFIG_VERSION,
        "model_type": model_type,
        "quantization": quantization,
        "model_config": model_config,
        "vocab_size": model_config["vocab_size"],
        "context_window_size": model_config["context_window_size"],
        "sliding_window_size": -1,
        "prefill_chunk_size": model_config["prefill_chunk_size"],
        "attention_sink_size": -1,
        "tensor_parallel_shards": model_config["tensor_parallel_shards"],
        "pipeline_parallel_stages": model_config["pipeline_parallel_stages"],
        "active_vocab_size": model_config["vocab_size"],
        "temperature": gen["temperature"],
        "presence_penalty": gen["presence_penalty"],
        "frequency_penalty": gen["frequency_penalty"],
        "repetition_penalty": gen["repetition_penalty"],
        "top_p": gen["top_p"],
        "tokenizer_files": tokenizer_files,
        "tokenizer_info": tokenizer_info,
        "conv_template": {
            "name": "LM", "system_template": "{system_message}", "system_message": "",
            "system_prefix_token_ids": [bos] if isinstance(bos, int) else [],
            "add_role_after_system_message": True, "roles": {"user": "", "assistant": ""},
            "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}",
                               "tool": "{tool_message}"},
            "messages": [], "seps": [""], "role_content_sep": "", "role_empty_sep": "", "stop_str": [],
            "stop_token_ids": [eos] if isinstance(eos, int) else list(eos),
            "strip_reasoning_in_history": False, "function_string": "", "use_function_calling": False,
        },
        "pad_token_id": gen["pad_token_id"],
        "bos_token_id": bos,
        "eos_token_id": eos,
        "model_task": "chat",
        "embedding_metadata": None,
    }


def write(out: Path, groups: Iterable[ParamGroup], config: dict[str, Any], tokenizer_dir: Path | None = None,
          on_param: Callable[[str, int], None] | None = None) -> int:
    """Write the MLC directory atomically, one group's load() at a time; returns the bytes written."""
    total_elements = 0
    with atomic_directory(out) as tmp:
        writer = TensorCacheWriter(tmp)
        for group in groups:
            arrays = group.load()
            for (name, shape, dtype), arr in zip(group.outputs, arrays, strict=True):
                if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
                    raise AssertionError(f"{name}: planned {shape} {dtype}, got {arr.shape} {arr.dtype}")
                writer.add(name, arr)
                if on_param is not None:
                    on_param(name, arr.nbytes)
            total_elements += group.source_elements
        writer.finish({"ParamSize": writer.n_arrays, "ParamBytes": float(writer.param_bytes),
                       "BitsPerParam": writer.param_bytes * 8.0 / max(total_elements, 1)})
        for name in config.get("tokenizer_files", []):
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        with open(tmp / CHAT_CONFIG, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
        size = sum(p.stat().st_size for p in tmp.iterdir())
    return size
