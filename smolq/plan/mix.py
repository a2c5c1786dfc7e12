"""Decide what each tensor becomes: llama.cpp's quantization mixes as data.

llama-quantize (src/llama-quant.cpp of the llama.cpp tree in llama-cpp-python
0.3.36, llamacpp.md 2.3) picks a per-tensor type from the requested file type
("ftype" preset): a default type; the user's --token-embedding-type,
--output-tensor-type and --tensor-type; else the mix, by tensor category
(output, token_embd, attn_v-like, attn_k, attn_q, attn_output, ffn_*), layer
position (counters walked in llama.cpp's order), the model's GQA, expert
count and 70B-ness, and whether an importance matrix is given; then a fallback
when a row length does not fit the block. This module reproduces those
decisions (tests/test_mix_vs_llama_quantize.py holds them to llama-quantize's),
and which tensors llama.cpp refuses to write without an importance matrix; it
never touches tensor data.

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
    "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37, "MXFP4_MOE": 38,
}
FTYPE_NAME: Mapping[int, str] = {v: k for k, v in LLAMA_FTYPE.items()}


@dataclass(frozen=True)
class Preset:
    name: str  # e.g. "Q4_K_M"
    default_type: GGMLType  # what a quantizable tensor becomes before the mix rules
    ftype: int | None  # LLAMA_FTYPE; None for a plain type without one


# preset name -> default type (llama-quant.cpp: llama_ftype_get_default_type). Note the
# presets whose name is not their base type: IQ2_S -> IQ2_XS, IQ2_M -> IQ2_S, IQ3_XS/IQ3_M -> IQ3_S.
PRESET_DEFAULTS: Mapping[str, GGMLType] = {
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
    "F16": T.F16, "BF16": T.BF16, "F32": T.F32,
    "Q2_K": T.Q2_K, "Q2_K_S": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K,
    "Q6_K": T.Q6_K, "TQ1_0": T.TQ1_0, "TQ2_0": T.TQ2_0,
    "IQ1_S": T.IQ1_S, "IQ1_M": T.IQ1_M, "IQ2_XXS": T.IQ2_XXS, "IQ2_XS": T.IQ2_XS,
    "IQ2_S": T.IQ2_XS, "IQ2_M": T.IQ2_S, "IQ3_XXS": T.IQ3_XXS, "IQ3_XS": T.IQ3_S,
    "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S, "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS,
    "MXFP4_MOE": T.MXFP4,
}

# llama-quantize accepts the bare K names as the _M mixes.
PRESET_ALIASES: Mapping[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# --bits N -> preset
BITS_PRESETS: Mapping[int, str] = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

# Block types smolq's round-to-nearest path can write (DESIGN.md, Quantizers).
RTN_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.TQ1_0, T.TQ2_0,
    T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M,
})
# The i-quants and MXFP4: planned like llama-quantize plans them; whether the kernel can
# write one is asked when the plan runs (pipeline), not here.
IQ_TYPES = frozenset({
    T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS,
})
PLAN_TYPES = RTN_TYPES | IQ_TYPES | {T.MXFP4}

# File type of a file made of one plain type (the MOSTLY_x values).
PLAIN_FTYPE: Mapping[GGMLType, int] = {
    T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
    T.Q2_K: 10, T.Q6_K: 18, T.BF16: 32, T.TQ1_0: 36, T.TQ2_0: 37,
    T.IQ2_XXS: 19, T.IQ2_XS: 20, T.IQ3_XXS: 23, T.IQ1_S: 24, T.IQ4_NL: 25, T.IQ3_S: 26,
    T.IQ4_XS: 30, T.IQ1_M: 31,
}


def _normalise(name: str) -> str:
    return name.strip().upper().replace("-", "_")


def parse_type(name: str, what: str = "type") -> GGMLType:
    """A single ggml type the plan can name (for --output-tensor-type, --tensor-type etc.)."""
    key = _normalise(name)
    try:
        t = GGMLType.from_name(key)
    except ValueError:
        t = None
    if t is None or t not in PLAN_TYPES:
        choices = ", ".join(sorted(x.name for x in PLAN_TYPES))
        raise InputError(None, f"unknown {what} {name!r}; choose one of {choices}")
    return t


def resolve_preset(type_name: str | None = None, bits: int | None = None) -> Preset:
    """The preset for --type NAME or --bits N (exactly one of them); preset names win over type names."""
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

# llama.cpp's LLM_TYPE_70B (the attn_v bump): architecture -> block count that makes one.
# A LLaMA also needs grouped KV heads (80 layers without are the 65B) and no 8 experts.
SEVENTY_B_LAYERS: Mapping[str, int] = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


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
    def experts(self) -> int:
        """llama.cpp's hparams.n_expert: 0 for a dense model (an expert_count of 1 included)."""
        return self.n_expert if self.n_expert > 1 else 0

    @property
    def is_70b(self) -> bool:
        if SEVENTY_B_LAYERS.get(self.arch) != self.n_layer:
            return False
        if self.arch == "llama":
            return self.experts != 8 and self.n_head != self.n_head_kv
        return True

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
    has_imatrix: bool = False  # an importance matrix comes with the run (some rules look at it)


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
    needs_imatrix: bool = False  # llama.cpp refuses to write dst_type here without an importance matrix

    @property
    def converts(self) -> bool:
        return self.dst_type != self.src_type


@dataclass
class QuantPlan:
    preset: Preset
    tensors: list[TensorPlan] = field(default_factory=list)
    has_imatrix: bool = False

    @property
    def n_fallback(self) -> int:
        return sum(t.fallback for t in self.tensors)

    def requantized(self) -> list[TensorPlan]:
        """Tensors whose already-quantized source would be quantized again."""
        return [t for t in self.tensors if t.converts and is_quantized(t.src_type)]

    def missing_imatrix(self) -> list[TensorPlan]:
        """Tensors that need an importance matrix the run does not have (llama.cpp refuses them)."""
        return [] if self.has_imatrix else [t for t in self.tensors if t.needs_imatrix]


# --- which tensors are quantized (llama-quant.cpp: tensor_allows_quantization) --------------

# Substrings of (GGUF) names llama.cpp never quantizes, besides 1-D and non-"weight" tensors.
NEVER_QUANTIZE = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    # multimodal projector pieces and audio codebooks
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
NEVER_QUANTIZE_EXACT = ("position_embd.weight", "token_types.weight")
# Architectures with more small tensors kept as they are.
ARCH_NEVER_QUANTIZE: Mapping[str, tuple[str, ...]] = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}
# Architectures whose named tensors never go below Q8_0 (unless the type is a float).
ARCH_AT_LEAST_Q8_0: Mapping[str, tuple[str, ...]] = {
    "glm5-next": ("attn_q_a", "attn_q_b", "nextn.eh_proj"),
}
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one above 1 in ggml order (PyTorch order: leading 1s drop)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return max(1, len(dims))


def is_quantizable(name: str, shape: tuple[int, ...], leave_output: bool = False, arch: str = "") -> bool:
    """llama.cpp's test: >= 2-D, a "weight", not a norm/router/position table..."""
    gguf_name = canonical_name(name)
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    never = NEVER_QUANTIZE + ARCH_NEVER_QUANTIZE.get(arch, ())
    if any(s in gguf_name for s in never) or gguf_name in NEVER_QUANTIZE_EXACT:
        return False
    return not (leave_output and gguf_name == "output.weight")


# --- tensor categories (llama-quant.cpp: tensor_get_category) --------------------------------

CATEGORY_EXACT: Mapping[str, str] = {
    "output.weight": "output", "token_embd.weight": "token_embd", "per_layer_token_embd.weight": "token_embd",
}
# Substring tests, first match wins (so "attn_qkv" is never read as "attn_v", "ffn_up" wins over "ffn_gate").
CATEGORY_SUBSTRINGS: tuple[tuple[str, str], ...] = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
# Sensitive like attn_v: these share its rules and its counter.
ATTN_V_LIKE = frozenset({"attn_v", "attn_qkv", "attn_kv_b"})


def tensor_category(gguf_name: str) -> str:
    if gguf_name in CATEGORY_EXACT:
        return CATEGORY_EXACT[gguf_name]
    for needle, category in CATEGORY_SUBSTRINGS:
        if needle in gguf_name:
            return category
    return "other"


# --- the rules (llama-quant.cpp: llama_tensor_get_type_impl) -----------------------------------

# Row length not a multiple of the block: llama-quant.cpp's replacement types (tensor_type_fallback).
SHAPE_FALLBACK: Mapping[GGMLType, GGMLType] = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}

# The very-low-bit presets: a branch of their own for every tensor below the embeddings.
VERY_LOW_BIT = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"})
# Presets whose output (and tied embedding) is Q5_K rather than Q6_K.
OUTPUT_Q5_K = VERY_LOW_BIT | {"IQ3_XXS"}
# Untied token_embd: preset -> type (other presets keep the default type).
TOKEN_EMBD_TYPE: Mapping[str, GGMLType] = {
    "IQ1_S": T.Q2_K, "IQ1_M": T.Q2_K, "IQ2_XXS": T.Q2_K, "IQ2_XS": T.Q2_K,
    "IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S, "IQ3_XXS": T.IQ3_S, "TQ1_0": T.Q4_K, "TQ2_0": T.Q4_K,
}
# attn_q and attn_k (without 8 experts)
ATTN_QK_TYPE: Mapping[str, GGMLType] = {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}
# attn_output of a dense model that is not Falcon
ATTN_OUTPUT_TYPE: Mapping[str, GGMLType] = {
    "Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_M": T.Q4_K,
}
# attn_output of an 8-expert model: these presets raise it to Q5_K
ATTN_OUTPUT_MOE8_Q5_K = frozenset({
    "Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS",
})
# MXFP4_MOE on these architectures: only the expert FFN tensors are MXFP4 (their MLA tensors are 3-D too).
MXFP4_EXPERT_FFN_ONLY = frozenset({"bailingmoe3"})


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp: the first and last eighth of the layers, and every third one between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _layer_number(gguf_name: str) -> int | None:
    m = re.match(r"^blk\.(\d+)\.", gguf_name)
    return int(m.group(1)) if m else None


class _MixState:
    """llama.cpp's quantize_state_impl: the model facts and the counters that walk attn_v / ffn_*."""

    def __init__(self, info: ModelInfo, gguf_names: Sequence[str], has_imatrix: bool):
        self.info = info
        self.has_imatrix = has_imatrix
        categories = [tensor_category(n) for n in gguf_names]
        self.tied = "output" not in categories  # no output.weight: token_embd is the output too
        self.n_attention_wv = sum(c in ATTN_V_LIKE for c in categories)
        layers = {_layer_number(n) for n in gguf_names} - {None}
        self.n_layer = info.n_layer or len(layers)
        self._seen: dict[str, int] = {}

    def take(self, counter: str) -> int:
        """The counter's value for this tensor; the next tensor of its kind sees one more."""
        value = self._seen.get(counter, 0)
        self._seen[counter] = value + 1
        return value

    def layer(self, counter: str, gguf_name: str) -> tuple[int, int]:
        """(layer, n_layer) of an ffn tensor: its position, or with experts its name (llama.cpp's layer_info:
        Mixtral's expert tensors are not stored in layer order)."""
        i = self.take(counter)
        if self.info.experts:
            number = _layer_number(gguf_name)
            i = i if number is None else number
        return i, self.n_layer


def _output_type(p: str, new: GGMLType, shape: tuple[int, ...], info: ModelInfo) -> GGMLType:
    """output.weight, and token_embd when the embeddings are tied."""
    if p == "MXFP4_MOE" or info.arch == "falcon" or shape[-1] % TYPE_INFO[new].block_size:
        return T.Q8_0
    if p in OUTPUT_Q5_K:
        return T.Q5_K
    return new if new == T.Q8_0 else T.Q6_K


def _mxfp4_moe_type(category: str, shape: tuple[int, ...], info: ModelInfo) -> GGMLType:
    """MXFP4_MOE: stacked expert tensors (a third dimension above 1) MXFP4, every other Q8_0."""
    stacked = len(shape) >= 3 and shape[-3] > 1
    if info.arch in MXFP4_EXPERT_FFN_ONLY:
        stacked = stacked and category in ("ffn_up", "ffn_gate", "ffn_down")
    return T.MXFP4 if stacked else T.Q8_0


def _very_low_bit_type(p: str, new: GGMLType, category: str, st: _MixState) -> GGMLType:
    """IQ1_S/IQ1_M/IQ2_*: the branch llama.cpp gives these presets below the embeddings."""
    info = st.info
    richer = T.IQ3_S if p in ("IQ2_S", "IQ2_M") else T.Q2_K
    if category in ATTN_V_LIKE:
        st.take("attn_v")
        return T.Q4_K if info.n_gqa >= 4 or info.experts >= 4 else richer
    if category == "attn_k" and info.experts == 8:
        return T.Q4_K
    if category == "ffn_down":
        # the raw counter, not the layer: this branch does not parse expert names
        return richer if st.take("ffn_down") < st.n_layer // 8 else new
    if category == "attn_output":
        if info.experts == 8:
            return T.Q5_K
        return {"IQ1_S": T.IQ2_XXS, "IQ1_M": T.IQ2_XXS, "IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S}.get(p, new)
    return new


def _attn_v_type(p: str, new: GGMLType, st: _MixState) -> GGMLType:
    info, i, gqa4 = st.info, st.take("attn_v"), st.info.n_gqa >= 4
    if p == "Q2_K":
        new = T.Q4_K if gqa4 else T.Q3_K
    elif p == "Q2_K_S" and gqa4:
        new = T.Q4_K
    elif p == "IQ3_XXS":
        new = T.Q4_K if gqa4 else (T.IQ3_XXS if st.has_imatrix else T.IQ3_S)
    elif p in ("IQ3_XS", "IQ3_S") and gqa4:
        new = T.Q4_K
    elif p == "IQ3_M":
        new = T.Q4_K
    elif p == "Q3_K_M":
        new = T.Q5_K if i < 2 else T.Q4_K
    elif p == "Q3_K_L":
        new = T.Q5_K
    elif p in ("IQ4_NL", "IQ4_XS") and gqa4:
        new = T.Q5_K
    elif p in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, st.n_attention_wv):
        new = T.Q6_K
    elif p == "Q4_K_S" and i < 4:
        new = T.Q5_K
    if info.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K  # 8 heads share attn_v: more bits cost little
    if info.experts == 8:
        new = T.Q8_0
    return new


def _ffn_down_type(p: str, new: GGMLType, gguf_name: str, st: _MixState) -> GGMLType:
    i, n = st.layer("ffn_down", gguf_name)
    falcon, early, more = st.info.arch == "falcon", i < n // 8, use_more_bits(i, n)
    if p == "Q2_K":
        new = T.Q3_K
    elif p == "Q2_K_S":
        new = T.Q4_K if early else new
    elif p == "IQ3_XXS" and not st.has_imatrix:
        new = T.Q4_K if early else T.Q3_K
    elif p == "Q3_K_M":
        new = T.Q5_K if i < n // 16 else (T.Q4_K if not falcon or more else T.Q3_K)
    elif p == "IQ3_M" and (early or (st.info.experts == 8 and more)):
        new = T.Q4_K
    elif p == "Q3_K_L":
        new = T.Q4_K if falcon else T.Q5_K
    elif p == "Q4_K_M":
        if falcon:
            new = T.Q6_K if i < n // 16 else (T.Q5_K if more else T.Q4_K)
        elif more:
            new = T.Q6_K
    elif early and p in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
        new = T.Q5_K
    elif p == "Q5_K_M" and more:
        new = T.Q6_K
    elif p == "Q4_K_S" and not falcon and early:
        new = T.Q5_K
    elif p in ("Q4_0", "Q5_0") and st.has_imatrix and early:
        # llama.cpp guards the first ffn_down layers of Q4_0/Q5_0 only when an imatrix is given,
        # so that a run without one stays what it always was.
        new = T.Q4_1 if p == "Q4_0" else T.Q5_1
    return new


def _attn_output_type(p: str, new: GGMLType, info: ModelInfo) -> GGMLType:
    if info.arch == "falcon":
        return T.Q4_K if p == "Q3_K_L" else new
    if info.experts == 8:
        return T.Q5_K if p in ATTN_OUTPUT_MOE8_Q5_K else new
    return ATTN_OUTPUT_TYPE.get(p, new)


def _ffn_gate_up_type(p: str, new: GGMLType, category: str, gguf_name: str, st: _MixState) -> GGMLType:
    i, n = st.layer(category, gguf_name)
    if p == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
        return T.IQ3_XXS
    return new


def _mix_type(preset: Preset, gguf_name: str, category: str, shape: tuple[int, ...], st: _MixState,
              opts: PlanOptions) -> GGMLType:
    """llama_tensor_get_type_impl: the type the preset's mix gives this tensor (before the shape fallback)."""
    p, new, info = preset.name, preset.default_type, st.info
    if any(s in gguf_name for s in ARCH_AT_LEAST_Q8_0.get(info.arch, ())) and new not in FLOAT_TYPES:
        return T.Q8_0
    if category == "output" or (st.tied and category == "token_embd"):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type
        return _output_type(p, new, shape, info)
    if p == "MXFP4_MOE":
        return _mxfp4_moe_type(category, shape, info)
    if category == "token_embd":
        return TOKEN_EMBD_TYPE.get(p, new)
    if p in VERY_LOW_BIT:
        return _very_low_bit_type(p, new, category, st)
    if category in ATTN_V_LIKE:
        return _attn_v_type(p, new, st)
    if category == "attn_k":
        return T.Q8_0 if info.experts == 8 else ATTN_QK_TYPE.get(p, new)
    if category == "attn_q":
        return ATTN_QK_TYPE.get(p, new)
    if category == "ffn_down":
        return _ffn_down_type(p, new, gguf_name, st)
    if category == "attn_output":
        return _attn_output_type(p, new, info)
    if category in ("ffn_gate", "ffn_up"):
        return _ffn_gate_up_type(p, new, category, gguf_name, st)
    return new


def with_shape_fallback(t: GGMLType, shape: tuple[int, ...]) -> tuple[GGMLType, bool]:
    """A type whose block fits the row: llama.cpp's fallback, then F16 (fell back: True either way)."""
    if _row_fits(t, shape):
        return t, False
    if TYPE_INFO[t].block_size > 32:
        t = SHAPE_FALLBACK.get(t, T.F16)
    if not _row_fits(t, shape):
        t = T.F16
    return t, True


def _row_fits(t: GGMLType, shape: tuple[int, ...]) -> bool:
    return bool(shape) and shape[-1] % TYPE_INFO[t].block_size == 0


# Types llama.cpp will not write without an importance matrix (tensor_requires_imatrix);
# Q2_K joins them inside a Q2_K_S file.
NEEDS_IMATRIX = frozenset({T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS})


def requires_imatrix(gguf_name: str, t: GGMLType, preset: Preset) -> bool:
    """Whether llama-quantize refuses to write `t` for this tensor without an imatrix (embeddings exempt)."""
    if gguf_name in CATEGORY_EXACT:
        return False
    return t in NEEDS_IMATRIX or (t == T.Q2_K and preset.name == "Q2_K_S")


def _override(name: str, gguf_name: str, overrides: Sequence[tuple[str, GGMLType]]) -> GGMLType | None:
    for pattern, t in overrides:
        if re.search(pattern, name) or re.search(pattern, gguf_name):
            return t
    return None


def _walk_order(gguf_names: Sequence[str]) -> list[int]:
    """llama.cpp visits tensors by (layer, name), globals first (llama_model_loader's weights_map);
    the counters must see them in that order whatever order the file has."""
    def key(i: int) -> tuple[int, str]:
        layer = _layer_number(gguf_names[i])
        return (-1 if layer is None else layer, gguf_names[i])

    return sorted(range(len(gguf_names)), key=key)


def plan_tensor_types(
    tensors: Sequence[tuple[str, GGMLType, tuple[int, ...]]],
    preset: Preset,
    info: ModelInfo,
    opts: PlanOptions | None = None,
) -> QuantPlan:
    """Target type of every (name, source type, PyTorch shape), returned in file order."""
    opts = opts or PlanOptions()
    gguf_names = [canonical_name(name) for name, _, _ in tensors]
    st = _MixState(info, gguf_names, opts.has_imatrix)
    planned: list[TensorPlan | None] = [None] * len(tensors)
    for i in _walk_order(gguf_names):
        name, src, shape = tensors[i]
        planned[i] = _plan_one(name, gguf_names[i], src, tuple(shape), preset, st, opts)
    return QuantPlan(preset, planned, opts.has_imatrix)


def _plan_one(name: str, gguf_name: str, src: GGMLType, shape: tuple[int, ...], preset: Preset,
              st: _MixState, opts: PlanOptions) -> TensorPlan:
    """llama_tensor_get_type: user types first, then the mix, then the shape fallback."""
    if not is_quantizable(name, shape, opts.leave_output_tensor, st.info.arch):
        return TensorPlan(name, shape, src, src)
    new, fell_back = _chosen_type(name, gguf_name, shape, preset, st, opts)
    return TensorPlan(name, shape, src, new, fell_back, requires_imatrix(gguf_name, new, preset))


def _chosen_type(name: str, gguf_name: str, shape: tuple[int, ...], preset: Preset, st: _MixState,
                 opts: PlanOptions) -> tuple[GGMLType, bool]:
    category = tensor_category(gguf_name)
    # --token-embedding-type / --output-tensor-type win over everything. llama.cpp applies no shape
    # fallback to them (an unfitting type fails later); smolq falls back rather than fail.
    # (Gemma 3n's per_layer_token_embd is a large table of its own: a --tensor-type naming it wins.)
    named = gguf_name == "per_layer_token_embd.weight" and _override(name, gguf_name, opts.tensor_types)
    if opts.token_embedding_type is not None and category == "token_embd" and not named:
        return with_shape_fallback(opts.token_embedding_type, shape)
    if opts.output_tensor_type is not None and category == "output":
        return with_shape_fallback(opts.output_tensor_type, shape)
    new = preset.default_type
    if not is_quantized(new):
        return new, False  # a float preset: no mix, no overrides
    override = _override(name, gguf_name, opts.tensor_types)
    if override is not None:
        new = override
    elif not opts.pure:
        new = _mix_type(preset, gguf_name, category, shape, st, opts)
    return with_shape_fallback(new, shape)
