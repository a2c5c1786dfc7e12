"""Tiny random Hugging Face checkpoints, made offline, for tests and demos.

`make_tiny_model("llama", out_dir)` writes a directory that looks like a real
checkpoint of that family (config.json, safetensors or pytorch .bin shards
with an index, a tokenizer) but holds a 2-layer model with hidden size 64.
Everything is deterministic for a seed: the weights come from a seeded
generator and the tokenizers are built from a fixed text by a fixed
procedure, so two runs write identical tensors and vocabularies.

Weights are drawn with a scale that gives logits of order one (not the
0.02-std initialisation of a fresh model, whose logits are nearly flat), and
norm weights and biases are not the trivial 1 / 0, so that a converter that
drops a bias or a norm weight changes the logits visibly.

Legacy GPT4All loaders recognise a family by its vocabulary size; pass
`vocab_size="legacy"` to get LLaMA 32000, GPT-J 50400 or MPT 50432 (the
tokenizer is padded with pieces no input ever produces).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Mapping

FAMILIES = ("llama", "gptj", "mpt", "mistral", "qwen2", "qwen3", "gemma3")
# Families with LLaMA's block (RMSNorm, SwiGLU, RoPE, GQA); Mistral has LLaMA's SentencePiece tokenizer.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_VOCAB = {"llama": 384, "gptj": 320, "mpt": 320, "mistral": 384, "qwen2": 384, "qwen3": 384, "gemma3": 384}
LEGACY_VOCAB = {"llama": 32000, "gptj": 50400, "mpt": 50432}
TINY_CONTEXT = 128
LLAMA_ROPE_THETA = 50000.0  # deliberately not a common default, so a dropped RoPE base shows
QWEN_ROPE_THETA = 1000000.0  # Qwen2.5's and Qwen3's
# Llama 3.1's RoPE scaling (rope_type llama3; llama.cpp writes it as the rope_freqs tensor), with a
# short original context so that the tiny head size has factors of all three kinds.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LLAMA_N_MULT = 32  # legacy LLaMA headers store n_mult; intermediate_size is rebuilt from it

# A fixed text for the tokenizers: a few paragraphs of plain English with
# digits, punctuation, newlines and a little non-ASCII, so byte fallback and
# multi-byte pieces occur.
TINY_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model is still a model:
it has an embedding, a few layers of attention and a feed-forward network,
and a head that turns the last hidden state into one score per token.
Converting a checkpoint means reading each tensor, renaming it, sometimes
permuting its rows, and writing it in the layout that the loader expects.
Quantization keeps the shape of a tensor but stores its numbers in blocks
of 32 or 256 values with a shared scale. Rounding to the nearest level is
the simplest method; GPTQ corrects the error of each column in the columns
that follow. In 2023 the files were called ggml, ggmf and ggjt; later GGUF
replaced them with a self-describing header of keys and values.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 3.14159 -7 +12 50% $5.
Punctuation: ( ) [ ] { } < > / \\ | @ # & * _ = ~ ` ^ ' " ; : ! ? , .
Accents and symbols: café, naïve, über, résumé, 東京, Ελληνικά, — and … too.
Tokenizers split text into pieces; frequent pieces become single tokens,
rare ones fall back to bytes. The dog sleeps while the fox runs again.
"""

Family = Literal["llama", "gptj", "mpt", "mistral", "qwen2", "qwen3", "gemma3"]
BpeStyle = Literal["llama3", "qwen2"]


def make_tiny_model(
    family: Family,
    out_dir: str | Path,
    *,
    gqa: bool = False,
    tied: bool = False,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    shards: int = 1,
    weights: Literal["safetensors", "bin"] = "safetensors",
    vocab_size: int | Literal["legacy"] | None = None,
    seed: int = 0,
    rope_params_style: Literal["top", "nested"] = "nested",
    hidden_size: int = 64,
    n_layers: int = 2,
    config_overrides: Mapping[str, Any] | None = None,
    legacy_buffers: bool = False,
    bpe: BpeStyle | None = None,
    llama3_rope: bool = False,
) -> Path:
    """Write a tiny random checkpoint of `family` into `out_dir` and return it.

    gqa: LLaMA only; 8 query heads share 2 KV heads (8 // 2 != 2, so a K
        permutation keyed on n_head // n_head_kv is caught). Gemma 3 always
        has 4 query heads over 2 KV heads.
    tied: LLaMA and Gemma 3 (tie_word_embeddings, no lm_head in the checkpoint).
        MPT is always tied; GPT-J never is.
    shards: number of weight files (an index json is written when > 1).
    weights: "safetensors" (via save_pretrained) or "bin" (torch.save).
    rope_params_style: LLaMA: "nested" keeps rope_theta inside
        rope_parameters (transformers 5); "top" writes it at the top level
        of config.json as transformers 4 did. Gemma 3: "top" writes
        rope_theta, rope_local_base_freq, rope_scaling and
        sliding_window_pattern (transformers 4) instead of the per-layer-type
        rope_parameters and layer_types.
    config_overrides: extra config fields (e.g. {"attn_config": {...}} for
        MPT clip_qkv, or n_heads) applied before the model is built.
    legacy_buffers: GPT-J only; add the attn.bias / attn.masked_bias
        buffers that old GPT-J checkpoints carry (converters must skip them).
    bpe: LLaMA/Mistral: a byte-level BPE tokenizer instead of SentencePiece,
        "llama3" (Llama 3's pre-tokenizer, BOS added, <|begin_of_text|> ...)
        or "qwen2"; Qwen2/Qwen3 always get "qwen2" (<|im_start|> ...).
    llama3_rope: LLaMA: Llama 3.1's RoPE scaling (LLAMA3_ROPE).
    Mistral, Qwen2 and Qwen3 use GQA (4 query heads, 2 KV heads); Qwen3
    has head_dim 32, not hidden_size / heads, as its real models do.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if gqa and family != "llama":
        raise ValueError("gqa is only available for llama (the other LLaMA-like families always have it)")
    if (bpe or llama3_rope) and family not in ("llama", "mistral"):
        raise ValueError("bpe and llama3_rope are options of llama and mistral")
    if llama3_rope:
        config_overrides = {**(config_overrides or {}), "rope_parameters": dict(LLAMA3_ROPE)}
    if tied and family == "gptj":
        raise ValueError("GPT-J checkpoints are never tied (lm_head has its own weight and bias)")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _resolve_vocab_size(family, vocab_size)

    config = _build_config(family, n_vocab, hidden_size, n_layers, gqa, tied, config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _fill_weights(model, seed)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

    if weights == "safetensors":
        _save_safetensors(model, out, shards)
    elif weights == "bin":
        model.config.save_pretrained(out)
        _save_bin(_checkpoint_state_dict(model), out, shards)
    else:
        raise ValueError(f"weights must be 'safetensors' or 'bin', not {weights!r}")
    if legacy_buffers:
        if family != "gptj":
            raise ValueError("legacy_buffers is only meaningful for gptj")
        _add_gptj_legacy_buffers(out, config)
    if family in LLAMA_LIKE:
        _rewrite_rope_params(out / "config.json", rope_params_style)
    style = bpe or ("qwen2" if family in ("qwen2", "qwen3") else None)
    if style is not None:
        _write_chat_bpe_tokenizer(out, style, n_vocab, config, jinja_file=family == "qwen3")
    elif family in LLAMA_LIKE:
        write_llama_tokenizer(out, n_vocab)
    elif family == "gemma3":
        _gemma3_transformers4_config(out / "config.json", rope_params_style)
        _write_gemma_tokenizer(out, n_vocab)
    else:
        _write_bpe_tokenizer(out, family, n_vocab)
    return out


def _resolve_vocab_size(family: str, vocab_size: int | str | None) -> int:
    if vocab_size is None:
        return DEFAULT_VOCAB[family]
    if vocab_size == "legacy":
        return LEGACY_VOCAB[family]
    n = int(vocab_size)
    floor = 300 if family in LLAMA_LIKE + ("gemma3",) else 280  # room for bytes, specials and a few merges
    if n < floor:
        raise ValueError(f"vocab_size {n} is too small for {family} (minimum {floor})")
    return n


# --------------------------------------------------------------------------- configs


def _build_config(family, n_vocab, hidden, n_layers, gqa, tied, overrides):
    from transformers import GPTJConfig, LlamaConfig, MptConfig

    overrides = dict(overrides or {})
    if family in ("mistral", "qwen2", "qwen3"):
        return _build_gqa_config(family, n_vocab, hidden, n_layers, tied, overrides)
    if family == "gemma3":
        return _gemma3_config(n_vocab, hidden, n_layers, tied, overrides)
    if family == "llama":
        n_head, n_kv = (8, 2) if gqa else (4, 4)
        kwargs = dict(
            vocab_size=n_vocab,
            hidden_size=hidden,
            intermediate_size=_llama_ffn_size(hidden, LLAMA_N_MULT),
            num_hidden_layers=n_layers,
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            max_position_embeddings=TINY_CONTEXT,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": LLAMA_ROPE_THETA},
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["LlamaForCausalLM"],
        )
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)
    if family == "gptj":
        eot = _bpe_layout("gptj", n_vocab)["eot_id"]
        kwargs = dict(
            vocab_size=n_vocab,
            n_positions=TINY_CONTEXT,
            n_embd=hidden,
            n_layer=n_layers,
            n_head=4,
            rotary_dim=hidden // 4 // 2,  # partial rotary: half of each 16-wide head
            layer_norm_epsilon=1e-5,
            activation_function="gelu_new",
            bos_token_id=eot,
            eos_token_id=eot,
            tie_word_embeddings=False,
            architectures=["GPTJForCausalLM"],
        )
        kwargs.update(overrides)
        return GPTJConfig(**kwargs)
    attn = {"alibi": True, "alibi_bias_max": 8, "clip_qkv": None, "attn_impl": "torch"}
    attn.update(overrides.pop("attn_config", {}))
    kwargs = dict(
        d_model=hidden,
        n_heads=4,
        n_layers=n_layers,
        expansion_ratio=4,
        max_seq_len=TINY_CONTEXT,
        vocab_size=n_vocab,
        layer_norm_epsilon=1e-5,
        no_bias=True,
        attn_config=attn,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["MPTForCausalLM"],
    )
    kwargs.update(overrides)
    return MptConfig(**kwargs)


def _build_gqa_config(family, n_vocab, hidden, n_layers, tied, overrides):
    """Mistral / Qwen2 / Qwen3 configs as their real models have them (GQA, their RoPE bases and
    token ids; Mistral's 4096 sliding window, longer than the tiny context)."""
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    qwen = family != "mistral"
    special = _qwen_specials(n_vocab) if qwen else {"bos_token_id": 1, "eos_token_id": 2}
    kwargs = dict(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=_llama_ffn_size(hidden, LLAMA_N_MULT),
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT, rms_norm_eps=1e-6 if qwen else 1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA if qwen else LLAMA_ROPE_THETA},
        tie_word_embeddings=tied, architectures=[{"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                  "qwen3": "Qwen3ForCausalLM"}[family]],
        **special,
    )
    if family == "mistral":
        kwargs.update(sliding_window=4096)
    else:
        kwargs.update(use_sliding_window=False, sliding_window=None)
    if family == "qwen3":
        kwargs.update(head_dim=2 * hidden // 4, attention_bias=False)
    kwargs.update(overrides)
    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(**kwargs)


def _qwen_specials(n_vocab: int) -> dict[str, int]:
    """Qwen's config.json ids: bos <|endoftext|>, eos <|im_end|> (at their tiny ids, see chat_bpe_layout)."""
    ids = chat_bpe_layout("qwen2", n_vocab)["added_ids"]
    return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}


GEMMA3_ROPE_THETA = (60000.0, 5000.0)  # (global, local): not Gemma 3's own, so a dropped base shows
GEMMA3_SLIDING_WINDOW = 5  # shorter than the test sequences, so the local layers' window matters


def _gemma3_config(n_vocab, hidden, n_layers, tied, overrides):
    """A Gemma3TextConfig: 4 query heads over 2 KV heads of width 16 (head_dim != hidden / heads
    would be allowed; here it is equal), query_pre_attn_scalar = head_dim (what llama.cpp
    assumes), the default layer pattern (every 6th layer global: 6 layers give both kinds)."""
    from transformers import Gemma3TextConfig

    glob, local = GEMMA3_ROPE_THETA
    head_dim = hidden // 4
    kwargs = dict(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=TINY_CONTEXT, rms_norm_eps=1e-6, sliding_window=GEMMA3_SLIDING_WINDOW,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": glob},
                         "sliding_attention": {"rope_type": "default", "rope_theta": local}},
        tie_word_embeddings=tied, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        architectures=["Gemma3ForCausalLM"],
    )
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


def _gemma3_transformers4_config(config_path: Path, style: str) -> None:
    """Rewrite a Gemma 3 config.json in transformers 4's layout (style "top")."""
    if style == "nested":
        return
    if style != "top":
        raise ValueError(f"rope_params_style must be 'top' or 'nested', not {style!r}")
    cfg = json.loads(config_path.read_text())
    params = cfg.pop("rope_parameters")
    full, local = params["full_attention"], params["sliding_attention"]
    cfg["rope_theta"], cfg["rope_local_base_freq"] = full["rope_theta"], local["rope_theta"]
    scaled = full.get("rope_type") == "linear"
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": full["factor"]} if scaled else None
    types = cfg.pop("layer_types")
    pattern = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
    if types != ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(types))]:
        raise ValueError("layer_types has no sliding_window_pattern form")
    cfg["sliding_window_pattern"] = pattern
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _llama_ffn_size(n_embd: int, n_mult: int) -> int:
    """n_ff as legacy LLaMA loaders rebuild it from n_mult (formats.md 2.1)."""
    return ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult


def _rewrite_rope_params(config_path: Path, style: str) -> None:
    """Move rope_theta to the top level, as configs saved by transformers 4 have it."""
    if style == "nested":
        return
    if style != "top":
        raise ValueError(f"rope_params_style must be 'top' or 'nested', not {style!r}")
    cfg = json.loads(config_path.read_text())
    params = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = params.pop("rope_theta", LLAMA_ROPE_THETA)
    cfg["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- weights


def _fill_weights(model, seed: int) -> None:
    """Overwrite every parameter from a seeded generator, in name order.

    Matrices get std 1/sqrt(fan_in) (logits of order one); embeddings std
    2/sqrt(hidden) (a tied head then gives logits of std ~2, not ~sqrt(hidden));
    norm weights 1 + 0.1·N(0,1); biases 0.1·N(0,1).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.1 * noise
            elif param.ndim == 1:
                value = 1.0 + 0.1 * noise
            elif _is_embedding(name):
                value = noise * (2.0 / math.sqrt(param.shape[1]))
            else:
                value = noise / math.sqrt(param.shape[1])
            param.copy_(value)


def _is_embedding(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "wte.weight"))


def _checkpoint_state_dict(model) -> dict:
    """The tensors a checkpoint holds: persistent ones, tied lm_head left out."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


def _shard_limit(state: Mapping[str, Any], shards: int) -> int:
    """A max_shard_size for which transformers' splitter makes `shards` files
    (or as close as whole tensors allow): start at total/shards and grow."""
    from huggingface_hub import split_torch_state_dict_into_shards

    total = sum(t.numel() * t.element_size() for t in state.values())
    limit = max(1, math.ceil(total / shards))
    while limit < total:
        plan = split_torch_state_dict_into_shards(state, max_shard_size=limit)
        if len(plan.filename_to_tensors) <= shards:
            break
        limit = int(limit * 1.05) + 1
    return limit


def _save_safetensors(model, out: Path, shards: int) -> None:
    from transformers.utils import logging as hf_logging

    state = _checkpoint_state_dict(model)
    limit = _shard_limit(state, shards) if shards > 1 else "50GB"
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # tests and the demo print their own progress
    try:
        model.save_pretrained(out, max_shard_size=limit)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_bin(state: dict, out: Path, shards: int) -> None:
    """pytorch_model.bin (or -0000i-of-0000n.bin shards with an index), as transformers 4 wrote them."""
    import torch

    groups = _split_evenly(list(state.items()), shards)
    if len(groups) == 1:
        torch.save(dict(groups[0]), out / "pytorch_model.bin")
        return
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        fname = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save(dict(group), out / fname)
        for name, tensor in group:
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _split_evenly(items: list, n: int) -> list[list]:
    n = min(n, len(items))
    size = math.ceil(len(items) / n)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _add_gptj_legacy_buffers(out: Path, config) -> None:
    """Old GPT-J checkpoints store the causal mask and masked_bias per layer."""
    import torch

    n = config.n_positions
    extra = {}
    for layer in range(config.n_layer):
        mask = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        extra[f"transformer.h.{layer}.attn.bias"] = mask
        extra[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e9)
    fname = "pytorch_model-legacy-buffers.bin" if (out / "pytorch_model.bin.index.json").exists() else None
    _merge_extra_tensors(out, extra, fname)


def _merge_extra_tensors(out: Path, extra: dict, shard_name: str | None) -> None:
    """Add tensors to an existing single-file or sharded checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = out / index_name
        if index_path.exists():
            index = json.loads(index_path.read_text())
            is_st = index_name.startswith("model.safetensors")
            fname = "model-legacy-buffers.safetensors" if is_st else (shard_name or "extra.bin")
            if is_st:
                save_file(extra, str(out / fname), metadata={"format": "pt"})
            else:
                torch.save(extra, out / fname)
            index["weight_map"].update({k: fname for k in extra})
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            return
    if (out / "model.safetensors").exists():
        state = load_file(str(out / "model.safetensors"))
        state.update(extra)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        state = torch.load(out / "pytorch_model.bin", weights_only=True)
        state.update(extra)
        torch.save(state, out / "pytorch_model.bin")


# --------------------------------------------------------------------------- SentencePiece (LLaMA)

SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6


def write_llama_tokenizer(out: Path, n_vocab: int) -> None:
    """tokenizer.model (SentencePiece, LLaMA layout) + tokenizer.json and configs for `n_vocab` ids."""
    proto = build_sentencepiece_model(n_vocab)
    (out / "tokenizer.model").write_bytes(proto)
    # Real LLaMA repos ship tokenizer.json too; transformers 5 needs protobuf
    # to read tokenizer.model by itself, so this keeps AutoTokenizer working.
    sentencepiece_to_tokenizer_json(proto).save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "pad_token": None,
        "model_max_length": TINY_CONTEXT,
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def build_sentencepiece_model(n_vocab: int) -> bytes:
    """A LLaMA-style SentencePiece BPE model (byte fallback, <unk>/<s>/</s> at 0/1/2)
    with exactly `n_vocab` pieces, as serialized ModelProto bytes.

    Trained on TINY_TEXT with the sentencepiece trainer (single thread, so
    deterministic); if the text cannot support n_vocab pieces, pieces
    "<extra_N>" with the lowest scores are appended.
    """
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TEXT.splitlines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=min(n_vocab, DEFAULT_VOCAB["llama"]),
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return _pad_pieces(buf.getvalue(), n_vocab)


def sentencepiece_to_tokenizer_json(proto: bytes, dummy_prefix: bool = True, user_defined: tuple[str, ...] = ()):
    """A `tokenizers` BPE equivalent to a SentencePiece BPE model (byte
    fallback, a dummy prefix unless told otherwise), built the way HF's LLaMA
    fast tokenizer is: every normal piece that splits into two pieces gives a
    merge, ranked by the piece's score (SentencePiece merges the
    highest-scoring pair first). Control and user-defined pieces are added
    tokens (`user_defined`: the model's user-defined pieces, which SentencePiece
    keeps whole)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    kept_whole = {vocab[p] for p in user_defined}
    ranked = []
    for i, piece in enumerate(pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or i in kept_whole:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.get_score(i), i, vocab[left], (left, right)))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = pieces[sp.unk_id()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend("\u2581")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    bos = pieces[sp.bos_id()]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, sp.bos_id())])
    fixed = sorted({sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()} - {-1})
    specials = [i for i in range(len(pieces)) if i in fixed or sp.is_control(i) or i in kept_whole]
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in specials])
    return tok


def _padding_names(pattern: str, count: int, existing: set[str]) -> list[str]:
    names, i = [], 0
    while len(names) < count:
        name = pattern.format(i)
        if name not in existing:
            names.append(name)
        i += 1
    return names


# Minimal protobuf wire encoding, enough to add SentencePiece pieces
# (ModelProto.pieces = field 1; SentencePiece: piece = 1, score = 2, type = 3).


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_spm_piece(piece: str, score: float, kind: int) -> bytes:
    import struct

    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _append_pieces(proto: bytes, pieces: list[bytes]) -> bytes:
    """Re-emit the ModelProto with `pieces` after the existing pieces (field 1)
    and before the other top-level fields, so the message stays in field order."""
    if not pieces:
        return proto
    head, tail, pos = [], [], 0
    while pos < len(proto):
        start = pos
        key, pos = _read_varint(proto, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _read_varint(proto, pos)
            pos += length
        elif wire == 0:
            _, pos = _read_varint(proto, pos)
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        (head if key >> 3 == 1 else tail).append(proto[start:pos])
    return b"".join(head) + b"".join(pieces) + b"".join(tail)


# --------------------------------------------------------------------------- SentencePiece (Gemma)

# Gemma's special pieces at the ids its tokenizer.model has them (<pad> 0, <eos> 1, <bos> 2, <unk> 3),
# two control pieces and the chat turn markers (user-defined pieces in Gemma's model).
GEMMA_CONTROL = ("<mask>", "[multimodal]")
GEMMA_TURNS = ("<start_of_turn>", "<end_of_turn>")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_gemma_sentencepiece_model(n_vocab: int) -> bytes:
    """A Gemma-shaped SentencePiece BPE model: <pad>/<eos>/<bos>/<unk> at 0-3, control and
    user-defined specials next, byte fallback, digits split, no dummy prefix; exactly n_vocab
    pieces (padded as build_sentencepiece_model pads)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TEXT.splitlines()), model_writer=buf, model_type="bpe",
        vocab_size=min(n_vocab, DEFAULT_VOCAB["gemma3"]), hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=list(GEMMA_CONTROL), user_defined_symbols=list(GEMMA_TURNS),
        num_threads=1, minloglevel=2,
    )
    return _pad_pieces(buf.getvalue(), n_vocab)


def _pad_pieces(proto: bytes, n_vocab: int) -> bytes:
    """The model with "<extra_N>" pieces of the lowest scores appended up to n_vocab pieces."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=proto)
    have = processor.get_piece_size()
    if have > n_vocab:
        raise ValueError(f"vocab_size {n_vocab} is smaller than the {have} pieces the tiny text needs")
    existing = {processor.id_to_piece(i) for i in range(have)}
    lowest = min(processor.get_score(i) for i in range(have))
    extra = _padding_names("<extra_{}>", n_vocab - have, existing)
    return _append_pieces(proto, [_encode_spm_piece(p, lowest - 1.0 - i, SPM_NORMAL) for i, p in enumerate(extra)])


def _write_gemma_tokenizer(out: Path, n_vocab: int) -> None:
    """tokenizer.model, tokenizer.json and the config files as Gemma 3 repositories carry them:
    the specials listed in added_tokens_decoder (special: true), add_bos only, a chat template."""
    proto = build_gemma_sentencepiece_model(n_vocab)
    (out / "tokenizer.model").write_bytes(proto)
    sentencepiece_to_tokenizer_json(proto, dummy_prefix=False, user_defined=GEMMA_TURNS).save(str(out / "tokenizer.json"))
    names = ("<pad>", "<eos>", "<bos>", "<unk>") + GEMMA_CONTROL + GEMMA_TURNS
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    decoder = {str(sp.piece_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in names}
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {**special, "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
              "chat_template": GEMMA_CHAT_TEMPLATE, "model_max_length": TINY_CONTEXT,
              "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
              "clean_up_tokenization_spaces": False}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


# --------------------------------------------------------------------------- byte-level BPE (GPT-J, MPT)

EOT = "<|endoftext|>"


def _bpe_layout(family: str, n_vocab: int) -> dict[str, int]:
    """How the model's vocab splits into BPE vocabulary and added tokens.

    GPT-J: BPE vocabulary with <|endoftext|> last (50257 tokens for the real
    one), then added "<|extratoken_N|>" up to vocab_size (143 for the real one).
    MPT: <|endoftext|> at id 0 and a tokenizer smaller than vocab_size
    (50254 tokens for 50432 in MPT-7B); the model's extra rows have no token.
    """
    if family == "gptj":
        n_added = 143 if n_vocab == LEGACY_VOCAB["gptj"] else n_vocab // 16
        n_bpe = n_vocab - n_added
        return {"n_bpe": n_bpe, "n_added": n_added, "eot_id": n_bpe - 1}
    n_unused = 178 if n_vocab == LEGACY_VOCAB["mpt"] else n_vocab // 16
    return {"n_bpe": n_vocab - n_unused, "n_added": 0, "eot_id": 0}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to
    U+0100 onwards in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _alphabet_in_gpt2_order() -> list[str]:
    """The 256 byte characters in GPT-2 vocab order (printable bytes first)."""
    table = bytes_to_unicode()
    printable = [table[b] for b in range(256) if table[b] == chr(b)]
    return printable + [table[b] for b in range(256) if table[b] != chr(b)]


def train_byte_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """A plain BPE trainer over GPT-2 byte-level words: merge the most
    frequent adjacent pair, ties broken by the pair's text, until n_merges
    merges or no pair occurs twice. Deterministic by construction."""
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(word for word, _ in splitter.pre_tokenize_str(text))
    segmented = {tuple(word): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best, freq = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if freq < 2:
            break
        merges.append(best)
        segmented = {_merge_pair(symbols, best): count for symbols, count in segmented.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_bpe_vocab(family: str, n_vocab: int) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(BPE vocabulary in id order, merges, added tokens) for a tiny GPT-J/MPT tokenizer."""
    layout = _bpe_layout(family, n_vocab)
    alphabet = _alphabet_in_gpt2_order()
    n_merges = layout["n_bpe"] - len(alphabet) - 1
    merges = train_byte_bpe(TINY_TEXT, n_merges)
    learned = [a + b for a, b in merges]
    base = alphabet + [t for t in dict.fromkeys(learned) if t not in alphabet]
    existing = set(base) | {EOT}
    # Unreachable pieces (no merge produces them) keep the vocab at its size.
    pad = _padding_names("Ġ<pad{}>", layout["n_bpe"] - 1 - len(base), existing)
    base += pad
    vocab = base + [EOT] if family == "gptj" else [EOT] + base
    added = [f"<|extratoken_{i}|>" for i in range(1, layout["n_added"] + 1)]
    return vocab, merges, added


def _write_bpe_tokenizer(out: Path, family: str, n_vocab: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges, added = build_bpe_vocab(family, n_vocab)
    ids = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    if added:
        tok.add_tokens([AddedToken(t, special=False) for t in added])
    tok.save(str(out / "tokenizer.json"))

    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    tokenizer_class = "GPT2Tokenizer" if family == "gptj" else "GPTNeoXTokenizer"
    config = {**special, "add_prefix_space": False, "model_max_length": TINY_CONTEXT, "tokenizer_class": tokenizer_class}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)
    if family == "gptj":
        # GPT-J repositories ship the slow-tokenizer files too; legacy converters read them.
        _write_json(out / "vocab.json", ids)
        merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
        (out / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        _write_json(out / "added_tokens.json", {t: len(vocab) + i for i, t in enumerate(added)})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- byte-level BPE with chat tokens
# (Llama 3, Qwen2/Qwen3)

# The Split regexes of the real tokenizers' tokenizer.json (llama.cpp quotes them in llama-vocab.cpp;
# smolq/sources/bpe_pre.py holds the same strings, tests/test_bpe_pre.py checks they agree).
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_REGEX = LLAMA3_SPLIT_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN_UNUSED_ROWS = 8  # Qwen's embedding has rows no token uses (151936 for 151665 tokens)

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# style -> added tokens (content, special) after the BPE vocabulary, the Split regex, tokenizer_config.
CHAT_BPE_STYLES: dict[str, dict[str, Any]] = {
    "llama3": {
        "added": (("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|reserved_special_token_0|>", True),
                  ("<|start_header_id|>", True), ("<|end_header_id|>", True), ("<|eot_id|>", True)),
        "regex": LLAMA3_SPLIT_REGEX, "ignore_merges": True, "unused_rows": 0, "add_bos": True,
        "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True},
    },
    "qwen2": {
        # <think>/<tool_call> are not special in Qwen's tokenizer (llama.cpp: USER_DEFINED).
        "added": (("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False),
                  ("</think>", False), ("<tool_call>", False)),
        "regex": QWEN2_SPLIT_REGEX, "ignore_merges": False, "unused_rows": QWEN_UNUSED_ROWS, "add_bos": False,
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": QWEN_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace",
                   "add_prefix_space": False, "split_special_tokens": False},
    },
}


def chat_bpe_layout(style: str, n_vocab: int) -> dict[str, Any]:
    """n_bpe BPE tokens, then the style's added tokens (their ids), then unused embedding rows."""
    spec = CHAT_BPE_STYLES[style]
    n_bpe = n_vocab - spec["unused_rows"] - len(spec["added"])
    return {"n_bpe": n_bpe, "added_ids": {t: n_bpe + i for i, (t, _) in enumerate(spec["added"])}}


def _write_chat_bpe_tokenizer(out: Path, style: str, n_vocab: int, config, jinja_file: bool = False) -> None:
    """tokenizer.json / tokenizer_config.json shaped like Llama 3's or Qwen2's: a BPE trained on
    TINY_TEXT, the real Split regex before a ByteLevel that only maps bytes, the chat tokens added.
    jinja_file: the chat template in chat_template.jinja, as transformers 5 saves it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    spec = CHAT_BPE_STYLES[style]
    layout = chat_bpe_layout(style, n_vocab)
    alphabet = _alphabet_in_gpt2_order()
    merges = train_byte_bpe(TINY_TEXT, layout["n_bpe"] - len(alphabet))
    learned = [t for t in dict.fromkeys(a + b for a, b in merges) if t not in alphabet]
    base = alphabet + learned
    base += _padding_names("Ġ<pad{}>", layout["n_bpe"] - len(base), set(base))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(base)}, merges=merges,
                               ignore_merges=spec["ignore_merges"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in spec["added"]])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if spec["add_bos"]:
        bos = spec["config"]["bos_token"]
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                   special_tokens=[(bos, layout["added_ids"][bos])]))
    tok.post_processor = processors.Sequence(steps)
    tok.save(str(out / "tokenizer.json"))
    cfg = {**spec["config"], "model_max_length": TINY_CONTEXT}
    if jinja_file:
        (out / "chat_template.jinja").write_text(cfg.pop("chat_template"), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", cfg)
    if style == "llama3":  # Llama 3.1 Instruct: config.json lists every end-of-turn id; llama.cpp takes none of a list
        ids = layout["added_ids"]
        path = out / "config.json"
        data = json.loads(path.read_text())
        data.update(bos_token_id=ids["<|begin_of_text|>"], eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]])
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
