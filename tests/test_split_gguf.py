"""Split GGUF: smolq's shards against llama.cpp's rules, and llama.cpp's shards read by smolq.

What llama.cpp does (tools/gguf-split/gguf-split.cpp, gguf-py's GGUFWriter):
shards PREFIX-00001-of-0000N.gguf; each has split.no (UINT16, 0-based),
split.count (UINT16) and split.tensors.count (INT32, the whole set's); the
first shard also has every other KV, before the split keys; later shards have
only the three. Shards are read back here with the gguf package's GGUFReader
and loaded by llama.cpp (llama-cpp-python in a child process), not with
smolq's reader, except where smolq's reading is what is tested.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import smolq
from real_loaders import llama_cpp_logits, open_llama, require_llama_cpp
from smolq.formats.gguf import parse_size
from smolq.tiny import make_tiny_model
from tests.script_module import load_script
from tests.test_vs_llama_converter import converter_dir, run_llama_converter

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("split") / "hf"
    make_tiny_model("llama", d, gqa=True)
    return d


@pytest.fixture(scope="module")
def unsplit(tiny) -> Path:
    out = tiny.parent / "whole.gguf"
    smolq.convert(tiny, out, outtype="q8_0")
    return out


def _kvs(reader: GGUFReader) -> list[tuple[str, list, object]]:
    """(key, value types, value) of every KV after the three header fields."""
    return [(k, list(f.types), f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")]


def _tensors(reader: GGUFReader) -> list[tuple[str, int, list, bytes]]:
    return [(t.name, int(t.tensor_type), [int(x) for x in t.shape], bytes(np.asarray(t.data).reshape(-1).view(np.uint8)))
            for t in reader.tensors]


def _shards(first: Path) -> list[Path]:
    return sorted(first.parent.glob(first.name.replace("-00001-of-", "-*-of-")))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# ------------------------------------------------------------------ what smolq writes


def test_convert_split_shards_are_what_llama_cpp_writes(tiny, unsplit, tmp_path, cli):
    out = tmp_path / "model.gguf"
    r = cli("convert", tiny, out, "--outtype", "q8_0", "--split-max-tensors", "5", "-q")
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    whole = GGUFReader(str(unsplit))
    n = len(whole.tensors)
    count = -(-n // 5)
    paths = [tmp_path / f"model-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert sorted(tmp_path.iterdir()) == paths
    readers = [GGUFReader(str(p)) for p in paths]
    split_types = [[GGUFValueType.UINT16], [GGUFValueType.UINT16], [GGUFValueType.INT32]]
    for i, r_ in enumerate(readers):
        kvs = _kvs(r_)
        assert [(k, t) for k, t, _ in kvs[-3:]] == list(zip(SPLIT_KEYS, split_types))
        assert [v for _, _, v in kvs[-3:]] == [i, count, n]
        if i == 0:
            assert kvs[:-3] == _kvs(whole)  # every model KV, in order, in the first shard only
        else:
            assert len(kvs) == 3
        assert len(r_.tensors) == (5 if i < count - 1 else n - 5 * (count - 1))
    assert sum((_tensors(r_) for r_ in readers), []) == _tensors(whole)


def test_size_limit_follows_gguf_split(tiny, unsplit, tmp_path):
    limit = 40_000
    summary = smolq.split(unsplit, tmp_path / "p", split_max_size="40K")
    assert parse_size("40K") == limit
    readers = [GGUFReader(s["path"]) for s in summary["shards"]]
    assert len(readers) > 2

    def padded(t) -> int:
        return (int(t.n_bytes) + 31) // 32 * 32

    for i, r_ in enumerate(readers):
        size = sum(padded(t) for t in r_.tensors)
        assert size <= limit or len(r_.tensors) == 1
        if i + 1 < len(readers):  # the next shard starts where this one would overflow
            assert size + padded(readers[i + 1].tensors[0]) > limit


@pytest.mark.parametrize("how", ["split", "convert", "quantize", "migrate"])
def test_split_then_merge_is_byte_identical(tiny, unsplit, tmp_path, cli, how):
    if how == "split":
        whole = unsplit
        args = ["split", unsplit, tmp_path / "s", "--split-max-tensors", "4"]
    elif how == "convert":
        whole = unsplit
        args = ["convert", tiny, tmp_path / "s.gguf", "--outtype", "q8_0", "--split-max-size", "30K"]
    elif how == "quantize":
        f16 = tmp_path / "f16.gguf"
        smolq.convert(tiny, f16)
        whole = tmp_path / "q.gguf"
        smolq.quantize(f16, whole, type="q4_k_m")
        args = ["quantize", f16, tmp_path / "s.gguf", "--type", "q4_k_m", "--split-max-tensors", "7"]
    else:
        whole = tmp_path / "m.gguf"
        smolq.migrate(unsplit, whole)
        args = ["migrate", unsplit, tmp_path / "s.gguf", "--split-max-tensors", "6"]
    r = cli(*args, "-q")
    assert r.returncode == 0, r.stderr
    first = next(tmp_path.glob("s-00001-of-*.gguf"))
    assert len(_shards(first)) > 1
    r = cli("merge", first, tmp_path / "merged.gguf", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged.gguf").read_bytes() == whole.read_bytes()


def test_one_shard_plan_writes_the_plain_file(tiny, unsplit, tmp_path):
    out = tmp_path / "one.gguf"  # gguf-py: "Model fails split requirements, not splitting"
    s = smolq.convert(tiny, out, outtype="q8_0", split_max_tensors=1000)
    assert "shards" not in s and out.read_bytes() == unsplit.read_bytes()


def test_llama_cpp_loads_smolq_split_model(unsplit, tmp_path):
    require_llama_cpp()
    smolq.split(unsplit, tmp_path / "p", split_max_tensors=4)
    first = tmp_path / "p-00001-of-00006.gguf"
    assert first.exists()
    whole = open_llama(unsplit)
    tokens = [whole.tokenize(b"The dog sleeps while the fox jumps", add_bos=True)]
    want = llama_cpp_logits(whole, tokens)
    got = llama_cpp_logits(open_llama(first), tokens)
    assert np.array_equal(np.stack(got), np.stack(want))
    assert np.isfinite(np.stack(got)).all() and np.stack(got).std() > 0


# ------------------------------------------------------------------ what llama.cpp writes


def _gguf_py_split(src: Path, out: Path, max_tensors: int) -> Path:
    """src rewritten by gguf-py's GGUFWriter in split mode (the writer convert_hf_to_gguf uses)."""
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = GGUFWriter(out, arch, split_max_tensors=max_tensors)
    load_script("swap_tensors").copy_keys(reader, w)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out.with_name(f"{out.stem}-00001-of-{-(-len(reader.tensors) // max_tensors):05d}.gguf")


def test_inspect_lists_every_tensor_of_a_gguf_py_split_set(unsplit, tmp_path, cli):
    first = _gguf_py_split(unsplit, tmp_path / "gp.gguf", 6)
    assert len(_shards(first)) == 4
    r = cli("inspect", first, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    want = GGUFReader(str(unsplit))
    assert [t["name"] for t in report["tensors"]] == [t.name for t in want.tensors]
    assert report["header"]["shards"] == [str(p) for p in _shards(first)]
    assert smolq.open(first).n_tensors == len(want.tensors)
    r = cli("merge", first, tmp_path / "merged.gguf", "-q")
    assert r.returncode == 0, r.stderr
    merged = GGUFReader(str(tmp_path / "merged.gguf"))
    assert _tensors(merged) == _tensors(want)


def test_inspect_and_quantize_a_set_from_llama_cpp_converter(tiny, tmp_path, cli):
    conv = converter_dir()
    if conv is None:
        pytest.skip("llama.cpp's converter is not fetched (python scripts/fetch_llama_converter.py)")
    out = tmp_path / "ll.gguf"
    run_llama_converter(conv, [[str(tiny), "--outfile", str(out), "--outtype", "f16", "--split-max-tensors", "5"]],
                        {}, tmp_path)
    shards = sorted(tmp_path.glob("ll-*-of-*.gguf"))
    assert len(shards) > 2 and not out.exists()
    total = sum(len(GGUFReader(str(p)).tensors) for p in shards)
    r = cli("inspect", shards[0], "--json")
    assert r.returncode == 0, r.stderr
    names = [t["name"] for t in json.loads(r.stdout)["tensors"]]
    assert names == [t.name for p in shards for t in GGUFReader(str(p)).tensors] and len(names) == total
    r = cli("quantize", shards[0], tmp_path / "q.gguf", "--type", "q8_0", "-q")
    assert r.returncode == 0, r.stderr
    q = GGUFReader(str(tmp_path / "q.gguf"))
    assert len(q.tensors) == total and not any(k.startswith("split.") for k in q.fields)
    r = cli("verify", shards[0], "--against", tiny)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ bad input


@pytest.fixture
def set3(unsplit, tmp_path) -> list[Path]:
    smolq.split(unsplit, tmp_path / "a", split_max_tensors=8)
    return _shards(tmp_path / "a-00001-of-00003.gguf")


def _one_line_error(r, path: Path, words: str) -> None:
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], r.stderr


@pytest.mark.parametrize("command", ["inspect", "verify", "merge", "quantize", "migrate", "split"])
def test_missing_shard(set3, tmp_path, cli, command):
    set3[1].unlink()
    extra = {"merge": [tmp_path / "o.gguf"], "quantize": [tmp_path / "o.gguf", "--type", "q4_0"],
             "migrate": [tmp_path / "o.gguf"], "split": [tmp_path / "o", "--split-max-tensors", "2"]}
    before = sorted(os.listdir(tmp_path))
    r = cli(command, set3[0], *extra.get(command, []))
    _one_line_error(r, set3[1], "missing shard 2 of 3")
    assert sorted(os.listdir(tmp_path)) == before


def test_foreign_shard_other_count(set3, unsplit, tmp_path, cli):
    smolq.split(unsplit, tmp_path / "b", split_max_tensors=5)
    (tmp_path / "b-00002-of-00005.gguf").replace(set3[1])
    r = cli("merge", set3[0], tmp_path / "o.gguf")
    _one_line_error(r, set3[1], "foreign shard")
    assert "split.count is 5" in r.stderr and not (tmp_path / "o.gguf").exists()


def test_foreign_shard_same_count(set3, unsplit, tmp_path, cli):
    # Another split of the same model into 3 shards (9/9/3 tensors, not 8/8/5): same split.count
    # and split.tensors.count, but its second shard holds tensors the set has elsewhere.
    smolq.split(unsplit, tmp_path / "b", split_max_tensors=9)
    (tmp_path / "b-00002-of-00003.gguf").replace(set3[1])
    r = cli("merge", set3[0], tmp_path / "o.gguf")
    assert r.returncode == 2 and "foreign shard" in r.stderr and not (tmp_path / "o.gguf").exists(), r.stderr
    # A set of another model with 3 shards and 3 tensors: split.tensors.count tells it apart.
    w = GGUFWriter(tmp_path / "e.gguf", "llama", split_max_tensors=1)
    for name in "xyz":
        w.add_tensor(name, np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "e-00002-of-00003.gguf").replace(set3[1])
    r = cli("inspect", set3[0])
    _one_line_error(r, set3[1], "split.tensors.count is 3")


def test_not_the_first_shard(set3, cli):
    r = cli("inspect", set3[1])
    _one_line_error(r, set3[1], "is shard 2 of 3")
    assert "a-00001-of-00003.gguf" in r.stderr


def test_renamed_first_shard(set3, tmp_path, cli):
    renamed = tmp_path / "renamed.gguf"
    set3[0].rename(renamed)
    r = cli("inspect", renamed)
    _one_line_error(r, renamed, "-00001-of-00003.gguf")


def test_split_failure_leaves_nothing(unsplit, tmp_path, monkeypatch):
    from smolq.formats import gguf as fg

    from smolq import fileio

    calls = {"n": 0}
    real_write, real_copy = fg._write_tensor_data, fileio.OutputFile.copy_span

    def disk_full_at_15th_tensor():
        calls["n"] += 1
        if calls["n"] == 15:
            raise OSError(28, "No space left on device")

    def fail_late(fh, entry, data, endian):
        disk_full_at_15th_tensor()
        real_write(fh, entry, data, endian)

    def fail_late_copy(self, span):
        disk_full_at_15th_tensor()
        return real_copy(self, span)

    # Tensors are written from bytes or copied file to file (stored unchanged): fail either way.
    monkeypatch.setattr(fg, "_write_tensor_data", fail_late)
    monkeypatch.setattr(fileio.OutputFile, "copy_span", fail_late_copy)
    with pytest.raises(OSError):
        smolq.split(unsplit, tmp_path / "p", split_max_tensors=4)
    assert os.listdir(tmp_path) == []


def test_split_options_refused_for_legacy_and_bad_sizes(tiny, tmp_path, cli):
    r = cli("convert", tiny, tmp_path / "x.bin", "--split-max-tensors", "3")
    _one_line_error(r, tmp_path / "x.bin", "apply to GGUF outputs")
    r = cli("convert", tiny, tmp_path / "x.gguf", "--split-max-size", "2X")
    assert r.returncode == 2 and "--split-max-size" in r.stderr
    assert os.listdir(tmp_path) == []
    assert [parse_size(s) for s in ("2G", "500M", "64K", "123", 7)] == [2 * 10**9, 5 * 10**8, 64_000, 123, 7]
    r = cli("merge", tiny.parent / "whole.gguf", tmp_path / "y.gguf")
    assert r.returncode == 2 and "not a split GGUF" in r.stderr
