"""LLaMA (LlamaForCausalLM, incl. GQA; GPT4All-13b-snoozy): GGUF `llama` and legacy Meta names.

Transforms: q_proj/k_proj rows go from HF's rotate-half order back to Meta's
interleaved order (formats.md 6.7), K with n_head_kv heads (GQA-aware).
Tied embeddings: GGUF has no output.weight (llama.cpp reuses token_embd);
legacy loaders require output.weight, so it is written from the embedding.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

from smolq.arch.base import Arch, LegacyTarget, MLCParam, NameTable, TensorMap, meta, rope_scaling, rope_theta
from smolq.arch.legacy_config import GGUFKeys, LegacyConfig
from smolq.errors import FormatError, InputError
from smolq.formats.legacy import find_n_mult, llama_n_ff
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's default when llama.rope.freq_base is absent


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rows -> Meta/ggml rows: per head, (2, hd/2) -> (hd/2, 2). ggml[h*hd+2i+s] = hf[h*hd+s*hd/2+i]."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta/ggml rows -> HF rows (inverse of permute_qk)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LLAMA_NAMES = NameTable([
    ("token_embd.weight", "tok_embeddings.weight"),
    ("output_norm.weight", "norm.weight"),
    ("output.weight", "output.weight"),
    ("blk.{i}.attn_norm.weight", "layers.{i}.attention_norm.weight"),
    ("blk.{i}.attn_q.weight", "layers.{i}.attention.wq.weight"),
    ("blk.{i}.attn_k.weight", "layers.{i}.attention.wk.weight"),
    ("blk.{i}.attn_v.weight", "layers.{i}.attention.wv.weight"),
    ("blk.{i}.attn_output.weight", "layers.{i}.attention.wo.weight"),
    ("blk.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("blk.{i}.ffn_gate.weight", "layers.{i}.feed_forward.w1.weight"),
    ("blk.{i}.ffn_down.weight", "layers.{i}.feed_forward.w2.weight"),
    ("blk.{i}.ffn_up.weight", "layers.{i}.feed_forward.w3.weight"),
])

# (HF name under model.layers.N., GGUF name under blk.N.); Q/K handled separately for the permutation.
_LAYER_TENSORS = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
)

# MLC-LLM's LLaMA (mlc_llm/model/llama/llama_model.py), its parameters in the model's order, and
# the HF tensors its loader (llama_loader.py: make_standard_hf_loader) concatenates along axis 0
# into each: q/k/v -> qkv_proj, gate/up -> gate_up_proj. MLC keeps HF's rotate-half Q/K row order
# (no permutation). {i}: the block. lm_head exists only without tied embeddings.
MLC_LLAMA_PARAMS = (
    ("model.embed_tokens", "embedding", ("model.embed_tokens.weight",)),
    ("model.layers.{i}.self_attn.qkv_proj", "linear", ("model.layers.{i}.self_attn.q_proj.weight",
                                                       "model.layers.{i}.self_attn.k_proj.weight",
                                                       "model.layers.{i}.self_attn.v_proj.weight")),
    ("model.layers.{i}.self_attn.o_proj", "linear", ("model.layers.{i}.self_attn.o_proj.weight",)),
    ("model.layers.{i}.mlp.gate_up_proj", "linear", ("model.layers.{i}.mlp.gate_proj.weight",
                                                     "model.layers.{i}.mlp.up_proj.weight")),
    ("model.layers.{i}.mlp.down_proj", "linear", ("model.layers.{i}.mlp.down_proj.weight",)),
    ("model.layers.{i}.input_layernorm", "norm", ("model.layers.{i}.input_layernorm.weight",)),
    ("model.layers.{i}.post_attention_layernorm", "norm", ("model.layers.{i}.post_attention_layernorm.weight",)),
    ("model.norm", "norm", ("model.norm.weight",)),
    ("lm_head", "linear", ("lm_head.weight",)),
)
MLC_PREFILL_CHUNK = 8192  # LlamaConfig: prefill_chunk_size defaults to min(context, 8192)
MLC_MAX_BATCH_SIZE = 128  # mlc_llm gen_config's --max-batch-size default


class Llama(Arch):
    family = "llama"
    gguf_arch = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    names = LLAMA_NAMES
    legacy_targets = {
        "ggjt-v3": LegacyTarget("ggjt", 3, "llama.cpp", "v3"),
        "ggjt-v2": LegacyTarget("ggjt", 2, "llama.cpp", "v2"),
        "ggjt-v1": LegacyTarget("ggjt", 1, "llama.cpp", "v1"),
        "ggmf": LegacyTarget("ggmf", 1, "llama.cpp", "v1"),
        "ggml": LegacyTarget("ggml", None, "llama.cpp", "v1"),
    }
    default_legacy = "ggjt-v3"
    mlc_model_type = "llama"
    hf_export = True
    skip_suffixes = (".rotary_emb.inv_freq",)
    legacy_defaults = (
        ("max_position_embeddings", 2048, "context_length", "LLaMA-1 context; legacy headers store none"),
        ("rms_norm_eps", 1e-6, "attention.layer_norm_rms_epsilon", "LLaMA-1 value, the 2023 llama.cpp default"),
        ("rope_theta", 10000.0, "rope.freq_base", "llama.cpp's default RoPE base"),
    )

    @classmethod
    def config_from_legacy(cls, d: LegacyConfig, h: dict[str, Any], tensors: dict[str, Any]) -> None:
        d.positive(h, ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot"))
        n_embd, n_head = h["n_embd"], h["n_head"]
        if n_embd % n_head or h["n_rot"] != n_embd // n_head:
            raise FormatError(d.source, f"unknown hyperparameters: n_embd {n_embd}, n_head {n_head}, "
                                        f"n_rot {h['n_rot']} (LLaMA needs n_rot = n_embd / n_head)")
        head_dim = n_embd // n_head
        n_ff = cls._legacy_n_ff(d, h, tensors)
        kv_rows = d.shape_of(tensors, "blk.0.attn_k.weight")[0]
        if kv_rows % head_dim or n_head % (kv_rows // head_dim or 1) or kv_rows == 0:
            raise FormatError(d.source, f"attention.wk has {kv_rows} rows, not a whole number of heads of {head_dim}")
        d.config["architectures"] = ["LlamaForCausalLM"]
        d.known("vocab_size", h["n_vocab"])
        d.known("hidden_size", n_embd)
        d.known("intermediate_size", n_ff)
        d.known("num_hidden_layers", h["n_layer"])
        d.known("num_attention_heads", n_head)
        d.known("num_key_value_heads", kv_rows // head_dim)
        if "head_dim" in d.user or not d.user:  # transformers 5 configs always carry it; convert then writes key_length
            d.known("head_dim", head_dim)
        d.defaults(cls.family, cls.legacy_defaults)
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(d.user.get(key), dict):
                d.config[key] = d.user[key]

    @staticmethod
    def _legacy_n_ff(d: LegacyConfig, h: dict[str, Any], tensors: dict[str, Any]) -> int:
        """The feed-forward width from w1's rows, not from n_mult (formats.md 6.8)."""
        n_ff = d.shape_of(tensors, "blk.0.ffn_gate.weight")[0]
        if n_ff != llama_n_ff(h["n_embd"], h["n_mult"]):
            d.notes.append(f"feed-forward width {n_ff} (from w1) differs from n_mult {h['n_mult']}'s "
                           f"{llama_n_ff(h['n_embd'], h['n_mult'])}; using the tensor's")
        return n_ff

    @classmethod
    def config_from_gguf(cls, meta: dict[str, Any], path) -> dict[str, Any]:
        k = GGUFKeys(meta, cls.gguf_arch, path)
        n_vocab = k.n_vocab()
        cfg = {
            "architectures": [cls.hf_architectures[0]], "vocab_size": n_vocab, "hidden_size": k.need("embedding_length"),
            "intermediate_size": k.need("feed_forward_length"), "num_hidden_layers": k.need("block_count"),
            "num_attention_heads": k.need("attention.head_count"),
            "num_key_value_heads": k.get("attention.head_count_kv") or k.need("attention.head_count"),
            "max_position_embeddings": k.need("context_length"),
            "rms_norm_eps": k.need("attention.layer_norm_rms_epsilon"),
            "rope_theta": k.get("rope.freq_base", 10000.0),
        }
        key_length = k.get("attention.key_length")
        head_dim = key_length or cfg["hidden_size"] // cfg["num_attention_heads"]
        if key_length is not None:
            cfg["head_dim"] = key_length
        n_rot = k.get("rope.dimension_count")
        if n_rot is not None and n_rot != head_dim:  # llama.cpp refuses it too ("invalid n_rot")
            raise FormatError(path, f"{cls.gguf_arch}.rope.dimension_count {n_rot} is not the head size {head_dim}")
        scaling = k.get("rope.scaling.type")
        if scaling == "linear":
            cfg["rope_scaling"] = {"type": "linear", "factor": k.get("rope.scaling.factor")}
        elif scaling not in (None, "none"):  # read_hparams refuses it rather than dropping it
            cfg["rope_scaling"] = {"type": scaling, "factor": k.get("rope.scaling.factor")}
        return cfg

    def read_hparams(self) -> None:
        c = self.config
        self.vocab_size = int(self.need("vocab_size"))
        self.n_embd = int(self.need("hidden_size"))
        self.n_ff = int(self.need("intermediate_size"))
        self.n_layer = int(self.need("num_hidden_layers"))
        self.n_head = int(self.need("num_attention_heads"))
        self.n_head_kv = int(c.get("num_key_value_heads") or self.n_head)  # absent means no GQA (HF definition)
        self.head_dim = int(c.get("head_dim") or self.n_embd // self.n_head)
        self.n_ctx = int(self.default("max_position_embeddings", 2048, "LLaMA-1 context"))
        self.rms_eps = float(self.default("rms_norm_eps", 1e-6, "LlamaConfig default"))
        theta = rope_theta(c)
        if theta is None:
            self.guesses.append(f"rope_theta not in config.json (neither top level nor rope_parameters); using {DEFAULT_ROPE_THETA}")
            theta = DEFAULT_ROPE_THETA
        self.rope_theta = theta
        self.tied = bool(c.get("tie_word_embeddings", False))
        self.rope_scaling = rope_scaling(c)
        self.rope_kind = None
        if self.rope_scaling is not None:
            self.rope_kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if self.rope_kind not in ("linear", "llama3"):
                raise InputError(self.config_path, f"RoPE scaling type {self.rope_kind!r} is not supported "
                                                   "(linear and llama3 are)")
        if self.n_head % self.n_head_kv:
            raise InputError(self.config_path, f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_head_kv}")

    @property
    def n_vocab(self) -> int:
        return self.vocab_size

    def layer_tensors(self) -> list[tuple[str, str, tuple[int, ...], Any, Any]]:
        """Per block: (HF name under model.layers.N., GGUF name under blk.N., shape, transform, inverse).
        LLaMA's Q/K rows go from HF's rotate-half order to ggml's interleaved one."""
        E, F, hd = self.n_embd, self.n_ff, self.head_dim
        q_rows, kv_rows = self.n_head * hd, self.n_head_kv * hd
        shapes = {
            "input_layernorm.weight": (E,), "post_attention_layernorm.weight": (E,),
            "self_attn.q_proj.weight": (q_rows, E), "self_attn.k_proj.weight": (kv_rows, E),
            "self_attn.v_proj.weight": (kv_rows, E), "self_attn.o_proj.weight": (E, q_rows),
            "mlp.gate_proj.weight": (F, E), "mlp.up_proj.weight": (F, E), "mlp.down_proj.weight": (E, F),
        }
        heads = {"self_attn.q_proj.weight": self.n_head, "self_attn.k_proj.weight": self.n_head_kv}
        out = []
        for hf, gg in _LAYER_TENSORS:
            n = heads.get(hf)
            transform = partial(permute_qk, n_heads=n) if n else None
            inverse = partial(unpermute_qk, n_heads=n) if n else None
            out.append((hf, gg, shapes[hf], transform, inverse))
        return out

    def tensor_maps(self, available: set[str]) -> list[TensorMap]:
        E, V = self.n_embd, self.vocab_size
        maps = [self._map("model.embed_tokens.weight", (V, E), "token_embd.weight")]
        if self.rope_kind == "llama3":
            maps.append(TensorMap("rope_freqs", (self.head_dim // 2,), "rope_freqs.weight", None, keep_f32=True,
                                  make=self.llama3_rope_factors))
        for i in range(self.n_layer):
            for hf, gg, shape, transform, inverse in self.layer_tensors():
                maps.append(self._map(f"model.layers.{i}.{hf}", shape, f"blk.{i}.{gg}", transform, inverse))
        maps.append(self._map("model.norm.weight", (E,), "output_norm.weight"))
        if "lm_head.weight" in available:
            maps.append(self._map("lm_head.weight", (V, E), "output.weight"))
        else:
            # Tied: GGUF omits output.weight; legacy loaders need it, so copy the embedding there.
            maps.append(TensorMap("model.embed_tokens.weight", (V, E), None, self.names.to_legacy("output.weight")))
        return maps

    def llama3_rope_factors(self) -> np.ndarray:
        """rope_freqs for Llama 3.1 RoPE scaling (rope_type llama3): per rotary pair, the factor llama.cpp
        divides its frequency by. Computed in float32 with the operations llama.cpp's converter's torch
        code performs (torch turns `scalar / tensor` into reciprocal-then-multiply); the defaults
        are the converter's for keys a config leaves out. The power alone is the float32 nearest
        the exact value, from float64: numpy's float32 power calls libm on some CPUs and SVML on
        those with AVX-512 (1 ULP apart on some frequencies), and the converter's torch power
        (Sleef) is itself within 1 ULP of it, so this tensor is the same on every machine and
        within 1 ULP of the converter's (tests/test_vs_llama_converter_families.py)."""
        p = self.rope_scaling
        f32 = np.float32
        factor = f32(p.get("factor", 8.0))
        low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
        old_ctx = float(p.get("original_max_position_embeddings", 8192))
        dim = self.head_dim
        exponents = (np.arange(0, dim, 2, dtype=f32) / f32(dim)).astype(np.float64)
        freqs = f32(1.0) / (np.float64(f32(self.rope_theta)) ** exponents).astype(f32)
        wavelen = (f32(1.0) / freqs) * f32(2 * math.pi)
        smooth = ((f32(1.0) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
        blended = f32(1.0) / ((f32(1.0) - smooth) / factor + smooth)
        out = np.where(wavelen < f32(old_ctx / high), f32(1.0), np.where(wavelen > f32(old_ctx / low), factor, blended))
        return out.astype(f32)

    def mlc_params(self) -> list[MLCParam]:
        E, F, V, hd = self.n_embd, self.n_ff, self.vocab_size, self.head_dim
        rows = {"qkv_proj": (self.n_head + 2 * self.n_head_kv) * hd, "o_proj": E, "gate_up_proj": 2 * F,
                "down_proj": E, "embed_tokens": V, "lm_head": V}
        cols = {"o_proj": self.n_head * hd, "down_proj": F}

        def param(name: str, kind: str, sources: tuple[str, ...], i: int | None) -> MLCParam:
            fill = (lambda t: t.replace("{i}", str(i))) if i is not None else (lambda t: t)
            short = name.rsplit(".", 1)[-1]
            shape = (E,) if kind == "norm" else (rows[short], cols.get(short, E))
            return MLCParam(fill(name), kind, tuple(fill(t) for t in sources), shape)

        per_layer = [p for p in MLC_LLAMA_PARAMS if "{i}" in p[0]]
        first, last = MLC_LLAMA_PARAMS[:1], [p for p in MLC_LLAMA_PARAMS[1:] if "{i}" not in p[0]]
        out = [param(*p, None) for p in first]
        out += [param(*p, i) for i in range(self.n_layer) for p in per_layer]
        out += [param(*p, None) for p in last if not (p[0] == "lm_head" and self.tied)]
        return out

    def mlc_model_config(self) -> dict[str, Any]:
        if self.rope_scaling is not None:
            raise InputError(self.config_path, "MLC-LLM's LLaMA takes only llama3 RoPE scaling; this model's is "
                                               f"{self.rope_scaling.get('rope_type', self.rope_scaling.get('type'))}")
        return {
            "hidden_size": self.n_embd, "intermediate_size": self.n_ff, "num_attention_heads": self.n_head,
            "num_hidden_layers": self.n_layer, "rms_norm_eps": self.rms_eps, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tied, "position_embedding_base": self.rope_theta, "rope_scaling": None,
            "context_window_size": self.n_ctx, "prefill_chunk_size": min(self.n_ctx, MLC_PREFILL_CHUNK),
            "num_key_value_heads": self.n_head_kv, "head_dim": self.head_dim, "tensor_parallel_shards": 1,
            "pipeline_parallel_stages": 1, "max_batch_size": MLC_MAX_BATCH_SIZE, "disaggregation": False,
        }

    def _map(self, source: str, shape: tuple[int, ...], gguf: str, transform=None, inverse=None) -> TensorMap:
        return TensorMap(source, shape, gguf, self.names.to_legacy(gguf), transform, keep_f32=len(shape) == 1,
                         inverse=inverse)

    def hf_config(self) -> dict[str, Any]:
        """LlamaForCausalLM's config.json. The RoPE base goes in both places transformers 4
        (rope_theta) and 5 (rope_parameters) read it; tied embeddings mean no lm_head."""
        def short(x: float) -> float:  # GGUF stores f32: 9.999999747378752e-06 is written as 1e-05
            return float(str(np.float32(x)))

        rope: dict[str, Any] = {"rope_theta": short(self.rope_theta), "rope_type": "default"}
        cfg: dict[str, Any] = {
            "architectures": [self.hf_architectures[0]], "model_type": self.model_types[0], "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd, "intermediate_size": self.n_ff, "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv,
            "max_position_embeddings": self.n_ctx, "rms_norm_eps": short(self.rms_eps),
            "rope_theta": short(self.rope_theta),
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": self.tied,
        }
        if self.config.get("head_dim") is not None:  # stated (GGUF key_length), else hidden / heads
            cfg["head_dim"] = self.head_dim
        if self.rope_scaling is not None:  # linear only (read_hparams refuses the others)
            factor = short(float(self.rope_scaling["factor"]))
            cfg["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": factor}
            rope.update(rope_type="linear", factor=factor)
        cfg["rope_parameters"] = rope
        return cfg

    def hparam_keys(self) -> dict[str, Any]:
        a = self.gguf_arch
        md = {
            f"{a}.vocab_size": meta("u32", self.vocab_size),
            f"{a}.context_length": meta("u32", self.n_ctx),
            f"{a}.embedding_length": meta("u32", self.n_embd),
            f"{a}.block_count": meta("u32", self.n_layer),
            f"{a}.feed_forward_length": meta("u32", self.n_ff),
            f"{a}.rope.dimension_count": meta("u32", self.head_dim),
            f"{a}.attention.head_count": meta("u32", self.n_head),
            f"{a}.attention.head_count_kv": meta("u32", self.n_head_kv),
            f"{a}.attention.layer_norm_rms_epsilon": meta("f32", self.rms_eps),
            f"{a}.rope.freq_base": meta("f32", self.rope_theta),
        }
        if self.config.get("head_dim") is not None:
            md[f"{a}.attention.key_length"] = meta("u32", self.head_dim)
            md[f"{a}.attention.value_length"] = meta("u32", self.head_dim)
        if self.rope_kind == "linear":  # llama3 scaling is the rope_freqs tensor, no key (as llama.cpp writes it)
            md[f"{a}.rope.scaling.type"] = meta("str", "linear")
            md[f"{a}.rope.scaling.factor"] = meta("f32", float(self.rope_scaling["factor"]))
        return md

    def legacy_hparams(self, target: LegacyTarget) -> dict[str, int | float]:
        if self.rope_kind is not None:
            raise InputError(self.config_path, f"{self.rope_kind} RoPE scaling has no place in a legacy LLaMA header "
                                               "(no 2023 loader knows it); write GGUF")
        if self.head_dim * self.n_head != self.n_embd:
            raise InputError(self.config_path, "legacy LLaMA headers assume head_dim = hidden_size / num_attention_heads")

        try:
            n_mult = find_n_mult(self.n_embd, self.n_ff)
        except InputError as exc:
            raise InputError(self.config_path, exc.message) from None
        if self.n_head_kv != self.n_head:
            self.notes.append(f"legacy LLaMA headers have no n_head_kv: loaders need --gqa {self.n_head // self.n_head_kv}")
        return {
            "n_vocab": self.vocab_size, "n_embd": self.n_embd, "n_mult": n_mult,
            "n_head": self.n_head, "n_layer": self.n_layer, "n_rot": self.n_embd // self.n_head,
        }
