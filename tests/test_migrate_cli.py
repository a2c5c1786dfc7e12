"""`smolq migrate` on the command line: plan, --json, guesses, removed types, bad input (one line, exit 2)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from smolq.pipeline.convert import convert
from smolq.formats.base import TensorEntry
from smolq.formats.legacy import read_legacy, write_legacy
from smolq.ggml_types import GGMLType

T = GGMLType


@pytest.fixture
def run(cli):
    return lambda *args: cli("migrate", *args)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("migrate-cli")
    hf = make_tiny_model("llama", root / "hf")
    for fmt in ("ggjt-v1", "ggjt-v2"):
        convert(hf, root / f"{fmt}.bin", format=fmt, outtype="f16")
    return hf, root


def test_json_summary_lists_guesses_and_tensors(run, llama, tmp_path):
    hf, root = llama
    r = run(root / "ggjt-v1.bin", tmp_path / "o.gguf", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["format"] == "gguf-v3" and s["source_format"] == "ggjt-v1" and s["architecture"] == "llama"
    keys = {g["key"]: g["value"] for g in s["guesses"]}
    assert keys["llama.context_length"] == 2048 and keys["llama.rope.freq_base"] == 10000.0
    meta = {f.name: f for f in GGUFReader(tmp_path / "o.gguf").fields.values()}
    assert meta["llama.context_length"].parts[-1][0] == 2048  # the guess is what was written
    assert len(s["tensors"]) == s["n_tensors"] and all(t["lossless"] for t in s["tensors"])


def test_guesses_are_printed(run, llama, tmp_path):
    _, root = llama
    r = run(root / "ggjt-v1.bin", tmp_path / "o.gguf")
    assert r.returncode == 0
    assert "guess: llama.attention.layer_norm_rms_epsilon" in r.stderr


def test_dry_run_writes_nothing(run, llama, tmp_path):
    hf, root = llama
    (tmp_path / "config.json").write_text((hf / "config.json").read_text())  # without the tokenizer beside it
    r = run(root / "ggjt-v2.bin", tmp_path / "o.gguf", "--dry-run", "--json", "--config", tmp_path / "config.json")
    assert r.returncode == 0
    s = json.loads(r.stdout)
    assert s["dry_run"] and not (tmp_path / "o.gguf").exists()
    # config.json alone fixes the hyperparameters but not the tokenizer
    keys = {g["key"] for g in s["guesses"]}
    assert "llama.context_length" not in keys and "tokenizer.ggml.tokens" in keys


def test_config_that_describes_another_model_is_refused(run, llama, tmp_path):
    hf, root = llama
    cfg = json.loads((hf / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run(root / "ggjt-v1.bin", tmp_path / "o.gguf", "--config", tmp_path / "config.json")
    assert r.returncode == 2 and "hidden_size" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- corrupt and unsupported inputs

def _patched(src, dst, offset, fmt, value):
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


def _type_field_offset(path, name):
    data = path.read_bytes()
    at = data.index(name.encode())
    return at - 4 * 2 - 4  # n_dims, name_len, TYPE, ne[0], ne[1], name (formats.md 4.1)


def _assert_one_line_exit_2(r, path, words):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_truncated_file(run, llama, tmp_path):
    _, root = llama
    data = (root / "ggjt-v1.bin").read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[: len(data) - 1000])
    r = run(bad, tmp_path / "o.gguf")
    _assert_one_line_exit_2(r, bad, "truncated")
    assert not (tmp_path / "o.gguf").exists()


def test_type_id_that_never_existed_in_that_version(run, llama, tmp_path):
    _, root = llama
    src = root / "ggjt-v2.bin"
    # id 4 was Q4_2 until ggjt v2 removed it (formats.md 5.1)
    bad = _patched(src, tmp_path / "bad.bin", _type_field_offset(src, "layers.0.attention.wq.weight"), "<i", 4)
    r = run(bad, tmp_path / "o.gguf")
    _assert_one_line_exit_2(r, bad, "type id 4 never existed")


def test_unknown_hyperparameters(run, llama, tmp_path):
    _, root = llama
    # ggjt LLaMA header: magic, version, n_vocab, n_embd, n_mult, n_head, n_layer, n_rot (formats.md 2.1)
    bad = _patched(root / "ggjt-v1.bin", tmp_path / "bad.bin", 28, "<I", 7)
    r = run(bad, tmp_path / "o.gguf")
    _assert_one_line_exit_2(r, bad, "unknown hyperparameters")


def test_not_a_model_file(run, tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"hello world, not a model")
    r = run(bad, tmp_path / "o.gguf")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_family_without_that_format(run, tmp_path):
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("gptj", tmp_path / "g")
    convert(hf, tmp_path / "g.gguf", format="gguf", outtype="f16")
    r = run(tmp_path / "g.gguf", tmp_path / "o.bin", "--format", "ggjt-v3")
    assert r.returncode == 2 and "gptj cannot be written as ggjt-v3" in r.stderr


# ---------------------------------------------------------------- removed types: requantized, reported

def pack_q4_2(x: np.ndarray) -> bytes:
    """Q4_2 (formats.md 5.2.1): blocks of 16, f16 d, byte k = element 2k | element 2k+1 << 4; d = max/-8."""
    out = bytearray()
    for block in x.reshape(-1, 16).astype(np.float32):
        big = block[np.argmax(np.abs(block))]
        d = np.float16(big / -8)
        inv = 1.0 / np.float32(d) if d else 0.0
        q = np.clip(np.round(block * inv) + 8, 0, 15).astype(np.uint8)
        out += d.tobytes() + bytes(q[0::2] | (q[1::2] << 4))
    return bytes(out)


def unpack_q4_2(raw: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 10)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:]
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 16).astype(np.float32)
    return ((q - 8) * d).reshape(-1)[:n]


def test_q4_2_is_requantized_to_q4_0_with_error_figures(llama, tmp_path):
    from smolq.pipeline.migrate import migrate

    hf, root = llama
    lf = read_legacy(root / "ggjt-v1.bin")
    entries, q42 = [], {}
    for e in lf.tensors:
        if len(e.shape) == 2 and ".attention." in e.name:
            x = np.frombuffer(e.load(), "<f2").astype(np.float32)
            q42[e.name] = pack_q4_2(x)
            entries.append(TensorEntry(e.name, T.Q4_2, e.shape, (lambda b=q42[e.name]: b), "v1"))
        else:
            entries.append(e)
    src = tmp_path / "q4_2.bin"
    write_legacy(src, "ggjt", 1, "llama", lf.hparams, lf.vocab, entries, ftype=5)
    s = migrate(src, tmp_path / "o.gguf", config=hf)
    reader = GGUFReader(tmp_path / "o.gguf")
    report = {t["source"]: t for t in s["tensors"]}
    for name, raw in q42.items():
        r = report[name]
        assert (r["source_type"], r["type"], r["action"], r["lossless"]) == ("Q4_2", "Q4_0", "requantize", False)
        rt = next(t for t in reader.tensors if t.name == r["name"])
        ref = unpack_q4_2(raw, int(np.prod(r["shape"])))
        got = gguf_dequantize(rt.data, rt.tensor_type).reshape(-1)
        err = np.abs(ref - got)
        assert err.max() == pytest.approx(r["stats"]["max_abs"], rel=1e-6)
        assert np.sqrt(np.mean(err.astype(np.float64) ** 2)) == pytest.approx(r["stats"]["rmse"], rel=1e-4)
    meta = GGUFReader(tmp_path / "o.gguf").fields["general.file_type"]
    assert meta.parts[-1][0] in (1, 2)  # Q4_2 (5) is gone; the file's main type decides


def test_q4_2_to_ggjt_v3_and_explicit_type(llama, tmp_path):
    from smolq.pipeline.migrate import migrate

    hf, root = llama
    lf = read_legacy(root / "ggjt-v1.bin")
    entries = [TensorEntry(e.name, T.Q4_2, e.shape, (lambda e=e: pack_q4_2(np.frombuffer(e.load(), "<f2"))), "v1")
               if e.name.endswith("wq.weight") else e for e in lf.tensors]
    write_legacy(tmp_path / "s.bin", "ggjt", 1, "llama", lf.hparams, lf.vocab, entries)
    s = migrate(tmp_path / "s.bin", tmp_path / "o.bin", format="ggjt-v3", type="q8_0")
    moved = [t for t in s["tensors"] if t["source_type"] == "Q4_2"]
    assert moved and all(t["type"] == "Q8_0" and t["layout"] == "v3" for t in moved)
    out = read_legacy(tmp_path / "o.bin")
    assert out.version == 3 and out.tensor("layers.0.attention.wq.weight").type == T.Q8_0
