"""The I/O path (smolq.fileio): file-to-file copies of unchanged tensors, write-behind,
input pages released tensor by tensor, the phase profile, and overlap of produce/write.

Every copied file is checked against bytes computed independently of the copy
path (the same tensors written from their loaded bytes, or gguf-py's reader).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from smolq import fileio
from smolq.errors import InputError
from smolq.fileio import FileSpan, MappedWindow, OutputFile, SpanLoad, produce_ahead
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import read_gguf, write_gguf
from smolq.ggml_types import GGMLType
from smolq.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _f32_entries(rng, shapes):
    out = []
    for i, shape in enumerate(shapes):
        data = rng.standard_normal(shape).astype(np.float32)
        out.append(TensorEntry(f"t{i}.weight", GGMLType.F32, shape, load=lambda d=data: d))
    return out


@pytest.fixture()
def source_gguf(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "src.gguf"
    write_gguf(path, {}, _f32_entries(rng, [(64, 33), (5,), (128, 256), (3, 7)]))
    return path


def _plain(entries):
    """The same tensors with loaders that are not SpanLoads: written from their bytes."""
    return [TensorEntry(e.name, e.type, e.shape, load=(lambda f=e.load: np.array(f())), layout=e.layout)
            for e in entries]


def test_unchanged_tensors_are_copied_and_equal_the_written_bytes(source_gguf, tmp_path, monkeypatch):
    copies = []
    real = OutputFile.copy_span
    monkeypatch.setattr(OutputFile, "copy_span", lambda self, span: copies.append(span) or real(self, span))
    with read_gguf(source_gguf) as gf:
        assert all(isinstance(t.load, SpanLoad) for t in gf.tensors)
        write_gguf(tmp_path / "copied.gguf", {}, gf.tensors)
        write_gguf(tmp_path / "written.gguf", {}, _plain(gf.tensors))
    assert len(copies) == 4
    assert (tmp_path / "copied.gguf").read_bytes() == (tmp_path / "written.gguf").read_bytes()
    reader = GGUFReader(tmp_path / "copied.gguf")
    src = GGUFReader(source_gguf)
    for a, b in zip(reader.tensors, src.tensors):
        assert a.name == b.name and np.array_equal(a.data, b.data)


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_falls_back_to_reading_where_copy_file_range_is_refused(source_gguf, tmp_path, monkeypatch, err):
    def refuse(*_a, **_k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(fileio, "FALLBACK_CHUNK", 1000)  # several reads per tensor
    with read_gguf(source_gguf) as gf:
        write_gguf(tmp_path / "copied.gguf", {}, gf.tensors)
        write_gguf(tmp_path / "written.gguf", {}, _plain(gf.tensors))
    assert (tmp_path / "copied.gguf").read_bytes() == (tmp_path / "written.gguf").read_bytes()


def test_copy_of_a_span_past_the_source_end_fails_and_leaves_nothing(tmp_path):
    src = tmp_path / "short.bin"
    src.write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    entry = TensorEntry("w", GGMLType.F32, (512,), load=SpanLoad(FileSpan(src, 0, 2048), lambda: b""))
    with pytest.raises(OSError, match="ended"):
        write_gguf(tmp_path / "out.gguf", {}, [entry])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.bin"]


def test_a_transformed_tensor_is_never_copied_raw(source_gguf, tmp_path):
    """Wrapping a SpanLoad (what every transform does) yields a plain loader: its bytes are written."""
    with read_gguf(source_gguf) as gf:
        t = gf.tensors[0]
        doubled = TensorEntry(t.name, t.type, t.shape, load=lambda f=t.load: np.frombuffer(f(), np.float32) * 2)
        assert fileio.span_of(doubled.load) is None
        write_gguf(tmp_path / "x.gguf", {}, [doubled])
        want = np.frombuffer(t.load(), np.float32) * 2
    got = GGUFReader(tmp_path / "x.gguf").tensors[0].data.reshape(-1)
    assert np.array_equal(got, want)


def test_write_behind_asks_for_every_finished_window_in_order(tmp_path, monkeypatch):
    calls, waits = [], []

    def writeback(fd, off, n, wait=False):
        (waits if wait else calls).append((off, n))

    monkeypatch.setattr(fileio, "_START_WRITEBACK", writeback)
    with open(tmp_path / "f", "wb") as raw:
        out = OutputFile(raw, write_behind=1000)
        for _ in range(10):
            out.write(b"x" * 450)
        out.settle()
    # windows end where a write first takes the unrequested bytes to 1000 or more: 1350, 2700, 4050
    assert calls == [(0, 1350), (1350, 1350), (2700, 1350)]
    assert waits == calls[:-1]  # each window is waited for once the next one has started
    assert (tmp_path / "f").stat().st_size == 4500


def test_produce_ahead_keeps_order_raises_at_the_failing_item_and_holds_two_results():
    alive = {"n": 0, "max": 0}

    class Result:
        def __init__(self, i):
            self.i = i
            alive["n"] += 1
            alive["max"] = max(alive["max"], alive["n"])

        def __del__(self):
            alive["n"] -= 1

    def produce(i):
        if i == 7:
            raise ValueError("bad item 7")
        return Result(i)

    seen = []
    with pytest.raises(ValueError, match="bad item 7"):
        for i, r in produce_ahead(range(10), produce):
            seen.append(r.i)
            del r
    assert seen == list(range(7))
    assert alive["max"] <= 2


def test_mapped_window_keeps_about_one_tensor_resident(tmp_path):
    """Touch eight 8 MiB tensors of a mapped GGUF one after the other: the file pages this
    process holds (RssFile) grow by about one tensor, not by all eight."""
    code = r"""
import sys, numpy as np
from smolq.formats.gguf import read_gguf
def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
gf = read_gguf(sys.argv[1])
before = rss_file()
peak = 0
for t in gf.tensors:
    float(np.frombuffer(t.load(), np.float32).sum())  # touches every page
    peak = max(peak, rss_file() - before)
print(peak)
"""
    rng = np.random.default_rng(1)
    path = tmp_path / "big.gguf"
    write_gguf(path, {}, _f32_entries(rng, [(2048, 1024)] * 8))
    mib = 1 << 20
    peak = int(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout)
    assert peak <= 20 * mib, f"{peak / mib:.0f} MiB of the 64 MiB file stayed resident"


def test_mapped_window_views_stay_valid_after_release(tmp_path):
    import mmap

    path = tmp_path / "f.bin"
    data = np.arange(1 << 20, dtype=np.uint32)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    w = MappedWindow(mm)
    first = np.frombuffer(w.view(0, 1 << 21), np.uint32)
    second = np.frombuffer(w.view(1 << 21, 1 << 21), np.uint32)  # releases the first view's pages
    assert np.array_equal(first, data[: 1 << 19]) and np.array_equal(second, data[1 << 19:])
    del first, second


def test_profile_file_names_every_phase_of_a_convert(tmp_path):
    tiny_llama_dir = make_tiny_model("llama", tmp_path / "hf", hidden_size=256, dtype="float16")
    prof = tmp_path / "phases.json"
    out = tmp_path / "m.gguf"
    subprocess.run([sys.executable, "-m", "smolq", "convert", str(tiny_llama_dir), str(out), "--outtype", "f16"],
                   env={**os.environ, "SMOLQ_PROFILE": str(prof)}, check=True, capture_output=True, cwd=REPO)
    phases = json.loads(prof.read_text())
    n = len(GGUFReader(out).tensors)
    assert {"fsync", "rename"} <= phases.keys()
    assert phases.get("copy", {}).get("calls", 0) + phases.get("produce", {}).get("calls", 0) == n
    assert phases["copy"]["calls"] > 0  # the f16 weights stored unchanged were copied, not rewritten


def test_bad_tensor_size_is_still_one_line(tmp_path):
    bad = TensorEntry("w", GGMLType.F32, (8,), load=lambda: bytes(31))
    with pytest.raises(InputError, match="load\\(\\) returned 31 bytes"):
        write_gguf(tmp_path / "x.gguf", {}, [bad])
    assert list(tmp_path.iterdir()) == []
