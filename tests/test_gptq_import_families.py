"""`smolq convert GPTQ_DIR out.gguf` for GPT-J and MPT, and asymmetric 8-bit GPTQ.

Same independent checks as test_gptq_import.py (whose spec dequantizer this
reuses): the GGUF read back with the gguf package, compared with the GPTQ
tensors dequantized in the test, and transformers' forward pass on those
weights. Neither family has a row transform in GGUF (arch/gptj.py: HF GPT-J
already rotates adjacent pairs; arch/mpt.py: ALiBi, no RoPE), so GGUF rows
are compared with HF rows as they are: a permutation would show as a mismatch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smolq.pipeline.gptq import quantize_hf_gptq
from tests.gptq_spec import dequantize as _dequantize
from tests.gptq_spec import levels as _levels
from tests.gptq_spec import load_dir as _tensors
from tests.test_gptq_import import _raw_gguf

N_LAYERS = 2
# family -> (block prefix, {GPTQ Linear: GGUF name}, Linears whose HF module has a bias)
FAMILIES = {
    "gptj": ("transformer.h", {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
                               "attn.out_proj": "attn_output", "mlp.fc_in": "ffn_up", "mlp.fc_out": "ffn_down"},
             ("mlp.fc_in", "mlp.fc_out")),
    "mpt": ("transformer.blocks", {"attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output",
                                   "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}, ()),
}
VARIANTS = {
    "sym4": dict(bits=4, group_size=32, sym=True),
    "asym4": dict(bits=4, group_size=32, sym=False),
    "asym8": dict(bits=8, group_size=32, sym=False),
}


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    """(family, variant) -> GPTQ directory, built on first use; (family, "hf") -> the HF source."""
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gptq_import_families")
    text = " ".join(f"a {w} ran past house {i % 13}" for i, w in enumerate(["fox", "hen", "cow"] * 150))
    (root / "calib.txt").write_text(text)
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, variant: str) -> Path:
        key = (family, variant)
        if key in made:
            return made[key]
        if variant == "hf":
            made[key] = make_tiny_model(family, root / family / "hf", hidden_size=64, n_layers=N_LAYERS, seed=7)
        else:
            out = root / family / variant / "model"
            quantize_hf_gptq(get(family, "hf"), out, format="gptq", calib=root / "calib.txt", nsamples=4,
                             seqlen=32, quiet=True, **VARIANTS[variant])
            made[key] = out
        return made[key]

    return get


def _linears(family: str):
    """(GPTQ module prefix, GGUF weight name, has bias) for every quantized Linear."""
    blocks, names, biased = FAMILIES[family]
    for i in range(N_LAYERS):
        for lin, gg in names.items():
            yield f"{blocks}.{i}.{lin}", f"blk.{i}.{gg}", lin in biased


def _read_gguf(path: Path) -> dict[str, tuple[object, np.ndarray]]:
    """name -> (ggml type, float32 values) in file row order (no row transform to undo here)."""
    from gguf.quants import dequantize

    return {name: (gtype, np.asarray(dequantize(data, gtype), dtype=np.float32))
            for name, (gtype, data) in _raw_gguf(path).items()}


def _convert_cli(cli, src: Path, out: Path, *args: str) -> list[str]:
    r = cli("convert", src, out, "--quiet", *args)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stderr.splitlines() if line.startswith("warning:")]


# ------------------------------------------------------------------ exact blocks, biases

@pytest.mark.parametrize("family", ["gptj", "mpt"])
@pytest.mark.parametrize("variant, qtype", [("sym4", "Q4_0"), ("asym4", "Q4_1")])
def test_family_linears_are_copied_exactly(gptq, tmp_path, cli, family, variant, qtype):
    src = gptq(family, variant)
    out = tmp_path / "out.gguf"
    assert _convert_cli(cli, src, out) == []
    t = _tensors(src)
    got = _read_gguf(out)
    n = 0
    for prefix, gg, has_bias in _linears(family):
        gtype, w = got[f"{gg}.weight"]
        assert gtype.name == qtype, gg
        want = _dequantize(t, prefix, 4)
        assert w.shape == want.shape
        if qtype == "Q4_0":
            np.testing.assert_array_equal(w, want, err_msg=gg)
        else:  # Q4_1 holds m = −s·z as fp16: exact up to that rounding
            q, s, z, g = _levels(t, prefix, 4)
            m = -(s * z)
            dm = np.abs(m.astype(np.float16).astype(np.float32) - m)[g].T
            assert (np.abs(w - want) <= dm + 1e-6 * np.abs(want) + 1e-9).all(), gg
        # the Linear's bias stays a float tensor beside the GPTQ tensors, and lands as F32
        assert (f"{prefix}.bias" in t) == has_bias, prefix
        if has_bias:
            btype, b = got[f"{gg}.bias"]
            assert btype.name == "F32"
            np.testing.assert_array_equal(b, t[f"{prefix}.bias"].astype(np.float32))
        n += 1
    gptq_layers = [k for k in t if k.endswith(".qweight")]
    assert len(gptq_layers) == n  # every GPTQ Linear was found above, none left over
    if family == "gptj":
        np.testing.assert_array_equal(got["output.bias"][1], t["lm_head.bias"].astype(np.float32))


@pytest.mark.parametrize("family", ["gptj", "mpt"])
@pytest.mark.parametrize("variant", ["sym4", "asym4"])
def test_family_gguf_runs_like_transformers_on_the_gptq_weights(gptq, tmp_path, family, variant):
    from transformers import AutoModelForCausalLM

    from smolq.pipeline.convert import convert
    from smolq.sources.reference import hf_hparams, logits_from_file

    hf, src = gptq(family, "hf"), gptq(family, variant)
    out = tmp_path / "out.gguf"
    convert(src, out)
    t = _tensors(src)
    quantized = {prefix for prefix, _, _ in _linears(family)}
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for name, p in model.named_parameters():
        prefix = name.rpartition(".")[0]
        if name.endswith(".weight") and prefix in quantized:
            p.data = torch.from_numpy(_dequantize(t, prefix, 4) if variant == "sym4" else _as_q4_1(t, prefix))
        else:  # everything else as the GPTQ directory stores it (fp16)
            p.data = torch.from_numpy(t[name].astype(np.float32))
    vocab = model.config.vocab_size
    tokens = (np.arange(1, 25) * 11 % vocab)[None]
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(tokens), use_cache=False).logits.double().numpy()
    got = logits_from_file(out, tokens, hparams_override=hf_hparams(hf))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def _as_q4_1(t: dict, prefix: str) -> np.ndarray:
    """What a Q4_1 copy of the layer holds (x = d·q + m, formats.md 5.2.3): d = scale, m = −scale·zero in fp16."""
    q, s, z, g = _levels(t, prefix, 4)
    m = (-(s * z)).astype(np.float16).astype(np.float32)
    return (s[g].T * q + m[g].T).astype(np.float32)


@pytest.mark.parametrize("family, fmt", [("gptj", "ggml"), ("mpt", "ggmm")])
def test_family_legacy_file_carries_the_exact_blocks(gptq, tmp_path, family, fmt):
    """GPT4All's legacy containers (v1 block layout): the same values as the GGUF, blocks relaid."""
    from smolq.pipeline.convert import convert
    from smolq.sources.reference import hf_hparams, logits_from_file

    src = gptq(family, "sym4")
    convert(src, tmp_path / "a.gguf")
    s = convert(src, tmp_path / "a.bin", format=fmt)
    assert s["warnings"] == [] and {x["type"] for x in s["tensors"] if x.get("exact")} == {"Q4_0"}
    assert all(x["exact"] for x in s["tensors"] if "exact" in x)
    tokens = (np.arange(1, 9) * 5 % 97)[None]
    hp = hf_hparams(gptq(family, "hf"))  # legacy headers have no norm eps
    np.testing.assert_allclose(logits_from_file(tmp_path / "a.bin", tokens, hparams_override=hp),
                               logits_from_file(tmp_path / "a.gguf", tokens, hparams_override=hp), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ asymmetric 8-bit: requantized

def test_asym_8bit_is_requantized_to_q8_0_with_one_warning(gptq, tmp_path, cli):
    from gguf import GGMLQuantizationType as G
    from gguf.quants import dequantize, quantize

    src = gptq("mpt", "asym8")
    t = _tensors(src)
    layers = list(_linears("mpt"))
    for prefix, _, _ in layers:  # Q8_0's symmetric grid needs zero 128 everywhere: not so here
        assert (_levels(t, prefix, 8)[2] != 128).any(), prefix
    out = tmp_path / "out.gguf"
    warnings = _convert_cli(cli, src, out)
    assert len(warnings) == 1, warnings
    assert f"{len(layers)} of {len(layers)} GPTQ linears dequantized and requantized" in warnings[0]
    assert "Q8_0" in warnings[0] and "zero points" in warnings[0]
    raw = _raw_gguf(out)
    for prefix, gg, _ in layers:
        gtype, data = raw[f"{gg}.weight"]
        assert gtype == G.Q8_0, gg
        want = _dequantize(t, prefix, 8)
        np.testing.assert_array_equal(dequantize(data, gtype), dequantize(quantize(want, G.Q8_0), G.Q8_0), err_msg=gg)


# ------------------------------------------------------------------ bias buffers the model does not have

def _with_bias_buffers(src: Path, dst: Path, value: float) -> list[str]:
    """Copy of a GPTQ dir in which every quantized Linear without a bias gets one filled with
    `value`, as GPTQ writers that register a bias buffer on every QuantLinear save them."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    added = []
    for f in sorted(dst.glob("*.safetensors")):
        t = dict(load_file(str(f)))
        for k in [k for k in t if k.endswith(".qweight")]:
            module = k[: -len(".qweight")]
            if f"{module}.bias" not in t:
                t[f"{module}.bias"] = np.full(t[f"{module}.scales"].shape[1], value, dtype=np.float16)
                index["weight_map"][f"{module}.bias"] = f.name
                added.append(f"{module}.bias")
        save_file(t, str(f), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return added


def test_zero_bias_buffers_are_dropped_with_a_note(gptq, tmp_path):
    from smolq.pipeline.convert import convert

    src = gptq("gptj", "sym4")
    d = tmp_path / "zb" / "model"
    added = _with_bias_buffers(src, d, 0.0)
    assert len(added) == 4 * N_LAYERS  # q/k/v/out_proj: GPT-J's attention has no bias
    convert(src, tmp_path / "a.gguf")
    s = convert(d, tmp_path / "b.gguf")
    assert s["warnings"] == [] and any(f"{len(added)} all-zero bias tensors" in n for n in s["notes"])
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_nonzero_bias_without_a_place_is_refused(gptq, tmp_path, cli):
    d = tmp_path / "nzb" / "model"
    _with_bias_buffers(gptq("gptj", "sym4"), d, 0.5)
    out = tmp_path / "out.gguf"
    r = cli("convert", d, out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "attn." in lines[0] and ".bias" in lines[0] and "unexpected" in lines[0], lines
    assert not out.exists()
