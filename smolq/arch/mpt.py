"""MPT (MptForCausalLM / MPTForCausalLM): GGUF `mpt` as llama.cpp writes it, legacy ggml and GPT4All ggmm.

ALiBi, no RoPE, so no permutation. The LM head is tied to wte and HF saves
no lm_head: the GGUF gets output.weight as a copy of wte, as llama.cpp's MPT
converter did for the 2023 loaders that require it (formats.md 6.6); legacy
MPT files have no output tensor. GPT4All's 'ggmm' loader reads wte as F32.
"""
from __future__ import annotations

from typing import Any

from smolq.arch.base import Arch, LegacyTarget, NameTable, TensorMap, meta
from smolq.errors import InputError

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

    def gguf_metadata(self) -> dict[str, Any]:
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
