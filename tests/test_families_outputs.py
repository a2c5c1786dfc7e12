"""Every output for Llama 3.x, Mistral, Qwen2 and Qwen3: GPTQ (directory and GGUF), HF export,
split GGUF; legacy containers refuse them in one line; an unknown architecture is named.

Independent judges: transformers (the source checkpoint's logits, the GPTQ directory and the
exported checkpoint loaded by it), llama-cpp-python (runs the GGUF files), gpt-py's reader
(the split shards). The byte-level comparisons with llama.cpp's converter are in
tests/test_vs_llama_converter_families.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from real_loaders import llama_cpp_logits, open_llama, probe_sequences

from smolq.errors import InputError
from smolq.formats.gguf import Split
from smolq.pipeline.convert import convert
from smolq.sources.reference import hf_logits, logit_stats
from smolq.tiny import TINY_TEXT
from tests.test_cli_support import run_cli

# name -> (family, make_tiny_model options)
MODELS = {
    "llama3": ("llama", {"bpe": "llama3", "gqa": True}),
    "llama31": ("llama", {"bpe": "llama3", "llama3_rope": True, "tied": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"tied": True}),
    "qwen3": ("qwen3", {}),
}
CALIB = " ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(["cat", "dog", "bird"] * 120))
GPTQ_FAST = dict(nsamples=4, seqlen=32, quiet=True, bits=4, group_size=32)
# 4-bit GPTQ on these random tiny weights costs 0.06-0.28 nats (float32 forwards); q's rows
# permuted within each head (RoPE pairs split) cost 0.40-1.77. The GPTQ tests below pin float32
# forwards: bf16 products (the default on CPUs with AMX) move these KLs by up to ±13 % (qwen2
# 0.28 -> 0.32), too close to that wrong layout for one bound to tell them apart; bf16 GPTQ's
# quality is tested in test_gptq_pipeline.py.
QUANT_KL = 0.3


@pytest.fixture
def float32_forwards(monkeypatch):
    monkeypatch.setenv("SMOLQ_GPTQ_FORWARD", "float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("families")
    (root / "calib.txt").write_text(CALIB)
    dirs = {name: make_tiny_model(family, root / name, seed=5, **opts) for name, (family, opts) in MODELS.items()}
    return root, dirs


def _tokens(llm, src):
    return probe_sequences(llm, json.loads((src / "config.json").read_text())["vocab_size"], 24)


def _kl_llama_cpp_vs_source(path, src) -> dict:
    llm = open_llama(path)
    tokens = _tokens(llm, src)
    ours = np.stack(llama_cpp_logits(llm, tokens))
    ref = hf_logits(src, tokens)
    return logit_stats(ref.reshape(-1, ref.shape[-1]), ours.reshape(-1, ours.shape[-1]))


# --------------------------------------------------------------------------- GPTQ

@pytest.mark.parametrize("name", list(MODELS))
def test_gptq_directory_runs_in_transformers(tiny, name, float32_forwards):
    import torch

    from smolq.pipeline.evaluate import load_gptq_as_hf
    from smolq.pipeline.gptq import quantize_hf_gptq
    from transformers import AutoModelForCausalLM

    root, dirs = tiny
    out = root / f"{name}-gptq"
    summary = quantize_hf_gptq(dirs[name], out, format="gptq", calib=root / "calib.txt", **GPTQ_FAST)
    assert summary["n_layers_quantized"] == 14
    tokens = torch.as_tensor(np.arange(1, 40) * 7 % 300)[None]
    with torch.no_grad():
        ours = load_gptq_as_hf(out)(input_ids=tokens).logits[0].double()
        ref = AutoModelForCausalLM.from_pretrained(dirs[name], dtype=torch.float32)(input_ids=tokens).logits[0].double()
    kl = float((ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - ours.log_softmax(-1))).sum(-1).mean())
    assert kl < QUANT_KL, kl


@pytest.mark.parametrize("name", list(MODELS))
def test_gptq_gguf_runs_in_llama_cpp(tiny, name, float32_forwards):
    from smolq.pipeline.gptq import quantize_hf_gptq

    root, dirs = tiny
    out = root / f"{name}-gptq-q4_0.gguf"
    quantize_hf_gptq(dirs[name], out, format="gguf", qtype="q4_0", calib=root / "calib.txt",
                     **{k: v for k, v in GPTQ_FAST.items() if k not in ("bits", "group_size")})
    stats = _kl_llama_cpp_vs_source(out, dirs[name])
    assert stats["kl_div"] < QUANT_KL, stats


@pytest.mark.parametrize("name", ["llama31", "qwen2"])
def test_gptq_directory_converts_to_gguf(tiny, name):
    """A GPTQ checkpoint of the family (the one the test above writes) -> GGUF, run by llama.cpp."""
    from smolq.pipeline.gptq import quantize_hf_gptq

    root, dirs = tiny
    gptq_dir = root / f"{name}-gptq-for-import"
    quantize_hf_gptq(dirs[name], gptq_dir, format="gptq", calib=root / "calib.txt", **GPTQ_FAST)
    out = root / f"{name}-from-gptq.gguf"
    summary = convert(gptq_dir, out)
    llm = open_llama(out)
    tokens = _tokens(llm, dirs[name])
    ours = np.stack(llama_cpp_logits(llm, tokens))
    theirs = _gptq_logits(gptq_dir, tokens)
    stats = logit_stats(theirs.reshape(-1, theirs.shape[-1]), ours.reshape(-1, ours.shape[-1]))
    # exact import (the GPTQ grid copied into the ggml type) leaves only the f16 rounding of the
    # unquantized tensors and the engines' own arithmetic
    assert all(t["exact"] for t in summary["tensors"] if "exact" in t), summary["notes"]
    assert stats["kl_div"] < 1e-3 and stats["top1_agreement"] > 0.95, stats


def _gptq_logits(gptq_dir, tokens) -> np.ndarray:
    import torch

    from smolq.pipeline.evaluate import load_gptq_as_hf

    with torch.no_grad():
        return load_gptq_as_hf(gptq_dir)(input_ids=torch.as_tensor(tokens)).logits.double().numpy()


# --------------------------------------------------------------------------- HF export

@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "qwen3"])
def test_hf_export_computes_and_tokenizes_like_the_source(tiny, name):
    from transformers import AutoTokenizer

    root, dirs = tiny
    gguf_path, hf_dir = root / f"{name}-export.gguf", root / f"{name}-export-hf"
    convert(dirs[name], gguf_path, outtype="f32")
    convert(gguf_path, hf_dir, format="hf", outtype="f32")
    config = json.loads((hf_dir / "config.json").read_text())
    want = {"llama3": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",  # a Mistral GGUF is a `llama` file
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[name]
    assert config["architectures"] == [want]
    tokens = np.stack([np.arange(24) * 13 % 300, np.arange(24) * 7 % 300])
    ref, ours = hf_logits(dirs[name], tokens), hf_logits(hf_dir, tokens)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    src_tok, out_tok = AutoTokenizer.from_pretrained(dirs[name]), AutoTokenizer.from_pretrained(hf_dir)
    for line in TINY_TEXT.splitlines() + ["<|im_start|>user\nhi<|im_end|>", "1234567 x"]:
        assert out_tok(line)["input_ids"] == src_tok(line)["input_ids"], line


def test_hf_export_refuses_llama31_rope_freqs(tiny, tmp_path):
    """rope_freqs holds the factors, not rope_parameters' four numbers: refused, not guessed."""
    root, dirs = tiny
    gguf_path = root / "llama31-export.gguf"
    convert(dirs["llama31"], gguf_path, outtype="f32")
    with pytest.raises(InputError, match="rope_freqs"):
        convert(gguf_path, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- split GGUF

@pytest.mark.parametrize("name", list(MODELS))
def test_split_gguf_holds_the_same_tensors(tiny, name):
    import gguf

    root, dirs = tiny
    whole, parts = root / f"{name}-whole.gguf", root / f"{name}-split.gguf"
    convert(dirs[name], whole, outtype="q8_0")
    summary = convert(dirs[name], parts, outtype="q8_0", split=Split(max_tensors=7))
    shards = summary["shards"]
    assert len(shards) > 2
    split_tensors = {t.name: bytes(t.data.tobytes()) for s in shards for t in gguf.GGUFReader(s).tensors}
    assert split_tensors == {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(whole).tensors}
    if name == "qwen3":  # llama.cpp opens the set from its first shard
        assert _kl_llama_cpp_vs_source(shards[0], dirs[name])["kl_div"] < 0.01


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("name,fmt", [("qwen2", None), ("qwen3", "ggjt-v3"), ("mistral", "ggml"),
                                      ("llama3", "ggjt-v3"), ("llama31", "ggjt-v1")])
def test_legacy_containers_refuse_in_one_line(tiny, tmp_path, capsys, name, fmt):
    _, dirs = tiny
    out = tmp_path / "m.bin"
    rc, _, err = run_cli(capsys, "convert", dirs[name], out, *(["--format", fmt] if fmt else []), "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "legacy" in err or "2023" in err, err
    assert list(tmp_path.iterdir()) == []


def test_unknown_architecture_is_named_with_the_supported_ones(tiny, tmp_path, capsys):
    _, dirs = tiny
    src = tmp_path / "gemma-like"
    src.mkdir()
    for f in dirs["qwen2"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["Gemma9ForCausalLM"], model_type="gemma9")
    (src / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "convert", src, tmp_path / "m.gguf", "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "Gemma9ForCausalLM" in err
    for known in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert known in err


# --------------------------------------------------------------------------- smolq's own forward pass

@pytest.mark.parametrize("name", list(MODELS))
def test_reference_forward_pass_matches_transformers(tiny, name):
    """sources.reference (what `verify` and `eval` run) on each family's f32 GGUF: Qwen's NeoX RoPE,
    biases and q/k norms, Llama 3.1's rope_freqs."""
    from smolq.sources.reference import logits_from_file

    root, dirs = tiny
    path = root / f"{name}-reference.gguf"
    convert(dirs[name], path, outtype="f32")
    tokens = np.stack([np.arange(24) * 13 % 300, np.arange(24) * 7 % 300])
    np.testing.assert_allclose(logits_from_file(path, tokens), hf_logits(dirs[name], tokens), rtol=0, atol=1e-4)


def test_mistral_sliding_window_shorter_than_the_context_is_noted(tmp_path):
    from smolq.tiny import make_tiny_model

    src = make_tiny_model("mistral", tmp_path / "m", n_layers=1, config_overrides={"sliding_window": 32})
    notes = convert(src, tmp_path / "m.gguf", dry_run=True)["notes"]
    assert any("sliding_window 32" in n for n in notes), notes
