"""Every --format converts a tiny checkpoint and reads back with smolq's readers.

Expected names come from tables written here from formats.md 4.4 / 6.6;
expected data from the checkpoint read with the safetensors package (not
smolq's parser), after the Q/K permutation written here from formats.md 6.7
as an explicit index loop.
"""
from __future__ import annotations

import numpy as np
import pytest

from smolq.pipeline.convert import convert
from smolq.formats.gguf import read_gguf
from smolq.formats.legacy import read_legacy
from smolq.ggml_types import GGMLType

T = GGMLType


def hf_llama_names(n_layer: int, tied: bool) -> dict[str, tuple[str | None, str]]:
    """HF name -> (GGUF name, legacy Meta name) (formats.md 4.4 HF -> legacy, 6.6)."""
    m = {
        "model.embed_tokens.weight": ("token_embd.weight", "tok_embeddings.weight"),
        "model.norm.weight": ("output_norm.weight", "norm.weight"),
    }
    if not tied:
        m["lm_head.weight"] = ("output.weight", "output.weight")
    per = {
        "input_layernorm": ("attn_norm", "attention_norm"),
        "self_attn.q_proj": ("attn_q", "attention.wq"),
        "self_attn.k_proj": ("attn_k", "attention.wk"),
        "self_attn.v_proj": ("attn_v", "attention.wv"),
        "self_attn.o_proj": ("attn_output", "attention.wo"),
        "post_attention_layernorm": ("ffn_norm", "ffn_norm"),
        "mlp.gate_proj": ("ffn_gate", "feed_forward.w1"),
        "mlp.down_proj": ("ffn_down", "feed_forward.w2"),
        "mlp.up_proj": ("ffn_up", "feed_forward.w3"),
    }
    for i in range(n_layer):
        for hf, (g, l) in per.items():
            m[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{g}.weight", f"layers.{i}.{l}.weight")
    return m


def hf_gptj_names(n_layer: int) -> dict[str, tuple[str, str]]:
    m = {}
    for hf, g in (("transformer.wte.weight", "token_embd.weight"), ("transformer.ln_f.weight", "output_norm.weight"),
                  ("transformer.ln_f.bias", "output_norm.bias"), ("lm_head.weight", "output.weight"),
                  ("lm_head.bias", "output.bias")):
        m[hf] = (g, hf)
    per = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias", "attn.q_proj.weight": "attn_q.weight",
           "attn.k_proj.weight": "attn_k.weight", "attn.v_proj.weight": "attn_v.weight",
           "attn.out_proj.weight": "attn_output.weight", "mlp.fc_in.weight": "ffn_up.weight",
           "mlp.fc_in.bias": "ffn_up.bias", "mlp.fc_out.weight": "ffn_down.weight", "mlp.fc_out.bias": "ffn_down.bias"}
    for i in range(n_layer):
        for hf, g in per.items():
            m[f"transformer.h.{i}.{hf}"] = (f"blk.{i}.{g}", f"transformer.h.{i}.{hf}")
    return m


def hf_mpt_names(n_layer: int) -> dict[str, tuple[str, str]]:
    m = {"transformer.wte.weight": ("token_embd.weight", "transformer.wte.weight"),
         "transformer.norm_f.weight": ("output_norm.weight", "transformer.norm_f.weight")}
    per = {"norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output",
           "norm_2": "ffn_norm", "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}
    for i in range(n_layer):
        for hf, g in per.items():
            m[f"transformer.blocks.{i}.{hf}.weight"] = (f"blk.{i}.{g}.weight", f"transformer.blocks.{i}.{hf}.weight")
    return m


def meta_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """formats.md 6.7: ggml_row[h*hd + 2i + s] = hf_row[h*hd + s*(hd/2) + i]."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for s in range(2):
            for i in range(hd // 2):
                out[h * hd + 2 * i + s] = w[h * hd + s * (hd // 2) + i]
    return out


def hf_weights(directory) -> dict[str, np.ndarray]:
    """All checkpoint tensors as float32, read with the safetensors package (torch for bf16)."""
    import json

    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).float().numpy()
    if not files:
        import torch

        for f in sorted(directory.glob("pytorch_model*.bin")):
            for k, v in torch.load(f, weights_only=True).items():
                out[k] = v.float().numpy()
    json.loads((directory / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("convert-models")
    return {
        "llama": make_tiny_model("llama", root / "llama"),
        "llama-gqa-tied": make_tiny_model("llama", root / "llama-gqa", gqa=True, tied=True, shards=2, dtype="bfloat16"),
        "llama-bin": make_tiny_model("llama", root / "llama-bin", weights="bin", shards=2, dtype="float16"),
        "gptj": make_tiny_model("gptj", root / "gptj", legacy_buffers=True),
        "mpt": make_tiny_model("mpt", root / "mpt", shards=2),
    }


def _read(path, fmt):
    if fmt.startswith("gguf"):
        gf = read_gguf(path)
        return {t.name: t for t in gf.tensors}, gf
    lf = read_legacy(path)
    return {t.name: t for t in lf.tensors}, lf


def _f32(entry) -> np.ndarray:
    return np.frombuffer(bytes(entry.load()), dtype="<f4").reshape(entry.shape)


def _expected(model: str, models, fmt: str):
    import json

    cfg = json.loads((models[model] / "config.json").read_text())
    family = model.split("-")[0]
    if family == "llama":
        tied = cfg.get("tie_word_embeddings", False)
        table = hf_llama_names(cfg["num_hidden_layers"], tied)
        if fmt.startswith("gguf"):
            return {g: hf for hf, (g, _) in table.items()}
        legacy = {l: hf for hf, (_, l) in table.items()}
        if tied:  # legacy loaders need output.weight; it is the embedding (DESIGN.md, tied embeddings)
            legacy["output.weight"] = "model.embed_tokens.weight"
        return legacy
    if family == "gptj":
        table = hf_gptj_names(cfg["n_layer"])
    else:
        table = hf_mpt_names(cfg["n_layers"])
    if fmt.startswith("gguf"):
        out = {g: hf for hf, (g, _) in table.items()}
        if family == "mpt":  # llama.cpp's MPT converter duplicates wte into output.weight
            out["output.weight"] = "transformer.wte.weight"
        return out
    return {l: hf for hf, (_, l) in table.items()}


def _transform(model, models, hf_name, w):
    import json

    if not model.startswith("llama"):
        return w
    cfg = json.loads((models[model] / "config.json").read_text())
    if hf_name.endswith("q_proj.weight"):
        return meta_row_order(w, cfg["num_attention_heads"])
    if hf_name.endswith("k_proj.weight"):
        return meta_row_order(w, cfg["num_key_value_heads"])
    return w


CASES = [
    ("llama", ["gguf", "gguf-v1", "gguf-v2", "gguf-v3", "ggml", "ggmf", "ggjt-v1", "ggjt-v2", "ggjt-v3"]),
    ("llama-gqa-tied", ["gguf", "ggjt-v3"]),
    ("llama-bin", ["gguf", "ggjt-v1"]),
    ("gptj", ["gguf", "ggml"]),
    ("mpt", ["gguf", "ggml", "ggmm"]),
]


@pytest.mark.parametrize("model,fmt", [(m, f) for m, fmts in CASES for f in fmts])
def test_f32_roundtrip_names_shapes_data(models, tmp_path, model, fmt):
    out = tmp_path / ("out.gguf" if fmt.startswith("gguf") else "out.bin")
    summary = convert(models[model], out, format=fmt, outtype="f32")
    assert out.is_file() and summary["format"].startswith(fmt.split("-")[0])
    tensors, f = _read(out, fmt)
    if fmt.startswith("gguf") and fmt != "gguf":
        assert f.version == int(fmt[-1])
    expected = _expected(model, models, fmt)
    assert set(tensors) == set(expected)
    weights = hf_weights(models[model])
    for name, hf in expected.items():
        entry = tensors[name]
        assert entry.type == T.F32, name
        want = _transform(model, models, hf, weights[hf])
        assert tuple(entry.shape) == want.shape, name
        np.testing.assert_array_equal(_f32(entry), want.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("model,fmt", [("llama", "gguf"), ("llama", "ggjt-v3"), ("gptj", "ggml"), ("mpt", "ggmm"), ("mpt", "gguf")])
def test_f16_types(models, tmp_path, model, fmt):
    """2-D weights F16, 1-D tensors (norms, biases) F32; GPT4All's ggmm keeps wte F32 (formats.md 4.4)."""
    out = tmp_path / ("out.gguf" if fmt.startswith("gguf") else "out.bin")
    convert(models[model], out, format=fmt, outtype="f16")
    tensors, _ = _read(out, fmt)
    weights = hf_weights(models[model])
    for name, hf in _expected(model, models, fmt).items():
        entry = tensors[name]
        want_type = T.F32 if len(entry.shape) == 1 else T.F16
        if fmt == "ggmm" and name == "transformer.wte.weight":
            want_type = T.F32
        assert entry.type == want_type, name
        if want_type == T.F16:
            got = np.frombuffer(bytes(entry.load()), dtype="<f2").reshape(entry.shape)
            want = _transform(model, models, hf, weights[hf]).astype(np.float16)
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_q8_0_matches_gguf_reference_quantizer(models, tmp_path):
    """q8_0 bytes equal gguf-py's numpy reference quantizer on the same (permuted) weights."""
    from gguf import GGMLQuantizationType, quants

    out = tmp_path / "q8.gguf"
    convert(models["llama"], out, outtype="q8_0")
    tensors, _ = _read(out, "gguf")
    weights = hf_weights(models["llama"])
    entry = tensors["blk.0.attn_q.weight"]
    assert entry.type == T.Q8_0
    want = quants.quantize(_transform("llama", models, "model.layers.0.self_attn.q_proj.weight",
                                      weights["model.layers.0.self_attn.q_proj.weight"]), GGMLQuantizationType.Q8_0)
    assert bytes(entry.load()) == want.tobytes()
    assert tensors["blk.0.attn_norm.weight"].type == T.F32


def test_legacy_quantized_layout_follows_version(models, tmp_path):
    """ggjt v1 Q4_0 blocks are 20 bytes (f32 scale), v3 18 bytes (formats.md 5.2)."""
    for fmt, size in (("ggjt-v1", 20), ("ggjt-v3", 18)):
        out = tmp_path / f"{fmt}.bin"
        convert(models["llama"], out, format=fmt, outtype="q4_0")
        lf = read_legacy(out)
        wq = lf.tensor("layers.0.attention.wq.weight")
        assert wq.type == T.Q4_0
        assert wq.nbytes == wq.n_elements // 32 * size
        assert lf.tensor("norm.weight").type == T.F32


def test_vocab_only_gguf(models, tmp_path):
    out = tmp_path / "vocab.gguf"
    convert(models["llama"], out, vocab_only=True)
    gf = read_gguf(out)
    assert gf.tensors == []
    assert len(gf.metadata["tokenizer.ggml.tokens"].value) == 384


def test_dry_run_writes_nothing(models, tmp_path):
    out = tmp_path / "plan.gguf"
    s = convert(models["llama"], out, outtype="q4_0", dry_run=True)
    assert not out.exists()
    by_name = {t["name"]: t for t in s["tensors"]}
    assert by_name["blk.0.attn_norm.weight"]["type"] == "F32"
    assert by_name["blk.0.ffn_up.weight"]["source_dtype"] == "F32"
    assert s["tensor_bytes"] == sum(t["bytes"] for t in s["tensors"])
