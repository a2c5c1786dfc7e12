"""smolq zoo end to end on tiny LLaMA / GPT-J / MPT checkpoints.

The outputs are read back with gguf-py (GGUFReader, gguf.quants) and
struct, the sources with safetensors, and perplexity is recomputed with
transformers: none of these go through the zoo's own code.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smolq.zoo import report as zreport
from smolq.zoo.manifest import load_manifest
from smolq.zoo.runner import LOCK_NAME, RunOptions, run_zoo

FAMILIES = ("llama", "gptj", "mpt")
N_OUTPUTS = 7

MANIFEST = """
[zoo]
out = "unused"
[gates]
max_rmse = 1.0
max_size = "10 MiB"

[[models]]
name = "llama"
source = "{src}/llama"
  [[models.outputs]]
  type = "q4_0"
  [[models.outputs]]
  type = "q4_k_m"
  [[models.outputs]]
  container = "ggjt"
  version = 3
  type = "q4_0"

[[models]]
name = "gptj"
source = "{src}/gptj"
  [[models.outputs]]
  type = "q4_0"
  [[models.outputs]]
  name = "small"
  type = "{gptj_small}"

[[models]]
name = "mpt"
source = "{src}/mpt"
  [[models.outputs]]
  type = "q4_0"
  gates = {{ max_rmse = {mpt_gate} }}
  [[models.outputs]]
  type = "q4_k_m"
{extra}
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("zoo-sources")
    for i, family in enumerate(FAMILIES):
        make_tiny_model(family, root / family, seed=10 + i)
    return root


def manifest(tmp_path: Path, sources: Path, gptj_small: str = "q4_k_m", mpt_gate: float = 1.0, extra: str = "",
             name: str = "zoo.toml") -> Path:
    p = tmp_path / name
    p.write_text(MANIFEST.format(src=sources, gptj_small=gptj_small, mpt_gate=mpt_gate, extra=extra))
    return p


def run(manifest_path: Path, out: Path, **opts) -> dict:
    opts.setdefault("quiet", True)
    return run_zoo(load_manifest(manifest_path, out), RunOptions(**opts))


def read_lock(out: Path) -> dict:
    return json.loads((out / LOCK_NAME).read_text())


def without_timings(lock: dict) -> dict:
    lock = copy.deepcopy(lock)
    for entry in lock["outputs"].values():
        entry.pop("timing", None)
    return lock


def statuses(rep: dict) -> dict[str, str]:
    return {r["id"]: r["status"] for r in zreport.rows_of(rep)}


def output_files(out: Path) -> dict[str, bytes]:
    """Every file a build left outside the cache directory (lock and reports aside), with its contents."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".zoo" not in p.relative_to(out).parts
            and p.name not in ("report.json", "report.md", LOCK_NAME)}


@pytest.fixture(scope="module")
def full(tmp_path_factory, sources):
    """The reference build: every output, unsharded, two jobs."""
    root = tmp_path_factory.mktemp("zoo-full")
    m = manifest(root, sources)
    rep = run(m, root / "out", jobs=2)
    return root / "out", rep


def copy_build(full_out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(full_out, dst)
    return dst


# --------------------------------------------------------------------------- a build


def test_full_build_outputs_read_back_independently(full, sources):
    out, rep = full
    assert rep["ok"], rep["summary"]
    assert statuses(rep) == {i: "built" for i in statuses(rep)} and len(statuses(rep)) == N_OUTPUTS
    lock = read_lock(out)
    assert sorted(lock["outputs"]) == sorted(statuses(rep))
    for oid, entry in lock["outputs"].items():
        path = out / entry["path"]
        assert path.is_file() and entry["bytes"] == path.stat().st_size, oid

    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    # GGUF q4_0 of LLaMA: gguf-py reads it; its token embedding, decoded by gguf.quants, against
    # the safetensors source gives the RMSE the report states.
    reader = gguf.GGUFReader(out / "llama" / "q4_0.gguf")
    tensors = {t.name: t for t in reader.tensors}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q4_0
    decoded = dequantize(emb.data, emb.tensor_type).reshape(-1)
    source = load_file(str(sources / "llama" / "model.safetensors"))["model.embed_tokens.weight"].reshape(-1)
    rmse = float(np.sqrt(np.mean((decoded.astype(np.float64) - source.astype(np.float64)) ** 2)))
    metrics = lock["outputs"]["llama/q4_0"]["metrics"]
    assert metrics["tensor_rmse"]["token_embd.weight"] == pytest.approx(rmse, rel=1e-6)
    assert metrics["max_rmse"] == max(metrics["tensor_rmse"].values())
    # bits per weight: tensor bytes over parameters, as gguf-py counts them
    row = next(r for r in zreport.rows_of(rep) if r["id"] == "llama/q4_0")
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    assert row["bpw"] == pytest.approx(8 * n_bytes / n_params)
    assert row["bytes"] == (out / "llama" / "q4_0.gguf").stat().st_size

    # Q4_K_M: the mix put K-quant blocks in the file
    kinds = {t.tensor_type for t in gguf.GGUFReader(out / "mpt" / "q4_k_m.gguf").tensors}
    assert gguf.GGMLQuantizationType.Q4_K in kinds

    # ggjt v3: magic 'ggjt' as a little-endian u32, then version 3
    magic, version = struct.unpack("<II", (out / "llama" / "ggjt-v3-q4_0.bin").read_bytes()[:8])
    assert (magic, version) == (0x67676A74, 3)

    md = (out / "report.md").read_text()
    for model in ("llama", "gptj", "mpt"):
        assert f"## {model}" in md
    assert md.count("| pass |") == N_OUTPUTS


def test_second_run_skips_everything_and_changes_nothing(full, sources, tmp_path):
    out = copy_build(full[0], tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".zoo" not in p.parts}
    lock_before = (out / LOCK_NAME).read_bytes()
    os.utime(sources / "llama" / "config.json")  # touched, not changed: fingerprinted again, same key
    rep = run(manifest(tmp_path, sources), out, jobs=2)
    assert set(statuses(rep).values()) == {"skipped"} and rep["ok"]
    changed = {p for p in before if p.name not in ("report.json", "report.md") and p.stat().st_mtime_ns != before[p]}
    assert changed == set()
    assert (out / LOCK_NAME).read_bytes() == lock_before


def test_cli_json_prints_the_report(full, sources, tmp_path, capsys):
    from smolq.cli import main

    out = copy_build(full[0], tmp_path)
    assert main(["zoo", str(manifest(tmp_path, sources)), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["ok"] and printed["summary"]["skipped"] == N_OUTPUTS


def test_a_damaged_output_is_rebuilt_with_verify_outputs(full, sources, tmp_path):
    out = copy_build(full[0], tmp_path)
    target = out / "llama" / "q4_k_m.gguf"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only a checksum notices
    target.write_bytes(bytes(data))
    m = manifest(tmp_path, sources)
    assert set(statuses(run(m, out)).values()) == {"skipped"}
    rep = run(m, out, verify_outputs=True, max_memory=1)  # a tiny budget: one job at a time, still done
    st = statuses(rep)
    assert st.pop("llama/q4_k_m") == "built" and set(st.values()) == {"skipped"}
    assert target.read_bytes() == (full[0] / "llama" / "q4_k_m.gguf").read_bytes()


def test_changing_one_option_rebuilds_only_that_output(full, sources, tmp_path):
    import gguf

    out = copy_build(full[0], tmp_path)
    before = read_lock(out)
    rep = run(manifest(tmp_path, sources, gptj_small="q5_k_m"), out, jobs=2)
    st = statuses(rep)
    assert st.pop("gptj/small") == "built"
    assert set(st.values()) == {"skipped"}
    after = read_lock(out)
    assert after["outputs"]["gptj/small"]["key"] != before["outputs"]["gptj/small"]["key"]
    for oid in st:
        assert after["outputs"][oid] == before["outputs"][oid]
    kinds = {t.tensor_type for t in gguf.GGUFReader(out / "gptj" / "small.gguf").tensors}
    assert gguf.GGMLQuantizationType.Q5_K in kinds and gguf.GGMLQuantizationType.Q4_K not in kinds


def test_a_new_reference_remeasures_without_rebuilding(full, sources, tmp_path):
    out = copy_build(full[0], tmp_path)
    before = read_lock(out)
    m = manifest(tmp_path, sources)
    m.write_text(m.read_text().replace('out = "unused"', 'out = "unused"\nreference = "f16"'))
    rep = run(m, out, jobs=2)
    assert set(statuses(rep).values()) == {"measured"}
    after = read_lock(out)
    for oid, entry in after["outputs"].items():
        assert entry["files"] == before["outputs"][oid]["files"] and entry["key"] == before["outputs"][oid]["key"]
        assert entry["metrics_key"] != before["outputs"][oid]["metrics_key"]
        assert entry["timing"]["build_s"] == before["outputs"][oid]["timing"]["build_s"]  # not rebuilt
    # against an f16 reference of f32 weights the errors change a little (f16 rounding), not a lot
    a = before["outputs"]["llama/q4_0"]["metrics"]["tensor_rmse"]["token_embd.weight"]
    b = after["outputs"]["llama/q4_0"]["metrics"]["tensor_rmse"]["token_embd.weight"]
    assert a != b and b == pytest.approx(a, rel=0.05)


def test_impossible_gate_and_broken_model_fail_the_run_naming_rows(full, sources, tmp_path):
    out = copy_build(full[0], tmp_path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    extra = f'[[models]]\nname = "broken"\nsource = "{broken}"\n  [[models.outputs]]\n  type = "q4_0"\n'
    m = manifest(tmp_path, sources, mpt_gate=1e-9, extra=extra)
    proc = subprocess.run([sys.executable, "-m", "smolq", "zoo", str(m), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "gate failed: mpt/q4_0:" in proc.stderr and "max_rmse 1e-09" in proc.stderr
    assert "error: broken/q4_0: failed:" in proc.stderr and str(broken) in proc.stderr
    assert "Traceback" not in proc.stderr
    rep = json.loads((out / "report.json").read_text())
    rows = {r["id"]: r for r in zreport.rows_of(rep)}
    assert not rows["mpt/q4_0"]["ok"] and rows["broken/q4_0"]["status"] == "failed"
    assert all(r["ok"] and r["status"] == "skipped" for i, r in rows.items() if i not in ("mpt/q4_0", "broken/q4_0"))
    md = (out / "report.md").read_text()
    assert "mpt/q4_0:" in md and "**FAIL**" in md and "**FAILED**" in md


def test_fail_fast_stops_after_the_first_failure(sources, tmp_path):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a model at all")
    text = (f'[[models]]\nname = "broken"\nsource = "{broken}"\n  [[models.outputs]]\n  type = "q4_0"\n'
            f'[[models]]\nname = "mpt"\nsource = "{sources}/mpt"\n  [[models.outputs]]\n  type = "q8_0"\n')
    m = tmp_path / "zoo.toml"
    m.write_text(text)
    rep = run(m, tmp_path / "ff", jobs=1, fail_fast=True)
    assert statuses(rep) == {"broken/q4_0": "failed", "mpt/q8_0": "not run"}
    assert not (tmp_path / "ff" / "mpt" / "q8_0.gguf").exists()
    rep = run(m, tmp_path / "ff", jobs=1)  # without --fail-fast the healthy model is built
    assert statuses(rep) == {"broken/q4_0": "failed", "mpt/q8_0": "built"}


def test_model_file_sources_are_requantized_against_themselves(sources, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from smolq.pipeline.convert import convert

    f16 = tmp_path / "llama-f16.gguf"
    convert(sources / "llama", f16, outtype="f16")
    m = tmp_path / "zoo.toml"
    m.write_text('[zoo]\neval = { inline = "some text", ctx = 8 }\n[[models]]\nname = "f"\nsource = "llama-f16.gguf"\n'
                 '  [[models.outputs]]\n  type = "q8_0"\n')
    rep = run(m, tmp_path / "out")
    row = zreport.rows_of(rep)[0]
    assert row["status"] == "built" and row["ok"]
    assert "perplexity needs the HF tokenizer" in " ".join(row["notes"])
    src = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    out = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / "f" / "q8_0.gguf").tensors}
    name = "blk.0.ffn_up.weight"
    assert out[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
    a = np.asarray(src[name].data, dtype=np.float64).reshape(-1)
    b = dequantize(out[name].data, out[name].tensor_type).astype(np.float64).reshape(-1)
    metrics = read_lock(tmp_path / "out")["outputs"]["f/q8_0"]["metrics"]
    assert metrics["tensor_rmse"][name] == pytest.approx(float(np.sqrt(np.mean((a - b) ** 2))), rel=1e-6)


# --------------------------------------------------------------------------- shards


def test_shards_union_equals_the_full_build_and_merge_equals_its_report(full, sources, tmp_path):
    from smolq.cli import main

    full_out, full_rep = full
    m = manifest(tmp_path, sources)
    built: dict[str, dict] = {}
    dirs = []
    for k in (1, 2, 3):
        d = tmp_path / f"shard-{k}"
        rep = run(m, d, shard=(k, 3), jobs=1)
        assert rep["shard"] == f"{k}/3"
        for oid, entry in read_lock(d)["outputs"].items():
            assert oid not in built, f"{oid} built by two shards"
            built[oid] = entry
        dirs.append(d)
    full_lock = read_lock(full_out)
    assert sorted(built) == sorted(full_lock["outputs"])
    for oid, entry in built.items():
        assert entry["files"] == full_lock["outputs"][oid]["files"], oid
        shard_dir = next(d for d in dirs if oid in read_lock(d)["outputs"])
        assert (shard_dir / entry["path"]).read_bytes() == (full_out / entry["path"]).read_bytes()

    assert main(["zoo", "report", *map(str, dirs), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert zreport.without_timings(merged) == zreport.without_timings(full_rep)


# --------------------------------------------------------------------------- interruption


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_build(full, sources, tmp_path):
    out = tmp_path / "killed"
    m = manifest(tmp_path, sources)
    proc = subprocess.Popen([sys.executable, "-m", "smolq", "zoo", str(m), "--out", str(out), "--jobs", "1", "--quiet"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    done_at_kill = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done_at_kill = len(read_lock(out)["outputs"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done_at_kill = 0
        if done_at_kill >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the zoo and its worker, mid-build
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 2 <= done_at_kill < N_OUTPUTS

    rep = run(m, out, jobs=1)
    assert rep["ok"]
    st = statuses(rep)
    assert list(st.values()).count("skipped") >= 2 and "failed" not in st.values()
    full_out = full[0]
    assert without_timings(read_lock(out)) == without_timings(read_lock(full_out))
    assert output_files(out) == output_files(full_out)
    assert not [p for p in out.rglob("*.part")]
