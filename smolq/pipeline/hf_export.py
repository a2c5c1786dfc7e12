"""A GGUF or legacy model file -> a Hugging Face checkpoint directory (`convert FILE OUT --format hf`).

    source (formats.detect.open_model; sources.model_file.describe: the family
       bound to the config its config_from_gguf / config_from_legacy recovers;
       sources.vocab_recovery: the vocabulary)
    -> plan (plan.targets: which families can go back, --outtype, shard size;
       here: each GGUF tensor's HF name, from the family's tensor maps)
    -> transform (each tensor dequantized by the C kernel, the family's
       inverse row transform: LLaMA's Q/K permutation undone)
    -> sink (sinks.hf: safetensors shards + index, config.json,
       generation_config.json, tokenizer.json / tokenizer_config.json from
       sources.hf_tokenizer), one tensor's load() at a time, atomically.

The weights are the values llama.cpp decodes from the file, so transformers
on the directory (at --outtype f32) computes what llama.cpp computes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from smolq.arch import Arch, TensorMap, arch_for_config
from smolq.arch.legacy_config import Guess
from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.formats.detect import open_model
from smolq.plan.targets import HF_FORMAT, hf_outtype, resolve_target, shard_bytes
from smolq.sinks import hf as hf_sink
from smolq.sinks.hf import DTYPES, TORCH_DTYPES, HFTensor
from smolq.sources.gptq import open_gptq_checkpoint
from smolq.sources.hf_tokenizer import hf_tokenizer, sentencepiece_model, special_tokens_map, tokenizer_config
from smolq.sources.model_file import describe, family_of, format_of
from smolq.sources.reference import tensor_to_float
from smolq.sources.vocab import Vocab
from smolq.sources.vocab_recovery import recover_vocab

__all__ = ["export_hf", "hf_tensors"]


def hf_tensors(arch: Arch, tensors: dict[str, TensorEntry], tied: bool, path: Path) -> list[tuple[HFTensor, TensorEntry]]:
    """(HF tensor, its source entry) for every tensor of the file, in the family's order.
    A tensor the family has no HF name for is refused; a tied output.weight (legacy
    LLaMA and MPT GGUF files store the embedding's copy: a map with no GGUF name, or one
    whose HF source is already written) is dropped, as transformers ties it back."""
    if "rope_freqs.weight" in tensors:
        raise InputError(path, "rope_freqs.weight (Llama 3.1 RoPE scaling) holds per-frequency factors, not the "
                               "rope_parameters transformers needs (factor, low/high_freq_factor, original context); "
                               "export from the original checkpoint's config instead")
    maps: list[TensorMap] = arch.tensor_maps(set() if tied else {"lm_head.weight"})
    out, used, written = [], set(), set()
    for m in maps:
        if m.gguf is None or m.source in written:  # the tied output: the embedding again
            if (m.gguf or "output.weight") in tensors:
                used.add(m.gguf or "output.weight")
            continue
        entry = tensors.get(m.gguf)
        if entry is None:
            raise FormatError(path, f"tensor {m.gguf} is missing")
        if tuple(entry.shape) != tuple(m.shape):
            raise FormatError(path, f"tensor {m.gguf} has shape {tuple(entry.shape)}, the config says {tuple(m.shape)}")
        used.add(m.gguf)
        written.add(m.source)
        out.append((HFTensor(m.source, tuple(m.shape), _loader(entry, m)), entry))
    extra = sorted(set(tensors) - used)
    if extra:
        raise FormatError(path, f"tensor {extra[0]} has no counterpart in {arch.hf_architectures[0]}"
                                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return out


def _loader(entry: TensorEntry, m: TensorMap) -> Callable[[], Any]:
    def load():
        x = tensor_to_float(entry)
        return m.inverse(x) if m.inverse is not None else x

    return load


def _config(arch: Arch, vocab: Vocab, dtype: str) -> dict[str, Any]:
    cfg = arch.hf_config()
    for kind in ("bos", "eos", "pad"):
        if kind in vocab.special_ids:
            cfg[f"{kind}_token_id"] = vocab.special_ids[kind]
    cfg["torch_dtype"] = cfg["dtype"] = TORCH_DTYPES[dtype]  # transformers 4 reads one, 5 the other
    return cfg


def _generation_config(vocab: Vocab) -> dict[str, Any]:
    gen = {f"{k}_token_id": vocab.special_ids[k] for k in ("bos", "eos", "pad") if k in vocab.special_ids}
    return {**gen, "_from_model_config": True}


def export_hf(src_path: str | os.PathLike, out_path: str | os.PathLike, outtype: str | None = None,
              max_shard_size: int | str | None = None, tokenizer: bool = True, dry_run: bool = False,
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write the checkpoint directory `out_path`; returns the summary (convert's shape).

    outtype: f32, f16 or bf16; None: the file's float type when every matrix has
    the same one, else f16. max_shard_size: bytes or "5GB" (default 5GB).
    tokenizer=False: weights and config only.
    """
    started = time.perf_counter()
    src, out = Path(src_path), Path(out_path)
    limit = shard_bytes(max_shard_size, out)
    model = open_model(src)
    try:
        family = family_of(model)
        if family is None:  # a GGUF architecture smolq has no family module for
            raise InputError(out, f"--format hf: {model.architecture} cannot be written as a transformers "
                                  "checkpoint by smolq (it has no family module for it)")
        resolve_target(HF_FORMAT, out, family=family)
        hf_sink.check_output_dir(out, src)
        source = describe(model, {}, None)
        arch = source.arch
        guesses: list[Guess] = list(source.guesses)
        notes = list(source.notes) + list(arch.notes)
        pairs = hf_tensors(arch, source.tensors, source.tied, src)
        dtype = hf_outtype(outtype, [e.type for _, e in pairs if len(e.shape) > 1], out)
        vocab = recover_vocab(model, arch, {}, None, guesses, notes)
        tok = hf_tokenizer(vocab, src) if tokenizer else None
        if tok is not None and vocab.model == "gpt2" and not vocab.merges:
            notes.append("tokenizer.json's BPE merges rebuilt from the vocabulary's order (the file stores none)")
        json_files: dict[str, Any] = {"config.json": _config(arch, vocab, dtype),
                                      "generation_config.json": _generation_config(vocab)}
        if tok is not None:
            tok_cfg = tokenizer_config(vocab, arch.n_ctx)
            json_files.update({"tokenizer_config.json": tok_cfg, "special_tokens_map.json": special_tokens_map(tok_cfg)})
        summary = _summary(src, out, model, dtype, pairs, vocab, guesses, notes, arch, limit)
        if dry_run:
            summary["dry_run"] = True
            return summary
        _emit(on_progress, event="start", n_tensors=len(pairs), n_bytes=summary["tensor_bytes"])

        def on_tensor(t: HFTensor) -> None:
            _emit(on_progress, event="tensor", name=t.name, nbytes=t.nbytes(dtype))

        raw_files = {"tokenizer.model": sentencepiece_model(vocab)} if tok is not None and vocab.model == "llama" else {}
        size = hf_sink.write(out, [t for t, _ in pairs], dtype, limit, json_files=json_files, tokenizer=tok,
                             raw_files=raw_files, on_tensor=on_tensor)
        summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
        _emit(on_progress, event="done", bytes=size)
        return summary
    finally:
        model.close()


# Files of a GPTQ checkpoint that describe the tokenizer and generation: copied as they are.
GPTQ_KEPT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def export_gptq_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str | None = None,
                   max_shard_size: int | str | None = None, dry_run: bool = False,
                   on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """A GPTQ checkpoint directory -> the plain checkpoint of its dequantized weights.

    Each GPTQ Linear is written as the weight its grid stands for (sources/gptq.py
    dequantizes by the checkpoint's own zero convention and g_idx); everything else is
    copied in the chosen float type. config.json loses its quantization_config; the
    tokenizer and generation files are copied. outtype: f32, f16 or bf16 (default f16).
    """
    started = time.perf_counter()
    src, out = Path(src_dir), Path(out_path)
    limit = shard_bytes(max_shard_size, out)
    dtype = hf_outtype(outtype, (), out)  # default f16, as GPTQ checkpoints keep the rest
    hf_sink.check_output_dir(out, src)
    with open_gptq_checkpoint(src) as ckpt:
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        ckpt.drop_zero_biases({m.source for m in arch.tensor_maps(set(ckpt.tensors))})
        tensors = [HFTensor(name, tuple(st.shape), st.load) for name, st in ckpt.tensors.items()]
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        config["torch_dtype"] = TORCH_DTYPES[dtype]
        rows = [{"name": t.name, "source": t.name, "shape": list(t.shape), "type": DTYPES[dtype][0],
                 "bytes": t.nbytes(dtype), "source_dtype": "GPTQ" if t.name in ckpt.linears else ckpt.tensors[t.name].dtype}
                for t in tensors]
        summary = {"source": str(src), "source_format": "gptq", "output": str(out), "format": HF_FORMAT,
                   "architecture": (ckpt.config.get("architectures") or [arch.family])[0], "outtype": dtype,
                   "n_tensors": len(rows), "tensor_bytes": sum(r["bytes"] for r in rows), "tensors": rows,
                   "files": hf_sink.shard_names(len(hf_sink.plan_shards(tensors, dtype, limit))),
                   "bytes": None, "seconds": None, "guesses": [], "notes": list(ckpt.notes)}
        if dry_run:
            summary["dry_run"] = True
            return summary
        _emit(on_progress, event="start", n_tensors=len(tensors), n_bytes=summary["tensor_bytes"])
        kept = {name: (src / name).read_bytes() for name in GPTQ_KEPT_FILES if (src / name).is_file()}
        size = hf_sink.write(out, tensors, dtype, limit, json_files={"config.json": config}, raw_files=kept,
                             on_tensor=lambda t: _emit(on_progress, event="tensor", name=t.name, nbytes=t.nbytes(dtype)))
    summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
    _emit(on_progress, event="done", bytes=size)
    return summary


def _emit(on_progress, **event) -> None:
    if on_progress is not None:
        on_progress(event)


def _summary(src: Path, out: Path, model, dtype: str, pairs, vocab: Vocab, guesses: list[Guess], notes: list[str],
             arch: Arch, limit: int) -> dict[str, Any]:
    rows = [{"name": t.name, "source": e.name, "source_dtype": e.type.name, "shape": list(t.shape),
             "type": DTYPES[dtype][0], "bytes": t.nbytes(dtype)} for t, e in pairs]
    n_shards = len(hf_sink.plan_shards([t for t, _ in pairs], dtype, limit))
    return {
        "source": str(src), "source_format": format_of(model), "output": str(out), "format": HF_FORMAT,
        "architecture": arch.hf_architectures[0], "outtype": dtype, "n_tensors": len(rows),
        "tensor_bytes": sum(r["bytes"] for r in rows), "n_vocab": len(vocab), "tokenizer": vocab.model,
        "files": hf_sink.shard_names(n_shards), "tensors": rows, "bytes": None, "seconds": None,
        "guesses": [f"{g.key} = {g.as_dict()['value']} ({g.why})" for g in guesses], "notes": notes,
    }
