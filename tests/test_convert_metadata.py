"""GGUF metadata for LLaMA and MPT, read back with gguf-py's GGUFReader (not smolq's reader).

The expected tables are written here from formats.md 6.3-6.5 and
llamacpp.md 1.5-1.7 (what convert_hf_to_gguf.py writes), with the values the
tiny configs hold.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from smolq.pipeline.convert import convert

V = GGUFValueType


def read_kv(path) -> dict[str, tuple[GGUFValueType, object]]:
    r = GGUFReader(str(path))
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        t = f.types[0]
        if t == V.ARRAY:
            out[name] = (V.ARRAY, f.types[1], f.contents())
        else:
            out[name] = (t, f.contents())
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("meta-models")
    return {
        "llama": make_tiny_model("llama", root / "tiny-llama"),
        "llama-top": make_tiny_model("llama", root / "tiny-llama-top", rope_params_style="top", gqa=True),
        "mpt": make_tiny_model("mpt", root / "tiny-mpt"),
        "mpt-clip": make_tiny_model("mpt", root / "tiny-mpt-clip",
                                    config_overrides={"attn_config": {"clip_qkv": 6.0, "alibi_bias_max": 4}}),
    }


def test_llama_metadata_table(models, tmp_path):
    src = models["llama"]
    out = tmp_path / "m.gguf"
    convert(src, out, outtype="f16")
    kv = read_kv(out)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 50000.0 and "rope_theta" not in cfg
    expected = {
        "general.architecture": (V.STRING, "llama"),
        "general.type": (V.STRING, "model"),
        "general.name": (V.STRING, "tiny-llama"),
        "general.file_type": (V.UINT32, 1),  # MOSTLY_F16
        "general.quantization_version": (V.UINT32, 2),
        "llama.vocab_size": (V.UINT32, 384),
        "llama.context_length": (V.UINT32, 128),
        "llama.embedding_length": (V.UINT32, 64),
        "llama.block_count": (V.UINT32, 2),
        "llama.feed_forward_length": (V.UINT32, 192),
        "llama.rope.dimension_count": (V.UINT32, 16),
        "llama.attention.head_count": (V.UINT32, 4),
        "llama.attention.head_count_kv": (V.UINT32, 4),
        "llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, np.float32(1e-5)),
        "llama.rope.freq_base": (V.FLOAT32, 50000.0),  # from rope_parameters, not the 10000 default
        "llama.attention.key_length": (V.UINT32, 16),
        "llama.attention.value_length": (V.UINT32, 16),
        "tokenizer.ggml.model": (V.STRING, "llama"),
        "tokenizer.ggml.pre": (V.STRING, "default"),
        "tokenizer.ggml.bos_token_id": (V.UINT32, 1),
        "tokenizer.ggml.eos_token_id": (V.UINT32, 2),
        "tokenizer.ggml.unknown_token_id": (V.UINT32, 0),
        "tokenizer.ggml.add_bos_token": (V.BOOL, True),
        "tokenizer.ggml.add_eos_token": (V.BOOL, False),
        # tokenizer.json's pair template "<s> $A <s> $B" has no sep/eos between A and B:
        # llama.cpp's converter (gguf-py SpecialVocab) then writes add_sep_token = false.
        "tokenizer.ggml.add_sep_token": (V.BOOL, False),
    }
    for key, (t, value) in expected.items():
        assert key in kv, key
        assert kv[key][0] == t, key
        if t == V.FLOAT32:
            assert np.float32(kv[key][1]) == np.float32(value), key
        else:
            assert kv[key][1] == value, key
    assert kv["tokenizer.ggml.tokens"][1] == V.STRING and len(kv["tokenizer.ggml.tokens"][2]) == 384
    assert kv["tokenizer.ggml.scores"][1] == V.FLOAT32
    assert kv["tokenizer.ggml.token_type"][1] == V.INT32
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    extra = set(kv) - set(expected) - arrays - {"tokenizer.chat_template"}
    assert not extra, f"unexpected keys {extra}"


def test_llama_tokens_are_raw_sentencepiece_pieces(models, tmp_path):
    import sentencepiece as spm

    src = models["llama"]
    out = tmp_path / "m.gguf"
    convert(src, out, vocab_only=True)
    kv = read_kv(out)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tokens, scores, types = (kv[k][2] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))
    for i in range(sp.get_piece_size()):
        assert tokens[i] == sp.id_to_piece(i)
        assert np.float32(scores[i]) == np.float32(sp.get_score(i))
        want = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
        assert types[i] == want, i


def test_rope_theta_top_level_and_gqa(models, tmp_path):
    src = models["llama-top"]
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0
    out = tmp_path / "m.gguf"
    summary = convert(src, out, vocab_only=True)
    kv = read_kv(out)
    assert kv["llama.rope.freq_base"] == (V.FLOAT32, 50000.0)
    assert kv["llama.attention.head_count"][1] == cfg["num_attention_heads"]
    assert kv["llama.attention.head_count_kv"][1] == cfg["num_key_value_heads"] != cfg["num_attention_heads"]
    assert summary["guesses"] == []


def test_missing_rope_theta_is_reported_as_a_guess(models, tmp_path):
    import shutil

    src = tmp_path / "no-rope"
    shutil.copytree(models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["rope_parameters"]
    (src / "config.json").write_text(json.dumps(cfg))
    summary = convert(src, tmp_path / "m.gguf", vocab_only=True)
    assert any("rope_theta" in g and "10000" in g for g in summary["guesses"])
    assert read_kv(tmp_path / "m.gguf")["llama.rope.freq_base"] == (V.FLOAT32, 10000.0)


def _mpt_expected(cfg: dict) -> dict:
    attn = cfg["attn_config"]
    d = cfg["d_model"]
    exp = {
        "general.architecture": (V.STRING, "mpt"),
        "general.type": (V.STRING, "model"),
        "general.file_type": (V.UINT32, 0),
        "general.quantization_version": (V.UINT32, 2),
        "mpt.context_length": (V.UINT32, cfg["max_seq_len"]),
        "mpt.embedding_length": (V.UINT32, d),
        "mpt.block_count": (V.UINT32, cfg["n_layers"]),
        "mpt.feed_forward_length": (V.UINT32, 4 * d),
        "mpt.attention.head_count": (V.UINT32, cfg["n_heads"]),
        "mpt.attention.layer_norm_epsilon": (V.FLOAT32, 1e-5),
        "mpt.attention.max_alibi_bias": (V.FLOAT32, float(attn["alibi_bias_max"]) if attn["alibi"] else 0.0),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),
        "tokenizer.ggml.pre": (V.STRING, "mpt"),
        "tokenizer.ggml.bos_token_id": (V.UINT32, 0),
        "tokenizer.ggml.eos_token_id": (V.UINT32, 0),
        "tokenizer.ggml.unknown_token_id": (V.UINT32, 0),
    }
    if attn.get("clip_qkv") is not None:
        exp["mpt.attention.clamp_kqv"] = (V.FLOAT32, float(attn["clip_qkv"]))
    return exp


@pytest.mark.parametrize("model", ["mpt", "mpt-clip"])
def test_mpt_metadata_table(models, tmp_path, model):
    src = models[model]
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "m.gguf"
    convert(src, out, outtype="f32")
    kv = read_kv(out)
    expected = _mpt_expected(cfg)
    for key, (t, value) in expected.items():
        assert key in kv, key
        assert kv[key][0] == t, key
        assert kv[key][1] == pytest.approx(value) if t == V.FLOAT32 else kv[key][1] == value, key
    if model == "mpt":
        assert "mpt.attention.clamp_kqv" not in kv  # omitted when clip_qkv is null
    else:
        assert kv["mpt.attention.max_alibi_bias"][1] == 4.0
    # tokens: the byte-level BPE strings of tokenizer.json, by id; merges as "a b"
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = kv["tokenizer.ggml.tokens"][2]
    for text, tid in vocab.items():
        assert tokens[tid] == text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert kv["tokenizer.ggml.merges"][2] == merges
    assert len(tokens) == cfg["vocab_size"]
    extra = set(kv) - set(expected) - {"general.name", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                       "tokenizer.ggml.merges", "tokenizer.ggml.add_bos_token",
                                       "tokenizer.ggml.add_eos_token", "tokenizer.chat_template"}
    assert not extra, f"unexpected keys {extra}"
