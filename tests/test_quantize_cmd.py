"""`smolq quantize` end to end: GGUF written by gguf-py, read back by gguf-py, bytes vs gguf.quants."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.test_cli_support import ggjt_by_hand, llama_tensors, run_cli, write_gguf_with_gguf_py

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 2-layer LLaMA-shaped F32 GGUF (rows of 256 and 512) and its tensors."""
    tensors = llama_tensors(n_layer=2, n_embd=256, n_ff=512, n_vocab=64)
    path = write_gguf_with_gguf_py(tmp_path_factory.mktemp("q") / "in-f32.gguf", tensors)
    return path, tensors


def read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    return r.fields[key].contents()


def test_q4_0_pure_bytes_equal_gguf_quants(capsys, src, tmp_path):
    path, tensors = src
    out = tmp_path / "q4_0.gguf"
    rc, _, err = run_cli(capsys, "quantize", path, out, "--type", "q4_0", "--pure", "--quiet")
    assert rc == 0, err
    r, got = read(out)
    for name, arr in tensors.items():
        t = got[name]
        if arr.ndim == 1:
            assert t.tensor_type == Q.F32
            np.testing.assert_array_equal(np.asarray(t.data), arr)
        else:
            assert t.tensor_type == Q.Q4_0, name
            expected = gguf.quants.quantize(arr, Q.Q4_0)
            assert np.asarray(t.data).tobytes() == expected.tobytes(), name
    assert field(r, "general.file_type") == 2
    assert field(r, "general.quantization_version") == 2
    assert field(r, "general.name") == "tiny test model"  # other KVs carried over
    assert field(r, "test.big") == 2**40 + 3


def test_q8_0_mix_keeps_output_q8_0(capsys, src, tmp_path):
    path, tensors = src
    out = tmp_path / "q8_0.gguf"
    rc, _, err = run_cli(capsys, "quantize", path, out, "-t", "Q8_0", "-q")
    assert rc == 0, err
    r, got = read(out)
    for name, arr in tensors.items():
        if arr.ndim == 2:
            # llama.cpp: output.weight stays Q8_0 in a Q8_0 file; everything 2-D is Q8_0.
            assert got[name].tensor_type == Q.Q8_0
            assert np.asarray(got[name].data).tobytes() == gguf.quants.quantize(arr, Q.Q8_0).tobytes()
    assert field(r, "general.file_type") == 7


def test_q4_0_mix_raises_output_to_q6_k(capsys, src, tmp_path):
    path, tensors = src
    out = tmp_path / "q4_0-mix.gguf"
    rc, _, err = run_cli(capsys, "quantize", path, out, "--type", "q4_0", "--quiet")
    assert rc == 0, err
    _, got = read(out)
    assert got["output.weight"].tensor_type == Q.Q6_K
    deq = gguf.quants.dequantize(np.asarray(got["output.weight"].data), Q.Q6_K).reshape(tensors["output.weight"].shape)
    err_rms = np.sqrt(np.mean((deq - tensors["output.weight"]) ** 2))
    assert err_rms < 0.05 * np.sqrt(np.mean(tensors["output.weight"] ** 2))
    assert got["blk.0.attn_q.weight"].tensor_type == Q.Q4_0


def test_q4_k_m_types_follow_the_mix(capsys, src, tmp_path):
    path, tensors = src
    out = tmp_path / "q4_k_m.gguf"
    rc, _, err = run_cli(capsys, "quantize", path, out, "--bits", "4", "--quiet")
    assert rc == 0, err
    r, got = read(out)
    # By hand, llamacpp.md 2.3 with 2 layers: use_more_bits(i, 2) is true for i >= 7*2//8 = 1 only.
    expected = {"output.weight": Q.Q6_K, "token_embd.weight": Q.Q4_K,
                "blk.0.attn_v.weight": Q.Q4_K, "blk.1.attn_v.weight": Q.Q6_K,
                "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K}
    for name, arr in tensors.items():
        want = Q.F32 if arr.ndim == 1 else expected.get(name, Q.Q4_K)
        assert got[name].tensor_type == want, name
        if arr.ndim == 2:  # decoded by gguf-py, close to the source
            deq = gguf.quants.dequantize(np.asarray(got[name].data), want).reshape(arr.shape)
            rel = np.sqrt(np.mean((deq - arr) ** 2) / np.mean(arr ** 2))
            assert rel < (0.12 if want == Q.Q4_K else 0.05), name
    assert field(r, "general.file_type") == 15
    assert field(r, "general.quantization_version") == 2


def test_overrides_and_leave_output(capsys, src, tmp_path):
    path, _ = src
    out = tmp_path / "ovr.gguf"
    rc, _, err = run_cli(capsys, "quantize", path, out, "-t", "q4_k_s", "--leave-output-tensor",
                         "--token-embedding-type", "q8_0", "--tensor-type", r"ffn_up=q5_0",
                         "--tensor-type", r"blk\.1\.attn_q=f16", "-q")
    assert rc == 0, err
    _, got = read(out)
    assert got["output.weight"].tensor_type == Q.F32  # left as in the input
    assert got["token_embd.weight"].tensor_type == Q.Q8_0
    assert got["blk.0.ffn_up.weight"].tensor_type == Q.Q5_0
    assert got["blk.1.attn_q.weight"].tensor_type == Q.F16
    assert got["blk.0.attn_q.weight"].tensor_type == Q.Q4_K


def test_dry_run_writes_nothing_and_reports_sizes(capsys, src, tmp_path):
    path, tensors = src
    out = tmp_path / "dry.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", path, out, "-t", "q8_0", "--pure", "--dry-run", "--json")
    assert rc == 0, err
    assert not out.exists()
    plan = json.loads(stdout)
    assert plan["dry_run"] is True and plan["preset"] == "Q8_0"
    by_name = {t["name"]: t for t in plan["tensors"]}
    for name, arr in tensors.items():
        if arr.ndim == 2:
            assert by_name[name]["type"] == "Q8_0"
            assert by_name[name]["bytes"] == arr.size // 32 * 34  # 34-byte blocks of 32
    assert plan["tensor_bytes"] == sum(t["bytes"] for t in plan["tensors"])
    rc, stdout, _ = run_cli(capsys, "quantize", path, out, "-t", "q8_0", "--dry-run")
    assert rc == 0 and "blk.1.ffn_down.weight" in stdout and not out.exists()


def test_json_summary(capsys, src, tmp_path):
    path, _ = src
    out = tmp_path / "j.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", path, out, "-t", "q5_1", "--json")
    assert rc == 0, err
    summary = json.loads(stdout)  # exactly one JSON object on stdout
    assert summary["bytes"] == out.stat().st_size
    assert summary["format"] == "gguf-v3" and summary["file_type"] == 9


def test_requantize_needs_the_flag(capsys, src, tmp_path):
    path, tensors = src
    q8 = tmp_path / "q8.gguf"
    assert run_cli(capsys, "quantize", path, q8, "-t", "q8_0", "-q")[0] == 0
    out = tmp_path / "q4.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", q8, out, "-t", "q4_0")
    assert rc == 2 and "--allow-requantize" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc, _, err = run_cli(capsys, "quantize", q8, out, "-t", "q4_0", "--pure", "--allow-requantize", "-q")
    assert rc == 0, err
    _, got = read(out)
    # dequantize Q8_0 (gguf-py) then quantize Q4_0 (gguf-py) is what requantizing means
    q8_bytes = gguf.quants.quantize(tensors["blk.0.attn_k.weight"], Q.Q8_0)
    expected = gguf.quants.quantize(gguf.quants.dequantize(q8_bytes, Q.Q8_0), Q.Q4_0)
    assert np.asarray(got["blk.0.attn_k.weight"].data).tobytes() == expected.tobytes()


@pytest.mark.parametrize("args, message", [
    (["-t", "q4_9"], "unknown type"),
    (["--bits", "7"], "--bits 7"),
    (["-t", "q4_0", "--method", "gptq"], "GPTQ needs the HF checkpoint (calibration runs the model); got a gguf file"),
    (["-t", "q4_0", "--method", "awq"], "unknown --method"),
    (["-t", "q4_0", "--format", "ggjt-v3"], "smolq migrate"),
    (["-t", "q4_0", "--tensor-type", "nope"], "REGEX=TYPE"),
    (["-t", "q4_0", "--output-tensor-type", "q7"], "unknown output tensor type"),
])
def test_bad_requests_are_one_line_errors(capsys, src, tmp_path, args, message):
    path, _ = src
    out = tmp_path / "never.gguf"
    rc, _, err = run_cli(capsys, "quantize", path, out, *args)
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


def test_in_equal_out_and_unwritable_output(capsys, src, tmp_path):
    path, _ = src
    before = path.read_bytes()
    rc, _, err = run_cli(capsys, "quantize", path, path, "-t", "q4_0")
    assert rc == 2 and "output is the input" in err and path.read_bytes() == before
    rc, _, err = run_cli(capsys, "quantize", path, tmp_path / "missing" / "x.gguf", "-t", "q4_0")
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run_cli(capsys, "quantize", path, ro / "x.gguf", "-t", "q4_0")
        if rc == 0:
            pytest.skip("running as a user who can write to read-only directories (root)")
        assert rc == 2 and "cannot write" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_missing_input(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "quantize", tmp_path / "nope.gguf", tmp_path / "o.gguf", "-t", "q4_0")
    assert rc == 2 and "no such file" in err


# --- legacy in and out -----------------------------------------------------------------------

def test_ggjt_v1_f32_to_q4_0_writes_ggjt_v3(capsys, tmp_path):
    src = tmp_path / "ggml-model-f32.bin"
    tensors, _ = ggjt_by_hand(src, version=1, n_embd=256)
    out = tmp_path / "ggml-model-q4_0.bin"
    rc, _, err = run_cli(capsys, "quantize", src, out, "-t", "q4_0", "-q")
    assert rc == 0, err
    raw = out.read_bytes()
    # formats.md 2.1: magic, version 3 (llama.cpp's quantizer writes the newest ggjt), ftype last
    magic, version = struct.unpack_from("<II", raw, 0)
    assert (magic, version) == (0x67676A74, 3)
    assert struct.unpack_from("<I", raw, 32)[0] == 2  # LLAMA_FTYPE MOSTLY_Q4_0
    from smolq.formats.legacy import read_legacy

    with read_legacy(out) as lf:
        got = {t.name: t for t in lf.tensors}
        for name, arr in tensors.items():
            t = got[name]
            if arr.ndim == 1:
                assert t.type.name == "F32"
            elif name == "output.weight":
                assert t.type.name == "Q6_K"  # llama.cpp raised output.weight in ggjt v3 too
            else:
                # the v3 block layout is GGUF's: gguf.quants is the reference
                assert t.type.name == "Q4_0", name
                assert bytes(np.asarray(t.load())) == gguf.quants.quantize(arr, Q.Q4_0).tobytes(), name


def test_ggjt_to_ggjt_v1_keeps_the_base_type(capsys, tmp_path):
    src = tmp_path / "f32.bin"
    tensors, _ = ggjt_by_hand(src, version=1, n_embd=256)
    out = tmp_path / "q4_0-v1.bin"
    rc, _, err = run_cli(capsys, "quantize", src, out, "-t", "q4_0", "--format", "ggjt-v1")
    assert rc == 0, err
    assert "cannot hold" in err  # the note about output.weight staying Q4_0
    assert struct.unpack_from("<II", out.read_bytes(), 0) == (0x67676A74, 1)
    from smolq import kernels
    from smolq.formats.legacy import read_legacy

    with read_legacy(out) as lf:
        for t in lf.tensors:
            if len(t.shape) == 2:
                assert t.type.name == "Q4_0" and t.layout == "v1"
                assert t.nbytes == tensors[t.name].size // 32 * 20  # v1: f32 scale + 16 bytes
                deq = kernels.dequantize(t.load(), t.type, t.shape, layout="v1")
                np.testing.assert_allclose(deq, tensors[t.name], atol=0.2 * np.abs(tensors[t.name]).max())


@pytest.mark.parametrize("family,src_fmt,dst_fmt", [("mpt", "ggml", "ggmm"), ("mpt", "ggmm", "ggml"),
                                                    ("llama", "ggml", "ggjt-v3")])
def test_quantize_between_header_layouts_points_to_migrate(capsys, tmp_path, family, src_fmt, dst_fmt):
    """quantize keeps the input's header and vocabulary; another layout is migrate's work: one line that says so."""
    from smolq.pipeline.convert import convert
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model(family, tmp_path / "hf")
    src = tmp_path / "src.bin"
    convert(hf, src, format=src_fmt, outtype="f16")
    out = tmp_path / "out.bin"
    rc, _, err = run_cli(capsys, "quantize", src, out, "-t", "q4_0", "--format", dst_fmt)
    assert rc == 2 and "smolq migrate" in err and "header and vocabulary layout" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
