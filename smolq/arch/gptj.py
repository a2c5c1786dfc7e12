"""GPT-J (GPTJForCausalLM): GGUF `gptj` as GPT4All's loader reads it, legacy ggml with HF names.

No row permutation: HF GPT-J already rotates adjacent pairs, as ggml's RoPE
mode 0 does (formats.md 6.7). The legacy file keeps the HF tensor names
(formats.md 4.4); the GGUF names follow gguf-py's table, which GPT4All's
converter used (formats.md 6.6).
"""
from __future__ import annotations

from typing import Any

from smolq.arch.base import Arch, LegacyTarget, NameTable, TensorMap, f32_short, meta
from smolq.arch.legacy_config import GGUFKeys, LegacyConfig
from smolq.errors import FormatError, InputError

GPTJ_NAMES = NameTable([
    ("token_embd.weight", "transformer.wte.weight"),
    ("output_norm.weight", "transformer.ln_f.weight"),
    ("output_norm.bias", "transformer.ln_f.bias"),
    ("output.weight", "lm_head.weight"),
    ("output.bias", "lm_head.bias"),
    ("blk.{i}.attn_norm.weight", "transformer.h.{i}.ln_1.weight"),
    ("blk.{i}.attn_norm.bias", "transformer.h.{i}.ln_1.bias"),
    ("blk.{i}.attn_q.weight", "transformer.h.{i}.attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "transformer.h.{i}.attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "transformer.h.{i}.attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "transformer.h.{i}.attn.out_proj.weight"),
    ("blk.{i}.ffn_up.weight", "transformer.h.{i}.mlp.fc_in.weight"),
    ("blk.{i}.ffn_up.bias", "transformer.h.{i}.mlp.fc_in.bias"),
    ("blk.{i}.ffn_down.weight", "transformer.h.{i}.mlp.fc_out.weight"),
    ("blk.{i}.ffn_down.bias", "transformer.h.{i}.mlp.fc_out.bias"),
])


class GPTJ(Arch):
    family = "gptj"
    gguf_arch = "gptj"
    hf_architectures = ("GPTJForCausalLM",)
    model_types = ("gptj",)
    names = GPTJ_NAMES
    # ggml examples and GPT4All read the same file; GPT4All's ggml (230511 fork) has v1 blocks.
    legacy_targets = {"ggml": LegacyTarget("ggml", None, "gpt4all", "v1")}
    default_legacy = "ggml"
    hf_export = True
    skip_suffixes = (".attn.bias", ".attn.masked_bias", ".attn.embed_positions", ".rotary_emb.inv_freq")
    legacy_defaults = (
        ("layer_norm_epsilon", 1e-5, "attention.layer_norm_epsilon", "GPT-J-6B / GPTJConfig default"),
    )

    @classmethod
    def config_from_legacy(cls, d: LegacyConfig, h: dict[str, Any], tensors: dict[str, Any]) -> None:
        d.positive(h, ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot"))
        if h["n_embd"] % h["n_head"] or h["n_rot"] > h["n_embd"] // h["n_head"]:
            raise FormatError(d.source, f"unknown hyperparameters: n_embd {h['n_embd']}, n_head {h['n_head']}, "
                                        f"n_rot {h['n_rot']}")
        d.config["architectures"] = ["GPTJForCausalLM"]
        d.known("vocab_size", h["n_vocab"])
        d.known("n_embd", h["n_embd"])
        d.known("n_layer", h["n_layer"])
        d.known("n_head", h["n_head"])
        d.known("rotary_dim", h["n_rot"])
        d.known("n_positions", h["n_ctx"], strict=False)  # a context a user fine-tuned for wins, with a note
        d.defaults(cls.family, cls.legacy_defaults)

    @classmethod
    def config_from_gguf(cls, meta: dict[str, Any], path) -> dict[str, Any]:
        k = GGUFKeys(meta, cls.family, path)
        n_vocab = k.n_vocab()
        return {
            "architectures": ["GPTJForCausalLM"], "vocab_size": n_vocab, "n_embd": k.need("embedding_length"),
            "n_layer": k.need("block_count"), "n_head": k.need("attention.head_count"),
            "rotary_dim": k.need("rope.dimension_count"), "n_positions": k.need("context_length"),
            "layer_norm_epsilon": k.need("attention.layer_norm_epsilon"),
        }

    def read_hparams(self) -> None:
        self.vocab_size = int(self.need("vocab_size"))
        self.n_embd = int(self.need("n_embd"))
        self.n_layer = int(self.need("n_layer"))
        self.n_head = int(self.need("n_head"))
        self.n_ctx = int(self.default("n_positions", 2048, "GPT-J-6B"))
        self.n_rot = int(self.default("rotary_dim", 64, "GPT-J-6B"))
        self.n_ff = int(self.config.get("n_inner") or 4 * self.n_embd)
        self.eps = float(self.default("layer_norm_epsilon", 1e-5, "GPTJConfig default"))
        if self.n_ff != 4 * self.n_embd:
            raise InputError(self.config_path, f"n_inner {self.n_ff} != 4*n_embd; GPT-J loaders fix the FFN at 4*n_embd")

    @property
    def n_vocab(self) -> int:
        return self.vocab_size

    def tensor_maps(self, available: set[str]) -> list[TensorMap]:
        E, F, V = self.n_embd, self.n_ff, self.vocab_size
        maps = [self._map("token_embd.weight", (V, E))]
        for i in range(self.n_layer):
            for gg, shape in (
                ("attn_norm.weight", (E,)), ("attn_norm.bias", (E,)),
                ("attn_q.weight", (E, E)), ("attn_k.weight", (E, E)), ("attn_v.weight", (E, E)),
                ("attn_output.weight", (E, E)),
                ("ffn_up.weight", (F, E)), ("ffn_up.bias", (F,)),
                ("ffn_down.weight", (E, F)), ("ffn_down.bias", (E,)),
            ):
                maps.append(self._map(f"blk.{i}.{gg}", shape))
        maps += [
            self._map("output_norm.weight", (E,)), self._map("output_norm.bias", (E,)),
            self._map("output.weight", (V, E)), self._map("output.bias", (V,)),
        ]
        return maps

    def _map(self, gguf: str, shape: tuple[int, ...]) -> TensorMap:
        legacy = self.names.to_legacy(gguf)
        # Only 2-D ".weight" tensors are converted (formats.md 4.2); biases and norms stay F32.
        return TensorMap(legacy, shape, gguf, legacy, keep_f32=len(shape) == 1)

    def hf_config(self) -> dict[str, Any]:
        """GPTJForCausalLM's config.json. The legacy names are the HF names and the
        rotation is the same (adjacent pairs), so the tensors go back as they are."""
        return {
            "architectures": ["GPTJForCausalLM"], "model_type": "gptj", "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx, "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
            "rotary_dim": self.n_rot, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": f32_short(self.eps), "tie_word_embeddings": False,
        }

    def hparam_keys(self) -> dict[str, Any]:
        a = self.gguf_arch
        return {
            f"{a}.context_length": meta("u32", self.n_ctx),
            f"{a}.embedding_length": meta("u32", self.n_embd),
            f"{a}.block_count": meta("u32", self.n_layer),
            f"{a}.feed_forward_length": meta("u32", self.n_ff),
            f"{a}.attention.head_count": meta("u32", self.n_head),
            f"{a}.rope.dimension_count": meta("u32", self.n_rot),
            f"{a}.attention.layer_norm_epsilon": meta("f32", self.eps),
        }

    def legacy_hparams(self, target: LegacyTarget) -> dict[str, int | float]:
        return {
            "n_vocab": self.vocab_size, "n_ctx": self.n_ctx, "n_embd": self.n_embd,
            "n_head": self.n_head, "n_layer": self.n_layer, "n_rot": self.n_rot,
        }
