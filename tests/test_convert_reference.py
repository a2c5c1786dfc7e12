"""Logits of converted files (smolq.sources.reference forward pass) against transformers.

f32 files: max |logit diff| < 1e-4; f16 files: top-1 agreement 100%.
The reference pass runs RoPE/ALiBi on the tensors as stored, so a wrong
Q/K permutation, a dropped bias or a wrong rope base fails here.
"""
from __future__ import annotations

import numpy as np
import pytest

from smolq.pipeline.convert import convert
from smolq.sources.reference import default_sequences, hf_hparams, hf_logits, logit_stats, logits_from_file

CASES = {
    "llama": ["gguf", "gguf-v1", "gguf-v2", "ggml", "ggmf", "ggjt-v1", "ggjt-v2", "ggjt-v3"],
    "llama-gqa-tied": ["gguf", "ggjt-v3"],
    "gptj": ["gguf", "ggml"],
    "mpt": ["gguf", "ggml", "ggmm"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("ref-models")
    dirs = {
        "llama": make_tiny_model("llama", root / "llama"),
        "llama-gqa-tied": make_tiny_model("llama", root / "gqa", gqa=True, tied=True),
        "gptj": make_tiny_model("gptj", root / "gptj"),
        "mpt": make_tiny_model("mpt", root / "mpt", config_overrides={"attn_config": {"clip_qkv": 6.0}}),
    }
    out = {}
    for name, d in dirs.items():
        import json

        n_vocab = json.loads((d / "config.json").read_text())["vocab_size"]
        tokens = default_sequences(n_vocab, batch=2, length=12)
        out[name] = (d, tokens, hf_logits(d, tokens))
    return out


@pytest.mark.parametrize("model,fmt", [(m, f) for m, fmts in CASES.items() for f in fmts])
def test_f32_logits_match_transformers(models, tmp_path, model, fmt):
    src, tokens, want = models[model]
    out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "m.bin")
    convert(src, out, format=fmt, outtype="f32")
    got = logits_from_file(out, tokens, hparams_override=hf_hparams(src))
    stats = logit_stats(want, got)
    assert stats["max_abs_diff"] < 1e-4, stats


@pytest.mark.parametrize("model,fmt", [("llama", "gguf"), ("llama", "ggjt-v3"), ("llama-gqa-tied", "gguf"),
                                       ("gptj", "gguf"), ("gptj", "ggml"), ("mpt", "gguf"), ("mpt", "ggmm")])
def test_f16_top1_agreement(models, tmp_path, model, fmt):
    src, tokens, want = models[model]
    out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "m.bin")
    convert(src, out, format=fmt, outtype="f16")
    got = logits_from_file(out, tokens, hparams_override=hf_hparams(src))
    stats = logit_stats(want, got)
    assert stats["top1_agreement"] == 1.0, stats
    assert np.isfinite(got).all()
