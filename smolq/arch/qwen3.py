"""Qwen3 (Qwen3ForCausalLM): GGUF architecture `qwen3`, as llama.cpp's converter writes it.

Qwen2's layout (NeoX RoPE, no Q/K permutation) without the q/k/v biases and
with an RMSNorm over each head of Q and of K before RoPE: `q_norm`/`k_norm`,
one weight of head_dim each (attn_q_norm / attn_k_norm). No legacy containers.
"""
from __future__ import annotations

from typing import Any

from smolq.arch.qwen2 import Qwen2

_QK_NORMS = (
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
)


class Qwen3(Qwen2):
    family = "qwen3"
    gguf_arch = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)

    def layer_tensors(self) -> list[tuple[str, str, tuple[int, ...], Any, Any]]:
        return super().layer_tensors() + [(hf, gg, (self.head_dim,), None, None) for hf, gg in _QK_NORMS]

    def attention_biases(self) -> tuple[tuple[str, str, str], ...]:
        return ()

    def hf_config(self) -> dict[str, Any]:
        """Qwen3ForCausalLM's config.json: Qwen2's, with head_dim stated (Qwen3Config's default is 128)
        and no q/k/v biases."""
        cfg = super().hf_config()
        cfg.update(head_dim=self.head_dim, attention_bias=False)
        return cfg
