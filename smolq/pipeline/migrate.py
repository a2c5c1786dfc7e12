"""Carry a model file of any container/version forward (or back) to another.

    source (formats.detect: GGUF v1-v3, 'ggml', 'ggmf', 'ggjt' v1-v3, 'ggmm')
    -> description (arch module bound to an HF-style config rebuilt from the
       header, the tensor shapes, --config and listed per-family defaults)
    -> steps (per tensor: copy, relayout, convert or requantize)
    -> sink (formats.gguf / formats.legacy, one tensor's load() at a time).

What a legacy header never stored (context length, norm epsilon, RoPE base,
tokenizer kind, special token ids ...) comes from --config or from a default
that is recorded as a `Guess` naming the GGUF key it fills: never silently.

Tensor data (formats.md 5, 6.8):
- a block type whose layout changed between ggjt versions (Q4_0/Q4_1/Q5_x/
  Q8_0) is re-laid out by the kernel; the result is lossless unless an f32
  scale has no exact f16 (v1/v2 -> v3), in which case the scale is rounded,
  the nearest the new layout allows;
- a type the target cannot hold (Q4_2/Q4_3 anywhere after May 2023, Q5_x in
  'ggmf', K-quants before ggjt v3, ...) is decoded and requantized into the
  nearest type the target holds (NEAREST), or into --type;
- with --type, every tensor that cannot be carried exactly goes to --type
  (--type f32 makes a migration lossless);
- every non-copy step reports whether decoded values are bit-equal to the
  decoded source, with the kernel's error_stats.

LLaMA Q/K rows need no work: legacy files and GGUF both hold Meta's
interleaved order (formats.md 6.7), so the bytes carry over unchanged.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from smolq.arch import Arch, LegacyTarget, TensorMap, family_arch
from smolq.arch.base import rope_theta
from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.formats.detect import open_model
from smolq.formats.gguf import VERSIONS, MetaValue, write_gguf
from smolq.formats.gguf import GGUFValueType as V
from smolq.formats.legacy import llama_n_ff, write_legacy
from smolq.ggml_types import (
    VERSIONED_TYPES,
    GGMLType,
    block_size,
    is_quantized,
    tensor_nbytes,
)
from smolq.kernels import DEQUANTIZE_TYPES, dequantize, error_stats, relayout
from smolq.pipeline.convert import convert_tensor
from smolq.plan.mix import PLAIN_FTYPE, parse_type
from smolq.plan.targets import Target, resolve_target
from smolq.plan.targets import storable_types as _storable  # the one table of what a target holds
from smolq.sinks.gguf import gguf_metadata
from smolq.sources.checkpoint import read_json_object
from smolq.sources.vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    SPIECE_SPACE,
    UNK_LEGACY_TEXT,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocab,
    byte_encoder,
    decode_byte_level,
    load_vocab,
)

T = GGMLType

FAMILIES = ("llama", "gptj", "mpt")

# Where a type goes when the target cannot hold it: first storable candidate wins
# (same kind of grid first, then more bits, F32 last so nothing is ever refused).
NEAREST: dict[GGMLType, tuple[GGMLType, ...]] = {
    T.Q4_2: (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.F16, T.F32),
    T.Q4_3: (T.Q4_1, T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q4_0: (T.Q4_1, T.Q5_0, T.Q8_0, T.F16, T.F32),
    T.Q4_1: (T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q5_0: (T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q5_1: (T.Q8_0, T.F16, T.F32),
    T.Q8_0: (T.F16, T.F32),
    T.Q2_K: (T.Q3_K, T.Q4_K, T.Q4_1, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.Q3_K: (T.Q4_K, T.Q4_1, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.Q4_K: (T.Q5_K, T.Q4_1, T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q5_K: (T.Q6_K, T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q6_K: (T.Q8_0, T.F16, T.F32),
    T.TQ1_0: (T.TQ2_0, T.Q2_K, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.TQ2_0: (T.Q2_K, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.BF16: (T.F32,),  # exact
    T.F16: (T.F32,),  # exact
    T.F32: (T.F16,),
}

# File-type word of a legacy header -> LLAMA_FTYPE (general.file_type), by dialect.
# llama.cpp LLaMA headers and GPT4All files use LLAMA_FTYPE numbers already (formats.md 7);
# ggml-examples files use ggml_ftype, which agrees up to 10 (formats.md 2.4).
GGML_FTYPE_TO_LLAMA = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 7: 7, 8: 8, 9: 9, 10: 10, 11: 12, 12: 15, 13: 17, 14: 18}


# LLAMA_FTYPE values that name a mix or a removed type -> their main weight type (formats.md 7).
FTYPE_MIXES = {4: T.Q4_1, 5: T.Q4_2, 6: T.Q4_3, 11: T.Q3_K, 12: T.Q3_K, 13: T.Q3_K, 14: T.Q4_K, 15: T.Q4_K,
               16: T.Q5_K, 17: T.Q5_K}


# ====================================================================== report types

@dataclass
class Guess:
    """A value the source did not hold, filled from a default: the key it lands in and why."""

    key: str
    value: Any
    why: str

    def as_dict(self) -> dict[str, Any]:
        value = self.value
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} values]"
        return {"key": self.key, "value": value, "why": self.why}


@dataclass
class Step:
    """One output tensor and how it is made from one source tensor."""

    name: str
    source: TensorEntry
    shape: tuple[int, ...]
    type: GGMLType
    layout: str
    action: str  # "copy" | "relayout" | "convert" | "requantize"
    why: str = ""
    lossless: bool | None = None  # known once the data has been produced (copy: True up front)
    stats: dict[str, float | None] | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape, self.layout)

    def as_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name, "source": self.source.name, "shape": list(self.shape),
            "source_type": self.source.type.name, "source_layout": self.source.layout,
            "type": self.type.name, "layout": self.layout, "action": self.action,
            "lossless": self.lossless, "bytes": self.nbytes,
        }
        if self.why:
            d["why"] = self.why
        if self.stats is not None:
            d["stats"] = self.stats
        return d


@dataclass
class Plan:
    """Everything decided before a byte is written."""

    source_path: Path
    source_format: str
    family: str | None  # None: a GGUF architecture smolq has no module for (GGUF -> GGUF only)
    target: Target
    steps: list[Step]
    guesses: list[Guess] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None  # GGUF target: key -> MetaValue
    legacy_hparams: dict[str, Any] | None = None
    legacy_vocab: list[tuple[bytes, float | None, bool]] | None = None
    legacy_ftype: int | None = None


# ====================================================================== small helpers

def _format_of(model) -> str:
    if model.container == "gguf":
        return f"gguf-v{model.version}"
    if model.container == "ggjt":
        return f"ggjt-v{model.version}"
    return model.container


def _decode(entry_or_bytes, t: GGMLType, shape, layout: str) -> np.ndarray:

    data = entry_or_bytes.load() if isinstance(entry_or_bytes, TensorEntry) else entry_or_bytes
    return dequantize(data, t, shape, layout)


def _decodable(t: GGMLType, layout: str) -> bool:

    return (t, layout) in DEQUANTIZE_TYPES


def _row_fits(t: GGMLType, shape: tuple[int, ...]) -> bool:
    return (shape[-1] if shape else 1) % block_size(t) == 0


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _compare(ref: np.ndarray, test: np.ndarray) -> tuple[bool, dict[str, float | None]]:

    lossless = bool(np.array_equal(ref, test, equal_nan=True))
    stats = error_stats(ref, test)
    return lossless, {k: _finite(float(v)) for k, v in stats.items()}


def _same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    if a.type != b.type or a.shape != b.shape or a.layout != b.layout:
        return False
    return bool(np.array_equal(np.asarray(a.load()).view(np.uint8), np.asarray(b.load()).view(np.uint8)))


# ====================================================================== --config

def read_user_config(spec: str | os.PathLike | None) -> tuple[dict[str, Any], Path | None, Path | None]:
    """(config dict, its path, the directory holding a tokenizer or None) from --config."""
    if spec is None:
        return {}, None, None
    p = Path(spec)
    if p.is_dir():
        path, directory = p / "config.json", p
    elif p.is_file():
        path, directory = p, p.parent
    else:
        raise InputError(p, "--config: no such file or directory")
    if not path.is_file():
        raise InputError(p, "--config directory has no config.json")

    config = read_json_object(path, InputError, "--config")
    has_tokenizer = any((directory / n).is_file() for n in ("tokenizer.model", "tokenizer.json", "vocab.json"))
    return config, path, directory if has_tokenizer else None


# ====================================================================== HF-style config from a source

# (HF config key, default, GGUF key suffix, why) for what legacy headers never stored.
DEFAULTS: dict[str, tuple[tuple[str, Any, str, str], ...]] = {
    "llama": (
        ("max_position_embeddings", 2048, "context_length", "LLaMA-1 context; legacy headers store none"),
        ("rms_norm_eps", 1e-6, "attention.layer_norm_rms_epsilon", "LLaMA-1 value, the 2023 llama.cpp default"),
        ("rope_theta", 10000.0, "rope.freq_base", "llama.cpp's default RoPE base"),
    ),
    "gptj": (
        ("layer_norm_epsilon", 1e-5, "attention.layer_norm_epsilon", "GPT-J-6B / GPTJConfig default"),
    ),
    "mpt": (),
}


class _Derived:
    """Collects an HF-style config: values known from the file, checked against --config."""

    def __init__(self, family: str, user: dict[str, Any], user_path: Path | None, source: Path):
        self.family, self.user, self.user_path, self.source = family, user, user_path, source
        self.config: dict[str, Any] = {}
        self.guesses: list[Guess] = []
        self.notes: list[str] = []

    def known(self, key: str, value: Any, where: dict[str, Any] | None = None, strict: bool = True) -> None:
        """A value the file fixes. A contradicting --config is an error (strict) or a note."""
        given = (self.user if where is None else where).get(key)
        if given is not None and not _same_value(given, value):
            message = f"--config says {key} = {given}, but the file has {value}"
            if strict:
                raise InputError(self.user_path, f"{message}: it describes another model")
            self.notes.append(f"{message}; using the file's")
        (self.config if where is None else where)[key] = value

    def defaults(self, arch_key: str) -> None:

        for key, default, gguf_suffix, why in DEFAULTS[self.family]:
            value = rope_theta(self.user) if key == "rope_theta" else self.user.get(key)
            if value is None:
                value = default
                self.guesses.append(Guess(f"{arch_key}.{gguf_suffix}", default, why))
            self.config[key] = value


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    return a == b


def _positive(path: Path, hparams: dict[str, Any], names: tuple[str, ...]) -> None:
    for n in names:
        v = hparams.get(n)
        if not isinstance(v, int) or v <= 0:
            raise FormatError(path, f"unknown hyperparameters: {n} = {v} (expected a positive integer)")


def _shape_of(tensors: dict[str, TensorEntry], name: str, path: Path) -> tuple[int, ...]:
    t = tensors.get(name)
    if t is None:
        raise FormatError(path, f"no tensor {name}, which this family needs")
    return t.shape


def _llama_config_from_legacy(d: _Derived, h: dict[str, Any], tensors: dict[str, TensorEntry]) -> None:

    path = d.source
    _positive(path, h, ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot"))
    n_embd, n_head = h["n_embd"], h["n_head"]
    if n_embd % n_head or h["n_rot"] != n_embd // n_head:
        raise FormatError(path, f"unknown hyperparameters: n_embd {n_embd}, n_head {n_head}, n_rot {h['n_rot']} "
                                "(LLaMA needs n_rot = n_embd / n_head)")
    head_dim = n_embd // n_head
    n_ff = _shape_of(tensors, "blk.0.ffn_gate.weight", path)[0]  # formats.md 6.8: from w1, not n_mult
    if n_ff != llama_n_ff(n_embd, h["n_mult"]):
        d.notes.append(f"feed-forward width {n_ff} (from w1) differs from n_mult {h['n_mult']}'s "
                       f"{llama_n_ff(n_embd, h['n_mult'])}; using the tensor's")
    kv_rows = _shape_of(tensors, "blk.0.attn_k.weight", path)[0]
    if kv_rows % head_dim or n_head % (kv_rows // head_dim or 1) or kv_rows == 0:
        raise FormatError(path, f"attention.wk has {kv_rows} rows, not a whole number of heads of {head_dim}")
    d.config["architectures"] = ["LlamaForCausalLM"]
    d.known("vocab_size", h["n_vocab"])
    d.known("hidden_size", n_embd)
    d.known("intermediate_size", n_ff)
    d.known("num_hidden_layers", h["n_layer"])
    d.known("num_attention_heads", n_head)
    d.known("num_key_value_heads", kv_rows // head_dim)
    if "head_dim" in d.user or not d.user:  # transformers 5 configs always carry it; convert then writes key_length
        d.known("head_dim", head_dim)
    d.defaults("llama")
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(d.user.get(key), dict):
            d.config[key] = d.user[key]


def _gptj_config_from_legacy(d: _Derived, h: dict[str, Any], tensors: dict[str, TensorEntry]) -> None:
    path = d.source
    _positive(path, h, ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot"))
    if h["n_embd"] % h["n_head"] or h["n_rot"] > h["n_embd"] // h["n_head"]:
        raise FormatError(path, f"unknown hyperparameters: n_embd {h['n_embd']}, n_head {h['n_head']}, n_rot {h['n_rot']}")
    d.config["architectures"] = ["GPTJForCausalLM"]
    d.known("vocab_size", h["n_vocab"])
    d.known("n_embd", h["n_embd"])
    d.known("n_layer", h["n_layer"])
    d.known("n_head", h["n_head"])
    d.known("rotary_dim", h["n_rot"])
    d.known("n_positions", h["n_ctx"], strict=False)
    d.defaults("gptj")


def _mpt_config_from_legacy(d: _Derived, h: dict[str, Any], tensors: dict[str, TensorEntry]) -> None:
    path = d.source
    g = {  # the two MPT headers name the same fields differently (formats.md 2.3)
        "n_vocab": h["n_vocab"], "n_embd": h.get("d_model", h.get("n_embd")),
        "n_layer": h.get("n_layers", h.get("n_layer")), "n_head": h.get("n_heads", h.get("n_head")),
        "n_ctx": h.get("max_seq_len", h.get("n_ctx")),
    }
    _positive(path, g, ("n_vocab", "n_embd", "n_layer", "n_head", "n_ctx"))
    if g["n_embd"] % g["n_head"] or not (math.isfinite(h["alibi_bias_max"]) and math.isfinite(h["clip_qkv"])):
        raise FormatError(path, f"unknown hyperparameters: d_model {g['n_embd']}, n_heads {g['n_head']}, "
                                f"alibi_bias_max {h['alibi_bias_max']}, clip_qkv {h['clip_qkv']}")
    hd = g["n_embd"] // g["n_head"]
    qkv_rows = _shape_of(tensors, "blk.0.attn_qkv.weight", path)[0]
    n_kv2 = qkv_rows - g["n_embd"]
    if n_kv2 <= 0 or n_kv2 % (2 * hd):
        raise FormatError(path, f"Wqkv has {qkv_rows} rows, which no head layout of d_model {g['n_embd']} gives")
    n_ff = _shape_of(tensors, "blk.0.ffn_up.weight", path)[0]
    if n_ff % g["n_embd"]:
        raise FormatError(path, f"ffn.up_proj has {n_ff} rows, not a multiple of d_model {g['n_embd']}")
    d.config["architectures"] = ["MPTForCausalLM"]
    d.known("vocab_size", g["n_vocab"])
    d.known("d_model", g["n_embd"])
    d.known("n_layers", g["n_layer"])
    d.known("n_heads", g["n_head"])
    d.known("max_seq_len", g["n_ctx"], strict=False)
    d.known("expansion_ratio", n_ff // g["n_embd"])
    d.config["no_bias"] = True
    attn: dict[str, Any] = {"alibi": True}  # every legacy MPT loader applies ALiBi
    d.config["attn_config"] = attn
    attn["alibi_bias_max"] = float(h["alibi_bias_max"])
    # The header stores 0.0 for "no clipping" (formats.md 2.3); a clip of 0 would zero every score.
    attn["clip_qkv"] = float(h["clip_qkv"]) if h["clip_qkv"] else None
    if n_kv2 // (2 * hd) != g["n_head"]:
        attn["kv_n_heads"] = n_kv2 // (2 * hd)


LEGACY_CONFIG = {"llama": _llama_config_from_legacy, "gptj": _gptj_config_from_legacy, "mpt": _mpt_config_from_legacy}


def _config_from_gguf(family: str, meta: dict[str, Any], tensors: dict[str, TensorEntry], path: Path) -> dict[str, Any]:
    """An HF-style config from GGUF `<arch>.*` keys, for writing legacy headers."""
    a = family

    def need(key: str) -> Any:
        v = meta.get(f"{a}.{key}")
        if v is None:
            raise FormatError(path, f"GGUF metadata has no {a}.{key}")
        return v

    n_vocab = len(meta["tokenizer.ggml.tokens"]) if isinstance(meta.get("tokenizer.ggml.tokens"), list) else need("vocab_size")
    if family == "llama":
        cfg = {
            "architectures": ["LlamaForCausalLM"], "vocab_size": n_vocab, "hidden_size": need("embedding_length"),
            "intermediate_size": need("feed_forward_length"), "num_hidden_layers": need("block_count"),
            "num_attention_heads": need("attention.head_count"),
            "num_key_value_heads": meta.get(f"{a}.attention.head_count_kv") or need("attention.head_count"),
            "max_position_embeddings": need("context_length"),
            "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
            "rope_theta": meta.get(f"{a}.rope.freq_base", 10000.0),
        }
        if meta.get(f"{a}.rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"type": "linear", "factor": meta.get(f"{a}.rope.scaling.factor")}
        return cfg
    if family == "gptj":
        return {
            "architectures": ["GPTJForCausalLM"], "vocab_size": n_vocab, "n_embd": need("embedding_length"),
            "n_layer": need("block_count"), "n_head": need("attention.head_count"),
            "rotary_dim": need("rope.dimension_count"), "n_positions": need("context_length"),
            "layer_norm_epsilon": need("attention.layer_norm_epsilon"),
        }
    n_embd = need("embedding_length")
    attn: dict[str, Any] = {"alibi": True, "alibi_bias_max": float(meta.get(f"{a}.attention.max_alibi_bias", 8.0)),
                            "clip_qkv": meta.get(f"{a}.attention.clamp_kqv")}
    if meta.get(f"{a}.attention.head_count_kv"):
        attn["kv_n_heads"] = meta[f"{a}.attention.head_count_kv"]
    return {
        "architectures": ["MPTForCausalLM"], "vocab_size": n_vocab, "d_model": n_embd,
        "n_layers": need("block_count"), "n_heads": need("attention.head_count"),
        "max_seq_len": need("context_length"), "expansion_ratio": need("feed_forward_length") // n_embd,
        "no_bias": True, "attn_config": attn,
    }


# ====================================================================== vocabularies

_PAD = "[PAD{}]"


def _pad_name(i: int, text: bytes) -> bool:
    return text == _PAD.format(i).encode()


def vocab_from_legacy(lf, guesses: list[Guess], notes: list[str]) -> Vocab:
    """The GGUF view of a legacy vocabulary, by each format's text rules (formats.md 3, 6.5)."""
    family = lf.family
    entries = lf.vocab
    n = len(entries)
    if family == "llama":
        return _llama_vocab_from_legacy(lf, guesses)
    enc = byte_encoder()
    tokens, types = [], []
    examples_mpt = family == "mpt" and lf.container == "ggml"
    last = None
    for i, (text, _) in enumerate(entries):
        if examples_mpt and last is not None and text == last and i > 0:
            tokens.append(_PAD.format(i))  # the ggml examples repeat the last token up to n_vocab
            types.append(UNUSED)
            continue
        last = text
        if _pad_name(i, text):
            tokens.append(text.decode())
            types.append(UNUSED)
        elif i in lf.special_tokens:
            tokens.append(text.decode("utf-8", "replace"))
            types.append(CONTROL)
        elif examples_mpt:
            raw = _latin1_utf8_to_bytes(text)
            if raw is None:  # an added token, kept as its text
                tokens.append(text.decode("utf-8", "replace"))
                types.append(USER_DEFINED)
            else:
                tokens.append("".join(enc[b] for b in raw))
                types.append(NORMAL)
        else:
            tokens.append("".join(enc[b] for b in text))
            types.append(NORMAL)
    if family == "mpt" and lf.container == "ggmm":
        guesses.append(Guess("tokenizer.ggml.tokens", "rebuilt", "'ggmm' stored tokens as UTF-8 text: byte tokens "
                                                                "that were not valid UTF-8 came through as U+FFFD"))
    if family == "mpt":
        guesses.append(Guess("tokenizer.ggml.token_type", "normal/control/unused", "rebuilt from the legacy vocabulary"))
    guesses.append(Guess("tokenizer.ggml.merges", None, "legacy files store no BPE merges; pass --config with the tokenizer"))
    # A GPT-2 byte-level tokenizer (ByteLevel post-processor) adds no BOS/EOS; convert writes that as
    # add_bos/add_eos = false, as llama.cpp's converter does.
    vocab = Vocab("gpt2", tokens, types, None, [], {}, add_bos=False, add_eos=False,
                  pre="mpt" if family == "mpt" else None, n_base=n)
    guesses.append(Guess("tokenizer.ggml.add_bos_token", False, "GPT-2 byte-level BPE adds no BOS"))
    guesses.append(Guess("tokenizer.ggml.add_eos_token", False, "GPT-2 byte-level BPE adds no EOS"))
    eot = "<|endoftext|>"
    if family == "mpt":
        guesses.append(Guess("tokenizer.ggml.pre", "mpt", "the pre-tokenizer smolq convert writes for MPT"))
    for i, tok in enumerate(tokens):
        if tok == eot or decode_byte_level(tok) == eot.encode():
            vocab.special_ids.update(bos=i, eos=i, unk=i)
            for key in ("bos", "eos", "unknown"):
                guesses.append(Guess(f"tokenizer.ggml.{key}_token_id", i, f"the id of {eot}"))
            break
    return vocab


def _latin1_utf8_to_bytes(text: bytes) -> bytes | None:
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return bytes(ord(c) for c in s) if all(ord(c) < 256 for c in s) else None


def _llama_vocab_from_legacy(lf, guesses: list[Guess]) -> Vocab:
    """convert-llama-ggml-to-gguf's rules (formats.md 6.5), written here from the table."""
    tokens, types, scores = [], [], []
    has_scores = bool(lf.vocab) and lf.vocab[0][1] is not None
    for i, (text, score) in enumerate(lf.vocab):
        if text == UNK_LEGACY_TEXT or (i == 0 and text == b""):
            tok, kind = "<unk>", UNKNOWN
        elif text == b"":
            tok, kind = {1: "<s>", 2: "</s>"}.get(i, f"[CONTROL{i}]"), CONTROL
        elif len(text) == 1 and 3 <= i < 3 + 256:
            tok, kind = f"<0x{text[0]:02X}>", BYTE
        elif _pad_name(i, text):
            tok, kind = text.decode(), UNUSED
        else:
            tok, kind = text.decode("utf-8", "surrogateescape").replace(" ", SPIECE_SPACE), NORMAL
        tokens.append(tok)
        types.append(kind)
        scores.append(float(score) if has_scores else 0.0)
    guesses.append(Guess("tokenizer.ggml.model", "llama", "legacy LLaMA files store no tokenizer kind; SentencePiece assumed"))
    guesses.append(Guess("tokenizer.ggml.tokens", "rebuilt", "spaces -> U+2581, single bytes at ids 3..258 -> <0xNN>, "
                                                            "empty -> control (formats.md 6.5)"))
    guesses.append(Guess("tokenizer.ggml.token_type", "rebuilt", "from the token texts, as above"))
    if not has_scores:
        guesses.append(Guess("tokenizer.ggml.scores", 0.0, "unversioned 'ggml' files store no scores"))
    special = {"unk": 0, "bos": 1, "eos": 2}
    for kind, i in special.items():
        key = {"unk": "unknown"}.get(kind, kind)
        guesses.append(Guess(f"tokenizer.ggml.{key}_token_id", i, "llama.cpp's default for SentencePiece LLaMA"))
    guesses.append(Guess("tokenizer.ggml.add_bos_token", True, "LLaMA's SentencePiece tokenizer adds <s>"))
    guesses.append(Guess("tokenizer.ggml.add_eos_token", False, "LLaMA's SentencePiece tokenizer adds no </s>"))
    guesses.append(Guess("tokenizer.ggml.add_sep_token", False, "LLaMA's tokenizer adds no separator"))
    return Vocab("llama", tokens, types, scores, [], dict(special), add_bos=True, add_eos=False, add_sep=False,
                 pre="default",
                 n_base=len(tokens))


def vocab_from_gguf(meta: dict[str, Any], family: str, path: Path) -> Vocab:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise FormatError(path, "GGUF metadata has no tokenizer.ggml.tokens; a legacy file needs a vocabulary")
    model = meta.get("tokenizer.ggml.model", "llama")
    enc = byte_encoder()
    if family == "gptj" and tokens and isinstance(tokens[0], (bytes, str)):
        # GPT4All's GPT-J GGUF stores decoded bytes; smolq's Vocab keeps the byte-level encoding.
        tokens = ["".join(enc[b] for b in (t.encode("utf-8", "surrogateescape") if isinstance(t, str) else t))
                  for t in tokens]
    tokens = [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else t for t in tokens]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    special = {}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("sep", "seperator")):
        if isinstance(meta.get(f"tokenizer.ggml.{key}_token_id"), int):
            special[kind] = meta[f"tokenizer.ggml.{key}_token_id"]
    return Vocab(model, tokens, list(types), list(scores) if scores else None, list(meta.get("tokenizer.ggml.merges") or []),
                 special, n_base=len(tokens))


def _legacy_texts(vocab: Vocab, lf) -> list[bytes]:
    return [t for t, _, _ in vocab.legacy_tokens(lf.family, lf.container, lf.dialect)]


# ====================================================================== tensor planning

def _canonical_tensors(model, arch_cls: type[Arch] | None) -> dict[str, TensorEntry]:
    """Source tensors by GGUF name (legacy names translated by the family's table)."""
    if model.container == "gguf":
        return {t.name: t for t in model.tensors}
    out = {}
    for t in model.tensors:
        name = arch_cls.names.to_gguf(t.name) if arch_cls else None
        if name is None:
            raise FormatError(model.path, f"tensor {t.name} is not part of a legacy {model.architecture} model")
        out[name] = t
    return out


def _choose(src: TensorEntry, shape: tuple[int, ...], target: Target, storable: frozenset[GGMLType],
            force: GGMLType | None) -> tuple[GGMLType, str, str]:
    """(type, action, why) for one tensor."""
    t, layout = src.type, src.layout
    if t in storable and _row_fits(t, shape):
        if t in VERSIONED_TYPES and layout != target.layout:
            if force is not None and force != t and _relayout_lossy(src, target.layout):
                return force, "requantize", f"--type: {t.name} {layout}->{target.layout} would round scales"
            return t, "relayout", f"{t.name} blocks {layout} -> {target.layout}"
        return t, "copy", ""
    if force is not None:
        return force, _verb(t, force), f"{target.format} cannot hold {t.name}; --type"
    for cand in NEAREST.get(t, (T.F16, T.F32)):
        if cand in storable and _row_fits(cand, shape):
            return cand, _verb(t, cand), f"{target.format} cannot hold {t.name}; nearest it holds"
    raise InputError(None, f"tensor {src.name}: {target.format} holds no type {t.name} can go to")


def _verb(src: GGMLType, dst: GGMLType) -> str:
    return "requantize" if is_quantized(dst) else "convert"


def _relayout_lossy(src: TensorEntry, dst_layout: str) -> bool:

    _, lossless = relayout(src.load(), src.type, src.layout, dst_layout)
    return not lossless


def _exact_as(entry: TensorEntry, dst: GGMLType) -> bool:
    """Would decoding `entry` and storing it as float type `dst` keep every value?"""
    x = _decode(entry, entry.type, entry.shape, entry.layout)

    y = _decode(convert_tensor(x, dst), dst, entry.shape, "v3")
    return bool(np.array_equal(x, y, equal_nan=True))


def _main_type(tensors) -> GGMLType | None:
    from collections import Counter

    counts = Counter(t.type for t in tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0] if counts else None


def _plan_gguf_copy(model, target: Target, force: GGMLType | None) -> list[Step]:
    storable = _storable(target, None)
    steps = []
    for t in model.tensors:
        if t.extra.get("be_blocks_as_stored"):
            raise InputError(model.path, f"tensor {t.name}: block-quantized data in a big-endian GGUF has no "
                                         "defined byte order for its scales; smolq will not guess")
        dst, action, why = _choose(t, t.shape, target, storable, force)
        steps.append(Step(t.name, t, t.shape, dst, target.layout, action, why))
    return steps


def _plan_family(model, arch: Arch, target: Target, force: GGMLType | None, tied: bool,
                 notes: list[str]) -> list[Step]:
    """Steps in the order `smolq convert` writes the family's tensors, with its names."""
    src = _canonical_tensors(model, type(arch))
    # MPT is always tied (its output.weight copies wte); LLaMA as decided by _llama_tied.
    available = set() if tied or arch.family == "mpt" else {"lm_head.weight"}
    maps = arch.tensor_maps(available)
    first_gguf = {}
    for m in maps:
        if m.gguf is not None:
            first_gguf.setdefault(m.source, m.gguf)
    storable = _storable(target, arch.family)
    ggmm = not target.is_gguf and target.legacy.container == "ggmm"
    src_ggmm = model.container == "ggmm"
    main = _main_type(model.tensors)
    steps, used = [], set()
    for m in maps:
        out_name = m.gguf if target.is_gguf else m.legacy
        if out_name is None:
            continue
        key = m.gguf if m.gguf in src else first_gguf.get(m.source)
        entry = src.get(key) if key else None
        if entry is None:
            raise FormatError(model.path, f"no tensor for {out_name} ({m.gguf or m.legacy}) in this {arch.family} file")
        if tuple(entry.shape) != tuple(m.shape):
            raise FormatError(model.path, f"tensor {entry.name} has shape {list(entry.shape)}; the header implies {list(m.shape)}")
        used.add(key)
        steps.append(_step_for(entry, out_name, m, target, storable, force, ggmm, src_ggmm, main))
    _check_unused(model, src, used, arch, target, tied, notes)
    return steps


_GGMM_F32 = frozenset({"transformer.wte.weight"})  # what GPT4All's 'ggmm' loader reads as F32 (formats.md 4.4)


def _step_for(entry: TensorEntry, out_name: str, m: TensorMap, target: Target, storable, force,
              ggmm: bool, src_ggmm: bool, main: GGMLType | None) -> Step:
    shape = tuple(m.shape)
    if ggmm and m.legacy_f32:  # GPT4All's 'ggmm' loader reads wte as F32 (formats.md 4.4)
        if entry.type == T.F32:
            return Step(out_name, entry, shape, T.F32, target.layout, "copy")
        return Step(out_name, entry, shape, T.F32, target.layout, "convert", "'ggmm' keeps wte in F32")
    if src_ggmm and entry.name in _GGMM_F32 and entry.type == T.F32 and main == T.F16 and force is None:
        # 'ggmm' forced wte to F32 whatever the file type; an F16 file's other targets hold it as F16,
        # which is what `smolq convert` writes (the report says whether that rounded anything).
        return Step(out_name, entry, shape, T.F16, target.layout, "convert", "'ggmm' forces wte to F32; the file is F16")
    dst, action, why = _choose(entry, shape, target, storable, force)
    return Step(out_name, entry, shape, dst, target.layout, action, why)


def _check_unused(model, src: dict[str, TensorEntry], used: set[str], arch: Arch, target: Target, tied: bool,
                  notes: list[str]) -> None:
    for name, entry in src.items():
        if name in used:
            continue
        if name == "output.weight" and "token_embd.weight" in src:
            same = _same_bytes(entry, src["token_embd.weight"])
            if not same:
                raise InputError(model.path, f"{target.format} has no separate output.weight for {arch.family}, "
                                             "and this one differs from token_embd.weight")
            notes.append("output.weight equals token_embd.weight (tied); the target stores it once")
            continue
        if name == "rope_freqs.weight" or name.endswith(".attn_rot_embd.weight"):
            notes.append(f"{name} dropped (llama.cpp recomputes it)")
            continue
        raise FormatError(model.path, f"tensor {entry.name} has no place in {arch.family} ({target.format})")


# ====================================================================== the plan

def _family_of(model) -> str | None:
    if model.container != "gguf":
        return model.architecture
    arch = model.metadata.get("general.architecture")
    return arch if arch in FAMILIES else None


def _llama_tied(model, src: dict[str, TensorEntry], user: dict[str, Any], user_path, notes: list[str]) -> bool:
    if "output.weight" not in src:
        return True
    if model.container == "gguf":
        return False
    same = _same_bytes(src["output.weight"], src["token_embd.weight"])
    if "tie_word_embeddings" in user:
        tied = bool(user["tie_word_embeddings"])
        if tied and not same:
            notes.append(f"{user_path}: tie_word_embeddings is true, but output.weight differs from "
                         "tok_embeddings.weight; both kept")
            return False
        return tied
    return same


def _model_name(user: dict[str, Any], user_path: Path | None, source: Path, guesses: list[Guess]) -> str:
    name = user.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        return Path(name.rstrip("/")).name
    if user_path is not None:
        return user_path.parent.resolve().name
    guesses.append(Guess("general.name", source.stem, "the source file's name"))
    return source.stem


def _file_type(model, steps: list[Step]) -> int | None:
    """general.file_type / the LLaMA header ftype: the source's, unless the main type changed."""

    if model.container == "gguf":
        ftype = model.metadata.get("general.file_type")
    elif model.architecture == "llama" or model.header.get("dialect") == "gpt4all":
        ftype = model.ftype
    else:
        ftype = GGML_FTYPE_TO_LLAMA.get(model.ftype)
    # A file type whose weight type no longer occurs (MOSTLY_Q4_2 after requantizing) is recomputed.
    named = {v: k for k, v in PLAIN_FTYPE.items()} | FTYPE_MIXES
    out_types = {s.type for s in steps}
    if ftype is not None and named.get(ftype) not in out_types:
        after = _main_type(_as_out(s) for s in steps)
        ftype = PLAIN_FTYPE.get(after) if after is not None else ftype
    return ftype


def _as_out(step: Step) -> TensorEntry:
    return TensorEntry(step.name, step.type, step.shape)


def build_plan(src_path, out_path, format: str | None = None, config: str | os.PathLike | None = None,
               type: str | None = None) -> tuple[Plan, Any]:
    """Read the source and decide everything; returns (plan, opened source) — close the source after."""

    src_path, out_path = Path(src_path), Path(out_path)
    force = None
    if type is not None:

        force = parse_type(type, "--type")
    user, user_path, tok_dir = read_user_config(config)
    model = open_model(src_path)
    try:
        family = _family_of(model)
        target = resolve_target(format, out_path, family=family)
        plan = Plan(src_path, _format_of(model), family, target, [])
        if model.container == "gguf" and target.is_gguf:
            plan.steps = _plan_gguf_copy(model, target, force)
            plan.metadata = _gguf_metadata_for_version(model, target, plan)
        else:
            _plan_with_arch(plan, model, user, user_path, tok_dir, force)
        return plan, model
    except BaseException:
        model.close()
        raise


def _plan_with_arch(plan: Plan, model, user, user_path, tok_dir, force) -> None:
    family, target = plan.family, plan.target
    if family is None:
        raise InputError(model.path, f"architecture {model.architecture!r} has no legacy format")
    arch_cls = family_arch(family)
    src = _canonical_tensors(model, arch_cls)
    if model.container == "gguf":
        cfg = _config_from_gguf(family, model.metadata, src, model.path)
    else:
        d = _Derived(family, user, user_path, model.path)
        LEGACY_CONFIG[family](d, dict(model.metadata), src)
        cfg = d.config
        plan.guesses += d.guesses
        plan.notes += d.notes
    tied = family == "llama" and _llama_tied(model, src, user, user_path, plan.notes)
    if family == "llama":
        cfg["tie_word_embeddings"] = tied
    arch = arch_cls(cfg, user_path or model.path)
    if target.legacy is not None:
        arch.legacy_target(target.format, plan.source_path)  # the family's own refusals (MPT with GQA)
    plan.guesses += [Guess("?", None, g) for g in arch.guesses]  # none expected: every key is filled above
    plan.steps = _plan_family(model, arch, target, force, tied, plan.notes)
    vocab = _vocab(plan, model, arch, user, tok_dir)
    file_type = _file_type(model, plan.steps)
    if target.is_gguf:
        plan.metadata = _gguf_metadata(arch, vocab, user, user_path, model.path, file_type, plan.guesses)
    else:
        plan.legacy_hparams = arch.legacy_hparams(target.legacy)
        plan.notes += arch.notes
        plan.legacy_vocab = _legacy_vocab(plan, model, vocab, arch)
        plan.legacy_ftype = file_type if family == "llama" else None


def _vocab(plan: Plan, model, arch: Arch, user: dict[str, Any], tok_dir: Path | None) -> Vocab:
    """The tokenizer from --config when it matches the file, else the file's own vocabulary."""

    n_vocab = arch.n_vocab
    if tok_dir is not None:
        vocab = load_vocab(tok_dir, n_vocab, arch.family, user)
        mismatch = _vocab_mismatch(vocab, model)
        if not mismatch:
            plan.notes += vocab.notes
            return vocab
        plan.notes.append(f"the tokenizer in {tok_dir} differs from the file's vocabulary at {mismatch} ids; "
                          "using the file's")
    if model.container == "gguf":
        return vocab_from_gguf(model.metadata, arch.family, model.path)
    if len(model.raw.vocab) != n_vocab:
        raise FormatError(model.path, f"{len(model.raw.vocab)} tokens for n_vocab {n_vocab}")
    return vocab_from_legacy(model.raw, plan.guesses, plan.notes)


def _vocab_mismatch(vocab: Vocab, model) -> int:
    if model.container == "gguf":
        theirs = model.metadata.get("tokenizer.ggml.tokens") or []
        mine = vocab.gguf_metadata(model.architecture)["tokenizer.ggml.tokens"].value
        return sum(a != b for a, b in zip(mine, theirs)) + abs(len(mine) - len(theirs))
    lf = model.raw
    texts = _legacy_texts(vocab, lf)
    return sum(a != b for a, (b, _) in zip(texts, lf.vocab)) + abs(len(texts) - len(lf.vocab))


def _legacy_vocab(plan: Plan, model, vocab: Vocab, arch: Arch) -> list[tuple[bytes, float | None, bool]]:
    lt = plan.target.legacy
    if model.container != "gguf" and _same_text_rules(model.raw, lt):
        # Same family and text rules: the file's bytes pass through untouched.
        lf = model.raw
        out = []
        for i, (text, score) in enumerate(lf.vocab):
            if score is None and (vocab.scores is not None):
                score = vocab.scores[i]
            out.append((text, score if score is not None else 0.0, i in lf.special_tokens))
        return out
    return vocab.legacy_tokens(arch.family, lt.container, lt.dialect)


def _same_text_rules(lf, lt: LegacyTarget) -> bool:
    if lf.family == "llama":
        return True
    if lf.family == "gptj":
        return True
    return lf.container == lt.container


def _gguf_metadata(arch: Arch, vocab: Vocab, user, user_path, source: Path, file_type, guesses) -> dict[str, Any]:
    """The keys `smolq convert` writes, in its order; the name comes from --config or the file."""

    return gguf_metadata(arch, vocab, None, file_type, name=_model_name(user, user_path, source, guesses))


def _gguf_metadata_for_version(model, target: Target, plan: Plan) -> dict[str, Any]:
    """GGUF -> GGUF: the same KVs; 64-bit values narrowed for v1 where they fit (formats.md 6.2)."""

    allowed = VERSIONS[target.gguf_version].value_types
    narrow = {V.UINT64: V.UINT32, V.INT64: V.INT32, V.FLOAT64: V.FLOAT32}
    out: dict[str, Any] = {}
    for key, mv in model.raw.metadata.items():
        t = mv.item_type if mv.type == V.ARRAY else mv.type
        if t in allowed:
            out[key] = mv
            continue
        try:
            out[key] = MetaValue.of(mv.value, narrow[t]) if mv.type != V.ARRAY else MetaValue.array(mv.value, narrow[t])
        except (ValueError, KeyError, OverflowError):
            raise InputError(plan.target.format, f"metadata {key} ({t.name}) does not fit GGUF v{target.gguf_version}") from None
        plan.notes.append(f"{key}: {t.name} narrowed to {narrow[t].name} for GGUF v{target.gguf_version}")
    ftype = _file_type(model, plan.steps)
    if ftype is not None and "general.file_type" in out and out["general.file_type"].value != ftype:
        out["general.file_type"] = MetaValue.u32(ftype)
    return out


# ====================================================================== tensor data

def _produce(step: Step) -> np.ndarray:
    """The output bytes of one step; fills step.lossless and step.stats."""
    src = step.source
    if step.action == "copy":
        step.lossless = True
        return src.load()
    if step.action == "relayout":

        data, _ = relayout(src.load(), src.type, src.layout, step.layout)
    else:
        if not _decodable(src.type, src.layout):
            raise InputError(None, f"tensor {src.name}: smolq cannot decode {src.type.name} to convert it")

        data = convert_tensor(_decode(src, src.type, src.shape, src.layout), step.type, step.layout)
    ref = _decode(src, src.type, src.shape, src.layout)
    test = _decode(data, step.type, step.shape, step.layout)
    step.lossless, step.stats = _compare(ref, test)
    return data


def _produce_or_explain(step: Step, path: Path) -> np.ndarray:
    try:
        return _produce(step)
    except ValueError as exc:  # the kernel's refusals (a NaN to quantize, a type it cannot decode)
        raise InputError(path, f"tensor {step.source.name}: {exc}") from None


def _entries(plan: Plan) -> list[TensorEntry]:
    return [TensorEntry(s.name, s.type, s.shape, (lambda s=s: _produce_or_explain(s, plan.source_path)), s.layout)
            for s in plan.steps]


# ====================================================================== the command

def summary(plan: Plan, out: Path) -> dict[str, Any]:
    steps = plan.steps
    return {
        "source": str(plan.source_path), "output": str(out), "source_format": plan.source_format,
        "format": plan.target.format, "architecture": plan.family, "n_tensors": len(steps),
        "tensor_bytes": sum(s.nbytes for s in steps),
        "guesses": [g.as_dict() for g in plan.guesses], "notes": list(plan.notes),
        "tensors": [s.as_dict() for s in steps],
        "n_copied": sum(s.action == "copy" for s in steps),
        "n_lossless": sum(s.lossless is True for s in steps),
        "n_lossy": sum(s.lossless is False for s in steps),
    }


def migrate(src_path, out_path, format: str | None = None, config: str | os.PathLike | None = None,
            type: str | None = None, dry_run: bool = False,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Migrate one model file; returns the summary (the per-tensor report filled in).

    format: gguf (v3, default), gguf-v1|v2|v3, ggml, ggmf, ggjt-v1|v2|v3, ggmm.
    config: an HF checkpoint directory or config.json for the values a legacy
    header lacks (and its tokenizer); without it they are guessed and listed.
    type: where tensors go that cannot be carried exactly (f32: lossless).
    """
    started = time.perf_counter()
    out = Path(out_path)
    plan, model = build_plan(src_path, out, format, config, type)
    try:
        if out.resolve() == Path(src_path).resolve():
            raise InputError(out, "output would overwrite the input")
        result = summary(plan, out)
        if dry_run:
            result["dry_run"] = True
            return result
        _emit(on_progress, event="start", n_tensors=len(plan.steps), n_bytes=result["tensor_bytes"])

        def on_tensor(entry: TensorEntry, *_: Any) -> None:
            _emit(on_progress, event="tensor", name=entry.name, nbytes=entry.nbytes)

        size = _write(plan, out, on_tensor)
        result = summary(plan, out)
        result.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
        _emit(on_progress, event="done", bytes=size)
        return result
    finally:
        model.close()


def _emit(on_progress, **event) -> None:
    if on_progress is not None:
        on_progress(event)


def _write(plan: Plan, out: Path, on_tensor) -> int:
    entries = _entries(plan)
    if plan.target.is_gguf:

        return write_gguf(out, plan.metadata, entries, version=plan.target.gguf_version, on_tensor=on_tensor)

    lt = plan.target.legacy
    vocab = plan.legacy_vocab
    write_legacy(out, lt.container, lt.version, plan.family, plan.legacy_hparams,
                 [(text, score) for text, score, _ in vocab], entries, dialect=lt.dialect,
                 ftype=plan.legacy_ftype, on_tensor=on_tensor,
                 special_tokens=[i for i, (_, _, special) in enumerate(vocab) if special])
    return out.stat().st_size
