"""`smolq quantize --type <i-quant> --pure` end to end: a GGUF whose every
tensor equals what llama.cpp's llama-quantize --pure writes from the same f32
file (types and bytes), and MXFP4 / IQ3_XXS (with an importance matrix, which
IQ3_XXS needs as in llama-quantize), decoded by gguf-py close to the source."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from smolq.tiny import make_tiny_model

from real_loaders import require_llama_tool

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("iq")
    # every row length a multiple of 256: no shape fallbacks, so every tensor is compared
    hf = make_tiny_model("llama", d / "hf", hidden_size=256, config_overrides={"intermediate_size": 768})
    out = d / "f32.gguf"
    smolq_cli("convert", hf, out, "--outtype", "f32", "--quiet")
    return out


def smolq_cli(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "smolq", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1).copy())
            for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", "IQ3_S"])
def test_pure_quantize_equals_llama_quantize(f32_gguf, tmp_path, qtype):
    exe = require_llama_tool("llama-quantize")
    ours, theirs = tmp_path / "smolq.gguf", tmp_path / "llama.gguf"
    smolq_cli("quantize", f32_gguf, ours, "--type", qtype.lower(), "--pure", "--quiet")
    proc = subprocess.run([str(exe), "--pure", str(f32_gguf), str(theirs), qtype, "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    assert sum(t == qtype for t, _ in a.values()) >= 14  # the 2-D weights are really in qtype
    for name in a:
        assert a[name][0] == b[name][0], name
        assert np.array_equal(a[name][1], b[name][1]), name


def random_imatrix(f32_gguf, path):
    """An importance matrix (positive random column weights) for every 2-D weight of the file."""
    from smolq.formats.imatrix import from_sums, write_imatrix

    rng = np.random.default_rng(3)
    names = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(str(f32_gguf)).tensors if len(t.shape) == 2}
    sums = {n: rng.uniform(0.1, 2.0, k).astype(np.float32) * 64 for n, k in names.items()}
    write_imatrix(path, from_sums(sums, {n: 64 for n in names}, datasets=["random"], chunk_count=1,
                                  chunk_size=64))
    return path


@pytest.mark.parametrize("qtype, min_snr_db", [("MXFP4", 17), ("IQ3_XXS", 12)])
def test_pure_quantize_decodes_close_to_the_source(f32_gguf, tmp_path, qtype, min_snr_db):
    out = tmp_path / "q.gguf"
    extra = []
    if qtype == "IQ3_XXS":  # llama-quantize refuses IQ3_XXS without an imatrix; so does smolq
        refused = subprocess.run([sys.executable, "-m", "smolq", "quantize", str(f32_gguf), str(out), "--type",
                                  "iq3_xxs", "--pure", "--quiet"], capture_output=True, text=True)
        assert refused.returncode == 2 and "needs an importance matrix" in refused.stderr and not out.exists()
        extra = ["--imatrix", random_imatrix(f32_gguf, tmp_path / "r.imatrix")]
    smolq_cli("quantize", f32_gguf, out, "--type", qtype.lower(), "--pure", "--quiet", *extra)
    src = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(f32_gguf)).tensors}
    n = 0
    for t in gguf.GGUFReader(str(out)).tensors:
        if t.tensor_type.name != qtype:
            continue
        y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(src[t.name].shape)
        x = src[t.name].astype(np.float64)
        assert 10 * np.log10(np.sum(x ** 2) / np.sum((x - y) ** 2)) > min_snr_db, t.name
        n += 1
    assert n >= 14
