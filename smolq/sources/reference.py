"""A small numpy forward pass over GGUF-named tensors: the yardstick for conversions.

`forward("llama", tensors, hparams, tokens)` runs a model from a dict of
GGUF tensor names (token_embd.weight, blk.0.attn_q.weight, ...; arrays in
PyTorch order, [out, in] for matrices) and a dict of GGUF metadata keys
(llama.embedding_length, ...), and returns logits [batch, seq, vocab].

It computes what llama.cpp (LLaMA, MPT) and GPT4All (GPT-J) compute, from
the tensors as stored in the file, not from the HF checkpoint:
- LLaMA: RoPE in ggml's "normal" mode, which rotates adjacent pairs
  (2i, 2i+1) of each head. GGUF/legacy LLaMA Q and K rows are stored in
  Meta's interleaved order (formats.md 6.7), so running this on a file and
  matching transformers' logits checks the Q/K permutation independently.
- GPT-J: the same adjacent-pair RoPE on the first rotary_dim dimensions of
  each head (HF's rotate_every_two is that pairing), attention and MLP in
  parallel from one LayerNorm, biases on the MLP and the head.
- MPT: fused attn_qkv (rows Q, K, V), optional clamp, ALiBi slopes as ggml
  computes them (the interleaved extension for non-power-of-2 head counts),
  LayerNorm with or without bias.
- Gemma 3: as llama.cpp's gemma3 graph: the embedding times sqrt(n_embd),
  RMS norms on Q and K per head and after each branch (weights as stored,
  i.e. with the +1 already in), NEOX RoPE (halves rotated together) with
  the local base on sliding-window layers and the global base (and linear
  scaling) on the others, the layer pattern of the file (every 6th global
  by default), GELU(tanh) gating, optional final logit soft-capping.

Numerics are float64 by default, so that on an f32 file the only error left
in a comparison is transformers' own float32 rounding. Activations follow
the model definitions (MPT's GELU is the exact erf form as in transformers;
ggml uses the tanh approximation, a difference of up to ~1e-3 per unit).

`logits_from_file(path, tokens)` reads any GGUF or legacy file smolq reads,
dequantizes every tensor with the C kernel and runs `forward`;
`compare_logits(path, hf_dir)` also runs transformers on the HF checkpoint
and reports max |diff|, top-1 agreement and KL divergence.
"""
from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from smolq import kernels
from smolq.arch import family_arch
from smolq.formats.detect import open_model
from smolq.ggml_types import GGMLType
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

DEFAULT_ROPE_BASE = 10000.0
_REQUIRED = object()


# --------------------------------------------------------------------------- building blocks


def _linear(x: np.ndarray, tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """x @ W.T (+ b when `name`.bias exists); W is [out, in] as stored."""
    y = x @ tensors[f"{name}.weight"].T
    bias = tensors.get(f"{name}.bias")
    return y if bias is None else y + bias


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _layer_norm(x: np.ndarray, tensors: Mapping[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * tensors[f"{name}.weight"]
    bias = tensors.get(f"{name}.bias")
    return y if bias is None else y + bias


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)  # exact erf, elementwise (transformers' GELU)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)).astype(x.dtype))


def rope_normal(x: np.ndarray, n_rot: int, base: float, position_scale: float = 1.0,
                freq_factors: np.ndarray | None = None, neox: bool = False) -> np.ndarray:
    """ggml RoPE on x [batch, seq, heads, head_dim]: rotate pair i (i < n_rot/2) by angle
    p·base^(-2i/n_rot) / freq_factors[i] (Llama 3.1's rope_freqs; none: 1); the dimensions
    from n_rot on pass through. p is the position in the sequence (times `position_scale`
    for linear RoPE scaling). Mode 0 pairs (2i, 2i+1); NeoX mode (Qwen) pairs (i, i + n_rot/2)."""
    seq = x.shape[1]
    pos = np.arange(seq, dtype=np.float64) * position_scale
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    angle = pos[:, None] * inv_freq[None, :]  # [seq, n_rot/2]
    cos = np.cos(angle)[None, :, None, :].astype(x.dtype)
    sin = np.sin(angle)[None, :, None, :].astype(x.dtype)
    first, second = (slice(0, n_rot // 2), slice(n_rot // 2, n_rot)) if neox else \
        (slice(0, n_rot, 2), slice(1, n_rot, 2))
    a, b = x[..., first], x[..., second]
    out = x.copy()
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out


def rope_neox(x: np.ndarray, n_rot: int, base: float, position_scale: float = 1.0) -> np.ndarray:
    """ggml RoPE NEOX mode on x [batch, seq, heads, head_dim]: dimension i < n_rot/2 turns
    with i + n_rot/2 by angle p·base^(-2i/n_rot) (transformers' rotate_half)."""
    seq, half = x.shape[1], n_rot // 2
    pos = np.arange(seq, dtype=np.float64) * position_scale
    angle = pos[:, None] * (base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot))[None, :]
    cos = np.cos(angle)[None, :, None, :].astype(x.dtype)
    sin = np.sin(angle)[None, :, None, :].astype(x.dtype)
    first, second = x[..., :half], x[..., half:n_rot]
    out = x.copy()
    out[..., :half] = first * cos - second * sin
    out[..., half:n_rot] = second * cos + first * sin
    return out


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """ggml's ALiBi slopes: m0^(k+1) for the first 2^floor(log2 n) heads,
    then odd powers of m1 = 2^(-max_bias/2 / that count) for the rest."""
    n_floor = 1 << (n_head.bit_length() - 1)
    m0 = 2.0 ** (-max_bias / n_floor)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_floor)
    return np.array([m0 ** (k + 1) if k < n_floor else m1 ** (2 * (k - n_floor) + 1) for k in range(n_head)])


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, bias: np.ndarray | None = None) -> np.ndarray:
    """Causal attention. q [b, s, n_head, hd]; k, v [b, s, n_kv, hd]; query
    head h reads KV head h // (n_head / n_kv) (llama.cpp's GQA broadcast).
    `bias` [n_head, s, s] is added to the scores before the mask."""
    b, s, n_head, hd = q.shape
    group = n_head // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        scores = scores + bias[None]
    future = np.triu(np.ones((s, s), dtype=bool), k=1)
    scores = np.where(future[None, None], -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(b, s, n_head * v.shape[-1])


def _heads(x: np.ndarray, n: int) -> np.ndarray:
    b, s, width = x.shape
    return x.reshape(b, s, n, width // n)


def _output(x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The head; without output.weight the embedding is reused (tied models)."""
    if "output.weight" in tensors:
        return _linear(x, tensors, "output")
    return x @ tensors["token_embd.weight"].T


# --------------------------------------------------------------------------- hyperparameters


class _HParams:
    """`<arch>.<key>` lookups in GGUF metadata terms, with defaults where loaders have them."""

    def __init__(self, arch: str, hparams: Mapping[str, Any]):
        self.arch, self.values = arch, hparams

    def __call__(self, key: str, default: Any = _REQUIRED) -> Any:
        full = f"{self.arch}.{key}"
        value = self.values.get(full)
        if value is None:
            if default is _REQUIRED:
                raise KeyError(f"hyperparameter {full} is missing")
            return default
        return value


def _block_count(hp: _HParams, tensors: Mapping[str, np.ndarray]) -> int:
    n = hp("block_count", None)
    if n is not None:
        return int(n)
    return 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blk."))


# --------------------------------------------------------------------------- architectures


def _llama(t: Mapping[str, np.ndarray], hp: _HParams, tokens: np.ndarray, neox: bool = False) -> np.ndarray:
    """LLaMA and the families built like it: Mistral (a `llama` file), Qwen2 (q/k/v biases, which
    _linear adds) and Qwen3 (RMSNorm of each Q and K head before RoPE), both in NeoX RoPE order."""
    n_embd = int(hp("embedding_length"))
    n_head = int(hp("attention.head_count"))
    n_kv = int(hp("attention.head_count_kv", n_head))
    head_dim = int(hp("attention.key_length", n_embd // n_head))
    n_rot = int(hp("rope.dimension_count", head_dim))
    eps = float(hp("attention.layer_norm_rms_epsilon"))
    base = float(hp("rope.freq_base", DEFAULT_ROPE_BASE))
    scale = _rope_position_scale(hp)
    factors = t.get("rope_freqs.weight")
    x = t["token_embd.weight"][tokens]

    def heads(h: np.ndarray, p: str, kind: str, n: int) -> np.ndarray:
        y = _heads(_linear(h, t, f"{p}.attn_{kind}"), n)
        norm = t.get(f"{p}.attn_{kind}_norm.weight")
        if norm is not None:
            y = _rms_norm(y, norm, eps)
        return rope_normal(y, n_rot, base, scale, factors, neox)

    for i in range(_block_count(hp, t)):
        p = f"blk.{i}"
        h = _rms_norm(x, t[f"{p}.attn_norm.weight"], eps)
        q, k = heads(h, p, "q", n_head), heads(h, p, "k", n_kv)
        v = _heads(_linear(h, t, f"{p}.attn_v"), n_kv)
        x = x + _linear(_attention(q, k, v, 1.0 / math.sqrt(head_dim)), t, f"{p}.attn_output")
        h = _rms_norm(x, t[f"{p}.ffn_norm.weight"], eps)
        gated = _silu(_linear(h, t, f"{p}.ffn_gate")) * _linear(h, t, f"{p}.ffn_up")
        x = x + _linear(gated, t, f"{p}.ffn_down")
    return _output(_rms_norm(x, t["output_norm.weight"], eps), t)


def _rope_position_scale(hp: _HParams) -> float:
    """Linear RoPE scaling divides positions by the factor (2023 key or the later pair)."""
    linear = hp("rope.scale_linear", None)
    if linear is not None:
        return 1.0 / float(linear)
    kind = hp("rope.scaling.type", None)
    if kind is None or kind == "none":
        return 1.0
    if kind != "linear":
        raise NotImplementedError(f"RoPE scaling {kind!r} is not implemented in the reference forward pass")
    return 1.0 / float(hp("rope.scaling.factor"))


def _gptj(t: Mapping[str, np.ndarray], hp: _HParams, tokens: np.ndarray) -> np.ndarray:
    n_embd = int(hp("embedding_length"))
    n_head = int(hp("attention.head_count"))
    head_dim = n_embd // n_head
    n_rot = int(hp("rope.dimension_count"))
    eps = float(hp("attention.layer_norm_epsilon"))
    base = float(hp("rope.freq_base", DEFAULT_ROPE_BASE))
    x = t["token_embd.weight"][tokens]
    for i in range(_block_count(hp, t)):
        p = f"blk.{i}"
        h = _layer_norm(x, t, f"{p}.attn_norm", eps)
        q = rope_normal(_heads(_linear(h, t, f"{p}.attn_q"), n_head), n_rot, base)
        k = rope_normal(_heads(_linear(h, t, f"{p}.attn_k"), n_head), n_rot, base)
        v = _heads(_linear(h, t, f"{p}.attn_v"), n_head)
        attn = _linear(_attention(q, k, v, 1.0 / math.sqrt(head_dim)), t, f"{p}.attn_output")
        mlp = _linear(_gelu_tanh(_linear(h, t, f"{p}.ffn_up")), t, f"{p}.ffn_down")
        x = x + attn + mlp  # GPT-J: attention and MLP both read ln_1's output
    return _output(_layer_norm(x, t, "output_norm", eps), t)


def _mpt(t: Mapping[str, np.ndarray], hp: _HParams, tokens: np.ndarray) -> np.ndarray:
    n_embd = int(hp("embedding_length"))
    n_head = int(hp("attention.head_count"))
    n_kv = int(hp("attention.head_count_kv", n_head))
    head_dim = n_embd // n_head
    eps = float(hp("attention.layer_norm_epsilon", 1e-5))
    clamp = float(hp("attention.clamp_kqv", 0.0))
    max_bias = float(hp("attention.max_alibi_bias", 0.0))
    seq = tokens.shape[1]
    alibi = None
    if max_bias > 0:
        # slope · key position; softmax is blind to the per-row constant HF subtracts.
        alibi = alibi_slopes(n_head, max_bias)[:, None, None] * np.arange(seq, dtype=np.float64)[None, None, :]
        alibi = np.broadcast_to(alibi, (n_head, seq, seq))
    x = t["token_embd.weight"][tokens]
    for i in range(_block_count(hp, t)):
        p = f"blk.{i}"
        h = _layer_norm(x, t, f"{p}.attn_norm", eps)
        qkv = _linear(h, t, f"{p}.attn_qkv")
        if clamp > 0:
            qkv = np.clip(qkv, -clamp, clamp)
        kv_width = n_kv * head_dim
        q, k, v = np.split(qkv, [n_embd, n_embd + kv_width], axis=-1)
        attn = _attention(_heads(q, n_head), _heads(k, n_kv), _heads(v, n_kv), 1.0 / math.sqrt(head_dim),
                          alibi.astype(x.dtype) if alibi is not None else None)
        x = x + _linear(attn, t, f"{p}.attn_output")
        h = _layer_norm(x, t, f"{p}.ffn_norm", eps)
        x = x + _linear(_gelu_erf(_linear(h, t, f"{p}.ffn_up")), t, f"{p}.ffn_down")
    return _output(_layer_norm(x, t, "output_norm", eps), t)


GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 loader: every 6th layer global unless the file says
GEMMA3_27B_LAYERS = 62  # llama.cpp scales attention by 1/sqrt(n_embd / n_head) for this size only


def _gemma3_sliding(hp: _HParams, n_layer: int) -> list[bool]:
    """Which layers attend within the sliding window, as llama.cpp's loader decides."""
    if not hp("attention.sliding_window", 0):
        return [False] * n_layer
    pattern = hp("attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, (list, tuple)):
        return [bool(flag) for flag in pattern]
    return [bool(pattern) and i % int(pattern) < int(pattern) - 1 for i in range(n_layer)]


def _window_bias(seq: int, window: int) -> np.ndarray:
    """-inf where the key lies `window` or more positions before the query ([1, seq, seq])."""
    q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
    return np.where(q - k >= window, -np.inf, 0.0)[None]


def _gemma3(t: Mapping[str, np.ndarray], hp: _HParams, tokens: np.ndarray) -> np.ndarray:
    n_embd = int(hp("embedding_length"))
    n_head = int(hp("attention.head_count"))
    n_kv = int(hp("attention.head_count_kv", n_head))
    head_dim = int(hp("attention.key_length", n_embd // n_head))
    eps = float(hp("attention.layer_norm_rms_epsilon"))
    n_layer = _block_count(hp, t)
    sliding = _gemma3_sliding(hp, n_layer)
    window = int(hp("attention.sliding_window", 0))
    rope = {True: (float(hp("rope.freq_base_swa", DEFAULT_ROPE_BASE)), 1.0),
            False: (float(hp("rope.freq_base", DEFAULT_ROPE_BASE)), _rope_position_scale(hp))}
    scale = 1.0 / math.sqrt(n_embd / n_head if n_layer == GEMMA3_27B_LAYERS else head_dim)
    x = t["token_embd.weight"][tokens] * np.asarray(math.sqrt(n_embd), dtype=t["token_embd.weight"].dtype)
    bias = _window_bias(tokens.shape[1], window) if window else None
    for i in range(n_layer):
        p, base, position_scale = f"blk.{i}", *rope[sliding[i]]
        h = _rms_norm(x, t[f"{p}.attn_norm.weight"], eps)
        q = _rms_norm(_heads(_linear(h, t, f"{p}.attn_q"), n_head), t[f"{p}.attn_q_norm.weight"], eps)
        k = _rms_norm(_heads(_linear(h, t, f"{p}.attn_k"), n_kv), t[f"{p}.attn_k_norm.weight"], eps)
        q, k = rope_neox(q, head_dim, base, position_scale), rope_neox(k, head_dim, base, position_scale)
        v = _heads(_linear(h, t, f"{p}.attn_v"), n_kv)
        attn = _linear(_attention(q, k, v, scale, bias if sliding[i] else None), t, f"{p}.attn_output")
        x = x + _rms_norm(attn, t[f"{p}.post_attention_norm.weight"], eps)
        h = _rms_norm(x, t[f"{p}.ffn_norm.weight"], eps)
        gated = _gelu_tanh(_linear(h, t, f"{p}.ffn_gate")) * _linear(h, t, f"{p}.ffn_up")
        x = x + _rms_norm(_linear(gated, t, f"{p}.ffn_down"), t[f"{p}.post_ffw_norm.weight"], eps)
    logits = _output(_rms_norm(x, t["output_norm.weight"], eps), t)
    cap = hp("final_logit_softcapping", None)
    return cap * np.tanh(logits / cap) if cap else logits


ARCHITECTURES: dict[str, Callable[..., np.ndarray]] = {
    "llama": _llama, "gptj": _gptj, "mpt": _mpt,
    "qwen2": partial(_llama, neox=True), "qwen3": partial(_llama, neox=True), "gemma3": _gemma3,
}


def forward(arch: str, tensors: Mapping[str, np.ndarray], hparams: Mapping[str, Any], tokens: np.ndarray,
            *, dtype: Any = "float64") -> np.ndarray:
    """Logits [batch, seq, vocab] for `tokens` [batch, seq] (or [seq])."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"no reference forward pass for architecture {arch!r} (have {', '.join(ARCHITECTURES)})")
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    cast = {name: np.asarray(value, dtype=dtype) for name, value in tensors.items()}
    n_vocab = cast["token_embd.weight"].shape[0]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= n_vocab):
        raise ValueError(f"token ids must be in [0, {n_vocab})")
    return ARCHITECTURES[arch](cast, _HParams(arch, hparams), tokens)


# --------------------------------------------------------------------------- files


def tensor_to_float(entry) -> np.ndarray:
    """A TensorEntry's data as float32 in its PyTorch-order shape (the C kernel
    decodes every float and block type; gguf-py covers types it lacks, v3 only)."""

    raw = entry.load()
    if (entry.type, entry.layout) in kernels.DEQUANTIZE_TYPES:
        return kernels.dequantize(raw, entry.type, entry.shape, layout=entry.layout)
    if entry.layout != "v3":
        raise ValueError(f"{entry.name}: no decoder for {GGMLType(entry.type).name} in layout {entry.layout}")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    flat = np.frombuffer(bytes(memoryview(raw).cast("B")), dtype=np.uint8)
    rows = flat.reshape(int(np.prod(entry.shape[:-1], dtype=np.int64)), -1)
    return dequantize(rows, GGMLQuantizationType(int(entry.type))).reshape(entry.shape).astype(np.float32)


# Legacy header field -> GGUF `<arch>.` key (formats.md 2 and 6.4). MPT has two dialects' names.
LEGACY_HPARAM_KEYS: dict[str, dict[str, str]] = {
    "llama": {"n_embd": "embedding_length", "n_head": "attention.head_count", "n_layer": "block_count",
              "n_rot": "rope.dimension_count"},
    "gptj": {"n_ctx": "context_length", "n_embd": "embedding_length", "n_head": "attention.head_count",
             "n_layer": "block_count", "n_rot": "rope.dimension_count"},
    "mpt": {"d_model": "embedding_length", "n_embd": "embedding_length", "max_seq_len": "context_length",
            "n_ctx": "context_length", "n_heads": "attention.head_count", "n_head": "attention.head_count",
            "n_layers": "block_count", "n_layer": "block_count", "alibi_bias_max": "attention.max_alibi_bias",
            "clip_qkv": "attention.clamp_kqv"},
}


def _legacy_hparams(family: str, header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """GGUF-style hparams from a legacy header; LLaMA's KV head count from attn_k's rows."""
    out = {f"{family}.{LEGACY_HPARAM_KEYS[family][k]}": v for k, v in header.items() if k in LEGACY_HPARAM_KEYS[family]}
    if family == "llama" and "blk.0.attn_k.weight" in tensors:
        head_dim = int(header["n_embd"]) // int(header["n_head"])
        out["llama.attention.head_count_kv"] = tensors["blk.0.attn_k.weight"].shape[0] // head_dim
    return out


def read_model(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """(architecture, GGUF-named float32 tensors, GGUF-style hparams) of any GGUF or legacy file."""

    with open_model(path) as mf:
        arch = mf.architecture
        if mf.is_gguf:
            tensors = {e.name: tensor_to_float(e) for e in mf.tensors}
            return arch, tensors, dict(mf.metadata)

        names = family_arch(arch).names
        tensors = {}
        for e in mf.tensors:
            gguf_name = names.to_gguf(e.name)
            if gguf_name is None:
                raise ValueError(f"{path}: legacy tensor {e.name} has no GGUF name for {arch}")
            tensors[gguf_name] = tensor_to_float(e)
        return arch, tensors, _legacy_hparams(arch, mf.metadata, tensors)


def logits_from_file(path: str | os.PathLike, tokens: np.ndarray, *,
                     hparams_override: Mapping[str, Any] | None = None, dtype: Any = "float64") -> np.ndarray:
    """Reference logits of a converted file. `hparams_override` supplies GGUF
    keys the file lacks (legacy headers carry no norm epsilon or RoPE base);
    keys present in the file win."""
    arch, tensors, hparams = read_model(path)
    merged = {**dict(hparams_override or {}), **hparams}
    return forward(arch, tensors, merged, tokens, dtype=dtype)


# --------------------------------------------------------------------------- comparison with transformers


def default_sequences(n_vocab: int, batch: int = 2, length: int = 16, seed: int = 1234) -> np.ndarray:
    """Deterministic token ids [batch, length] spread over the whole vocabulary."""
    return np.random.default_rng(seed).integers(0, n_vocab, size=(batch, length), dtype=np.int64)


def hf_hparams(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The GGUF keys legacy headers lack, read straight from config.json (both
    places transformers has kept rope_theta), for `hparams_override`."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type == "llama":
        params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", params.get("rope_theta", DEFAULT_ROPE_BASE))
        return {"llama.attention.layer_norm_rms_epsilon": cfg.get("rms_norm_eps", 1e-6), "llama.rope.freq_base": theta}
    if model_type == "gptj":
        return {"gptj.attention.layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5)}
    if model_type == "mpt":
        return {"mpt.attention.layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5)}
    if model_type == "gemma3_text":  # GGUF only: its files carry every key; this fills nothing they have
        return {"gemma3.attention.layer_norm_rms_epsilon": cfg.get("rms_norm_eps", 1e-6)}
    raise ValueError(f"{hf_dir}: no reference for model_type {model_type!r}")


def hf_logits(hf_dir: str | os.PathLike, tokens: np.ndarray) -> np.ndarray:
    """transformers' logits (CPU, float32) for `tokens` [batch, seq]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens, dtype=np.int64))).logits
    return out.float().numpy()


def logit_stats(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """max |diff|, top-1 agreement (fraction of positions) and mean KL(reference || test)."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {test.shape}")
    log_p = reference - _logsumexp(reference)
    log_q = test - _logsumexp(test)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return {
        "max_abs_diff": float(np.max(np.abs(reference - test))),
        "top1_agreement": float(np.mean(reference.argmax(-1) == test.argmax(-1))),
        "kl_div": float(np.mean(kl)),
    }


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(path: str | os.PathLike, hf_dir: str | os.PathLike,
                   sequences: Sequence[Sequence[int]] | np.ndarray | None = None) -> dict[str, float]:
    """Run the converted file (reference forward pass) and the HF checkpoint
    (transformers) on the same tokens and compare their logits."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    tokens = np.asarray(sequences if sequences is not None else default_sequences(int(cfg["vocab_size"])), dtype=np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    ours = logits_from_file(path, tokens, hparams_override=hf_hparams(hf_dir))
    theirs = hf_logits(hf_dir, tokens)
    return logit_stats(theirs, ours)
