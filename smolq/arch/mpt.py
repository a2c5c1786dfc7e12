"""MPT (MptForCausalLM / MPTForCausalLM): GGUF `mpt` as llama.cpp writes it, legacy ggml and GPT4All ggmm.

ALiBi, no RoPE, so no permutation. The LM head is tied to wte and HF saves
no lm_head: the GGUF gets output.weight as a copy of wte, as llama.cpp's MPT
converter did for the 2023 loaders that require it (formats.md 6.6); legacy
MPT files have no output tensor. GPT4All's 'ggmm' loader reads wte as F32.
"""
from __future__ import annotations

import math
from typing import Any

from smolq.arch.base import Arch, LegacyTarget, NameTable, TensorMap, f32_short, meta
from smolq.arch.legacy_config import GGUFKeys, LegacyConfig
from smolq.errors import FormatError, InputError

MPT_NAMES = NameTable([
    ("token_embd.weight", "transformer.wte.weight"),
    ("output_norm.weight", "transformer.norm_f.weight"),
    ("blk.{i}.attn_norm.weight", "transformer.blocks.{i}.norm_1.weight"),
    ("blk.{i}.attn_qkv.weight", "transformer.blocks.{i}.attn.Wqkv.weight"),
    ("blk.{i}.attn_output.weight", "transformer.blocks.{i}.attn.out_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "transformer.blocks.{i}.norm_2.weight"),
    ("blk.{i}.ffn_up.weight", "transformer.blocks.{i}.ffn.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "transformer.blocks.{i}.ffn.down_proj.weight"),
])

LAYER_NORM_EPS = 1e-5  # llama.cpp's converter writes this fixed value (llamacpp.md 1.6)


class MPT(Arch):
    family = "mpt"
    gguf_arch = "mpt"
    hf_architectures = ("MptForCausalLM", "MPTForCausalLM")
    model_types = ("mpt",)
    names = MPT_NAMES
    legacy_targets = {
        "ggmm": LegacyTarget("ggmm", None, "gpt4all", "v1"),
        "ggml": LegacyTarget("ggml", None, "ggml-examples", "v3"),
    }
    default_legacy = "ggmm"
    skip_suffixes = (".attn.bias", ".attn.masked_bias")
    hf_export = True

    @classmethod
    def config_from_legacy(cls, d: LegacyConfig, h: dict[str, Any], tensors: dict[str, Any]) -> None:
        g = cls._legacy_hparams_named(h)
        d.positive(g, ("n_vocab", "n_embd", "n_layer", "n_head", "n_ctx"))
        if g["n_embd"] % g["n_head"] or not (math.isfinite(h["alibi_bias_max"]) and math.isfinite(h["clip_qkv"])):
            raise FormatError(d.source, f"unknown hyperparameters: d_model {g['n_embd']}, n_heads {g['n_head']}, "
                                        f"alibi_bias_max {h['alibi_bias_max']}, clip_qkv {h['clip_qkv']}")
        hd = g["n_embd"] // g["n_head"]
        qkv_rows = d.shape_of(tensors, "blk.0.attn_qkv.weight")[0]
        n_kv2 = qkv_rows - g["n_embd"]  # K and V rows together: the header has no KV head count
        if n_kv2 <= 0 or n_kv2 % (2 * hd):
            raise FormatError(d.source, f"Wqkv has {qkv_rows} rows, which no head layout of d_model {g['n_embd']} gives")
        n_ff = d.shape_of(tensors, "blk.0.ffn_up.weight")[0]
        if n_ff % g["n_embd"]:
            raise FormatError(d.source, f"ffn.up_proj has {n_ff} rows, not a multiple of d_model {g['n_embd']}")
        d.config["architectures"] = ["MPTForCausalLM"]
        d.known("vocab_size", g["n_vocab"])
        d.known("d_model", g["n_embd"])
        d.known("n_layers", g["n_layer"])
        d.known("n_heads", g["n_head"])
        d.known("max_seq_len", g["n_ctx"], strict=False)
        d.known("expansion_ratio", n_ff // g["n_embd"])
        d.config["no_bias"] = True
        d.config["attn_config"] = cls._legacy_attn_config(h, g["n_head"], n_kv2 // (2 * hd))

    @staticmethod
    def _legacy_hparams_named(h: dict[str, Any]) -> dict[str, Any]:
        """The two MPT headers name the same fields differently (formats.md 2.3)."""
        return {
            "n_vocab": h["n_vocab"], "n_embd": h.get("d_model", h.get("n_embd")),
            "n_layer": h.get("n_layers", h.get("n_layer")), "n_head": h.get("n_heads", h.get("n_head")),
            "n_ctx": h.get("max_seq_len", h.get("n_ctx")),
        }

    @staticmethod
    def _legacy_attn_config(h: dict[str, Any], n_head: int, n_head_kv: int) -> dict[str, Any]:
        attn: dict[str, Any] = {"alibi": True}  # every legacy MPT loader applies ALiBi
        attn["alibi_bias_max"] = float(h["alibi_bias_max"])
        # The header stores 0.0 for "no clipping" (formats.md 2.3); a clip of 0 would zero every score.
        attn["clip_qkv"] = float(h["clip_qkv"]) if h["clip_qkv"] else None
        if n_head_kv != n_head:
            attn["kv_n_heads"] = n_head_kv
        return attn

    @classmethod
    def config_from_gguf(cls, meta: dict[str, Any], path) -> dict[str, Any]:
        k = GGUFKeys(meta, cls.family, path)
        n_vocab = k.n_vocab()
        n_embd = k.need("embedding_length")
        attn: dict[str, Any] = {"alibi": True, "alibi_bias_max": float(k.get("attention.max_alibi_bias", 8.0)),
                                "clip_qkv": k.get("attention.clamp_kqv")}
        if k.get("attention.head_count_kv"):
            attn["kv_n_heads"] = k.get("attention.head_count_kv")
        return {
            "architectures": ["MPTForCausalLM"], "vocab_size": n_vocab, "d_model": n_embd,
            "n_layers": k.need("block_count"), "n_heads": k.need("attention.head_count"),
            "max_seq_len": k.need("context_length"), "expansion_ratio": k.need("feed_forward_length") // n_embd,
            "no_bias": True, "attn_config": attn,
            "layer_norm_epsilon": k.get("attention.layer_norm_epsilon", LAYER_NORM_EPS),
        }

    @classmethod
    def output_tied(cls, tensors: dict[str, Any], same) -> bool:
        """Legacy MPT files store no output; smolq's and llama.cpp's GGUF a copy of wte.
        A stored output.weight that differs (quantized to another type) is a head of its own."""
        out = tensors.get("output.weight")
        return out is None or same(out, tensors["token_embd.weight"])

    def read_hparams(self) -> None:
        attn = self.config.get("attn_config") or {}
        if not isinstance(attn, dict):
            raise InputError(self.config_path, "attn_config is not an object")
        self.attn = attn
        self.vocab_size = int(self.need("vocab_size"))
        self.n_embd = int(self.need("d_model"))
        self.n_layer = int(self.need("n_layers"))
        self.n_head = int(self.need("n_heads"))
        self.n_head_kv = int(attn.get("kv_n_heads") or self.n_head)
        self.n_ctx = int(self.default("max_seq_len", 2048, "MPT-7B"))
        self.expansion = int(self.default("expansion_ratio", 4, "MptConfig default"))
        self.n_ff = self.expansion * self.n_embd
        self.alibi = bool(self.default("alibi", True, "MptAttentionConfig default", where=attn))
        self.alibi_bias_max = float(self.default("alibi_bias_max", 8, "MptAttentionConfig default", where=attn))
        self.clip_qkv = attn.get("clip_qkv")
        self.eps = float(self.config.get("layer_norm_epsilon") or LAYER_NORM_EPS)
        self.tied = bool(self.config.get("tie_word_embeddings", True))
        if self.config.get("no_bias") is False:
            raise InputError(self.config_path, "MPT with biases (no_bias: false) is not supported")
        if attn.get("qk_ln"):
            raise InputError(self.config_path, "MPT with qk_ln is not supported")
        if self.expansion != 4:
            self.notes.append("expansion_ratio != 4: legacy MPT loaders assume 4")

    @property
    def n_vocab(self) -> int:
        return self.vocab_size

    def tensor_maps(self, available: set[str]) -> list[TensorMap]:
        E, F, V = self.n_embd, self.n_ff, self.vocab_size
        hd = E // self.n_head
        qkv_rows = E + 2 * self.n_head_kv * hd
        maps = [self._map("token_embd.weight", (V, E), legacy_f32=True)]
        for i in range(self.n_layer):
            for gg, shape in (
                ("attn_norm.weight", (E,)), ("attn_qkv.weight", (qkv_rows, E)),
                ("attn_output.weight", (E, E)), ("ffn_norm.weight", (E,)),
                ("ffn_up.weight", (F, E)), ("ffn_down.weight", (E, F)),
            ):
                maps.append(self._map(f"blk.{i}.{gg}", shape))
        maps.append(self._map("output_norm.weight", (E,)))
        source = "lm_head.weight" if "lm_head.weight" in available else "transformer.wte.weight"
        maps.append(TensorMap(source, (V, E), "output.weight", None))
        return maps

    def _map(self, gguf: str, shape: tuple[int, ...], legacy_f32: bool = False) -> TensorMap:
        legacy = self.names.to_legacy(gguf)
        return TensorMap(legacy, shape, gguf, legacy, keep_f32=len(shape) == 1, legacy_f32=legacy_f32)

    def legacy_target(self, fmt, path):
        target = super().legacy_target(fmt, path)
        if self.n_head_kv != self.n_head:
            raise InputError(path, "legacy MPT files cannot describe kv_n_heads (GQA)")
        return target

    def hf_config(self) -> dict[str, Any]:
        """transformers' native MptForCausalLM config.json. Its attention has no kv_n_heads,
        no qk_ln and always applies ALiBi, so those models are refused, not written wrong.
        Wqkv stays fused, as MptForCausalLM stores it."""
        if self.n_head_kv != self.n_head:
            raise InputError(self.config_path, "MptForCausalLM has no kv_n_heads (GQA); this MPT model cannot be "
                                               "written as a transformers checkpoint")
        if not self.alibi or self.alibi_bias_max <= 0:
            raise InputError(self.config_path, "MptForCausalLM always applies ALiBi; this MPT model has none")
        if not float(self.alibi_bias_max).is_integer():
            raise InputError(self.config_path, f"MptForCausalLM takes a whole alibi_bias_max, not {self.alibi_bias_max}")
        attn = {"attn_type": "multihead_attention", "attn_impl": "torch", "alibi": True,
                "alibi_bias_max": int(self.alibi_bias_max),
                "clip_qkv": f32_short(float(self.clip_qkv)) if self.clip_qkv else None,
                "qk_ln": False, "softmax_scale": None, "prefix_lm": False, "attn_uses_sequence_id": False}
        return {
            "architectures": ["MptForCausalLM"], "model_type": "mpt", "vocab_size": self.vocab_size,
            "d_model": self.n_embd, "n_heads": self.n_head, "n_layers": self.n_layer,
            "expansion_ratio": self.expansion, "max_seq_len": self.n_ctx, "layer_norm_epsilon": f32_short(self.eps),
            "no_bias": True, "logit_scale": None, "attn_config": attn, "tie_word_embeddings": self.tied,
        }

    def hparam_keys(self) -> dict[str, Any]:
        a = self.gguf_arch
        md = {
            f"{a}.context_length": meta("u32", self.n_ctx),
            f"{a}.embedding_length": meta("u32", self.n_embd),
            f"{a}.block_count": meta("u32", self.n_layer),
            f"{a}.feed_forward_length": meta("u32", self.n_ff),
            f"{a}.attention.head_count": meta("u32", self.n_head),
        }
        if self.attn.get("kv_n_heads"):
            md[f"{a}.attention.head_count_kv"] = meta("u32", self.n_head_kv)
        md[f"{a}.attention.layer_norm_epsilon"] = meta("f32", LAYER_NORM_EPS)
        if self.clip_qkv is not None:
            md[f"{a}.attention.clamp_kqv"] = meta("f32", float(self.clip_qkv))
        md[f"{a}.attention.max_alibi_bias"] = meta("f32", self.alibi_bias_max if self.alibi else 0.0)
        return md

    def legacy_hparams(self, target: LegacyTarget) -> dict[str, int | float]:
        clip = float(self.clip_qkv) if self.clip_qkv is not None else 0.0
        if target.container == "ggmm":
            return {
                "n_vocab": self.vocab_size, "n_ctx": self.n_ctx, "n_layer": self.n_layer,
                "n_head": self.n_head, "n_embd": self.n_embd,
                "alibi_bias_max": self.alibi_bias_max, "clip_qkv": clip,
            }
        return {
            "d_model": self.n_embd, "max_seq_len": self.n_ctx, "n_heads": self.n_head,
            "n_layers": self.n_layer, "n_vocab": self.vocab_size,
            "alibi_bias_max": self.alibi_bias_max, "clip_qkv": clip,
        }
