"""MLC-LLM weights (--format mlc): TVM reads the tensor cache; a decoder written here from
MLC-LLM's group-quantization spec recovers the HF weights; bad input is one line, exit 2.

The decoder below follows mlc_llm/quantization (group_quantization.py, utils.py) and
llama_model.py, not smolq's code: q_weight words hold 32 // bits codes, element r at
bits [r*bits, (r+1)*bits); w = (code - max_int) * scale, scale per group of group_size
along the input axis; q4f16_0 stores both arrays transposed; q/k/v and gate/up are fused
along the output rows in that order.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import smolq
from smolq.tiny import make_tiny_model

# name: (bits, group size, transposed linears)
SPEC = {"q4f16_1": (4, 32, False), "q4f16_0": (4, 32, True), "q3f16_1": (3, 40, False), "q0f16": (None, 0, False)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("mlc") / "llama", hidden_size=256)


@pytest.fixture(scope="module")
def tiny_gqa_tied(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("mlc") / "gqa", hidden_size=256, gqa=True, tied=True)


def _hf_weights(model: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return out


def _decode(q_weight: np.ndarray, q_scale: np.ndarray, k: int, quant: str, linear: bool) -> np.ndarray:
    bits, group, transposed = SPEC[quant]
    if linear and transposed:
        q_weight, q_scale = q_weight.T, q_scale.T
    per_word = 32 // bits
    codes = np.stack([(q_weight >> np.uint32(r * bits)) & np.uint32((1 << bits) - 1) for r in range(per_word)], -1)
    codes = codes.reshape(q_weight.shape[0], -1)[:, :k].astype(np.float32)
    scale = np.repeat(q_scale.astype(np.float32), group, axis=1)[:, :k]
    return (codes - (2 ** (bits - 1) - 1)) * scale


def _mlc_expected(hf: dict[str, np.ndarray], n_layer: int, tied: bool) -> dict[str, tuple[np.ndarray, str]]:
    """MLC-LLM's LLaMA parameter (without suffix) -> (the HF weight it holds, kind)."""
    exp = {"model.embed_tokens": (hf["model.embed_tokens.weight"], "embedding"), "model.norm": (hf["model.norm.weight"], "norm")}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        exp[p + "self_attn.qkv_proj"] = (np.concatenate([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]), "linear")
        exp[p + "self_attn.o_proj"] = (hf[p + "self_attn.o_proj.weight"], "linear")
        exp[p + "mlp.gate_up_proj"] = (np.concatenate([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]), "linear")
        exp[p + "mlp.down_proj"] = (hf[p + "mlp.down_proj.weight"], "linear")
        exp[p + "input_layernorm"] = (hf[p + "input_layernorm.weight"], "norm")
        exp[p + "post_attention_layernorm"] = (hf[p + "post_attention_layernorm.weight"], "norm")
    if not tied:
        exp["lm_head"] = (hf["lm_head.weight"], "linear")
    return exp


def _tvm_load(out: Path) -> dict[str, np.ndarray]:
    """Every array as TVM's tensor-cache loader (tvm.contrib.tvmjs) returns it, in a child process."""
    pytest.importorskip("tvm", reason="apache-tvm is not installed (make setup installs it; optional)")
    code = (
        "import sys, numpy as np, tvm\n"
        "from tvm.contrib import tvmjs\n"
        "params, meta = tvmjs.load_tensor_cache(sys.argv[1], tvm.cpu())\n"
        "np.savez(sys.argv[2], **{k: v.numpy() for k, v in params.items()})\n"
    )
    npz = out.parent / (out.name + ".npz")
    run = subprocess.run([sys.executable, "-c", code, str(out), str(npz)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("quant", list(SPEC))
@pytest.mark.parametrize("model", ["tiny", "tiny_gqa_tied"])
def test_tvm_reads_and_decoder_recovers(request, tmp_path, quant, model):
    src = request.getfixturevalue(model)
    out = tmp_path / "mlc"
    smolq.convert(src, out, format="mlc", outtype=quant)
    cache = json.loads((out / "tensor-cache.json").read_text())
    records = {r["name"]: r for shard in cache["records"] for r in shard["records"]}
    arrays = _tvm_load(out)
    assert set(arrays) == set(records)
    for name, rec in records.items():  # the loader's shape and dtype are the records'
        assert list(arrays[name].shape) == rec["shape"] and str(arrays[name].dtype) == rec["dtype"], name

    config = json.loads((src / "config.json").read_text())
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat["model_type"] == "llama" and chat["quantization"] == quant
    assert chat["model_config"]["hidden_size"] == 256 and chat["model_config"]["tie_word_embeddings"] == config["tie_word_embeddings"]
    assert set(chat["tokenizer_files"]) <= {p.name for p in out.iterdir()}

    hf = _hf_weights(src)
    expected = _mlc_expected(hf, config["num_hidden_layers"], config["tie_word_embeddings"])
    bits, group, _ = SPEC[quant]
    names = {n.rsplit(".", 1)[0] for n in records}
    assert names == set(expected)
    for name, (w, kind) in expected.items():
        if kind == "norm" or bits is None:
            got = arrays[f"{name}.weight"]
            assert got.dtype == np.float16 and got.shape == w.shape
            np.testing.assert_array_equal(got, w.astype(np.float16))
            continue
        got = _decode(arrays[f"{name}.q_weight"], arrays[f"{name}.q_scale"], w.shape[1], quant, kind == "linear")
        assert got.shape == w.shape, name
        # within the format's error: half a step of the group's scale (plus float16 rounding)
        k = w.shape[1]
        pad = -k % group
        absmax = np.abs(np.pad(w, ((0, 0), (0, pad)))).reshape(w.shape[0], -1, group).max(-1)
        step = np.repeat(absmax / (2 ** (bits - 1) - 1), group, axis=1)[:, :k]
        err = np.abs(got - w)
        assert np.all(err <= 0.5 * step * 1.01 + 1e-3 * np.abs(w) + 1e-7), (name, float((err / step).max()))
        assert np.mean(err) < 0.3 * np.mean(step), name


@pytest.mark.parametrize("quant,k", [("q4f16_1", 256), ("q3f16_1", 256), ("q3f16_1", 704)])
def test_codes_equal_mlc_quantizer_run_by_tvm(tmp_path, quant, k):
    """smolq's q_weight / q_scale equal MLC's quantization compute, compiled and run by TVM, bit for bit
    (except an all-zero group, where MLC divides 0 by 0 and smolq writes the zero code)."""
    pytest.importorskip("tvm", reason="apache-tvm is not installed (make setup installs it; optional)")
    from smolq.formats.mlc import QUANTS
    from smolq.transforms.mlc import group_quantize

    q = QUANTS[quant]
    w = (np.random.default_rng(k).standard_normal((64, k)) * 0.05).astype(np.float32)
    w[5, 7] = 0.3  # an outlier
    np.save(tmp_path / "w.npy", w)
    script = Path(__file__).with_name("mlc_te_reference.py")
    run = subprocess.run([sys.executable, str(script), "64", str(k), str(q.bits), str(q.group_size),
                          str(tmp_path / "w.npy"), str(tmp_path / "o.npz")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ref = np.load(tmp_path / "o.npz")
    words, scales = group_quantize(w, q)
    np.testing.assert_array_equal(scales, ref["q_scale"])
    np.testing.assert_array_equal(words, ref["q_weight"])


def test_quantize_command_same_as_convert(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    smolq.convert(tiny, a, format="mlc", outtype="q4f16_1")
    s = smolq.quantize(tiny, b, format="mlc", type="q4f16_1")
    assert s["format"] == "mlc" and s["preset"] == "q4f16_1"
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = tmp_path / "c"
    smolq.quantize(tiny, c, format="mlc", bits=4)
    assert (c / "params_shard_0.bin").read_bytes() == (a / "params_shard_0.bin").read_bytes()


def test_shards_follow_tvm_cap(tmp_path):
    """Arrays are split over shards as TVM's dump_tensor_cache splits them (32 MiB cap, here 1000 bytes)."""
    from smolq.formats.mlc import TensorCacheWriter

    arrays = {f"a{i}": np.full(n // 4, i, dtype=np.uint32) for i, n in enumerate((300, 300, 300, 600, 100))}
    mine = tmp_path / "mine"
    mine.mkdir()
    w = TensorCacheWriter(mine, shard_cap=1000)
    for name, a in arrays.items():
        w.add(name, a)
    w.finish({})
    shards = json.loads((mine / "tensor-cache.json").read_text())["records"]
    # a3 (at least half the cap) goes out of band into a shard of its own, numbered before the
    # pending a0..a2, which a4 then pushes out
    assert [[r["name"] for r in s["records"]] for s in shards] == [["a3"], ["a0", "a1", "a2"], ["a4"]]
    try:
        from tvm.contrib import tvmjs
    except ImportError:
        return
    theirs = tmp_path / "tvm"
    tvmjs.dump_tensor_cache(arrays, str(theirs), shard_cap_mb=1000 / (1 << 20), show_progress=False)
    assert json.loads((theirs / "tensor-cache.json").read_text())["records"] == shards
    for s in shards:
        assert (theirs / s["dataPath"]).read_bytes() == (mine / s["dataPath"]).read_bytes()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolq", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", ["gptj", "outtype", "quantize-outtype", "file-input", "gptq", "nonempty"])
def test_bad_input_one_line_exit_2_nothing_written(tiny, tmp_path, case):
    out = tmp_path / "out"
    if case == "gptj":
        src = make_tiny_model("gptj", tmp_path / "gptj")
        args = ["convert", str(src), str(out), "--format", "mlc", "--outtype", "q4f16_1"]
    elif case == "outtype":
        args = ["convert", str(tiny), str(out), "--format", "mlc", "--outtype", "q4_0"]
    elif case == "quantize-outtype":
        args = ["quantize", str(tiny), str(out), "--format", "mlc", "--type", "q5f16_1"]
    elif case == "file-input":
        f = tmp_path / "m.gguf"
        smolq.convert(tiny, f)
        args = ["quantize", str(f), str(out), "--format", "mlc", "--type", "q4f16_1"]
    elif case == "gptq":
        args = ["quantize", str(tiny), str(out), "--format", "mlc", "--type", "q4f16_1", "--method", "gptq"]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        args = ["convert", str(tiny), str(out), "--format", "mlc", "--outtype", "q4f16_1"]
    before = sorted(p.name for p in tmp_path.iterdir())
    run = _cli(*args, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "nonempty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
