#!/usr/bin/env python3
"""Rebuild a Hugging Face LLaMA directory from a LLaMA GGUF file.

    python scripts/hf_from_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf

Every tensor is dequantized with smolq's C kernel to float32 (so a quantized
GGUF becomes an "f32" checkpoint holding exactly the values llama.cpp
decodes), Q/K rows go back from ggml's interleaved RoPE order to HF's
rotate-half order (smolq.arch.llama.unpermute_qk), config.json comes
from the GGUF metadata, and a GPT-2 byte-level BPE tokenizer.json is built
from tokenizer.ggml.tokens/merges with the `tokenizers` package.

Only tokenizer.ggml.model "gpt2" with a known pre-tokenizer is rebuilt (see
PRE_TOKENIZERS); anything else is refused rather than guessed, unless
--no-tokenizer is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from smolq.arch.llama import _LAYER_TENSORS, unpermute_qk
from smolq.errors import FormatError, InputError

# llama.cpp token types (llama-vocab.h): 3 control, 4 user-defined -> added special tokens.
SPECIAL_TOKEN_TYPES = (3, 4)
SHARD_BYTES = 256 << 20  # float32 shards of about this size

# tokenizer.ggml.pre -> the HF pre-tokenizer that splits as llama.cpp's regexes do
# (llama-vocab.cpp: "smollm" = \p{N} then the GPT-2 regex; "gpt2"/"default" = the GPT-2 regex).
PRE_TOKENIZERS = {
    "smollm": ("digits", "bytelevel"),
    "gpt2": ("bytelevel",),
    "default": ("bytelevel",),
}

_GGUF_TO_HF_LAYER = {gg: hf for hf, gg in _LAYER_TENSORS}
_TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


# --------------------------------------------------------------------------- metadata


def _meta(gf, key: str, default: Any = None, required: bool = True) -> Any:
    if key in gf.metadata:
        return gf.metadata[key].to_python()
    if required and default is None:
        raise FormatError(gf.path, f"metadata key {key} is missing")
    return default


def hf_config(gf) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from a GGUF's llama.* metadata."""
    arch = _meta(gf, "general.architecture")
    if arch != "llama":
        raise FormatError(gf.path, f"only LLaMA GGUF files can be rebuilt, not {arch!r}")
    a = "llama"
    n_embd = int(_meta(gf, f"{a}.embedding_length"))
    n_head = int(_meta(gf, f"{a}.attention.head_count"))
    n_head_kv = int(_meta(gf, f"{a}.attention.head_count_kv", n_head))
    head_dim = int(_meta(gf, f"{a}.attention.key_length", n_embd // n_head))
    n_rot = int(_meta(gf, f"{a}.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise FormatError(gf.path, f"partial RoPE ({n_rot} of {head_dim} dims) has no LlamaConfig equivalent")
    if f"{a}.rope.freq_base" not in gf.metadata:
        raise FormatError(gf.path, f"{a}.rope.freq_base is missing; refusing to guess the RoPE base")
    if f"{a}.rope.scaling.type" in gf.metadata:
        raise FormatError(gf.path, "RoPE scaling is not rebuilt by this helper")
    names = {t.name for t in gf.tensors}
    embd = gf.tensor("token_embd.weight")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embd.shape[0]),
        "hidden_size": n_embd,
        "intermediate_size": int(_meta(gf, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_meta(gf, f"{a}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_meta(gf, f"{a}.context_length")),
        "rms_norm_eps": float(_meta(gf, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(gf, f"{a}.rope.freq_base")),  # both places: transformers 4 and 5 read one each
        "rope_parameters": {"rope_theta": float(_meta(gf, f"{a}.rope.freq_base")), "rope_type": "default"},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        v = _meta(gf, f"tokenizer.ggml.{key}", required=False)
        if v is not None:
            cfg[hf] = int(v)
    return cfg


# --------------------------------------------------------------------------- weights


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_TO_HF_LAYER:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF_LAYER[parts[2]]}"
    raise KeyError(gguf_name)


def hf_tensors(gf, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor, one at a time, Q/K unpermuted."""
    from smolq.sources.reference import tensor_to_float

    for entry in gf.tensors:
        try:
            name = hf_name(entry.name)
        except KeyError:
            raise FormatError(gf.path, f"tensor {entry.name} has no LlamaForCausalLM counterpart") from None
        w = np.ascontiguousarray(tensor_to_float(entry), dtype=np.float32)
        if entry.name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif entry.name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        yield name, np.ascontiguousarray(w)


def state_dict_from_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, HF state dict of float32 arrays) — for evaluating a GGUF in transformers."""
    from smolq.formats.gguf import read_gguf

    with read_gguf(path) as gf:
        cfg = hf_config(gf)
        return cfg, dict(hf_tensors(gf, cfg))


def _write_weights(tmp: Path, tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """Shards of about SHARD_BYTES plus the index: at most one shard in memory."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size, weight_map, files, total = 0, {}, [], 0

    def flush():
        nonlocal size
        if shards[-1]:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(tmp / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({k: fname for k in shards[-1]})
            shards[-1], size = {}, 0

    for name, w in tensors:
        if size and size + w.nbytes > SHARD_BYTES:
            flush()
        shards[-1][name] = w
        size += w.nbytes
        total += w.nbytes
    flush()
    n = len(files)
    renamed = {}
    for i, fname in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (tmp / fname).rename(tmp / final)
        renamed[fname] = final
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------- tokenizer


def _tokenizer(gf):
    """A `tokenizers.Tokenizer` equal to llama.cpp's GPT-2 BPE for this vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _meta(gf, "tokenizer.ggml.model")
    pre = _meta(gf, "tokenizer.ggml.pre", "default", required=False)
    if kind != "gpt2":
        raise FormatError(gf.path, f"tokenizer.ggml.model {kind!r}: only GPT-2 BPE vocabularies are rebuilt")
    if pre not in PRE_TOKENIZERS:
        raise FormatError(gf.path, f"tokenizer.ggml.pre {pre!r} is not in this helper's table {sorted(PRE_TOKENIZERS)}")
    tokens = _meta(gf, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _meta(gf, "tokenizer.ggml.merges")]
    types = _meta(gf, "tokenizer.ggml.token_type", [1] * len(tokens), required=False)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FormatError(gf.path, "tokenizer.ggml.tokens has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = {"digits": pre_tokenizers.Digits(individual_digits=True),
             "bytelevel": pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)}
    tok.pre_tokenizer = pre_tokenizers.Sequence([steps[s] for s in PRE_TOKENIZERS[pre]])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in SPECIAL_TOKEN_TYPES]
    tok.add_special_tokens(special)
    return tok


def _tokenizer_config(gf, cfg: dict[str, Any]) -> dict[str, Any]:
    tokens = _meta(gf, "tokenizer.ggml.tokens")
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "add_bos_token": bool(_meta(gf, "tokenizer.ggml.add_bos_token", False, required=False)),
           "add_eos_token": bool(_meta(gf, "tokenizer.ggml.add_eos_token", False, required=False)),
           "model_max_length": cfg["max_position_embeddings"]}
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                      ("unknown_token_id", "unk_token"), ("padding_token_id", "pad_token")):
        v = _meta(gf, f"tokenizer.ggml.{key}", required=False)
        if v is not None and 0 <= int(v) < len(tokens):
            out[name] = tokens[int(v)]
    template = _meta(gf, "tokenizer.chat_template", required=False)
    if template:
        out["chat_template"] = template
    return out


# --------------------------------------------------------------------------- driver


def hf_from_gguf(gguf_path: str | Path, out_dir: str | Path, *, tokenizer: bool = True) -> Path:
    """Write the HF directory; returns it. Output is atomic (temp dir, rename)."""
    from smolq.atomic import atomic_directory
    from smolq.formats.gguf import read_gguf

    out = Path(out_dir)
    with read_gguf(gguf_path) as gf:
        cfg = hf_config(gf)
        tok = _tokenizer(gf) if tokenizer else None
        with atomic_directory(out) as tmp:
            tmp = Path(tmp)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
            _write_weights(tmp, hf_tensors(gf, cfg))
            if tok is not None:
                tok.save(str(tmp / "tokenizer.json"))
                (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(gf, cfg), indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.add_argument("--no-tokenizer", action="store_true", help="weights and config only")
    args = p.parse_args(argv)
    try:
        out = hf_from_gguf(args.gguf, args.out_dir, tokenizer=not args.no_tokenizer)
    except (FormatError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
