"""smolq convert, end to end: every tiny model to every --format, judged by logits.

The yardstick is transformers' forward pass on the HF checkpoint; the file
is run by the numpy reference forward pass (smolq.sources.reference), which
reads what is stored (Meta-order Q/K rows, fused MPT qkv, legacy names)
and so checks names, permutations, hyperparameters and block layouts
together. Quantized GGUF files are also checked against gguf-py's own
quantizer applied to tensors built in the test from the spec.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from smolq.arch import family_arch  # noqa: E402
from smolq.pipeline.convert import convert  # noqa: E402
from smolq.sources.reference import (  # noqa: E402
    compare_logits, default_sequences, forward, hf_hparams, hf_logits, logit_stats, logits_from_file,
)
from smolq.tiny import make_tiny_model  # noqa: E402
from test_reference import BUILDERS  # noqa: E402  (spec-built GGUF tensors, written in that test)

F32_TOL = 1e-4

MODELS = {
    "llama": ("llama", {}),
    "llama-gqa-tied-top": ("llama", {"gqa": True, "tied": True, "rope_params_style": "top"}),
    "gptj": ("gptj", {}),
    "mpt": ("mpt", {}),
    "mpt-6heads-clip": ("mpt", {"hidden_size": 48, "config_overrides": {"n_heads": 6, "attn_config": {"clip_qkv": 1.5}}}),
}


class Model:
    """A tiny HF checkpoint with its tokens and transformers' logits, computed once."""

    def __init__(self, family: str, hf_dir):
        self.family, self.hf_dir = family, hf_dir
        vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        self.tokens = default_sequences(vocab, batch=2, length=16)
        self.hf = hf_logits(hf_dir, self.tokens)

    def stats(self, path) -> dict[str, float]:
        ours = logits_from_file(path, self.tokens, hparams_override=hf_hparams(self.hf_dir))
        return logit_stats(self.hf, ours)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made: dict[str, Model] = {}

    def get(name: str, **extra) -> Model:
        key = name + repr(sorted(extra.items()))
        if key not in made:
            family, kwargs = MODELS[name]
            hf_dir = make_tiny_model(family, tmp_path_factory.mktemp(name) / "hf", **{**kwargs, **extra})
            made[key] = Model(family, hf_dir)
        return made[key]

    return get


def _formats(family: str) -> list[str]:
    return ["gguf-v1", "gguf-v2", "gguf-v3", *family_arch(family).legacy_targets]


CONVERSIONS = [(name, fmt) for name, (family, _) in MODELS.items() for fmt in _formats(family)]


def _clear_margin(logits: np.ndarray, margin: float) -> np.ndarray:
    """Positions whose top-2 logits differ by more than `margin` (f16 cannot flip those)."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) > margin


@pytest.mark.parametrize("name,fmt", CONVERSIONS)
def test_f32_conversion_matches_transformers(models, tmp_path, name, fmt):
    m = models(name)
    out = tmp_path / f"{name}-{fmt}-f32.bin"
    convert(m.hf_dir, out, format=fmt, outtype="f32")
    stats = m.stats(out)
    assert stats["max_abs_diff"] < F32_TOL, stats
    assert stats["top1_agreement"] == 1.0, stats


@pytest.mark.parametrize("name,fmt", CONVERSIONS)
def test_f16_conversion_keeps_the_argmax(models, tmp_path, name, fmt):
    m = models(name)
    out = tmp_path / f"{name}-{fmt}-f16.bin"
    convert(m.hf_dir, out, format=fmt, outtype="f16")
    ours = logits_from_file(out, m.tokens, hparams_override=hf_hparams(m.hf_dir))
    stats = logit_stats(m.hf, ours)
    # f16 weights are a rounding of the f32 ones: small, non-zero logit error...
    assert 0 < stats["max_abs_diff"] < 0.05 and stats["kl_div"] < 1e-5, stats
    # ...and the same top-1 token wherever the top two are not a near tie.
    clear = _clear_margin(m.hf, 0.05)
    assert clear.mean() > 0.8
    assert np.array_equal(m.hf.argmax(-1)[clear], ours.argmax(-1)[clear]), stats


@pytest.mark.parametrize("name", ["llama", "gptj", "mpt"])
@pytest.mark.parametrize("fmt", ["gguf-v3", "legacy"])
def test_f16_checkpoint_to_f16_is_lossless(models, tmp_path, name, fmt):
    m = models(name, dtype="float16")
    fmt = family_arch(m.family).default_legacy if fmt == "legacy" else fmt
    out = tmp_path / "f16.bin"
    convert(m.hf_dir, out, format=fmt, outtype="f16")
    stats = m.stats(out)
    assert stats["max_abs_diff"] < F32_TOL and stats["top1_agreement"] == 1.0, stats


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_bf16_checkpoint_is_lossless_to_f32_and_bf16(models, tmp_path, outtype):
    m = models("llama-gqa-tied-top", dtype="bfloat16")
    out = tmp_path / f"bf16-{outtype}.gguf"
    convert(m.hf_dir, out, format="gguf", outtype=outtype)
    stats = m.stats(out)
    assert stats["max_abs_diff"] < F32_TOL and stats["top1_agreement"] == 1.0, stats


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_sharded_checkpoints_convert_exactly(models, tmp_path, weights):
    m = models("llama", shards=3, weights=weights)
    out = tmp_path / "sharded.gguf"
    convert(m.hf_dir, out, outtype="f32")
    assert m.stats(out)["max_abs_diff"] < F32_TOL


def test_compare_logits_on_a_converted_file(models, tmp_path):
    m = models("mpt")
    out = tmp_path / "mpt.gguf"
    convert(m.hf_dir, out, outtype="f32")
    stats = compare_logits(out, m.hf_dir)
    assert set(stats) == {"max_abs_diff", "top1_agreement", "kl_div"}
    assert stats["max_abs_diff"] < F32_TOL and stats["top1_agreement"] == 1.0


# --------------------------------------------------------------------------- quantized files


def _gguf_py_round_trip(tensors: dict, path) -> dict:
    """Each spec-built tensor passed through gguf-py's quantizer and dequantizer
    with the type the file stores it in (read by gguf-py's GGUFReader)."""
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(path))
    types = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)) for t in reader.tensors}
    assert set(types) == set(tensors)
    out = {}
    for name, x in tensors.items():
        t = types[name]
        if t == gguf.GGMLQuantizationType.F32:
            out[name] = x
        elif t == gguf.GGMLQuantizationType.F16:
            out[name] = x.astype(np.float16).astype(np.float32)
        else:
            rows = x.reshape(-1, x.shape[-1])
            out[name] = dequantize(quantize(rows, t), t).reshape(x.shape)
    return out


@pytest.mark.parametrize("name", ["llama-gqa-tied-top", "gptj", "mpt-6heads-clip"])
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q5_1"])
def test_quantized_gguf_equals_gguf_py_quantization_of_the_spec_tensors(models, tmp_path, name, outtype):
    m = models(name)
    out = tmp_path / f"{outtype}.gguf"
    summary = convert(m.hf_dir, out, format="gguf", outtype=outtype)
    assert summary["n_quantized"] > 0
    tensors, hp = BUILDERS[m.family](m.hf_dir)
    if m.family == "mpt":
        tensors["output.weight"] = tensors["token_embd.weight"]  # formats.md 6.6: upstream duplicates wte
    expected = forward(m.family, _gguf_py_round_trip(tensors, out), hp, m.tokens)
    ours = logits_from_file(out, m.tokens)
    assert np.max(np.abs(expected - ours)) < 1e-6
    # and the quantization is visible against transformers, as it should be
    assert logit_stats(m.hf, ours)["max_abs_diff"] > 1e-3


LEGACY_QUANT = [
    ("llama", "ggjt-v3", "q8_0"), ("llama", "ggjt-v2", "q8_0"), ("llama", "ggjt-v1", "q8_0"),
    ("llama", "ggjt-v3", "q4_1"), ("llama", "ggjt-v2", "q4_1"), ("llama", "ggjt-v1", "q4_1"),
    ("llama", "ggjt-v2", "q5_0"),
    ("mpt", "ggmm", "q4_0"), ("mpt", "ggml", "q5_1"), ("mpt", "ggml", "q8_0"),
]


@pytest.mark.parametrize("name,fmt,outtype", LEGACY_QUANT)
def test_quantized_legacy_is_as_good_as_gguf(models, tmp_path, name, fmt, outtype):
    # Each legacy era stores the same grid in its own block layout; decoded
    # with the wrong layout the weights would be garbage. So its error
    # against transformers must be on a par with the GGUF file's.
    m = models(name)
    legacy, reference = tmp_path / f"{fmt}.bin", tmp_path / "ref.gguf"
    convert(m.hf_dir, legacy, format=fmt, outtype=outtype)
    convert(m.hf_dir, reference, format="gguf", outtype=outtype)
    got, want = m.stats(legacy), m.stats(reference)
    assert got["kl_div"] <= 1.5 * want["kl_div"] + 1e-5, (got, want)
    assert got["max_abs_diff"] > 1e-3  # it is quantized
