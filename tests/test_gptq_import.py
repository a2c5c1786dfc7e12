"""`smolq convert GPTQ_DIR out.gguf`: GPTQ checkpoints into GGUF.

Independent checks: a dequantizer written here from gptq.md 2 (word layout,
v1 zero − 1, scales[g_idx]), the GGUF read back with the gguf package
(GGUFReader + gguf.quants.dequantize / quantize), the LLaMA Q/K row order
from llama.cpp's permute (formats.md 6.7) inverted here, and transformers'
forward pass on the weights dequantized here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from smolq.pipeline.gptq import quantize_hf_gptq
from tests.gptq_spec import dequantize as _dequantize
from tests.gptq_spec import levels as _levels
from tests.gptq_spec import load_dir as _tensors
from tests.gptq_spec import pack as _pack
from tests.gptq_spec import unpack as _unpack

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
N_LAYERS, N_HEAD, HEAD_DIM = 2, 4, 16  # make_tiny_model("llama", hidden_size=64): 4 heads, no GQA

VARIANTS = {  # name -> quantize_hf_gptq settings
    "asym4": dict(bits=4, group_size=32, sym=False),
    "sym4": dict(bits=4, group_size=32, sym=True),
    "sym8": dict(bits=8, group_size=32, sym=True),
    "asym2": dict(bits=2, group_size=32, sym=False),
    "g128": dict(bits=4, group_size=128, sym=False),
    "act3": dict(bits=3, group_size=32, sym=False, act_order=True),
    "act4static": dict(bits=4, group_size=32, sym=True, act_order=True, static_groups=True),
}


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    """name -> GPTQ directory (built on first use), plus the HF source under "hf"."""
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gptq_import")
    hf = make_tiny_model("llama", root / "hf", hidden_size=64, n_layers=N_LAYERS, seed=5)
    text = " ".join(f"a {w} ran past house {i % 13}" for i, w in enumerate(["fox", "hen", "cow"] * 150))
    (root / "calib.txt").write_text(text)
    made: dict[str, Path] = {"hf": hf}

    def get(name: str) -> Path:
        if name not in made:
            out = root / name / "model"  # same basename everywhere: general.name is the directory name
            quantize_hf_gptq(hf, out, format="gptq", calib=root / "calib.txt", nsamples=4, seqlen=32, quiet=True,
                             **VARIANTS[name])
            made[name] = out
        return made[name]

    return get


# ------------------------------------------------------------------ the spec, written here

def _ggml_rows_to_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute put hf row h·hd + s·hd/2 + i at ggml row h·hd + 2i + s; undo it."""
    rows = w.shape[0]
    hd = rows // n_head
    hf_row = np.array([(r // hd) * hd + (r % hd % 2) * (hd // 2) + (r % hd) // 2 for r in range(rows)])
    out = np.empty_like(w)
    out[hf_row] = w
    return out


def _read_gguf(path: Path) -> dict[str, tuple[object, np.ndarray]]:
    """name -> (ggml type, float32 [rows, cols] in HF row order)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = _ggml_rows_to_hf(w, N_HEAD)
        out[t.name] = (t.tensor_type, w)
    return out


def _raw_gguf(path: Path) -> dict[str, tuple[object, np.ndarray]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFReader(str(path)).tensors}


def _convert(src: Path, out: Path, **kw):
    from smolq.pipeline.convert import convert

    return convert(src, out, **kw)


# ------------------------------------------------------------------ 1. exact path

@pytest.mark.parametrize("name, bits, qtype", [
    ("sym4", 4, "Q4_0"), ("sym8", 8, "Q8_0"), ("asym2", 2, "Q4_0"), ("act4static", 4, "Q4_0"),
])
def test_exact_types_decode_bit_for_bit(gptq, tmp_path, name, bits, qtype):
    src = gptq(name)
    summary = _convert(src, tmp_path / "out.gguf")
    assert summary["warnings"] == [] and any("copied exactly" in n for n in summary["notes"])
    t = _tensors(src)
    got = _read_gguf(tmp_path / "out.gguf")
    for i in range(N_LAYERS):
        for lin in LINEARS:
            gtype, w = got[f"blk.{i}.{GGUF_NAMES[lin]}.weight"]
            assert gtype.name == qtype
            np.testing.assert_array_equal(w, _dequantize(t, f"model.layers.{i}.{lin}", bits))
    # the rest: norms F32, embeddings F16 (as convert --outtype f16), values as stored
    assert got["blk.0.attn_norm.weight"][0].name == "F32" and got["token_embd.weight"][0].name == "F16"
    np.testing.assert_array_equal(got["token_embd.weight"][1], t["model.embed_tokens.weight"].astype(np.float32))


@pytest.mark.parametrize("name", ["asym4", "g128"])
def test_asym_4bit_is_q4_1_up_to_fp16_rounding_of_m(gptq, tmp_path, name):
    src = gptq(name)
    summary = _convert(src, tmp_path / "out.gguf")
    assert summary["warnings"] == []
    t = _tensors(src)
    got = _read_gguf(tmp_path / "out.gguf")
    worst = 0.0
    for i in range(N_LAYERS):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            gtype, w = got[f"blk.{i}.{GGUF_NAMES[lin]}.weight"]
            assert gtype.name == "Q4_1"
            q, s, z, g = _levels(t, prefix, 4)
            m = -(s * z)  # exact in f32; the file can only hold it as fp16
            dm = np.abs(m.astype(np.float16).astype(np.float32) - m)[g].T
            want = _dequantize(t, prefix, 4)
            err = np.abs(w - want)
            assert (err <= dm + 1e-6 * np.abs(want) + 1e-9).all(), prefix
            worst = max(worst, float(dm.max()))
    note = next(n for n in summary["notes"] if "copied exactly as Q4_1" in n)
    assert note.startswith("14 of 14") and f"{worst:.3g}" in note


@pytest.mark.parametrize("name, bits, outtype, affine", [
    ("asym4", 4, "q5_0", False),  # any 4-bit zero fits Q5_0's c = q - z + 16 in [0, 32)
    ("asym4", 4, "q5_1", True),
    ("asym2", 2, "q4_1", True),
    ("asym2", 2, "q8_0", False),
])
def test_other_exact_grids(gptq, tmp_path, name, bits, outtype, affine):
    src = gptq(name)
    summary = _convert(src, tmp_path / "out.gguf", outtype=outtype)
    assert summary["warnings"] == []
    t = _tensors(src)
    got = _read_gguf(tmp_path / "out.gguf")
    for i in range(N_LAYERS):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            gtype, w = got[f"blk.{i}.{GGUF_NAMES[lin]}.weight"]
            assert gtype.name == outtype.upper()
            want = _dequantize(t, prefix, bits)
            if not affine:
                np.testing.assert_array_equal(w, want)
                continue
            q, s, z, g = _levels(t, prefix, bits)
            m = -(s * z)
            dm = np.abs(m.astype(np.float16).astype(np.float32) - m)[g].T
            assert (np.abs(w - want) <= dm + 1e-6 * np.abs(want) + 1e-9).all(), prefix


# ------------------------------------------------------------------ 2. requantize path

def test_scattered_act_order_is_requantized_with_one_warning(gptq, tmp_path, cli):
    src = gptq("act3")
    t = _tensors(src)
    assert len(np.unique(t["model.layers.0.self_attn.q_proj.g_idx"][:32])) > 1  # really scattered
    out = tmp_path / "out.gguf"
    r = cli("convert", src, out, "--quiet")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "14 of 14" in warnings[0] and "act-order" in warnings[0]

    from gguf import GGMLQuantizationType as G
    from gguf.quants import dequantize, quantize

    raw = _raw_gguf(out)
    for i in range(N_LAYERS):
        for lin in LINEARS:
            gtype, data = raw[f"blk.{i}.{GGUF_NAMES[lin]}.weight"]
            # 3 bits -> Q3_K by default; rows of 64/192 do not fill its 256-blocks -> llama.cpp's Q4_0 fallback
            assert gtype == G.Q4_0
            want = _dequantize(t, f"model.layers.{i}.{lin}", 3)
            mine = _ggml_rows_to_hf(dequantize(data, gtype), N_HEAD) if lin in ("self_attn.q_proj", "self_attn.k_proj") \
                else dequantize(data, gtype)
            np.testing.assert_array_equal(mine, dequantize(quantize(want, G.Q4_0), G.Q4_0))


def test_explicit_outtype_is_honoured_exact_or_not(gptq, tmp_path):
    from gguf import GGMLQuantizationType as G
    from gguf.quants import dequantize, quantize

    src = gptq("sym4")  # exact as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; not as Q6_K
    s = _convert(src, tmp_path / "q8.gguf", outtype="q8_0")
    assert s["warnings"] == [] and all(x.get("exact") for x in s["tensors"] if "exact" in x)
    t = _tensors(src)
    got = _read_gguf(tmp_path / "q8.gguf")
    want = _dequantize(t, "model.layers.1.mlp.down_proj", 4)
    assert got["blk.1.ffn_down.weight"][0] == G.Q8_0
    np.testing.assert_array_equal(got["blk.1.ffn_down.weight"][1], want)

    s = _convert(src, tmp_path / "q6k.gguf", outtype="q6_k")  # 64/192-wide rows fall back to Q8_0 ... exact again
    assert s["warnings"] == []
    s = _convert(src, tmp_path / "f16.gguf", outtype="f16")
    assert s["warnings"] == [] and any("dequantized to F16" in n for n in s["notes"])
    got = _read_gguf(tmp_path / "f16.gguf")
    np.testing.assert_array_equal(got["blk.1.ffn_down.weight"][1], want.astype(np.float16).astype(np.float32))

    s = _convert(gptq("asym4"), tmp_path / "q40.gguf", outtype="q4_0")  # asym zeros do not fit Q4_0's grid
    assert len(s["warnings"]) == 1 and "zero points" in s["warnings"][0]
    assert s["warnings"][0].endswith("--outtype q4_1 would copy them exactly")
    raw = _raw_gguf(tmp_path / "q40.gguf")
    want = _dequantize(_tensors(gptq("asym4")), "model.layers.0.mlp.up_proj", 4)
    np.testing.assert_array_equal(raw["blk.0.ffn_up.weight"][1], quantize(want, G.Q4_0))
    assert dequantize(raw["blk.0.ffn_up.weight"][1], G.Q4_0).shape == want.shape


# ------------------------------------------------------------------ 3. v1 and v2 zero conventions

def test_v1_and_v2_directories_give_identical_files(gptq, tmp_path):
    v1 = gptq("asym4")
    v2 = tmp_path / "v2" / "model"
    shutil.copytree(v1, v2)
    from safetensors.numpy import save_file

    for f in v2.glob("*.safetensors"):
        t = _tensors_of(f)
        for k in [k for k in t if k.endswith(".qzeros")]:
            n_out = t[k[: -len("qzeros")] + "scales"].shape[1]
            z = _unpack(t[k].T.copy(), 4, n_out).T + 1  # true zeros
            assert z.max() < 16
            t[k] = _pack(z.T.copy(), 4).T.copy()
        save_file(t, str(f), metadata={"format": "pt"})
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((v2 / name).read_text())
        q = cfg.get("quantization_config", cfg)
        q["checkpoint_format"] = q["format"] = "gptq_v2"
        (v2 / name).write_text(json.dumps(cfg))
    _convert(v1, tmp_path / "a.gguf")
    _convert(v2, tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # and a v2 directory read as v1 (mislabelled) would not be: the zeros matter
    cfg = json.loads((v2 / "quantize_config.json").read_text())
    cfg["checkpoint_format"] = cfg["format"] = "gptq"
    (v2 / "quantize_config.json").write_text(json.dumps(cfg))
    _convert(v2, tmp_path / "c.gguf")
    assert (tmp_path / "a.gguf").read_bytes() != (tmp_path / "c.gguf").read_bytes()


def _tensors_of(f: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(f)))


# ------------------------------------------------------------------ 4. the file runs

def test_exact_gguf_runs_like_transformers_on_the_gptq_weights(gptq, tmp_path):
    from transformers import AutoModelForCausalLM

    from smolq.sources.reference import hf_hparams, logits_from_file

    hf = gptq("hf")
    src = gptq("sym4")
    out = tmp_path / "out.gguf"
    _convert(src, out)
    t = _tensors(src)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for name, p in model.named_parameters():
        prefix = name[: -len(".weight")]
        if any(prefix.endswith(lin) for lin in LINEARS):
            p.data = torch.from_numpy(_dequantize(t, prefix, 4))
        else:
            p.data = torch.from_numpy(t[name].astype(np.float32))
    tokens = (np.arange(1, 25) * 11 % 384)[None]
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(tokens), use_cache=False).logits.double().numpy()
    got = logits_from_file(out, tokens, hparams_override=hf_hparams(hf))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_legacy_ggjt_v3_carries_the_exact_blocks(gptq, tmp_path):
    from smolq.sources.reference import hf_hparams, logits_from_file

    src = gptq("sym4")
    _convert(src, tmp_path / "a.gguf")
    s = _convert(src, tmp_path / "a.bin", format="ggjt-v3")
    assert s["warnings"] == [] and {x["type"] for x in s["tensors"] if "exact" in x} == {"Q4_0"}
    tokens = (np.arange(1, 9) * 5 % 384)[None]
    hp = hf_hparams(gptq("hf"))  # legacy headers have no rms eps
    # same blocks; the headers differ in float widths of hyperparameters (~1e-11 in the logits)
    np.testing.assert_allclose(logits_from_file(tmp_path / "a.bin", tokens, hparams_override=hp),
                               logits_from_file(tmp_path / "a.gguf", tokens, hparams_override=hp), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ 5. bad input

def _broken_copy(gptq, tmp_path, name="sym4") -> Path:
    d = tmp_path / "bad" / "model"
    shutil.copytree(gptq(name), d)
    return d


def _one_line_error(r, out: Path, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f"*{out.name}*"))


def test_missing_shard(gptq, tmp_path, cli):
    d = _broken_copy(gptq, tmp_path)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.unlink()
    out = tmp_path / "o" / "out.gguf"
    out.parent.mkdir()
    _one_line_error(cli("convert", d, out), out, shard.name, "missing")


def test_bad_bits(gptq, tmp_path, cli):
    d = _broken_copy(gptq, tmp_path)
    cfg = json.loads((d / "quantize_config.json").read_text())
    cfg["bits"] = 5
    (d / "quantize_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o" / "out.gguf"
    out.parent.mkdir()
    _one_line_error(cli("convert", d, out), out, "quantize_config.json", "bits")


def test_qweight_shape_mismatch(gptq, tmp_path, cli):
    from safetensors.numpy import save_file

    d = _broken_copy(gptq, tmp_path)
    key = "model.layers.1.mlp.up_proj.qweight"
    shard = next(f for f in d.glob("*.safetensors") if key in _tensors_of(f))
    t = _tensors_of(shard)
    t[key] = t[key][:, :-32].copy()  # 32 outputs fewer than scales says
    save_file(t, str(shard), metadata={"format": "pt"})
    out = tmp_path / "o" / "out.gguf"
    out.parent.mkdir()
    _one_line_error(cli("convert", d, out), out, shard.name, "up_proj.qweight", "shape")


def test_bfloat16_tensors_are_read_as_gptqmodel_stores_them(gptq, tmp_path):
    """GPTQModel writes a checkpoint's unquantized tensors (norms, embeddings) in bfloat16, which
    numpy cannot hold: they are widened to float32 exactly (torch's own conversion is the oracle),
    and such a directory converts."""
    from safetensors.torch import load_file, save_file

    from smolq.formats.gptq_ckpt import read_gptq_dir

    src = gptq("sym4")
    d = tmp_path / "model"
    shutil.copytree(src, d)
    tensors, floats = {}, []
    for st_file in d.glob("*.safetensors"):
        part = load_file(str(st_file))
        mine = [k for k, v in part.items() if v.dtype in (torch.float16, torch.float32) and not k.endswith(".scales")]
        part.update({k: part[k].to(torch.bfloat16) for k in mine})
        save_file(part, str(st_file), metadata={"format": "pt"})
        tensors.update(part)
        floats += mine
    assert any("norm" in k for k in floats) and "model.embed_tokens.weight" in floats
    _, loaders = read_gptq_dir(d)
    for k in floats:
        got = loaders[k]()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tensors[k].float().numpy())
    assert _convert(d, tmp_path / "out.gguf")["bytes"] > 0
