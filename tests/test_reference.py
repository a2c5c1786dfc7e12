"""The reference forward pass against transformers, on tensors prepared in the test from the spec.

The GGUF-named tensors are built here straight from the HF state dict with
the transformations written out from formats.md 6.6/6.7 (not with smolq's
converter), so these tests check the forward pass and the spec reading
independently of the conversion code.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from smolq.sources.reference import (  # noqa: E402
    alibi_slopes, compare_logits, default_sequences, forward, hf_logits, logit_stats, logits_from_file,
)
from smolq.tiny import make_tiny_model  # noqa: E402

F32_TOL = 1e-4


def _state(hf_dir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return {k: v.astype(np.float32) for k, v in state.items()}


def _config(hf_dir) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


def _meta_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """formats.md 6.7, row by row: ggml_row[h*hd + 2i + s] = hf_row[h*hd + s*hd/2 + i]."""
    hd = w.shape[0] // n_heads
    source = [h * hd + s * (hd // 2) + i for h in range(n_heads) for i in range(hd // 2) for s in range(2)]
    return w[source]


def llama_gguf_tensors(hf_dir, permute: bool = True) -> tuple[dict, dict]:
    cfg, sd = _config(hf_dir), _state(hf_dir)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qk = _meta_order if permute else (lambda w, n: w)
    t = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        t["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        hf = f"model.layers.{i}."
        t.update({
            f"blk.{i}.attn_norm.weight": sd[hf + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": qk(sd[hf + "self_attn.q_proj.weight"], n_head),
            f"blk.{i}.attn_k.weight": qk(sd[hf + "self_attn.k_proj.weight"], n_kv),
            f"blk.{i}.attn_v.weight": sd[hf + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[hf + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[hf + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[hf + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[hf + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[hf + "mlp.down_proj.weight"],
        })
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    hp = {
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_kv,
        "llama.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
        "llama.rope.freq_base": theta,
        "llama.rope.dimension_count": cfg["hidden_size"] // n_head,
    }
    return t, hp


def gptj_gguf_tensors(hf_dir) -> tuple[dict, dict]:
    cfg, sd = _config(hf_dir), _state(hf_dir)
    t = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": sd["transformer.ln_f.bias"],
        "output.weight": sd["lm_head.weight"], "output.bias": sd["lm_head.bias"],
    }
    pairs = [("ln_1", "attn_norm"), ("attn.q_proj", "attn_q"), ("attn.k_proj", "attn_k"), ("attn.v_proj", "attn_v"),
             ("attn.out_proj", "attn_output"), ("mlp.fc_in", "ffn_up"), ("mlp.fc_out", "ffn_down")]
    for i in range(cfg["n_layer"]):
        for hf, gg in pairs:
            for kind in ("weight", "bias"):
                key = f"transformer.h.{i}.{hf}.{kind}"
                if key in sd:
                    t[f"blk.{i}.{gg}.{kind}"] = sd[key]
    hp = {
        "gptj.context_length": cfg["n_positions"], "gptj.embedding_length": cfg["n_embd"],
        "gptj.block_count": cfg["n_layer"], "gptj.rope.dimension_count": cfg["rotary_dim"],
        "gptj.attention.head_count": cfg["n_head"], "gptj.attention.layer_norm_epsilon": cfg["layer_norm_epsilon"],
    }
    return t, hp


def mpt_gguf_tensors(hf_dir) -> tuple[dict, dict]:
    cfg, sd = _config(hf_dir), _state(hf_dir)
    t = {"token_embd.weight": sd["transformer.wte.weight"], "output_norm.weight": sd["transformer.norm_f.weight"]}
    pairs = [("norm_1", "attn_norm"), ("attn.Wqkv", "attn_qkv"), ("attn.out_proj", "attn_output"),
             ("norm_2", "ffn_norm"), ("ffn.up_proj", "ffn_up"), ("ffn.down_proj", "ffn_down")]
    for i in range(cfg["n_layers"]):
        for hf, gg in pairs:
            t[f"blk.{i}.{gg}.weight"] = sd[f"transformer.blocks.{i}.{hf}.weight"]
    attn = cfg["attn_config"]
    hp = {
        "mpt.context_length": cfg["max_seq_len"], "mpt.embedding_length": cfg["d_model"],
        "mpt.block_count": cfg["n_layers"], "mpt.feed_forward_length": 4 * cfg["d_model"],
        "mpt.attention.head_count": cfg["n_heads"], "mpt.attention.layer_norm_epsilon": 1e-5,
        "mpt.attention.max_alibi_bias": float(attn["alibi_bias_max"]),
    }
    if attn.get("clip_qkv"):
        hp["mpt.attention.clamp_kqv"] = float(attn["clip_qkv"])
    return t, hp


BUILDERS = {"llama": llama_gguf_tensors, "gptj": gptj_gguf_tensors, "mpt": mpt_gguf_tensors}

CASES = {
    "llama": ("llama", {}),
    "llama-gqa": ("llama", {"gqa": True}),
    "llama-tied": ("llama", {"tied": True}),
    "llama-gqa-tied-top": ("llama", {"gqa": True, "tied": True, "rope_params_style": "top"}),
    "gptj": ("gptj", {}),
    "mpt": ("mpt", {}),
    # 6 heads: ALiBi's extension for non-power-of-2 head counts; clip_qkv that really clips.
    "mpt-6heads-clip": ("mpt", {"hidden_size": 48, "config_overrides": {"n_heads": 6, "attn_config": {"clip_qkv": 1.5}}}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            family, kwargs = CASES[case]
            made[case] = make_tiny_model(family, tmp_path_factory.mktemp(case) / "hf", **kwargs)
        return made[case]

    return get


def _tokens(hf_dir) -> np.ndarray:
    return default_sequences(_config(hf_dir)["vocab_size"], batch=2, length=20)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_transformers_f32(tiny, case):
    hf_dir = tiny(case)
    family = CASES[case][0]
    tensors, hp = BUILDERS[family](hf_dir)
    tokens = _tokens(hf_dir)
    ours = forward(family, tensors, hp, tokens)
    theirs = hf_logits(hf_dir, tokens)
    stats = logit_stats(theirs, ours)
    assert stats["max_abs_diff"] < F32_TOL, stats
    assert stats["top1_agreement"] == 1.0
    assert np.std(theirs) > 0.3  # logits of order one, so the tolerance means something


def _differs(family, tensors, hp, hf_dir) -> float:
    tokens = _tokens(hf_dir)
    return logit_stats(hf_logits(hf_dir, tokens), forward(family, tensors, hp, tokens))["max_abs_diff"]


@pytest.mark.parametrize("case", ["llama", "llama-gqa"])
def test_unpermuted_qk_is_caught(tiny, case):
    hf_dir = tiny(case)
    tensors, hp = llama_gguf_tensors(hf_dir, permute=False)
    assert _differs("llama", tensors, hp, hf_dir) > 1e-2


def test_k_permuted_with_the_old_head_count_is_caught(tiny):
    # Before llama.cpp e51962101, K was permuted with n_head // n_head_kv heads.
    hf_dir = tiny("llama-gqa")
    cfg = _config(hf_dir)
    tensors, hp = llama_gguf_tensors(hf_dir)
    n_old = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    sd = _state(hf_dir)
    for i in range(cfg["num_hidden_layers"]):
        tensors[f"blk.{i}.attn_k.weight"] = _meta_order(sd[f"model.layers.{i}.self_attn.k_proj.weight"], n_old)
    assert _differs("llama", tensors, hp, hf_dir) > 1e-2


def test_default_rope_base_is_caught(tiny):
    hf_dir = tiny("llama")
    tensors, hp = llama_gguf_tensors(hf_dir)
    del hp["llama.rope.freq_base"]  # what a converter that drops rope_parameters writes
    assert _differs("llama", tensors, hp, hf_dir) > 1e-2


def test_untied_head_is_not_the_embedding(tiny):
    hf_dir = tiny("llama")
    tensors, hp = llama_gguf_tensors(hf_dir)
    del tensors["output.weight"]
    assert _differs("llama", tensors, hp, hf_dir) > 1e-2


def test_gptj_partial_rotary_and_biases_matter(tiny):
    hf_dir = tiny("gptj")
    tensors, hp = gptj_gguf_tensors(hf_dir)
    full_rotary = {**hp, "gptj.rope.dimension_count": hp["gptj.embedding_length"] // hp["gptj.attention.head_count"]}
    assert _differs("gptj", tensors, full_rotary, hf_dir) > 1e-2
    no_bias = {k: v for k, v in tensors.items() if k != "blk.0.ffn_up.bias"}
    assert _differs("gptj", no_bias, hp, hf_dir) > 1e-2


def test_mpt_clamp_and_alibi_matter(tiny):
    hf_dir = tiny("mpt-6heads-clip")
    tensors, hp = mpt_gguf_tensors(hf_dir)
    no_clamp = {k: v for k, v in hp.items() if k != "mpt.attention.clamp_kqv"}
    assert _differs("mpt", tensors, no_clamp, hf_dir) > 1e-2
    no_alibi = {**hp, "mpt.attention.max_alibi_bias": 0.0}
    assert _differs("mpt", tensors, no_alibi, hf_dir) > 1e-2


def test_alibi_slopes_hand_computed():
    # 8 heads, max bias 8: 2^-1 ... 2^-8. 6 heads: 2^-2, 2^-4, 2^-6, 2^-8 then 2^-1, 2^-3.
    assert np.allclose(alibi_slopes(8, 8.0), [2.0 ** -k for k in range(1, 9)])
    assert np.allclose(alibi_slopes(6, 8.0), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])


def test_float32_forward_is_close_to_float64(tiny):
    hf_dir = tiny("llama-gqa")
    tensors, hp = llama_gguf_tensors(hf_dir)
    tokens = _tokens(hf_dir)
    a = forward("llama", tensors, hp, tokens, dtype=np.float32)
    b = forward("llama", tensors, hp, tokens)
    assert a.dtype == np.float32 and np.max(np.abs(a - b)) < 1e-4


def test_bad_tokens_and_arch_are_refused(tiny):
    hf_dir = tiny("llama")
    tensors, hp = llama_gguf_tensors(hf_dir)
    with pytest.raises(ValueError):
        forward("llama", tensors, hp, np.array([[0, 10_000]]))
    with pytest.raises(ValueError):
        forward("falcon", tensors, hp, np.array([[0]]))


# --------------------------------------------------------------------------- files written by gguf-py


def _write_with_gguf_py(path, family: str, tensors: dict, hp: dict, f16: bool = False) -> None:
    """A GGUF file written by the independent gguf.GGUFWriter (norms and biases stay F32)."""
    writer = gguf.GGUFWriter(str(path), family)
    for key, value in hp.items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    for name, data in tensors.items():
        keep_f32 = data.ndim == 1 or not f16
        writer.add_tensor(name, data.astype(np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("case", ["llama-gqa-tied-top", "gptj", "mpt-6heads-clip"])
def test_logits_from_gguf_py_file_f32(tiny, tmp_path, case):
    hf_dir = tiny(case)
    family = CASES[case][0]
    tensors, hp = BUILDERS[family](hf_dir)
    path = tmp_path / "model.gguf"
    _write_with_gguf_py(path, family, tensors, hp)
    tokens = _tokens(hf_dir)
    stats = logit_stats(hf_logits(hf_dir, tokens), logits_from_file(path, tokens))
    assert stats["max_abs_diff"] < F32_TOL, stats
    # compare_logits: the same through its own defaults
    assert compare_logits(path, hf_dir)["max_abs_diff"] < F32_TOL


@pytest.mark.parametrize("case", ["llama", "gptj", "mpt"])
def test_logits_from_gguf_py_file_f16(tiny, tmp_path, case):
    hf_dir = tiny(case)
    family = CASES[case][0]
    tensors, hp = BUILDERS[family](hf_dir)
    path = tmp_path / "model-f16.gguf"
    _write_with_gguf_py(path, family, tensors, hp, f16=True)
    stats = compare_logits(path, hf_dir)
    assert stats["top1_agreement"] == 1.0, stats
    assert 0 < stats["max_abs_diff"] < 5e-2 and stats["kl_div"] < 1e-4, stats
