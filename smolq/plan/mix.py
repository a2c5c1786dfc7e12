"""Decide what each tensor becomes: llama.cpp's quantization mixes as data.

llama-quantize (src/llama-quant.cpp, llamacpp.md 2.3) picks a per-tensor type
from the requested file type ("ftype" preset): a default type, then bumps for
the output/embedding tensors, attn_v, ffn_down, attn_output and attn_qkv by
layer position, then a fallback when a row length does not fit the block.
This module reproduces those decisions; it never touches tensor data.

Rules are written against GGUF tensor names ("blk.N.attn_v.weight") with the
substring tests llama.cpp uses. Legacy ggml names (LLaMA "layers.N.attention.wv",
GPT-J "transformer.h.N.attn.v_proj", MPT "transformer.blocks.N.attn.Wqkv") and
HF names are first mapped onto the GGUF name through the role tables below.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from smolq.errors import InputError
from smolq.ggml_types import TYPE_INFO, GGMLType, is_quantized

T = GGMLType

# --- tensor roles: legacy / HF names -> GGUF names (formats.md 4.4 and 6.6) -----------------

# Whole-model tensors, by name without the ".weight"/".bias" suffix.
GLOBAL_ROLES: Mapping[str, str] = {
    "token_embd": "token_embd", "tok_embeddings": "token_embd",
    "transformer.wte": "token_embd", "model.embed_tokens": "token_embd",
    "output": "output", "lm_head": "output",
    "output_norm": "output_norm", "norm": "output_norm", "model.norm": "output_norm",
    "transformer.ln_f": "output_norm", "transformer.norm_f": "output_norm",
    "position_embd": "position_embd", "transformer.wpe": "position_embd",
}

# Prefixes that carry a layer number, in every naming scheme we read.
LAYER_PREFIX = re.compile(
    r"^(?:blk|layers|transformer\.h|transformer\.blocks|model\.layers)\.(\d+)\.(.+)$"
)

# Per-layer tensors: the part after the layer prefix, without the suffix.
LAYER_ROLES: Mapping[str, str] = {
    # LLaMA legacy (Meta .pth names)
    "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
    "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    # HF LLaMA
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up",
    # GPT-J (HF names kept in ggml files)
    "ln_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v", "attn.out_proj": "attn_output",
    "mlp.fc_in": "ffn_up", "mlp.fc_out": "ffn_down",
    # MPT
    "norm_1": "attn_norm", "norm_2": "ffn_norm", "attn.Wqkv": "attn_qkv",
    "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down",
}


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def canonical_name(name: str) -> str:
    """The GGUF name of a tensor given in any naming scheme (unknown names unchanged)."""
    stem, suffix = _split_suffix(name)
    if stem in GLOBAL_ROLES:
        return GLOBAL_ROLES[stem] + suffix
    m = LAYER_PREFIX.match(stem)
    if m:
        layer, local = m.groups()
        role = LAYER_ROLES.get(local, local)
        return f"blk.{layer}.{role}{suffix}"
    return name


def tensor_role(name: str) -> tuple[str, int | None]:
    """(role, layer) of a tensor: ("attn_v", 3) for "layers.3.attention.wv.weight"."""
    stem, _ = _split_suffix(canonical_name(name))
    m = re.match(r"^blk\.(\d+)\.(.+)$", stem)
    if m:
        return m.group(2), int(m.group(1))
    return stem, None


# --- presets (llamacpp.md 2.1, formats.md 7) -------------------------------------------------

# LLAMA_FTYPE values, as stored in general.file_type and legacy LLaMA headers.
LLAMA_FTYPE: Mapping[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q4_1_SOME_F16": 4, "Q4_2": 5, "Q4_3": 6,
    "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24,
    "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30,
    "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}
FTYPE_NAME: Mapping[int, str] = {v: k for k, v in LLAMA_FTYPE.items()}


@dataclass(frozen=True)
class Preset:
    name: str  # e.g. "Q4_K_M"
    default_type: GGMLType  # what a quantizable tensor becomes before the mix rules
    ftype: int | None  # LLAMA_FTYPE; None for a plain type without one


# preset name -> default type (llama-quant.cpp's switch on ftype)
PRESET_DEFAULTS: Mapping[str, GGMLType] = {
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
    "F16": T.F16, "BF16": T.BF16, "F32": T.F32,
    "Q2_K": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K,
    "Q6_K": T.Q6_K, "TQ1_0": T.TQ1_0, "TQ2_0": T.TQ2_0,
}

# llama-quantize accepts the bare K names as the _M mixes.
PRESET_ALIASES: Mapping[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# --bits N -> preset
BITS_PRESETS: Mapping[int, str] = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

# Block types smolq's round-to-nearest path can write (DESIGN.md, Quantizers).
RTN_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.TQ1_0, T.TQ2_0,
})

# File type of a file made of one plain type (the MOSTLY_x values).
PLAIN_FTYPE: Mapping[GGMLType, int] = {
    T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
    T.Q2_K: 10, T.Q6_K: 18, T.BF16: 32, T.TQ1_0: 36, T.TQ2_0: 37,
}


def _normalise(name: str) -> str:
    return name.strip().upper().replace("-", "_")


def parse_type(name: str, what: str = "type") -> GGMLType:
    """A single ggml type that smolq can write (for --output-tensor-type etc.)."""
    key = _normalise(name)
    try:
        t = GGMLType.from_name(key)
    except ValueError:
        t = None
    if t is None or t not in RTN_TYPES:
        choices = ", ".join(sorted(x.name for x in RTN_TYPES))
        raise InputError(None, f"unknown {what} {name!r}; choose one of {choices}")
    return t


def resolve_preset(type_name: str | None = None, bits: int | None = None) -> Preset:
    """The preset for --type NAME or --bits N (exactly one of them)."""
    if (type_name is None) == (bits is None):
        raise InputError(None, "give exactly one of --type and --bits")
    if bits is not None:
        if bits not in BITS_PRESETS:
            raise InputError(None, f"--bits {bits} is not supported; choose one of {sorted(BITS_PRESETS)}")
        type_name = BITS_PRESETS[bits]
    key = _normalise(type_name)
    key = PRESET_ALIASES.get(key, key)
    if key in PRESET_DEFAULTS:
        return Preset(key, PRESET_DEFAULTS[key], LLAMA_FTYPE[key])
    try:
        t = parse_type(key)
    except InputError:
        names = sorted(PRESET_DEFAULTS) + sorted(PRESET_ALIASES)
        raise InputError(None, f"unknown type {type_name!r}; choose one of {', '.join(names)}") from None
    return Preset(t.name, t, PLAIN_FTYPE.get(t))


# --- the model facts the mix rules look at -----------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    arch: str = "llama"
    n_layer: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        if self.n_head and self.n_head_kv:
            return self.n_head // self.n_head_kv
        return 1

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B: a LLaMA with 80 layers and grouped KV heads.
        return self.arch == "llama" and self.n_layer == 80 and self.n_gqa > 1

    @classmethod
    def from_metadata(cls, arch: str, meta: Mapping[str, object],
                      tensors: Iterable[tuple[str, Sequence[int]]] = ()) -> "ModelInfo":
        """From GGUF keys ("llama.block_count") or legacy hparams ("n_layer", "n_layers").

        Legacy LLaMA headers have no KV head count (70B took it from the command
        line), so without one it is read off attn_k's rows, given (name, shape) pairs.
        """

        def first(*keys: str) -> int:
            for key in keys:
                value = meta.get(key)
                if isinstance(value, (list, tuple)):  # per-layer arrays in some GGUFs
                    value = value[0] if value else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return int(value)
            return 0

        n_head = first(f"{arch}.attention.head_count", "n_head", "n_heads")
        n_embd = first(f"{arch}.embedding_length", "n_embd", "d_model")
        n_head_kv = first(f"{arch}.attention.head_count_kv", "n_head_kv")
        if not n_head_kv and n_head and n_embd:
            n_head_kv = _kv_heads_from_attn_k(tensors, n_embd // n_head) or n_head
        return cls(
            arch=arch,
            n_layer=first(f"{arch}.block_count", "n_layer", "n_layers"),
            n_head=n_head,
            n_head_kv=n_head_kv or n_head,
            n_expert=first(f"{arch}.expert_count", "n_expert"),
        )


def _kv_heads_from_attn_k(tensors: Iterable[tuple[str, Sequence[int]]], head_dim: int) -> int:
    for name, shape in tensors:
        if canonical_name(name) == "blk.0.attn_k.weight" and len(shape) == 2 and head_dim:
            return int(shape[0]) // head_dim
    return 0


# --- options and the result ----------------------------------------------------------------

@dataclass
class PlanOptions:
    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: GGMLType | None = None
    token_embedding_type: GGMLType | None = None
    tensor_types: Sequence[tuple[str, GGMLType]] = ()  # (regex, type), first match wins
    # An importance matrix is in use (llama.cpp's qs.has_imatrix).
    # TODO(lead): the `mixes` branch owns the rules that read it (Q4_0/Q5_0 ffn_down -> Q4_1/Q5_1
    # in the first n/8 layers, the IQ mixes); until it lands, nothing here looks at it.
    has_imatrix: bool = False


def parse_tensor_type_overrides(specs: Iterable[str]) -> list[tuple[str, GGMLType]]:
    """--tensor-type REGEX=TYPE values -> [(regex, type)]; bad ones are a one-line error."""
    out = []
    for spec in specs:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern:
            raise InputError(None, f"--tensor-type {spec!r}: expected REGEX=TYPE")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(None, f"--tensor-type {spec!r}: bad regex: {exc}") from None
        out.append((pattern, parse_type(type_name, "tensor type")))
    return out


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_type: GGMLType
    dst_type: GGMLType
    fallback: bool = False  # the row length forced a fallback type

    @property
    def converts(self) -> bool:
        return self.dst_type != self.src_type


@dataclass
class QuantPlan:
    preset: Preset
    tensors: list[TensorPlan] = field(default_factory=list)

    @property
    def n_fallback(self) -> int:
        return sum(t.fallback for t in self.tensors)

    def requantized(self) -> list[TensorPlan]:
        """Tensors whose already-quantized source would be quantized again."""
        return [t for t in self.tensors if t.converts and is_quantized(t.src_type)]


# --- the rules -----------------------------------------------------------------------------

# Substrings of (GGUF) names llama.cpp never quantizes, besides 1-D and non-"weight" tensors.
NEVER_QUANTIZE = (
    "_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d.weight", "shortconv.conv.weight", "attn_rel_b.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
)
NEVER_QUANTIZE_EXACT = ("position_embd.weight", "token_types.weight")

# Row length not a multiple of the block: llama-quant.cpp's replacement types.
SHAPE_FALLBACK: Mapping[GGMLType, GGMLType] = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp: the first and last eighth of the layers, and every third one between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _row_fits(t: GGMLType, shape: tuple[int, ...]) -> bool:
    return bool(shape) and shape[-1] % TYPE_INFO[t].block_size == 0


def is_quantizable(name: str, shape: tuple[int, ...], leave_output: bool = False) -> bool:
    """llama.cpp's test: >= 2-D, a "weight", not a norm/router/position table..."""
    gguf_name = canonical_name(name)
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    if any(s in gguf_name for s in NEVER_QUANTIZE) or gguf_name in NEVER_QUANTIZE_EXACT:
        return False
    return not (leave_output and gguf_name == "output.weight")


class _MixState:
    """llama.cpp's quantize_state_impl: counters that walk attn_v / ffn_* in file order."""

    def __init__(self, info: ModelInfo, names: Sequence[str]):
        self.info = info
        gguf_names = [canonical_name(n) for n in names]
        self.has_output = "output.weight" in gguf_names
        self.n_attention_wv = sum(
            any(k in n for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))
            for n in gguf_names
        )
        layers = {tensor_role(n)[1] for n in names} - {None}
        self.n_layer = info.n_layer or len(layers)
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def layer_of(self, counter: int, name: str) -> int:
        # MoE experts are not stored in layer order, so llama.cpp parses the name there.
        if self.info.n_expert > 1:
            layer = tensor_role(name)[1]
            return counter if layer is None else layer
        return counter


def _output_type(preset: str, default: GGMLType, shape: tuple[int, ...], info: ModelInfo) -> GGMLType:
    n_per_row = shape[-1]
    if info.arch == "falcon" or n_per_row % TYPE_INFO[default].block_size:
        return T.Q8_0
    if default != T.Q8_0:
        return T.Q6_K
    return default


def _attn_v_type(preset: str, new: GGMLType, st: _MixState) -> GGMLType:
    info, i = st.info, st.i_attention_wv
    if preset == "Q2_K":
        new = T.Q4_K if info.n_gqa >= 4 else T.Q3_K
    elif preset == "Q3_K_M":
        new = T.Q5_K if i < 2 else T.Q4_K
    elif preset == "Q3_K_L":
        new = T.Q5_K
    elif preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, st.n_attention_wv):
        new = T.Q6_K
    elif preset == "Q4_K_S" and i < 4:
        new = T.Q5_K
    if info.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K  # 8 heads share attn_v: more bits cost little
    if info.n_expert == 8:
        new = T.Q8_0
    st.i_attention_wv += 1
    return new


def _ffn_down_type(preset: str, new: GGMLType, name: str, st: _MixState) -> GGMLType:
    i = st.layer_of(st.i_ffn_down, name)
    n = st.n_layer
    falcon = st.info.arch == "falcon"
    if preset == "Q2_K":
        new = T.Q3_K
    elif preset == "Q3_K_M":
        if i < n // 16:
            new = T.Q5_K
        elif not falcon or use_more_bits(i, n):
            new = T.Q4_K
        else:
            new = T.Q3_K
    elif preset == "Q3_K_L":
        new = T.Q4_K if falcon else T.Q5_K
    elif preset == "Q4_K_M":
        if falcon:
            new = T.Q6_K if i < n // 16 else (T.Q5_K if use_more_bits(i, n) else T.Q4_K)
        elif use_more_bits(i, n):
            new = T.Q6_K
    elif preset == "Q5_K_M" and use_more_bits(i, n):
        new = T.Q6_K
    elif preset == "Q4_K_S" and not falcon and i < n // 8:
        new = T.Q5_K
    st.i_ffn_down += 1
    return new


_ATTN_OUTPUT_MOE_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
_ATTN_OUTPUT: Mapping[str, GGMLType] = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}


def _attn_output_type(preset: str, new: GGMLType, info: ModelInfo) -> GGMLType:
    if info.arch == "falcon":
        return T.Q4_K if preset == "Q3_K_L" else new
    if info.n_expert == 8:
        return T.Q5_K if preset in _ATTN_OUTPUT_MOE_PRESETS else new
    return _ATTN_OUTPUT.get(preset, new)


_ATTN_QKV: Mapping[str, GGMLType] = {
    "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q4_K, "Q4_K_M": T.Q5_K, "Q5_K_M": T.Q6_K,
}


def _mix_type(preset: Preset, name: str, shape: tuple[int, ...], st: _MixState,
              opts: PlanOptions) -> GGMLType:
    """llama_tensor_get_type without the shape fallback (applied by the caller)."""
    p, new, info = preset.name, preset.default_type, st.info
    n = canonical_name(name)
    if n == "output.weight" or (not st.has_output and n == "token_embd.weight"):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type
        return _output_type(p, new, shape, info)
    if n == "token_embd.weight":
        if opts.token_embedding_type is not None:
            return opts.token_embedding_type
        return T.Q4_K if p in ("TQ1_0", "TQ2_0") else new
    if "attn_v.weight" in n:
        return _attn_v_type(p, new, st)
    if "attn_k.weight" in n:
        return T.Q8_0 if info.n_expert == 8 else new
    if "attn_q.weight" in n:
        return new
    if "ffn_down" in n:
        return _ffn_down_type(p, new, name, st)
    if "attn_output.weight" in n:
        return _attn_output_type(p, new, info)
    if "attn_qkv.weight" in n:
        return _ATTN_QKV.get(p, new)
    return new


def with_shape_fallback(t: GGMLType, shape: tuple[int, ...]) -> tuple[GGMLType, bool]:
    if _row_fits(t, shape):
        return t, False
    t = SHAPE_FALLBACK.get(t, T.F16)
    if not _row_fits(t, shape):
        t = T.F16
    return t, True


def _override(name: str, overrides: Sequence[tuple[str, GGMLType]]) -> GGMLType | None:
    gguf_name = canonical_name(name)
    for pattern, t in overrides:
        if re.search(pattern, name) or re.search(pattern, gguf_name):
            return t
    return None


def plan_tensor_types(
    tensors: Sequence[tuple[str, GGMLType, tuple[int, ...]]],
    preset: Preset,
    info: ModelInfo,
    opts: PlanOptions | None = None,
) -> QuantPlan:
    """Target type of every (name, source type, PyTorch shape), in file order."""
    opts = opts or PlanOptions()
    st = _MixState(info, [name for name, _, _ in tensors])
    plan = QuantPlan(preset)
    for name, src, shape in tensors:
        shape = tuple(shape)
        plan.tensors.append(_plan_one(name, src, shape, preset, st, opts))
    return plan


def _plan_one(name: str, src: GGMLType, shape: tuple[int, ...], preset: Preset,
              st: _MixState, opts: PlanOptions) -> TensorPlan:
    if not is_quantizable(name, shape, opts.leave_output_tensor):
        return TensorPlan(name, shape, src, src)
    new = preset.default_type
    if not opts.pure and is_quantized(new):
        new = _mix_type(preset, name, shape, st, opts)
    override = _override(name, opts.tensor_types)
    if override is not None:
        new = override
    gguf_name = canonical_name(name)
    if opts.token_embedding_type is not None and gguf_name == "token_embd.weight":
        new = opts.token_embedding_type
    if opts.output_tensor_type is not None and gguf_name == "output.weight":
        new = opts.output_tensor_type
    new, fell_back = with_shape_fallback(new, shape)
    return TensorPlan(name, shape, src, new, fell_back)
