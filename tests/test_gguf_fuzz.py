"""Corrupted GGUF files: reading and loading either works or raises FormatError, in bounded memory.

Seeds are small valid files of every version and byte order. Mutations flip
bytes, overwrite 4/8-byte windows with huge counts or lengths, and truncate.
Any exception other than smolq's FormatError escapes and fails the test;
tracemalloc shows no claimed count turned into a big allocation.
"""
from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolq.errors import FormatError
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import Metadata, MetaValue, read_gguf, write_gguf
from smolq.ggml_types import GGMLType

MEMORY_LIMIT = 2 << 20  # bytes of Python/numpy allocation per read; seeds are < 1 KiB


def seed_metadata(version: int) -> Metadata:
    m = Metadata()
    m["general.architecture"] = MetaValue.string("llama")
    m["general.alignment"] = MetaValue.u32(16)
    m["t.tokens"] = MetaValue.array(["<s>", "a", "bcd"], "string")
    m["t.scores"] = MetaValue.array([0.0, -1.5, 2.0], "f32")
    m["t.flag"] = MetaValue.boolean(True)
    m["t.nested"] = MetaValue.array([MetaValue.array([1, 2], "u16"), MetaValue.array(["x"], "string")], "array")
    if version >= 2:
        m["t.big"] = MetaValue.u64(2**40)
    return m


def seed_tensors() -> list[TensorEntry]:
    f32 = np.arange(8, dtype="<f4")
    f16 = np.arange(6, dtype="<f2").reshape(2, 3)
    q8 = bytes(range(34))
    return [TensorEntry("f32", GGMLType.F32, (8,), load=lambda: f32),
            TensorEntry("f16", GGMLType.F16, (2, 3), load=lambda: f16),
            TensorEntry("q8", GGMLType.Q8_0, (1, 32), load=lambda: q8)]


SEED_KEYS = [(v, e) for v in (1, 2, 3) for e in "<>"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[tuple[int, str], bytes]:
    d = tmp_path_factory.mktemp("seeds")
    out = {}
    for v, e in SEED_KEYS:
        p = d / f"v{v}{'le' if e == '<' else 'be'}.gguf"
        write_gguf(p, seed_metadata(v), seed_tensors(), version=v, endian=e)
        out[(v, e)] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "f.gguf"


def put(path, data: bytes) -> None:
    # Unlink first: rewriting a file in place makes ext4 flush it (auto_da_alloc), 40x slower.
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def read_all(path) -> int:
    """Read and load every tensor; return the tracemalloc peak. Only FormatError may escape."""
    tracemalloc.start()
    try:
        try:
            with read_gguf(path) as f:
                for t in f.tensors:
                    assert len(t.load()) == t.nbytes
        except FormatError as exc:
            assert exc.path == str(path) and exc.message
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_seeds_are_valid(seeds, scratch):
    for key, data in seeds.items():
        put(scratch, data)
        with read_gguf(scratch) as f:
            assert (f.version, f.endian) == key and len(f.tensors) == 3


def test_every_truncation(seeds, scratch):
    """A prefix of a valid file fails cleanly (or reads, if only trailing padding is lost)."""
    for data in seeds.values():
        for cut in range(len(data)):
            put(scratch, data[:cut])
            assert read_all(scratch) < MEMORY_LIMIT


HUGE = [0xFFFFFFFF, 0x80000000, 2**32, 2**60, 2**63, 2**64 - 1, 0, 5, 13, 31, 2**31 + 1]

mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("huge"), st.integers(0, 2**20), st.sampled_from([4, 8]), st.sampled_from(HUGE)),
    st.tuples(st.just("cut"), st.integers(0, 2**20)),
)


def mutate(data: bytes, endian: str, mutation) -> bytes:
    b = bytearray(data)
    kind = mutation[0]
    if kind == "flip":
        for pos, value in mutation[1]:
            b[pos % len(b)] = value
    elif kind == "huge":
        _, pos, width, value = mutation
        pos %= len(b) - width
        b[pos:pos + width] = struct.pack(endian + ("I" if width == 4 else "Q"), value % (1 << (8 * width)))
    else:
        del b[mutation[1] % len(b):]
    return bytes(b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(SEED_KEYS), mutation=mutations)
def test_mutated_files(seeds, scratch, key, mutation):
    put(scratch, mutate(seeds[key], key[1], mutation))
    assert read_all(scratch) < MEMORY_LIMIT


@pytest.mark.parametrize("key", [(1, "<"), (3, ">")])
def test_huge_value_at_every_offset(seeds, scratch, key):
    """Every 4- and 8-byte window overwritten with all ones: each count/length/dim gets its turn."""
    data = seeds[key]
    for width in (4, 8):
        for pos in range(len(data) - width):
            put(scratch, data[:pos] + b"\xff" * width + data[pos + width:])
            assert read_all(scratch) < MEMORY_LIMIT
