"""Gemma 3 (Gemma3ForCausalLM, the text model): GGUF `gemma3`, as llama.cpp's converter writes it.

What sets it apart from LLaMA (llama.cpp's Gemma3Model in conversion/gemma.py, its loader in
src/models/gemma3.cpp):
- RMS norms scale by (1 + w) in transformers; llama.cpp multiplies by the stored weight, so
  every `*norm.weight` is written as w + 1 (and exported back as w - 1). The sum is taken in
  the source's float type where that is f16 (the converter adds in torch's f16), else in f32;
- sandwich norms: besides input/pre-feedforward norms, post-attention and post-feedforward
  norms on each branch, and RMS norms on Q and K per head (attn_q_norm / attn_k_norm);
- Q/K rows stay in HF's order (llama.cpp ropes Gemma in NEOX mode: no permutation);
- local/global attention: sliding layers use `sliding_window` and the local RoPE base
  (rope.freq_base_swa), full layers the global base and any linear RoPE scaling. llama.cpp
  lays the layers out as "every 6th is global" unless the file says otherwise, so a model
  whose layer_types differ gets the pattern written (the converter omits it);
- the embedding is scaled by sqrt(hidden) at run time (nothing stored), the output head is
  tied unless the checkpoint has lm_head, and final logits may be soft-capped;
- attention scores are scaled by 1/sqrt(head_dim) in llama.cpp (1/sqrt(hidden/heads) for the
  27B model) whatever query_pre_attn_scalar says; a config that disagrees gets a note.

Configs come in two layouts: transformers 4 (rope_theta, rope_local_base_freq, rope_scaling,
sliding_window_pattern) and transformers 5 (rope_parameters per layer type, layer_types).
Gemma 3 predates nothing: no legacy container holds it.
"""
from __future__ import annotations

import math
from typing import Any

from smolq.arch.base import Arch, NameTable, TensorMap, f32_short, meta
from smolq.arch.legacy_config import GGUFKeys
from smolq.errors import FormatError, InputError
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# transformers' Gemma3TextConfig defaults, which llama.cpp's converter also assumes for absent keys.
DEFAULTS = {
    "max_position_embeddings": 131072, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "rms_norm_eps": 1e-6, "sliding_window": 4096, "query_pre_attn_scalar": 256,
}
GLOBAL_ROPE_THETA = 1_000_000.0  # Gemma3TextConfig.default_theta["global"]
LOCAL_ROPE_THETA = 10_000.0  # default_theta["local"]; also llama.cpp's rope_freq_base_train_swa default
LLAMA_CPP_SWA_PATTERN = 6  # llama.cpp's gemma3 loader: every 6th layer global unless the file says
LAYERS_27B = 62  # llama.cpp scales attention by 1/sqrt(hidden/heads) for this size only
SLIDING, FULL = "sliding_attention", "full_attention"

# (HF name under model.layers.N., GGUF name under blk.N.) in the order smolq writes a block.
LAYER_TENSORS = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
)



def add_one(w: np.ndarray) -> np.ndarray:
    """A Gemma norm weight as llama.cpp stores it: 1 + w, summed in f16 for f16 data (as the
    converter's torch does: f32 sum rounded to f16), in f32 otherwise."""
    if w.dtype == np.float16:
        return (w.astype(np.float32) + np.float32(1)).astype(np.float16)
    return np.asarray(w, dtype=np.float32) + np.float32(1)


def sub_one(w: np.ndarray) -> np.ndarray:
    """A stored Gemma norm weight back to transformers' convention (w - 1)."""
    return np.asarray(w, dtype=np.float32) - np.float32(1)


def layer_types_from(config: dict[str, Any], n_layer: int) -> list[str]:
    """Each layer's attention kind: config.layer_types (transformers 5), else from
    sliding_window_pattern (transformers 4; every pattern-th layer global, default 6)."""
    types = config.get("layer_types")
    if isinstance(types, list):
        return [str(t) for t in types]
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layer)]


def llama_cpp_layer_types(n_layer: int, pattern: int = LLAMA_CPP_SWA_PATTERN) -> list[str]:
    """The layout llama.cpp assumes for a pattern (hparams.set_swa_pattern, dense last)."""
    return [SLIDING if pattern and i % pattern < pattern - 1 else FULL for i in range(n_layer)]


def _rope_sections(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) RoPE settings from either layout: rope_parameters per layer type
    (transformers 5), or rope_theta / rope_local_base_freq / rope_scaling (transformers 4)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        return dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    full: dict[str, Any] = {}
    for source in (params, config.get("rope_scaling")):
        if isinstance(source, dict):
            full.update(source)
    if config.get("rope_theta") is not None:
        full.setdefault("rope_theta", config["rope_theta"])
    local = {"rope_theta": config["rope_local_base_freq"]} if config.get("rope_local_base_freq") is not None else {}
    return full, local


class Gemma3(Arch):
    family = "gemma3"
    gguf_arch = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    names = NameTable([])  # no legacy container holds Gemma 3, so no legacy names
    legacy_targets = {}
    default_legacy = "ggjt-v3"  # so that OUT.bin is refused by name (legacy_target)
    hf_export = True
    add_space_prefix = False  # Gemma3Model.set_vocab
    skip_suffixes = (".rotary_emb.inv_freq",)

    def read_hparams(self) -> None:
        c = self.config
        self.vocab_size = int(self.need("vocab_size"))
        self.n_embd = int(self.need("hidden_size"))
        self.n_ff = int(self.need("intermediate_size"))
        self.n_layer = int(self.need("num_hidden_layers"))
        self.n_head = int(self._default("num_attention_heads"))
        self.n_head_kv = int(self._default("num_key_value_heads"))
        self.head_dim = int(self._default("head_dim"))
        self.n_ctx = int(self._default("max_position_embeddings"))
        self.rms_eps = float(self._default("rms_norm_eps"))
        self.tied = bool(c.get("tie_word_embeddings", True))  # transformers' default for Gemma 3
        self._read_attention(c)
        self._read_rope(c)
        if self.n_head % self.n_head_kv:
            raise InputError(self.config_path, f"num_attention_heads {self.n_head} is not a multiple of "
                                               f"num_key_value_heads {self.n_head_kv}")

    def _default(self, key: str) -> Any:
        return self.default(key, DEFAULTS[key], "Gemma3TextConfig default")

    def _read_attention(self, c: dict[str, Any]) -> None:
        if c.get("attn_logit_softcapping") is not None:  # Gemma 2 had it; llama.cpp's gemma3 has no such step
            raise InputError(self.config_path, "attn_logit_softcapping is set; Gemma 3 (and llama.cpp's gemma3) "
                                               "has no attention soft-capping")
        if c.get("use_bidirectional_attention"):
            raise InputError(self.config_path, "use_bidirectional_attention is set (an embedding model); "
                                               "smolq converts the causal Gemma3ForCausalLM only")
        self.final_softcap = float(c["final_logit_softcapping"]) if c.get("final_logit_softcapping") else None
        self.layer_types = layer_types_from(c, self.n_layer)
        if len(self.layer_types) != self.n_layer or set(self.layer_types) - {SLIDING, FULL}:
            raise InputError(self.config_path, f"layer_types must name {SLIDING} or {FULL} for each of the "
                                               f"{self.n_layer} layers")
        has_sliding = SLIDING in self.layer_types
        self.sliding_window = int(self._default("sliding_window")) if has_sliding else None
        scalar = float(self._default("query_pre_attn_scalar"))
        llama_cpp = self.n_embd / self.n_head if self.n_layer == LAYERS_27B else self.head_dim
        if not math.isclose(scalar, llama_cpp):
            self.notes.append(f"query_pre_attn_scalar {scalar:g}: llama.cpp scales attention by "
                              f"1/sqrt({llama_cpp:g}) for this model whatever the config says")

    def _read_rope(self, c: dict[str, Any]) -> None:
        full, local = _rope_sections(c)
        if full.get("rope_theta") is None:
            self.guesses.append(f"global rope_theta not in config.json; using {GLOBAL_ROPE_THETA} (Gemma 3's)")
        if local.get("rope_theta") is None:
            self.guesses.append(f"local rope_theta not in config.json; using {LOCAL_ROPE_THETA} (Gemma 3's)")
        self.rope_theta = float(full.get("rope_theta") or GLOBAL_ROPE_THETA)
        self.rope_theta_local = float(local.get("rope_theta") or LOCAL_ROPE_THETA)
        for section, where in ((full, "global"), (local, "local")):
            kind = section.get("rope_type", section.get("type"))
            if kind not in (None, "default", "linear") or (kind == "linear" and where == "local"):
                raise InputError(self.config_path, f"{where} RoPE scaling {kind!r} is not supported "
                                                   "(Gemma 3 uses linear scaling on global layers only)")
        kind = full.get("rope_type", full.get("type"))
        self.rope_factor = float(full["factor"]) if kind == "linear" and full.get("factor") is not None else None

    @property
    def n_vocab(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ tensors

    def tensor_maps(self, available: set[str]) -> list[TensorMap]:
        E, F, V, hd = self.n_embd, self.n_ff, self.vocab_size, self.head_dim
        q_rows, kv_rows = self.n_head * hd, self.n_head_kv * hd
        shapes = {
            "input_layernorm.weight": (E,), "post_attention_layernorm.weight": (E,),
            "pre_feedforward_layernorm.weight": (E,), "post_feedforward_layernorm.weight": (E,),
            "self_attn.q_proj.weight": (q_rows, E), "self_attn.k_proj.weight": (kv_rows, E),
            "self_attn.v_proj.weight": (kv_rows, E), "self_attn.o_proj.weight": (E, q_rows),
            "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (F, E), "mlp.up_proj.weight": (F, E), "mlp.down_proj.weight": (E, F),
        }
        maps = [self._map("model.embed_tokens.weight", (V, E), "token_embd.weight")]
        for i in range(self.n_layer):
            maps += [self._map(f"model.layers.{i}.{hf}", shapes[hf], f"blk.{i}.{gg}") for hf, gg in LAYER_TENSORS]
        maps.append(self._map("model.norm.weight", (E,), "output_norm.weight"))
        if "lm_head.weight" in available:
            maps.append(self._map("lm_head.weight", (V, E), "output.weight"))
        return maps

    @staticmethod
    def _map(source: str, shape: tuple[int, ...], gguf: str) -> TensorMap:
        norm = source.endswith("norm.weight")
        return TensorMap(source, shape, gguf, None, add_one if norm else None, keep_f32=len(shape) == 1,
                         inverse=sub_one if norm else None)

    @classmethod
    def output_tied(cls, tensors: dict[str, Any], same) -> bool:
        return "output.weight" not in tensors

    # ------------------------------------------------------------------ GGUF metadata

    def hparam_keys(self) -> dict[str, Any]:
        """The converter's keys (TextModel then Gemma3Model.set_gguf_parameters), values as it writes them."""
        a = self.gguf_arch
        md = {
            f"{a}.block_count": meta("u32", self.n_layer),
            f"{a}.context_length": meta("u32", self.n_ctx),
            f"{a}.embedding_length": meta("u32", self.n_embd),
            f"{a}.feed_forward_length": meta("u32", self.n_ff),
            f"{a}.attention.head_count": meta("u32", self.n_head),
            f"{a}.attention.head_count_kv": meta("u32", self.n_head_kv),
        }
        if self.rope_factor is not None:
            md[f"{a}.rope.scaling.type"] = meta("str", "linear")
            md[f"{a}.rope.scaling.factor"] = meta("f32", self.rope_factor)
        md[f"{a}.rope.freq_base"] = meta("f32", self.rope_theta)
        md[f"{a}.rope.freq_base_swa"] = meta("f32", self.rope_theta_local)
        md[f"{a}.attention.layer_norm_rms_epsilon"] = meta("f32", self.rms_eps)
        md[f"{a}.attention.key_length"] = meta("u32", self.head_dim)
        md[f"{a}.attention.value_length"] = meta("u32", self.head_dim)
        if self.final_softcap is not None:
            md[f"{a}.final_logit_softcapping"] = meta("f32", self.final_softcap)
        if self.sliding_window is not None:
            md[f"{a}.attention.sliding_window"] = meta("u32", self.sliding_window)
            if self.layer_types != llama_cpp_layer_types(self.n_layer):
                # llama.cpp would assume every 6th layer global; say which are (true: sliding).
                md[f"{a}.attention.sliding_window_pattern"] = meta(
                    "array", [t == SLIDING for t in self.layer_types], "bool")
        return md

    @classmethod
    def config_from_gguf(cls, meta_kv: dict[str, Any], path) -> dict[str, Any]:
        """A Gemma3TextConfig (transformers 5 layout) from `gemma3.*` keys, read as llama.cpp's loader does."""
        k = GGUFKeys(meta_kv, cls.family, path)
        n_layer, n_embd = int(k.need("block_count")), int(k.need("embedding_length"))
        n_head = int(k.need("attention.head_count"))
        head_dim = int(k.get("attention.key_length") or n_embd // n_head)
        if k.get("attention.value_length", head_dim) != head_dim:
            raise FormatError(path, "gemma3 with value_length != key_length has no transformers counterpart")
        window = k.get("attention.sliding_window")
        layer_types = cls._gguf_layer_types(k, n_layer, window, path)
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": f32_short(k.get("rope.freq_base", 10000.0))}
        scaling = k.get("rope.scaling.type")
        if scaling == "linear":
            full.update(rope_type="linear", factor=f32_short(k.need("rope.scaling.factor")))
        elif scaling not in (None, "none"):
            raise FormatError(path, f"gemma3.rope.scaling.type {scaling!r} has no transformers Gemma 3 counterpart")
        local = {"rope_type": "default", "rope_theta": f32_short(k.get("rope.freq_base_swa", LOCAL_ROPE_THETA))}
        softcap = k.get("final_logit_softcapping")
        return {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": k.n_vocab(),
            "hidden_size": n_embd, "intermediate_size": int(k.need("feed_forward_length")),
            "num_hidden_layers": n_layer, "num_attention_heads": n_head,
            "num_key_value_heads": int(k.get("attention.head_count_kv") or n_head), "head_dim": head_dim,
            "max_position_embeddings": int(k.need("context_length")),
            "rms_norm_eps": f32_short(k.need("attention.layer_norm_rms_epsilon")),
            "sliding_window": int(window) if window else DEFAULTS["sliding_window"], "layer_types": layer_types,
            "query_pre_attn_scalar": n_embd // n_head if n_layer == LAYERS_27B else head_dim,
            "final_logit_softcapping": f32_short(softcap) if softcap else None,
            "rope_parameters": {FULL: full, SLIDING: local},
        }

    @staticmethod
    def _gguf_layer_types(k: GGUFKeys, n_layer: int, window: Any, path) -> list[str]:
        if not window:  # llama.cpp: no sliding window key, no local layers
            return [FULL] * n_layer
        pattern = k.get("attention.sliding_window_pattern", LLAMA_CPP_SWA_PATTERN)
        if isinstance(pattern, list):
            if len(pattern) != n_layer:
                raise FormatError(path, f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries "
                                        f"for {n_layer} layers")
            return [SLIDING if flag else FULL for flag in pattern]
        return llama_cpp_layer_types(n_layer, int(pattern))

    def hf_config(self) -> dict[str, Any]:
        """Gemma3ForCausalLM's config.json, in transformers 5's layout (per-layer-type RoPE,
        layer_types) with the transformers 4 keys beside it, so either version reads it."""
        full = {"rope_type": "default", "rope_theta": f32_short(self.rope_theta)}
        if self.rope_factor is not None:
            full.update(rope_type="linear", factor=f32_short(self.rope_factor))
        cfg: dict[str, Any] = {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd, "intermediate_size": self.n_ff, "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv, "head_dim": self.head_dim,
            "max_position_embeddings": self.n_ctx, "rms_norm_eps": f32_short(self.rms_eps),
            "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
            "query_pre_attn_scalar": self.config.get("query_pre_attn_scalar", self.head_dim),
            "sliding_window": self.sliding_window or DEFAULTS["sliding_window"], "layer_types": self.layer_types,
            "final_logit_softcapping": f32_short(self.final_softcap) if self.final_softcap else None,
            "attn_logit_softcapping": None, "tie_word_embeddings": self.tied,
            "rope_parameters": {FULL: full, SLIDING: {"rope_type": "default",
                                                      "rope_theta": f32_short(self.rope_theta_local)}},
            # transformers 4's names for the same settings
            "rope_theta": f32_short(self.rope_theta), "rope_local_base_freq": f32_short(self.rope_theta_local),
            "rope_scaling": {"rope_type": "linear", "factor": full["factor"]} if self.rope_factor else None,
        }
        return cfg
