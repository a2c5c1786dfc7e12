"""scripts/hf_from_gguf.py: GGUF -> HF LLaMA directory (weights, config, tokenizer)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.gptq_spec import load_dir as _tensors
from tests.script_module import load_script


def _helper():
    return load_script("hf_from_gguf")


@pytest.mark.parametrize("gqa,tied", [(True, True), (False, False)])
def test_tiny_llama_round_trip(tmp_path, gqa, tied):
    """HF -> smolq GGUF (f32, Q/K permuted) -> helper gives back the same tensors and config."""
    from smolq.arch.base import rope_theta
    from smolq.pipeline.convert import convert
    from smolq.tiny import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "src", gqa=gqa, tied=tied, seed=3)
    gguf_path = tmp_path / "m.gguf"
    convert(src, gguf_path, format="gguf", outtype="f32")
    out = _helper().hf_from_gguf(gguf_path, tmp_path / "back", tokenizer=False)

    want = _tensors(src)
    got = _tensors(out)
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w.astype(np.float32), err_msg=name)

    a = json.loads((src / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "tie_word_embeddings", "max_position_embeddings"):
        assert b[key] == a[key], key
    assert b["num_key_value_heads"] == a.get("num_key_value_heads", a["num_attention_heads"])
    assert b["rms_norm_eps"] == pytest.approx(a["rms_norm_eps"], rel=1e-6)  # stored as f32 in GGUF
    assert b["rope_theta"] == rope_theta(a)


def test_gptj_goes_through_the_helper_too(tmp_path):
    """GPT-J and MPT export as LLaMA does (tests/test_hf_export.py proves them); the helper passes them on."""
    import json

    from smolq.pipeline.convert import convert
    from smolq.tiny import make_tiny_model

    src = make_tiny_model("gptj", tmp_path / "src")
    convert(src, tmp_path / "g.gguf", format="gguf", outtype="f32")
    assert _helper().main([str(tmp_path / "g.gguf"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GPTJForCausalLM"]


TEXT = "The quick brown fox jumps over 13 lazy dogs.\nIt's 2024: naïve café!"


@pytest.mark.slow
def test_smollm2_rebuilt_dir_loads_and_matches_the_file(tmp_path, smollm2_gguf):
    """transformers runs the rebuilt dir; its logits equal smolq's reference pass over
    the GGUF itself (ggml's interleaved RoPE on the stored rows), which checks the Q/K
    unpermutation and the config independently; the tokenizer round-trips text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.sources.reference import logits_from_file

    out = _helper().hf_from_gguf(smollm2_gguf, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    text = TEXT
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("1999")["input_ids"]) == ["1", "9", "9", "9"]  # smollm digit split
    assert tok.convert_ids_to_tokens(tok(" the")["input_ids"]) == ["Ġthe"]
    assert tok.eos_token == "<|im_end|>" and tok("<|im_start|>")["input_ids"] == [1]

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.asarray([ids[:12]], dtype=np.int64)
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    ref = logits_from_file(smollm2_gguf, tokens, dtype=np.float32)
    assert np.abs(hf - ref).max() < 2e-3 * np.abs(ref).max()
    assert (hf.argmax(-1) == ref.argmax(-1)).all()
