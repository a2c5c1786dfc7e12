"""Mutated and truncated legacy files: only FormatError escapes, and memory stays bounded."""
from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolq.errors import FormatError
from smolq.formats.base import TensorEntry
from smolq.formats.legacy import read_legacy, write_legacy
from smolq.formats.legacy_tables import FORMAT_SPECS
from smolq.ggml_types import GGMLType as T
from smolq.ggml_types import tensor_nbytes

HP = {
    "llama": {"n_vocab": 3, "n_embd": 32, "n_mult": 16, "n_head": 4, "n_layer": 1, "n_rot": 8},
    "gptj": {"n_vocab": 3, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_rot": 8},
    "mpt/ggml": {"d_model": 32, "max_seq_len": 64, "n_heads": 4, "n_layers": 1, "n_vocab": 3,
                 "alibi_bias_max": 8.0, "clip_qkv": 0.0},
    "mpt/ggmm": {"n_vocab": 3, "n_ctx": 64, "n_layer": 1, "n_head": 4, "n_embd": 32,
                 "alibi_bias_max": 8.0, "clip_qkv": 0.0},
}


def base_files():
    """One small valid file per (family, container, dialect, version/qntvr)."""
    out = []
    for spec in FORMAT_SPECS:
        for key in spec.eras:
            era = spec.eras[key]
            quant = T.Q4_0 if T.Q4_0 in era.type_ids.values() else T.Q4_1
            tensors = []
            for name, t, shape in (("norm", T.F32, (32,)), ("emb", T.F16, (3, 32)), ("wq", quant, (2, 32))):
                data = bytes(np.arange(tensor_nbytes(t, shape, era.layout), dtype=np.uint8))
                tensors.append(TensorEntry(name, t, shape, load=lambda d=data: d, layout=era.layout))
            hp = HP.get(spec.family) or HP[f"{spec.family}/{spec.container}"]
            vocab = [(b"tok%d" % i, 0.5 * i if spec.vocab.scores else None) for i in range(3)]
            out.append((spec, key, hp, vocab, tensors))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy_fuzz")
    files = []
    for i, (spec, key, hp, vocab, tensors) in enumerate(base_files()):
        path = d / f"base{i}.bin"
        write_legacy(path, spec.container, None if spec.qntvr_in_ftype else key, spec.family, hp, vocab, tensors,
                     dialect=spec.dialect, ftype=2 if spec.dialect == "gpt4all" else 1,
                     qntvr=key if spec.qntvr_in_ftype else None)
        read_legacy(path)  # every base file is valid
        files.append(path.read_bytes())
    return d, files


# A mutation: truncate, overwrite one byte, overwrite one aligned 32-bit word (hits lengths/counts/dims),
# insert or delete bytes. Positions are fractions of the file length so every region gets hit.
frac = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
word_values = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 4, 5, 9, 31, 32, 0x7FFFFFFF,
                                                                     0x80000000, 0xFFFFFFFF, 1000, 2002, 50400]))
mutation = st.one_of(
    st.tuples(st.just("truncate"), frac, st.just(0)),
    st.tuples(st.just("byte"), frac, st.integers(0, 255)),
    st.tuples(st.just("word"), frac, word_values),
    st.tuples(st.just("insert"), frac, st.integers(1, 40)),
    st.tuples(st.just("delete"), frac, st.integers(1, 40)),
)


def mutate(data: bytes, muts) -> bytes:
    buf = bytearray(data)
    for kind, where, value in muts:
        pos = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "byte" and buf:
            buf[pos] = value
        elif kind == "word" and len(buf) >= 4:
            pos = min(pos - pos % 4, len(buf) - 4)
            buf[pos:pos + 4] = struct.pack("<I", value)
        elif kind == "insert":
            buf[pos:pos] = bytes([value]) * value
        elif kind == "delete":
            del buf[pos:pos + value]
    return bytes(buf)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 100), muts=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_raise_only_format_error(corpus, index, muts):
    directory, files = corpus
    data = mutate(files[index % len(files)], muts)
    path = directory / "mutant.bin"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        lf = read_legacy(path)
        for t in lf.tensors:
            view = t.load()
            assert len(view) == t.nbytes and t.offset + t.nbytes <= len(data)
        lf.close()
    except FormatError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Small files, small parse: never anything like a header-claimed size.
    assert peak < 1_000_000 + 200 * len(data)
