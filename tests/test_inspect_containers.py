"""`inspect` and `verify` on every container and version smolq reads.

Files are written by smolq's writers (checked against the spec in their own
tests); what is checked here is that inspect reports the container, version
and tensors, and that each reported offset really holds that tensor's bytes
(read straight from the file), and that verify decodes every tensor.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from smolq.formats.base import TensorEntry
from smolq.formats.legacy import write_legacy
from smolq.formats.legacy_tables import FORMAT_SPECS
from smolq.ggml_types import GGMLType as T
from tests.test_cli_support import run_cli

HPARAMS = {
    "llama": {"n_vocab": 6, "n_embd": 64, "n_mult": 32, "n_head": 4, "n_layer": 1, "n_rot": 16},
    "gptj": {"n_vocab": 6, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 1, "n_rot": 16},
    "mpt/ggml": {"d_model": 64, "max_seq_len": 128, "n_heads": 4, "n_layers": 1, "n_vocab": 6,
                 "alibi_bias_max": 8.0, "clip_qkv": 0.0},
    "mpt/ggmm": {"n_vocab": 6, "n_ctx": 128, "n_layer": 1, "n_head": 4, "n_embd": 64,
                 "alibi_bias_max": 8.0, "clip_qkv": 0.0},
}
NAMES = {"llama": ("norm.weight", "tok_embeddings.weight", "layers.0.attention.wq.weight"),
         "gptj": ("transformer.ln_f.weight", "transformer.wte.weight", "transformer.h.0.attn.q_proj.weight"),
         "mpt": ("transformer.norm_f.weight", "transformer.wte.weight", "transformer.blocks.0.attn.Wqkv.weight")}


def _entries(family: str, layout: str):
    """An F32 1-D tensor, an F16 matrix and a Q4_0 matrix (every legacy era holds these three)."""
    from smolq import kernels

    rng = np.random.default_rng(3)
    norm, embd, proj = NAMES[family]
    values = {norm: rng.standard_normal(64).astype(np.float32),
              embd: rng.standard_normal((6, 64)).astype(np.float32),
              proj: rng.standard_normal((64, 64)).astype(np.float32)}
    blobs = {norm: values[norm].tobytes(), embd: values[embd].astype("<f2").tobytes(),
             proj: kernels.quantize(values[proj], T.Q4_0, layout=layout).tobytes()}
    types = {norm: T.F32, embd: T.F16, proj: T.Q4_0}
    entries = [TensorEntry(n, types[n], values[n].shape, load=lambda b=blobs[n]: b, layout=layout) for n in values]
    return entries, blobs


def _legacy_cases():
    for spec in FORMAT_SPECS:
        for key in spec.eras:
            yield pytest.param(spec, key, id=f"{spec.family}-{spec.container}-{spec.dialect}-{key}")


def _check_offsets(report: dict, path, blobs: dict[str, bytes]) -> None:
    raw = path.read_bytes()
    assert [t["name"] for t in report["tensors"]] == list(blobs)
    for row in report["tensors"]:
        blob = blobs[row["name"]]
        assert row["bytes"] == len(blob)
        assert raw[row["offset"]:row["offset"] + row["bytes"]] == blob, row["name"]


@pytest.mark.parametrize("spec,key", list(_legacy_cases()))
def test_every_legacy_container(capsys, tmp_path, spec, key):
    from smolq.formats.legacy import layout_for

    version = None if spec.qntvr_in_ftype else key
    qntvr = key if spec.qntvr_in_ftype else None
    layout = spec.eras[key].layout
    assert layout == layout_for(spec.container, version, qntvr)
    entries, blobs = _entries(spec.family, layout)
    hp = dict(HPARAMS.get(spec.family) or HPARAMS[f"{spec.family}/{spec.container}"])
    vocab = [(f"t{i}".encode(), -float(i) if spec.vocab.scores else None) for i in range(6)]
    path = tmp_path / "m.bin"
    write_legacy(path, spec.container, version, spec.family, hp, vocab, entries, dialect=spec.dialect, qntvr=qntvr)

    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["container"] == spec.container
    assert report["version"] == (version if spec.container != "ggmf" else 1)
    assert report["architecture"] == spec.family
    if (spec.family, spec.dialect) != ("gptj", "gpt4all"):
        assert report["header"]["dialect"] == spec.dialect
    # else: a GPT4All GPT-J file whose n_vocab is outside [50300, 50400] reads the same as a
    # ggml-examples qntvr-0 file (same header, same v1 blocks); either answer is right.
    assert report["vocab"]["count"] == 6 and report["vocab"]["tokens"][:2] == ["t0", "t1"]
    for name, value in hp.items():
        assert report["hyperparameters"][name] == pytest.approx(value)
    _check_offsets(report, path, blobs)
    rc, out, err = run_cli(capsys, "inspect", path)
    assert rc == 0 and spec.container in out

    rc, out, err = run_cli(capsys, "verify", path, "--json")
    assert rc == 0, err
    assert json.loads(out)["summary"]["n_problems"] == 0


@pytest.mark.parametrize("version, endian", [(1, "<"), (2, "<"), (3, "<"), (3, ">")])
def test_every_gguf_version_and_byte_order(capsys, tmp_path, version, endian):
    from smolq.formats.gguf import MetaValue, write_gguf

    entries, blobs = _entries("llama", "v3")
    meta = {"general.architecture": MetaValue.string("llama"), "llama.block_count": MetaValue.u32(1),
            "tokenizer.ggml.tokens": MetaValue.array([f"t{i}" for i in range(12)], "string")}
    path = tmp_path / "m.gguf"
    write_gguf(path, meta, entries, version=version, endian=endian)
    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert (report["container"], report["version"]) == ("gguf", version)
    assert report["endian"] == ("little" if endian == "<" else "big")
    tokens = report["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["count"] == 12 and tokens["value"] == [f"t{i}" for i in range(8)] and tokens["truncated"]
    if endian == "<":
        _check_offsets(report, path, blobs)
    else:  # element types are stored byte-swapped; block data as is
        import gguf

        r = gguf.GGUFReader(str(path))
        assert r.endianess == gguf.GGUFEndian.BIG
        assert [t.data_offset for t in r.tensors] == [row["offset"] for row in report["tensors"]]
    rc, out, err = run_cli(capsys, "verify", path, "--json")
    if endian == "<":
        assert rc == 0, err
    else:  # Q4_0 blocks in a big-endian GGUF are ambiguous (gguf.py docstring): reported, not guessed
        problems = {r["name"]: r["problems"] for r in json.loads(out)["tensors"]}
        assert rc == 1 and "big-endian" in problems["layers.0.attention.wq.weight"][0]
        assert problems["norm.weight"] == [] and problems["tok_embeddings.weight"] == []
