"""`smolq verify`: exit codes, corruption found, error numbers recomputed with gguf-py + numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_cli_support import ggjt_by_hand, llama_tensors, run_cli, write_gguf_with_gguf_py

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

LEGACY_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "output.weight": "output.weight", "layers.0.attention_norm.weight": "blk.0.attn_norm.weight",
    "layers.0.attention.wq.weight": "blk.0.attn_q.weight", "layers.0.attention.wk.weight": "blk.0.attn_k.weight",
    "layers.0.attention.wv.weight": "blk.0.attn_v.weight", "layers.0.attention.wo.weight": "blk.0.attn_output.weight",
    "layers.0.ffn_norm.weight": "blk.0.ffn_norm.weight", "layers.0.feed_forward.w1.weight": "blk.0.ffn_gate.weight",
    "layers.0.feed_forward.w2.weight": "blk.0.ffn_down.weight", "layers.0.feed_forward.w3.weight": "blk.0.ffn_up.weight",
}


def write_q4_0_gguf(path, tensors):
    """2-D tensors as Q4_0 bytes from gguf.quants, 1-D as F32 (gguf-py writer)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, arr in tensors.items():
        if arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, Q.Q4_0), raw_dtype=Q.Q4_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    tensors = llama_tensors(n_layer=1, n_embd=64, n_ff=128, n_vocab=32)
    ref = write_gguf_with_gguf_py(d / "f32.gguf", tensors, n_layer=1)
    q = d / "q4_0.gguf"
    write_q4_0_gguf(q, tensors)
    return ref, q, tensors


def expected_stats(arr):
    deq = gguf.quants.dequantize(gguf.quants.quantize(arr, Q.Q4_0), Q.Q4_0).reshape(arr.shape)
    diff = deq.astype(np.float64) - arr
    rmse = float(np.sqrt(np.mean(diff ** 2)))
    cos = float(np.dot(deq.ravel(), arr.ravel()) / np.linalg.norm(deq) / np.linalg.norm(arr))
    return rmse, float(np.max(np.abs(diff))), cos


def test_clean_file_exits_zero(capsys, pair):
    _, q, tensors = pair
    rc, out, err = run_cli(capsys, "verify", q, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] and report["summary"]["n_tensors"] == len(tensors)
    assert all(not r["problems"] for r in report["tensors"])


def test_error_table_matches_numpy(capsys, pair):
    ref, q, tensors = pair
    rc, out, err = run_cli(capsys, "verify", q, "--against", ref, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["summary"]["n_compared"] == len(tensors)
    for row in report["tensors"]:
        arr = tensors[row["name"]]
        if arr.ndim == 1:
            assert row["rmse"] == 0 and row["max_abs"] == 0
            continue
        rmse, max_abs, cos = expected_stats(arr)
        assert row["rmse"] == pytest.approx(rmse, rel=1e-5)
        assert row["max_abs"] == pytest.approx(max_abs, rel=1e-5)
        assert row["cosine"] == pytest.approx(cos, abs=1e-6)
        assert row["snr_db"] == pytest.approx(10 * np.log10(np.mean(arr.astype(np.float64) ** 2) / rmse ** 2), abs=1e-3)
    worst = max(r["rmse"] for r in report["tensors"])
    # --max-rmse: just above the worst passes; just below fails with exit 1
    assert run_cli(capsys, "verify", q, "--against", ref, "--max-rmse", str(worst * 1.01), "-q")[0] == 0
    rc, out, _ = run_cli(capsys, "verify", q, "--against", ref, "--max-rmse", str(worst * 0.99), "-q")
    assert rc == 1 and "FAILED" in out


def test_corrupt_block_scale_is_found(capsys, pair, tmp_path):
    _, q, _ = pair
    r = gguf.GGUFReader(str(q))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight")
    raw = bytearray(q.read_bytes())
    raw[t.data_offset:t.data_offset + 2] = b"\x00\x7c"  # first block's f16 scale := +inf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    rc, out, err = run_cli(capsys, "verify", bad, "--json")
    assert rc == 1
    report = json.loads(out)
    assert not report["ok"]
    flagged = [row["name"] for row in report["tensors"] if row["problems"]]
    assert flagged == ["blk.0.attn_v.weight"]


def test_truncated_file_is_a_one_line_error(capsys, pair, tmp_path):
    _, q, _ = pair
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(q.read_bytes()[:-100])
    rc, _, err = run_cli(capsys, "verify", cut)
    assert rc == 2 and str(cut) in err and len(err.strip().splitlines()) == 1


def test_legacy_file_against_gguf_reference_by_role(capsys, tmp_path):
    """A ggjt Q4_0 file checked against an F32 GGUF: names matched through the role table."""
    src = tmp_path / "f32.bin"
    tensors, _ = ggjt_by_hand(src, version=1, n_embd=64)
    ref = write_gguf_with_gguf_py(tmp_path / "f32.gguf", {LEGACY_TO_GGUF[k]: v for k, v in tensors.items()},
                                  n_layer=1)
    q = tmp_path / "q4_0.bin"
    assert run_cli(capsys, "quantize", src, q, "-t", "q4_0", "--pure", "-q")[0] == 0
    rc, out, err = run_cli(capsys, "verify", q, "--against", ref, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["summary"]["n_compared"] == len(tensors)
    assert report["only_in_reference"] == []
    for row in report["tensors"]:
        assert row["reference"] == LEGACY_TO_GGUF[row["name"]]
        arr = tensors[row["name"]]
        if arr.ndim == 2:
            assert row["rmse"] == pytest.approx(expected_stats(arr)[0], rel=1e-5)


def test_shape_mismatch_fails(capsys, tmp_path):
    a = write_gguf_with_gguf_py(tmp_path / "a.gguf", {"blk.0.attn_q.weight": np.ones((32, 64), np.float32)}, n_layer=1)
    b = write_gguf_with_gguf_py(tmp_path / "b.gguf", {"blk.0.attn_q.weight": np.ones((64, 32), np.float32)}, n_layer=1)
    rc, out, _ = run_cli(capsys, "verify", a, "--against", b, "--json")
    assert rc == 1 and "differs from the reference" in out


def test_request_errors(capsys, pair, tmp_path):
    _, q, _ = pair
    rc, _, err = run_cli(capsys, "verify", q, "--max-rmse", "0.1")
    assert rc == 2 and "--against" in err
    rc, _, err = run_cli(capsys, "verify", q, "--logits")
    assert rc == 2 and "HF_DIR" in err
    rc, _, err = run_cli(capsys, "verify", q, "--against", tmp_path)  # a directory without config.json
    assert rc == 2 and len(err.strip().splitlines()) == 1
