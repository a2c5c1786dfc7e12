"""Qwen2 (Qwen2ForCausalLM): GGUF architecture `qwen2`, as llama.cpp's converter writes it.

LLaMA's block (RMSNorm, SwiGLU, GQA, RoPE) with biases on q/k/v, and RoPE in
NeoX order (rotate-half), so unlike LLaMA no Q/K row permutation: the
checkpoint's rows are written as they are. The converter writes the generic
keys only (no vocab_size, no rope.dimension_count). No legacy containers.
"""
from __future__ import annotations

from typing import Any

from smolq.arch.base import NameTable
from smolq.arch.llama import Llama

_QKV_BIASES = (
    ("self_attn.q_proj.bias", "attn_q.bias", "q"),
    ("self_attn.k_proj.bias", "attn_k.bias", "kv"),
    ("self_attn.v_proj.bias", "attn_v.bias", "kv"),
)


class Qwen2(Llama):
    family = "qwen2"
    gguf_arch = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    names = NameTable([])  # no legacy names: no 2023 container holds it
    legacy_targets = {}
    mlc_model_type = None
    hf_export = True
    omitted_keys = ("vocab_size", "rope.dimension_count")  # LLaMA's converter adds these; the generic one does not

    @classmethod
    def output_tied(cls, tensors: dict[str, Any], same) -> bool:
        """GGUF qwen2/qwen3 files of tied models have no output.weight (llama.cpp reuses token_embd)."""
        return "output.weight" not in tensors

    def layer_tensors(self) -> list[tuple[str, str, tuple[int, ...], Any, Any]]:
        """LLaMA's block without the Q/K permutation (NeoX RoPE), plus the q/k/v biases."""
        plain = [(hf, gg, shape, None, None) for hf, gg, shape, _, _ in super().layer_tensors()]
        rows = {"q": self.n_head * self.head_dim, "kv": self.n_head_kv * self.head_dim}
        return plain + [(hf, gg, (rows[kind],), None, None) for hf, gg, kind in self.attention_biases()]

    def attention_biases(self) -> tuple[tuple[str, str, str], ...]:
        return _QKV_BIASES

    def hparam_keys(self) -> dict[str, Any]:
        md = super().hparam_keys()
        for key in self.omitted_keys:
            md.pop(f"{self.gguf_arch}.{key}", None)
        return md

    def legacy_hparams(self, target):  # legacy_target refuses first; this is the second line of defence
        raise NotImplementedError("qwen2 has no legacy container")

    def hf_config(self) -> dict[str, Any]:
        """Qwen2ForCausalLM's config.json: LLaMA's fields; its q/k/v biases are built in, not configured."""
        cfg = super().hf_config()
        for key in ("attention_bias", "mlp_bias"):
            cfg.pop(key)
        cfg["use_sliding_window"] = False
        return cfg
