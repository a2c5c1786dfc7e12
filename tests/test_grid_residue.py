"""scripts/grid_residue.py: does a model's weights lie on a ggml grid (README: Benchmarks, about the
benchmark models). Checked against gguf-py's own Q5_0 / Q4_0 quantizer (gguf.quants): weights put
on the Q5_0 grid by gguf-py come back exactly at Q5_0 and not at Q4_0, and the relative error of
normal random weights at Q4_0 is the one gguf-py's round trip gives."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from smolq.tiny import make_tiny_model
from tests.script_module import load_script

grid_residue = load_script("grid_residue")


def _gguf_roundtrip(x, qtype):
    return dequantize(quantize(x, qtype), qtype).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(7)
    on_grid = _gguf_roundtrip(rng.standard_normal((48, 256)).astype(np.float32), GGMLQuantizationType.Q5_0)
    normal = rng.standard_normal((32, 512)).astype(np.float32)
    path = tmp_path_factory.mktemp("grid") / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 256)).astype(np.float32))
    w.add_tensor("blk.0.ffn_down.weight", on_grid)
    w.add_tensor("blk.0.attn_q.weight", normal)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(256, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, normal


def test_weights_on_the_q5_0_grid_come_back_at_q5_0_only(model, tmp_path):
    path, _ = model
    out = tmp_path / "r.json"
    assert grid_residue.main([str(path), "--types", "q4_0,q5_0,q8_0,q4_k", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    per = result["per_tensor"]
    assert set(per) == {"blk.0.ffn_down.weight", "blk.0.attn_q.weight"}  # the embedding and norms are not blocks' 2-D weights
    assert per["blk.0.ffn_down.weight"]["Q5_0"] <= grid_residue.ON_GRID
    assert per["blk.0.ffn_down.weight"]["Q4_0"] > 1e-3
    assert per["blk.0.ffn_down.weight"]["Q8_0"] > 1e-6  # 16 d / 127 is not a Q8_0 step of every value
    assert per["blk.0.attn_q.weight"]["Q5_0"] > 1e-3
    assert result["types"]["Q5_0"]["on_grid"] == 1 and result["types"]["Q4_0"]["on_grid"] == 0
    assert result["types"]["Q4_K"]["tensors"] == 2  # 256 and 512 wide rows both fit a K block


def test_relative_error_is_gguf_py_round_trip(model):
    _, normal = model
    y = _gguf_roundtrip(normal, GGMLQuantizationType.Q4_0)
    expected = float(((normal.astype(np.float64) - y) ** 2).sum() / (normal.astype(np.float64) ** 2).sum())
    got = grid_residue.relative_error(normal, grid_residue.GGMLType.Q4_0)
    assert got == pytest.approx(expected, rel=1e-9)
    ratio = grid_residue.relative_error(normal, grid_residue.GGMLType.Q5_0) / got
    assert 0.2 < ratio < 0.3  # the docstring's "about 0.25" on continuous weights


def test_hf_directory(tmp_path):
    """An HF checkpoint: every layer's 2-D weight (read here by safetensors itself), each at
    gguf-py's Q8_0 round-trip error."""
    from safetensors.numpy import load_file

    hf = make_tiny_model("llama", tmp_path / "hf", seed=3)
    out = tmp_path / "r.json"
    assert grid_residue.main([str(hf), "--types", "q4_0,q8_0", "--json", str(out)]) == 0
    per = json.loads(out.read_text())["per_tensor"]
    weights = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()
               if ".layers." in k and v.ndim == 2}
    assert weights and set(per) == set(weights)
    for name, w in weights.items():
        x = w.astype(np.float32)
        y = _gguf_roundtrip(x, GGMLQuantizationType.Q8_0)
        expected = float(((x.astype(np.float64) - y) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
        assert per[name]["Q8_0"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("args, words", [
    (["{missing}"], "no such file"),
    (["{text}"], "text.gguf"),
    (["{model}", "--types", "q9_9"], "q9_9"),
    (["{model}", "--match", "nothing-matches"], "no 2-D tensor"),
])
def test_bad_input_is_one_line_exit_2(model, tmp_path, capsys, args, words):
    text = tmp_path / "text.gguf"
    text.write_text("not a model\n")
    paths = {"missing": tmp_path / "nope.gguf", "text": text, "model": model[0]}
    assert grid_residue.main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_types_needing_an_imatrix_take_the_searched_rtn(model, tmp_path):
    path, _ = model
    out = tmp_path / "r.json"
    assert grid_residue.main([str(path), "--types", "iq2_xxs,q4_k", "--json", str(out)]) == 0
    per = json.loads(out.read_text())["per_tensor"]
    assert 0 < per["blk.0.attn_q.weight"]["IQ2_XXS"] < 1


@pytest.mark.parametrize("args, words", [
    (["{model}", "--match", "("], "--match"),
    (["{model}", "--types", "f16"], "F16"),
])
def test_bad_options_are_one_line_exit_2(model, capsys, args, words):
    assert grid_residue.main([a.format(model=model[0]) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
