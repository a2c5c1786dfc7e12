"""smolq migrate: legacy -> GGUF v3 equals what `smolq convert` writes directly.

For each family, the HF checkpoint is converted by smolq into every legacy
format it exists in and into GGUF v3; each legacy file is migrated to GGUF
v3 and both GGUF files are read back with gguf-py's GGUFReader (not smolq's
reader). Tensor names (in order), types and bytes must be equal, and so must
every metadata key, except the keys the migration lists as guesses; with
--config pointing at the checkpoint there must be no guesses at all.

Quantized legacy files: every tensor the report calls lossless decodes
(old layouts with a decoder written here from formats.md 5.2.1/5.2.2, the
GGUF side with gguf.quants) to exactly the source values; the others stay
within the reported max_abs.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from smolq.pipeline.convert import convert
from smolq.formats.legacy import read_legacy
from smolq.pipeline.migrate import migrate
from smolq.ggml_types import GGMLType
from smolq.tiny import make_tiny_model

T = GGMLType

LEGACY = {
    "llama": ("ggjt-v3", "ggjt-v2", "ggjt-v1", "ggmf", "ggml"),
    "gptj": ("ggml",),
    "mpt": ("ggmm", "ggml"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("migrate")
    return {fam: make_tiny_model(fam, root / fam) for fam in LEGACY}


def _field_value(reader: GGUFReader, key: str):
    f = reader.fields[key]
    if not f.types:
        return None
    if f.types[0].name == "ARRAY":
        return [bytes(f.parts[i]) if f.types[-1].name == "STRING" else f.parts[i].tolist() for i in f.data]
    if f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]])
    return f.parts[f.data[0]].tolist()


def read_both(a, b):
    ra, rb = GGUFReader(a), GGUFReader(b)
    meta_a = {k: _field_value(ra, k) for k in ra.fields if not k.startswith("GGUF.")}
    meta_b = {k: _field_value(rb, k) for k in rb.fields if not k.startswith("GGUF.")}
    return ra, rb, meta_a, meta_b


def assert_same_as_convert(migrated, direct, summary, tensors_too=True):
    ra, rb, ma, mb = read_both(migrated, direct)
    guessed = {g["key"] for g in summary["guesses"]}
    for key in set(ma) | set(mb):
        if key in guessed:
            continue
        assert ma.get(key) == mb.get(key), f"metadata {key} differs and is not listed as a guess"
    if tensors_too:
        assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
        for ta, tb in zip(ra.tensors, rb.tensors):
            assert ta.tensor_type == tb.tensor_type, ta.name
            assert list(ta.shape) == list(tb.shape), ta.name
            assert bytes(ta.data.tobytes()) == bytes(tb.data.tobytes()), ta.name


@pytest.mark.parametrize("family,fmt", [(f, x) for f, xs in LEGACY.items() for x in xs])
def test_every_legacy_version_migrates_to_what_convert_writes(models, tmp_path, family, fmt):
    hf = models[family]
    direct, legacy = tmp_path / "direct.gguf", tmp_path / "legacy.bin"
    convert(hf, direct, format="gguf", outtype="f16")
    convert(hf, legacy, format=fmt, outtype="f16")

    with_config = migrate(legacy, tmp_path / "cfg.gguf", config=hf)
    assert with_config["guesses"] == []
    assert_same_as_convert(tmp_path / "cfg.gguf", direct, with_config)

    guessed = migrate(legacy, tmp_path / "guess.gguf")
    assert guessed["guesses"], "a legacy header lacks values; they must be listed"
    keys = {g["key"] for g in guessed["guesses"]}
    assert "general.name" in keys
    if family == "llama":
        assert {"llama.context_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"} <= keys
    tensors_match = not (family == "mpt" and fmt == "ggmm")
    assert_same_as_convert(tmp_path / "guess.gguf", direct, guessed, tensors_too=tensors_match)
    assert all(t["lossless"] for t in guessed["tensors"]) or fmt == "ggmm"


def test_ggmm_f32_embedding_goes_back_to_f16(models, tmp_path):
    """GPT4All's ggmm forces wte to F32; an F16 file's GGUF holds it as F16, as convert writes it."""
    hf = models["mpt"]
    convert(hf, tmp_path / "direct.gguf", format="gguf", outtype="f16")
    convert(hf, tmp_path / "m.bin", format="ggmm", outtype="f16")
    assert read_legacy(tmp_path / "m.bin").tensor("transformer.wte.weight").type == T.F32
    s = migrate(tmp_path / "m.bin", tmp_path / "out.gguf", config=hf)
    assert_same_as_convert(tmp_path / "out.gguf", tmp_path / "direct.gguf", s)
    wte = next(t for t in s["tensors"] if t["name"] == "token_embd.weight")
    assert wte["action"] == "convert" and wte["type"] == "F16"


# ---------------------------------------------------------------- quantized legacy files

def decode_old(raw: np.ndarray, t: GGMLType, layout: str, n: int) -> np.ndarray:
    """Q4_0/Q4_1/Q5_1/Q8_0 in the v1/v2 layouts, from formats.md 5.2.1/5.2.2 (f32 scales for Q4/Q8)."""
    raw = np.asarray(raw, dtype=np.uint8)
    if t == T.Q8_0:
        b = raw.reshape(-1, 36)
        d = b[:, :4].copy().view("<f4")
        return (b[:, 4:].view(np.int8).astype(np.float32) * d).reshape(-1)[:n]
    if t in (T.Q4_0, T.Q4_1):
        size = 20 if t == T.Q4_0 else 24
        b = raw.reshape(-1, size)
        d = b[:, :4].copy().view("<f4")
        m = b[:, 4:8].copy().view("<f4") if t == T.Q4_1 else None
        qs = b[:, size - 16:]
        lo, hi = (qs & 15).astype(np.float32), (qs >> 4).astype(np.float32)
        q = np.stack([lo, hi], axis=2).reshape(-1, 32) if layout == "v1" else np.concatenate([lo, hi], axis=1)
        return (((q - 8) * d) if t == T.Q4_0 else (q * d + m)).reshape(-1)[:n]
    if t == T.Q5_1:
        b = raw.reshape(-1, 24)
        d = b[:, 0:2].copy().view("<f2").astype(np.float32)
        m = b[:, 2:4].copy().view("<f2").astype(np.float32)
        qh = b[:, 4:8].copy().view("<u4")
        qs = b[:, 8:]
        lo, hi = (qs & 15).astype(np.uint32), (qs >> 4).astype(np.uint32)
        q4 = np.stack([lo, hi], axis=2).reshape(-1, 32) if layout == "v1" else np.concatenate([lo, hi], axis=1)
        fifth = (qh >> np.arange(32, dtype=np.uint32)) & 1
        q = (q4 | (fifth << 4)).astype(np.float32)
        return (q * d + m).reshape(-1)[:n]
    raise AssertionError(t)


@pytest.mark.parametrize("fmt,outtype", [("ggjt-v1", "q4_0"), ("ggjt-v2", "q4_1"), ("ggjt-v1", "q5_1"),
                                         ("ggjt-v3", "q8_0")])
def test_quantized_legacy_decodes_equal_where_report_says_lossless(models, tmp_path, fmt, outtype):
    hf = models["llama"]
    legacy = tmp_path / "q.bin"
    convert(hf, legacy, format=fmt, outtype=outtype)
    s = migrate(legacy, tmp_path / "q.gguf", config=hf)
    lf = read_legacy(legacy)
    reader = GGUFReader(tmp_path / "q.gguf")
    report = {t["name"]: t for t in s["tensors"]}
    n_lossless = 0
    for rt in reader.tensors:
        entry = lf.tensor(report[rt.name]["source"])
        n = entry.n_elements
        if entry.type in (T.F32, T.F16):
            src = np.frombuffer(entry.load(), dtype="<f4" if entry.type == T.F32 else "<f2").astype(np.float32)
        elif entry.layout == "v3":
            src = gguf_dequantize(np.asarray(entry.load()), int(entry.type)).reshape(-1)
        else:
            src = decode_old(entry.load(), entry.type, entry.layout, n)
        dst = gguf_dequantize(rt.data, rt.tensor_type).reshape(-1).astype(np.float32)
        r = report[rt.name]
        if r["lossless"]:
            n_lossless += 1
            assert np.array_equal(src, dst), rt.name
        else:
            assert r["action"] == "relayout" and entry.layout != "v3"
            assert np.abs(src - dst).max() <= r["stats"]["max_abs"] * (1 + 1e-6)
            assert r["stats"]["max_abs"] <= np.abs(src).max() * 2**-10  # only the f16 rounding of scales
    assert n_lossless >= 5


def test_type_f32_makes_a_lossy_relayout_lossless(models, tmp_path):
    hf = models["llama"]
    convert(hf, tmp_path / "q.bin", format="ggjt-v1", outtype="q4_0")
    s = migrate(tmp_path / "q.bin", tmp_path / "q.gguf", config=hf, type="f32")
    assert s["n_lossy"] == 0
    moved = [t for t in s["tensors"] if t["action"] != "copy"]
    assert moved and all(t["type"] == "F32" and t["lossless"] for t in moved)


# ---------------------------------------------------------------- GGUF -> legacy, GGUF -> GGUF

@pytest.mark.parametrize("family,fmt", [(f, x) for f, xs in LEGACY.items() for x in xs])
def test_gguf_to_every_legacy_format_equals_convert(models, tmp_path, family, fmt):
    hf = models[family]
    convert(hf, tmp_path / "src.gguf", format="gguf", outtype="f16")
    convert(hf, tmp_path / "direct.bin", format=fmt, outtype="f16")
    s = migrate(tmp_path / "src.gguf", tmp_path / "migrated.bin", format=fmt)
    a, b = read_legacy(tmp_path / "migrated.bin"), read_legacy(tmp_path / "direct.bin")
    assert (a.container, a.version, a.family, a.dialect) == (b.container, b.version, b.family, b.dialect)
    assert a.hparams == b.hparams and a.ftype == b.ftype
    assert a.vocab == b.vocab and a.special_tokens == b.special_tokens
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.type == tb.type, ta.name
        if family == "mpt" and fmt == "ggmm" and ta.name == "transformer.wte.weight":
            # convert writes ggmm's F32 wte from the f32 checkpoint; from the F16 GGUF it is the F16 values.
            assert np.array_equal(np.frombuffer(ta.load(), "<f4"),
                                  np.frombuffer(tb.load(), "<f4").astype("<f2").astype("<f4"))
            continue
        assert np.array_equal(ta.load(), tb.load()), ta.name
    assert s["guesses"] == []


@pytest.mark.parametrize("version", [1, 2])
def test_gguf_versions_round_trip(models, tmp_path, version):
    convert(models["gptj"], tmp_path / "v3.gguf", format="gguf", outtype="f16")
    migrate(tmp_path / "v3.gguf", tmp_path / "old.gguf", format=f"gguf-v{version}")
    s = migrate(tmp_path / "old.gguf", tmp_path / "back.gguf")
    assert s["source_format"] == f"gguf-v{version}" and s["n_copied"] == s["n_tensors"]
    assert (tmp_path / "back.gguf").read_bytes() == (tmp_path / "v3.gguf").read_bytes()
