"""Data tables for the legacy ggml containers (formats.md sections 1-5).

Everything that differs between 'ggml', 'ggmf', 'ggjt' v1-v3 and GPT4All's
'ggmm', and between the LLaMA, GPT-J and MPT headers, lives here as data.
legacy.py holds the one reader and the one writer that interpret it.

Vocabulary:
  container  magic + optional version word + whether tensor data is 32-byte aligned
  family     "llama" | "gptj" | "mpt"
  dialect    the tool whose files these are: "llama.cpp", "ggml-examples", "gpt4all"
  era        (block layout, file type-id table) for one version / quantization version
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from smolq.ggml_types import GGMLType

T = GGMLType


# --- containers (formats.md 1) -------------------------------------------------------------

@dataclass(frozen=True)
class Container:
    name: str
    magic: int  # u32 written little-endian, so the letters appear reversed on disk
    versions: tuple[int | None, ...]  # (None,) when there is no version word
    aligned: bool  # 'ggjt': each tensor's data starts at a multiple of 32 in the file

    @property
    def has_version(self) -> bool:
        return self.versions != (None,)


ALIGNMENT = 32

CONTAINERS: Mapping[str, Container] = MappingProxyType({
    "ggml": Container("ggml", 0x67676D6C, (None,), False),
    "ggmf": Container("ggmf", 0x67676D66, (1,), False),
    "ggjt": Container("ggjt", 0x67676A74, (1, 2, 3), True),
    "ggmm": Container("ggmm", 0x67676D6D, (None,), False),
})

CONTAINER_BY_MAGIC: Mapping[int, Container] = MappingProxyType({c.magic: c for c in CONTAINERS.values()})

# Magics we recognise but do not read, so the error can say what the file is.
OTHER_MAGICS: Mapping[int, str] = MappingProxyType({
    0x67676C61: "a llama.cpp LoRA adapter ('ggla')",
    0x6767736E: "a llama.cpp session file ('ggsn')",
    0x46554747: "a GGUF file",
    0x7265706C: "a GPT4All Replit model ('repl')",
    0x62657274: "a GPT4All BERT model ('bert')",
})


# --- per-tensor type ids through time (formats.md 4.2, 5.1) --------------------------------
# file id -> canonical GGMLType. Only types that were ever stored in model files.

# LLaMA 'ggml'/'ggmf' (before #709 the field was a file-level f32/f16/q4_0/q4_1 code),
# and GPT4All GPT-J, whose loader accepts exactly these four.
TYPE_IDS_FOUR = MappingProxyType({0: T.F32, 1: T.F16, 2: T.Q4_0, 3: T.Q4_1})

# ggjt v1 era up to 2023-05-11; nomic's 230511 fork (GPT4All MPT); ggml examples, qntvr 0.
TYPE_IDS_230511 = MappingProxyType({
    **TYPE_IDS_FOUR, 4: T.Q4_2, 5: T.Q4_3, 6: T.Q5_0, 7: T.Q5_1, 8: T.Q8_0,
})

# ggjt v2 (#1405 removed Q4_2; Q4_3 was already gone); ggml examples, qntvr 1.
TYPE_IDS_V2 = MappingProxyType({**TYPE_IDS_FOUR, 6: T.Q5_0, 7: T.Q5_1, 8: T.Q8_0})

# ggjt v3 (K-quants from 2023-06-05, ids 10-14; Q8_K is internal); ggml examples, qntvr 2.
TYPE_IDS_V3 = MappingProxyType({
    **TYPE_IDS_V2, 10: T.Q2_K, 11: T.Q3_K, 12: T.Q4_K, 13: T.Q5_K, 14: T.Q6_K,
})


@dataclass(frozen=True, eq=False)
class Era:
    layout: str  # block layout of Q4_0/Q4_1/Q5_x/Q8_0: "v1" | "v2" | "v3"
    type_ids: Mapping[int, GGMLType]

    def file_id(self, t: GGMLType) -> int | None:
        for file_id, canonical in self.type_ids.items():
            if canonical == t:
                return file_id
        return None


ERA_FOUR = Era("v1", TYPE_IDS_FOUR)
ERA_V1 = Era("v1", TYPE_IDS_230511)
ERA_V2 = Era("v2", TYPE_IDS_V2)
ERA_V3 = Era("v3", TYPE_IDS_V3)

# ggml examples: stored ftype = qntvr*1000 + ftype (formats.md 2.4); qntvr picks the era.
QNTVR_FACTOR = 1000
ERA_BY_QNTVR: Mapping[int, Era] = MappingProxyType({0: ERA_V1, 1: ERA_V2, 2: ERA_V3})


# --- hyperparameter headers (formats.md 2) -------------------------------------------------
# (field name, struct code). "ftype" is always the last field; it is reported separately
# from the other hparams because its meaning (and the x1000 term) depends on the dialect.

LLAMA_FIELDS = (
    ("n_vocab", "I"), ("n_embd", "I"), ("n_mult", "I"), ("n_head", "I"),
    ("n_layer", "I"), ("n_rot", "I"), ("ftype", "I"),
)
GPTJ_FIELDS = (
    ("n_vocab", "i"), ("n_ctx", "i"), ("n_embd", "i"), ("n_head", "i"),
    ("n_layer", "i"), ("n_rot", "i"), ("ftype", "i"),
)
MPT_EXAMPLES_FIELDS = (
    ("d_model", "i"), ("max_seq_len", "i"), ("n_heads", "i"), ("n_layers", "i"),
    ("n_vocab", "i"), ("alibi_bias_max", "f"), ("clip_qkv", "f"), ("ftype", "i"),
)
MPT_GPT4ALL_FIELDS = (
    ("n_vocab", "I"), ("n_ctx", "I"), ("n_layer", "I"), ("n_head", "I"),
    ("n_embd", "I"), ("alibi_bias_max", "f"), ("clip_qkv", "f"), ("ftype", "I"),
)


# --- vocabulary sections (formats.md 3) ----------------------------------------------------

@dataclass(frozen=True)
class VocabSpec:
    count_code: str | None  # struct code of a token count after the header, or None
    scores: bool  # an f32 score follows each token's bytes
    special_bit: bool  # 'ggmm': bit 31 of the length word marks a special token

    @property
    def min_entry_bytes(self) -> int:
        return 4 + (4 if self.scores else 0)


VOCAB_PLAIN = VocabSpec(None, False, False)  # LLaMA 'ggml', MPT ggml examples
VOCAB_SCORED = VocabSpec(None, True, False)  # LLaMA 'ggmf', 'ggjt'
VOCAB_COUNTED = VocabSpec("i", False, False)  # GPT-J
VOCAB_GGMM = VocabSpec("I", False, True)  # GPT4All MPT

SPECIAL_BIT = 1 << 31


# --- file types, used only to fill in a header's ftype the caller did not give (formats.md 2.4, 7)

LLAMA_FTYPE_OF = MappingProxyType({
    T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q4_2: 5, T.Q4_3: 6, T.Q8_0: 7, T.Q5_0: 8,
    T.Q5_1: 9, T.Q2_K: 10, T.Q3_K: 12, T.Q4_K: 15, T.Q5_K: 17, T.Q6_K: 18,  # K: the _M mixes
})
GGML_FTYPE_OF = MappingProxyType({
    T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
    T.Q2_K: 10, T.Q3_K: 11, T.Q4_K: 12, T.Q5_K: 13, T.Q6_K: 14,
})
GPT4ALL_FTYPE_OF = MappingProxyType({T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q4_2: 5})


# --- one entry per (family, container, dialect) --------------------------------------------

@dataclass(frozen=True, eq=False)  # hashed by identity: one object per format
class FormatSpec:
    family: str
    container: str
    dialect: str
    fields: tuple[tuple[str, str], ...]
    vocab: VocabSpec
    qntvr_in_ftype: bool  # ggml examples: stored ftype = qntvr*1000 + ftype
    eras: Mapping[int | None, Era]  # key: container version, qntvr (ggml examples), or None
    ftype_of: Mapping[GGMLType, int]

    @property
    def hparam_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields if name != "ftype")

    @property
    def header_struct(self) -> str:
        return "<" + "".join(code for _, code in self.fields)


def _spec(family, container, dialect, fields, vocab, eras, ftype_of, qntvr=False) -> FormatSpec:
    return FormatSpec(family, container, dialect, fields, vocab, qntvr, MappingProxyType(eras), ftype_of)


FORMAT_SPECS: tuple[FormatSpec, ...] = (
    _spec("llama", "ggml", "llama.cpp", LLAMA_FIELDS, VOCAB_PLAIN, {None: ERA_FOUR}, LLAMA_FTYPE_OF),
    _spec("llama", "ggmf", "llama.cpp", LLAMA_FIELDS, VOCAB_SCORED, {1: ERA_FOUR}, LLAMA_FTYPE_OF),
    _spec("llama", "ggjt", "llama.cpp", LLAMA_FIELDS, VOCAB_SCORED,
          {1: ERA_V1, 2: ERA_V2, 3: ERA_V3}, LLAMA_FTYPE_OF),
    _spec("gptj", "ggml", "ggml-examples", GPTJ_FIELDS, VOCAB_COUNTED, ERA_BY_QNTVR, GGML_FTYPE_OF,
          qntvr=True),
    _spec("gptj", "ggml", "gpt4all", GPTJ_FIELDS, VOCAB_COUNTED, {None: ERA_FOUR}, GPT4ALL_FTYPE_OF),
    _spec("mpt", "ggml", "ggml-examples", MPT_EXAMPLES_FIELDS, VOCAB_PLAIN, ERA_BY_QNTVR,
          GGML_FTYPE_OF, qntvr=True),
    _spec("mpt", "ggmm", "gpt4all", MPT_GPT4ALL_FIELDS, VOCAB_GGMM, {None: ERA_V1}, GPT4ALL_FTYPE_OF),
)

FAMILIES = ("llama", "gptj", "mpt")


def find_spec(family: str, container: str, dialect: str | None = None) -> FormatSpec | None:
    """The spec for (family, container[, dialect]); the first listed dialect when None."""
    for spec in FORMAT_SPECS:
        if spec.family == family and spec.container == container:
            if dialect is None or spec.dialect == dialect:
                return spec
    return None


# GPT4All's family rules (gpt4all-backend magic_match, formats.md 1). smolq reads every
# 'ggjt' file as LLaMA; GPT4All's own loader accepts one only with n_vocab in this range.
GPT4ALL_LLAMA_VOCAB = range(32000, 32101)
GPT4ALL_GPTJ_VOCAB = range(50300, 50401)
