"""Write -> read -> write for every legacy family/container/dialect/version, every storable type."""
from __future__ import annotations

import numpy as np
import pytest

from smolq.formats.base import TensorEntry
from smolq.formats.legacy import (
    find_n_mult,
    layout_for,
    llama_n_ff,
    read_legacy,
    storable_types,
    write_legacy,
)
from smolq.formats.legacy_tables import FORMAT_SPECS
from smolq.ggml_types import GGMLType as T
from smolq.ggml_types import tensor_nbytes
from smolq.errors import FormatError, InputError

HPARAMS = {
    "llama": {"n_vocab": 6, "n_embd": 256, "n_mult": 32, "n_head": 8, "n_layer": 2, "n_rot": 32},
    "gptj": {"n_vocab": 6, "n_ctx": 512, "n_embd": 256, "n_head": 8, "n_layer": 2, "n_rot": 16},
    "mpt/ggml": {"d_model": 256, "max_seq_len": 512, "n_heads": 8, "n_layers": 2, "n_vocab": 6,
                 "alibi_bias_max": 8.0, "clip_qkv": 0.5},
    "mpt/ggmm": {"n_vocab": 6, "n_ctx": 512, "n_layer": 2, "n_head": 8, "n_embd": 256,
                 "alibi_bias_max": 8.0, "clip_qkv": 0.0},
}


def hparams_for(spec):
    return dict(HPARAMS.get(spec.family) or HPARAMS[f"{spec.family}/{spec.container}"])


def combos():
    for spec in FORMAT_SPECS:
        for key in spec.eras:
            yield pytest.param(spec, key, id=f"{spec.family}-{spec.container}-{spec.dialect}-{key}")


def random_tensors(types, layout, seed=0):
    rng = np.random.default_rng(seed)
    out = [TensorEntry("norm.weight", T.F32, (256,), layout=layout)]
    out += [TensorEntry(f"w.{t.name}", t, (3, 256), layout=layout) for t in sorted(types)]
    for e in out:
        data = rng.integers(0, 256, tensor_nbytes(e.type, e.shape, layout), dtype=np.uint8)
        e.load = lambda d=data: d
    return out


@pytest.mark.parametrize("spec,key", list(combos()))
def test_round_trip(spec, key, tmp_path):
    version = None if spec.qntvr_in_ftype else key
    qntvr = key if spec.qntvr_in_ftype else None
    era = spec.eras[key]
    tensors = random_tensors(era.type_ids.values(), era.layout)
    scores = spec.vocab.scores
    vocab = [(bytes([i]) * i, float(i) / 4 - 1 if scores else None) for i in range(6)]
    special = {1, 5} if spec.vocab.special_bit else set()
    ftype = min(spec.ftype_of.values(), key=lambda v: abs(v - 2))
    path = tmp_path / "a.bin"
    seen = []
    write_legacy(path, spec.container, version, spec.family, hparams_for(spec), vocab, tensors,
                 dialect=spec.dialect, ftype=ftype, qntvr=qntvr, special_tokens=special, on_tensor=seen.append)
    assert [e.name for e in seen] == [e.name for e in tensors]

    lf = read_legacy(path, family=spec.family, dialect=spec.dialect)
    assert (lf.container, lf.family, lf.dialect, lf.layout) == (spec.container, spec.family, spec.dialect,
                                                                 era.layout)
    assert lf.version == (version if version is not None else (1 if spec.container == "ggmf" else None))
    assert (lf.ftype, lf.qntvr) == (ftype, qntvr)
    assert lf.hparams == hparams_for(spec)
    assert lf.vocab == vocab and lf.special_tokens == special
    assert [(e.name, e.type, e.shape) for e in lf.tensors] == [(e.name, e.type, e.shape) for e in tensors]
    for got, want in zip(lf.tensors, tensors):
        np.testing.assert_array_equal(got.load(), want.load())

    # Rewriting what was read gives the same bytes.
    again = tmp_path / "b.bin"
    write_legacy(again, lf.container, lf.version, lf.family, lf.hparams, lf.vocab, lf.tensors,
                 dialect=lf.dialect, ftype=lf.ftype, qntvr=lf.qntvr, special_tokens=lf.special_tokens)
    assert again.read_bytes() == path.read_bytes()
    # Detection without hints agrees where the bytes are unambiguous.
    if spec.dialect != "gpt4all" or spec.container == "ggmm":
        auto = read_legacy(path)
        assert (auto.family, auto.dialect) == (spec.family, spec.dialect)
    lf.close()


def test_migrate_unquantized_between_containers(tmp_path):
    """F32/F16 tensors have one layout, so they move between any two versions unchanged."""
    src = tmp_path / "v1.bin"
    tensors = random_tensors([T.F16], "v1")
    vocab = [(b"a", 0.0)] * 6
    write_legacy(src, "ggjt", 1, "llama", HPARAMS["llama"], vocab, tensors, ftype=1)
    lf = read_legacy(src)
    for container, version in (("ggml", None), ("ggmf", 1), ("ggjt", 2), ("ggjt", 3)):
        dst = tmp_path / f"{container}{version}.bin"
        write_legacy(dst, container, version, "llama", lf.hparams, lf.vocab, lf.tensors, ftype=lf.ftype)
        back = read_legacy(dst)
        assert back.container == container and back.family == "llama"
        for a, b in zip(lf.tensors, back.tensors):
            assert bytes(a.load()) == bytes(b.load())


def test_ftype_and_qntvr_defaults(tmp_path):
    path = tmp_path / "g.bin"
    hp = {"n_vocab": 1, "n_ctx": 8, "n_embd": 32, "n_head": 1, "n_layer": 1, "n_rot": 8}
    q = TensorEntry("w", T.Q4_0, (2, 32), load=lambda: bytes(36), layout="v3")
    write_legacy(path, "ggml", None, "gptj", hp, [(b"x", None)], [q])
    lf = read_legacy(path)
    assert (lf.qntvr, lf.ftype, lf.stored_ftype, lf.layout) == (2, 2, 2002, "v3")
    write_legacy(path, "ggml", None, "gptj", hp, [(b"x", None)],
                 [TensorEntry("w", T.F16, (2, 32), load=lambda: bytes(128))])
    lf = read_legacy(path)
    assert (lf.qntvr, lf.ftype, lf.stored_ftype) == (0, 1, 1)


def test_layout_table():
    assert [layout_for("ggjt", v) for v in (1, 2, 3)] == ["v1", "v2", "v3"]
    assert layout_for("ggml") == layout_for("ggmf", 1) == layout_for("ggmm") == "v1"
    assert [layout_for("ggml", None, q) for q in (0, 1, 2)] == ["v1", "v2", "v3"]
    with pytest.raises(ValueError):
        layout_for("ggjt", 4)
    assert T.Q4_2 in storable_types("ggjt", 1) and T.Q4_2 not in storable_types("ggjt", 2)
    assert T.Q4_K in storable_types("ggjt", 3) and T.Q4_K not in storable_types("ggjt", 2)
    assert storable_types("ggml", None, "gptj", "gpt4all") == {T.F32, T.F16, T.Q4_0, T.Q4_1}
    assert T.Q5_0 in storable_types("ggmm", None, "mpt")


def test_llama_n_mult():
    # 7B: n_mult 256 -> 11008 (formats.md 2.1 formula, by hand: 8*4096//3 = 10922 -> 43*256).
    assert llama_n_ff(4096, 256) == 11008
    assert llama_n_ff(5120, 256) == 13824
    for n_embd, n_ff in ((4096, 11008), (5120, 13824), (6656, 17920), (8192, 28672), (2048, 5632)):
        n_mult = find_n_mult(n_embd, n_ff)
        assert llama_n_ff(n_embd, n_mult) == n_ff
        assert all(llama_n_ff(n_embd, m) != n_ff for m in range(n_mult + 1, 8193))
    with pytest.raises(InputError, match="no n_mult"):
        find_n_mult(4096, 100)


def test_multi_part_llama_is_merged(tmp_path):
    """Two 'ggmf' parts (formats.md 4.3): tok_embeddings/wo/w2 split by columns, others by rows, 1-D copied."""
    rng = np.random.default_rng(5)
    hp = {"n_vocab": 2, "n_embd": 64, "n_mult": 16, "n_head": 4, "n_layer": 1, "n_rot": 16}
    vocab = [(b"a", 0.0), (b"b", 1.0)]
    full = {  # PyTorch shapes of the whole model, and the split dim
        "tok_embeddings.weight": ((2, 64), T.F16, 1),
        "norm.weight": ((64,), T.F32, None),
        "layers.0.attention.wq.weight": ((64, 64), T.Q4_0, 0),
        "layers.0.attention.wo.weight": ((64, 64), T.Q4_0, 1),
    }
    data = {}
    for name, (shape, t, _) in full.items():
        rows = shape[0] if len(shape) == 2 else 1
        data[name] = rng.integers(0, 256, tensor_nbytes(t, shape, "v1"), dtype=np.uint8).reshape(rows, -1)
    for k in range(2):
        entries = []
        for name, (shape, t, axis) in full.items():
            d = data[name]
            if axis is None:
                part, pshape = d, shape
            elif axis == 0:
                part, pshape = np.split(d, 2, axis=0)[k], (shape[0] // 2, shape[1])
            else:
                part, pshape = np.split(d, 2, axis=1)[k], (shape[0], shape[1] // 2)
            entries.append(TensorEntry(name, t, pshape, load=lambda p=np.ascontiguousarray(part): p, layout="v1"))
        write_legacy(tmp_path / ("m.bin" if k == 0 else "m.bin.1"), "ggmf", 1, "llama", hp, vocab, entries, ftype=2)
    lf = read_legacy(tmp_path / "m.bin")
    assert lf.parts == (str(tmp_path / "m.bin.1"),)
    for name, (shape, t, _) in full.items():
        got = lf.tensor(name)
        assert (got.shape, got.type) == (shape, t)
        np.testing.assert_array_equal(np.asarray(got.load()).reshape(-1), data[name].reshape(-1))
    lf.close()
    (tmp_path / "m.bin.1").unlink()
    with pytest.raises(FormatError, match="part 1 .* is missing"):
        read_legacy(tmp_path / "m.bin")
