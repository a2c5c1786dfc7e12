"""bitsandbytes NF4 / FP4 output (smolq quantize --format nf4|fp4).

Checked against bitsandbytes itself (quantize_4bit on CPU, byte for byte), against
transformers loading the directory (logits vs a test-side decoder written from the
bitsandbytes spec, and vs the unquantized model), and for refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

import smolq
from smolq import kernels
from smolq.tiny import make_tiny_model

torch = pytest.importorskip("torch")


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception as exc:  # absent, or no usable backend
        pytest.skip(f"bitsandbytes not importable ({exc}); `make setup` installs it")
    return F


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("hf") / "tiny", hidden_size=256, dtype="float16")


def _read_st(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


# ---------------------------------------------------------------- kernel vs spec / bitsandbytes

def _spec_nf4_index(s: np.ndarray, code: np.ndarray) -> np.ndarray:
    """bitsandbytes' rule: the number of midpoints of the sorted code strictly below s."""
    order = np.argsort(code, kind="stable")
    srt = code[order]
    mids = ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32)
    return order[(mids[None, :] < s[:, None]).sum(1)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_ref_fast_and_spec_agree(quant_type):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(64 * 37 + 7) * 0.03).astype(np.float32)
    x[64:128] = 0  # a zero block
    ref = kernels.bnb4_quantize(x, quant_type, 64, impl="ref")
    fast = kernels.bnb4_quantize(x, quant_type, 64, impl="fast", threads=3)
    assert ref[0].tobytes() == fast[0].tobytes() and ref[1].tobytes() == fast[1].tobytes()
    code = kernels.bnb_code(quant_type)
    full = x[: 64 * 37].reshape(-1, 64)
    am = np.abs(full).max(1)
    s = np.clip(full * (np.float32(1) / np.maximum(am, np.float32(1e-38)))[:, None], -1, 1).reshape(-1)
    idx = _spec_nf4_index(s.astype(np.float32), code)
    packed = ref[0][: 64 * 37 // 2]
    assert (((packed >> 4) == idx[0::2]) & ((packed & 15) == idx[1::2])).all()
    q8r = kernels.bnb8_quantize(ref[1], 256, impl="ref")
    q8f = kernels.bnb8_quantize(ref[1], 256, impl="fast")
    assert q8r[0].tobytes() == q8f[0].tobytes()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_bytes_equal_bitsandbytes(quant_type, double_quant, dtype):
    F = _bnb()
    from smolq.transforms.bnb import quantize_weight, torch_reduction

    assert kernels.bnb_code(quant_type).tobytes() == F.get_4bit_type(quant_type, device="cpu").numpy().tobytes()
    assert kernels.bnb_code("dynamic").tobytes() == F.create_dynamic_map().numpy().tobytes()
    g = torch.Generator().manual_seed(3)
    for shape in [(704, 256), (256, 704), (3, 37), (96, 96)]:
        w = (torch.randn(shape, generator=g) * 0.05).to(getattr(torch, dtype))
        q, st = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
        # the offset's last bits follow torch's vector width and threads, as this process's torch sums
        lanes, torch_threads = torch_reduction()
        mine = quantize_weight(w.float().numpy(), quant_type, 64, double_quant, dtype, lanes=lanes,
                               torch_threads=torch_threads)
        theirs = {"": q, **{"." + k: v for k, v in st.as_dict(packed=True).items()}}
        assert set(mine) == set(theirs), (set(mine) ^ set(theirs))
        for k, v in theirs.items():
            assert mine[k].tobytes() == v.numpy().tobytes(), (shape, k)
            assert tuple(mine[k].shape) == tuple(v.shape), (shape, k)


# ---------------------------------------------------------------- the directory

def test_directory_matches_transformers_save(tiny, tmp_path):
    """transformers quantizing the same checkpoint and saving it gives the same tensors and config."""
    _bnb()
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loader needs accelerate")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "nf4"
    smolq.quantize(tiny, out, format="nf4")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg)
    model.save_pretrained(tmp_path / "ref")
    a, b = _read_st(tmp_path / "ref" / "model.safetensors"), _read_st(out / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    ca, cb = json.loads((tmp_path / "ref" / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tiny / f).read_bytes()


NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)


def _decode_spec(t: dict, prefix: str) -> np.ndarray:
    """A decoder written from the bitsandbytes layout (not smolq's kernel): high nibble first,
    absmax per block, nested absmax = dynamic-map code * nested absmax + offset."""
    state = json.loads(bytes(t[prefix + ".quant_state.bitsandbytes__nf4"]).decode())
    shape, bs = state["shape"], state["blocksize"]
    n = int(np.prod(shape))
    packed = t[prefix].reshape(-1)
    idx = np.empty(packed.size * 2, dtype=np.int64)
    idx[0::2], idx[1::2] = packed >> 4, packed & 15
    code = t[prefix + ".quant_map"]
    assert code.tobytes() == NF4.tobytes()
    absmax = t[prefix + ".absmax"]
    if "nested_offset" in state:
        nb = state["nested_blocksize"]
        nested = t[prefix + ".nested_quant_map"][absmax.astype(np.int64)]
        absmax = nested * np.repeat(t[prefix + ".nested_absmax"], nb)[: absmax.size] + np.float32(state["nested_offset"])
    vals = code[idx[:n]] * np.repeat(absmax.astype(np.float32), bs)[:n]
    return vals.reshape(shape)


def _bnb_logit_tolerance() -> float:
    """How far bitsandbytes' CPU forward may be from the float32 spec decoder's. On CPUs with
    AVX512-BF16 its fused 4-bit kernel rounds each Linear's input and the block scales to bf16
    (bitsandbytes/backends/cpu/ops.py: "cpu fused op only support bf16"): on the tiny model that
    moved logits of magnitude ~4 by up to 0.041, against 1.55 between NF4 and the unquantized
    model, so 0.1 still tells a right decoding from a wrong one. Elsewhere it runs float32."""
    import bitsandbytes.functional as F

    return 0.1 if getattr(F, "has_avx512bf16", lambda: False)() else 2e-2


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_transformers_loads_and_logits_match(tiny, tmp_path):
    _bnb()
    pytest.importorskip("accelerate", reason="transformers' bitsandbytes loader needs accelerate")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4"
    smolq.quantize(tiny, out, format="nf4")
    ids = [1, 5, 17, 42, 99, 200, 7, 3, 250, 11]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert "Linear4bit" in type(loaded.model.layers[0].self_attn.q_proj).__name__
    got = _logits(loaded, ids)

    # the same model with every quantized Linear replaced by the spec decoder's weights
    t = _read_st(out / "model.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(tiny)
    want_fp = _logits(plain, ids)
    sd = plain.state_dict()
    for name in sd:
        if name + ".quant_state.bitsandbytes__nf4" in t:
            sd[name].copy_(torch.from_numpy(_decode_spec(t, name)).to(sd[name].dtype))
    spec = _logits(plain, ids)
    np.testing.assert_allclose(got, spec, atol=_bnb_logit_tolerance(), rtol=0)
    # NF4 vs unquantized: close, not equal
    cos = (got * want_fp).sum() / np.linalg.norm(got) / np.linalg.norm(want_fp)
    assert cos > 0.9 and not np.allclose(got, want_fp, atol=1e-4)  # random tiny weights: NF4 costs ~5% here


# ---------------------------------------------------------------- refusals

def test_gguf_input_refused(tiny, tmp_path, cli):
    gguf = tmp_path / "m.gguf"
    smolq.convert(tiny, gguf)
    out = tmp_path / "out"
    r = cli("quantize", gguf, out, "--format", "nf4")
    assert r.returncode == 2, r.stderr
    assert "needs a Hugging Face checkpoint directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("extra", [["--type", "q4_0"], ["--method", "gptq"], ["--blocksize", "48"]])
def test_bad_options_refused(tiny, tmp_path, extra, cli):
    out = tmp_path / "out"
    r = cli("quantize", tiny, out, "--format", "nf4", *extra)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bnb_options_need_bnb_format(tiny, tmp_path, cli):
    r = cli("quantize", tiny, tmp_path / "o.gguf", "--type", "q8_0", "--no-double-quant")
    assert r.returncode == 2 and "--format nf4 or fp4" in r.stderr


def test_fp4_no_double_quant_api(tiny, tmp_path):
    s = smolq.quantize(tiny, tmp_path / "fp4", format="fp4", double_quant=False, blocksize=128)
    assert s["format"] == "fp4" and s["n_quantized"] == 14 and s["bytes"] > 0
    t = _read_st(tmp_path / "fp4" / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.weight"
    state = json.loads(bytes(t[k + ".quant_state.bitsandbytes__fp4"]).decode())
    assert state == {"quant_type": "fp4", "blocksize": 128, "dtype": "float16", "shape": [256, 256]}
    assert t[k + ".absmax"].dtype == np.float32 and t[k + ".absmax"].size == 256 * 256 // 128
    assert k + ".nested_absmax" not in t
    assert t["model.embed_tokens.weight"].dtype == np.float16
