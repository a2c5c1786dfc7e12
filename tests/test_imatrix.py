"""Importance matrices: llama.cpp's files both ways, `smolq imatrix`, and `--imatrix` on quantize/convert.

The oracles are independent of the code under test: gguf-py's reader for the
GGUF container, a hand-built .dat, and llama.cpp itself (llama-imatrix writes
imatrix files of both formats from the same text, llama-quantize quantizes
with either file); the tests that need llama.cpp's tools skip, saying why,
when they are not built.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import smolq

from smolq.formats.imatrix import Imatrix, ImatrixEntry, from_sums, read_imatrix, write_imatrix
from smolq.plan.mix import resolve_preset, requires_imatrix
from smolq.ggml_types import GGMLType as T
from tests.real_loaders import require_llama_tool

CTX, CHUNKS = 64, 6
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs "
         "and many other creatures of the forest sing").split()


def _text(seed: int, lines: int = 300) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(lines)) + "\n"


def _smolq(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os
    import sys

    repo = str(Path(__file__).resolve().parents[1])  # this checkout's smolq, from any working directory
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "smolq", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def _llama(tool: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, f"{tool.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA (rows of 256 so every K-quant applies; ffn_down rows of 704 fall back),
    its f32 GGUF by smolq convert, and a calibration text."""
    from smolq.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("imatrix")
    make_tiny_model("llama", d / "hf", hidden_size=256, n_layers=2)
    proc = _smolq("convert", d / "hf", d / "model-f32.gguf", "--outtype", "f32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    (d / "calib.txt").write_text(_text(1))
    return d


@pytest.fixture(scope="module")
def smolq_imatrix(tiny):
    out = tiny / "smolq.imatrix"
    proc = _smolq("imatrix", tiny / "hf", "--calib", "calib.txt", "-o", out, "--ctx", CTX, "--chunks", CHUNKS,
                  "--quiet", cwd=tiny)  # the dataset is recorded as given: "calib.txt", as llama-imatrix's
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def llama_imatrix(tiny):
    """llama-imatrix's own files on the same model, text, context and chunks, both formats."""
    tool = require_llama_tool("llama-imatrix")
    files = {}
    for fmt, name in (("gguf", "llama.gguf"), ("dat", "llama.dat")):
        _llama(tool, "-m", "model-f32.gguf", "-f", "calib.txt", "-c", CTX, "--chunks", CHUNKS, "-t", "1",
               "--no-ppl", "-o", name, "--output-format", fmt, cwd=tiny)
        files[fmt] = tiny / name
    return files


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- the format, against gguf-py and hand-made bytes ----------------------------------------

def _example() -> Imatrix:
    return from_sums({"blk.0.attn_q.weight": np.arange(32, dtype=np.float32) * 3,
                      "blk.1.ffn_down.weight": np.linspace(1, 2, 64, dtype=np.float32)},
                     {"blk.0.attn_q.weight": 1536, "blk.1.ffn_down.weight": 1000},
                     datasets=["wiki.txt"], chunk_count=3, chunk_size=512)


def test_gguf_imatrix_field_by_field_with_gguf_py(tmp_path):
    import gguf

    write_imatrix(tmp_path / "x.imatrix", _example())
    r = gguf.GGUFReader(tmp_path / "x.imatrix")
    fields = {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    V = gguf.GGUFValueType
    assert fields == {"general.type": ([V.STRING], "imatrix"),
                      "imatrix.datasets": ([V.ARRAY, V.STRING], ["wiki.txt"]),
                      "imatrix.chunk_count": ([V.UINT32], 3), "imatrix.chunk_size": ([V.UINT32], 512)}
    tensors = {t.name: t for t in r.tensors}
    assert list(tensors) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                             "blk.1.ffn_down.weight.in_sum2", "blk.1.ffn_down.weight.counts"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    assert list(tensors["blk.0.attn_q.weight.in_sum2"].shape) == [32]  # ggml drops trailing 1-dims
    assert list(tensors["blk.0.attn_q.weight.counts"].shape) == [1]
    assert np.array_equal(tensors["blk.0.attn_q.weight.in_sum2"].data, np.arange(32, dtype=np.float32) * 3)
    assert tensors["blk.1.ffn_down.weight.counts"].data.tolist() == [1000.0]


def test_dat_bytes_as_llama_imatrix_writes_them(tmp_path):
    """Hand-built: ncall = ceil(tokens / chunk size); values = mean square x ncall (float32)."""
    write_imatrix(tmp_path / "x.dat", _example())
    sums = np.arange(32, dtype=np.float32) * 3
    expect = struct.pack("<i", 2)
    for name, values, ncall in (("blk.0.attn_q.weight", sums / np.float32(1536) * np.float32(3), 3),
                                ("blk.1.ffn_down.weight",
                                 np.linspace(1, 2, 64, dtype=np.float32) / np.float32(1000) * np.float32(2), 2)):
        expect += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        expect += values.astype("<f4").tobytes()
    expect += struct.pack("<i", 3) + struct.pack("<i", 8) + b"wiki.txt"
    assert (tmp_path / "x.dat").read_bytes() == expect


def test_importance_is_what_llama_quantize_computes(tmp_path):
    im = _example()
    assert np.array_equal(im.importance("blk.0.attn_q.weight"),
                          np.arange(32, dtype=np.float32) * 3 / np.float32(1536))
    write_imatrix(tmp_path / "x.dat", im)
    legacy = read_imatrix(tmp_path / "x.dat")
    assert legacy.legacy and legacy.chunk_count == 3 and legacy.datasets == ["wiki.txt"]
    np.testing.assert_allclose(legacy.importance("blk.0.attn_q.weight"), im.importance("blk.0.attn_q.weight"),
                               rtol=1e-6)
    assert im.importance("no.such.weight") is None


def test_per_expert_counts_and_an_expert_without_tokens(tmp_path):
    sums = np.arange(12, dtype=np.float32).reshape(3, 4)
    im = Imatrix({"blk.0.ffn_down_exps.weight": ImatrixEntry(sums, np.array([4, 0, 2]))}, ["t"], 1, 4)
    write_imatrix(tmp_path / "e.imatrix", im)
    import gguf

    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(tmp_path / "e.imatrix").tensors}
    assert shapes == {"blk.0.ffn_down_exps.weight.in_sum2": [4, 3], "blk.0.ffn_down_exps.weight.counts": [1, 3]}
    back = read_imatrix(tmp_path / "e.imatrix")
    assert back.entries["blk.0.ffn_down_exps.weight"].counts.tolist() == [4, 0, 2]
    assert back.importance("blk.0.ffn_down_exps.weight").tolist() == [0, .25, .5, .75, 1, 1, 1, 1, 4, 4.5, 5, 5.5]


def test_include_and_exclude_are_substring_filters():
    im = _example()
    assert list(im.select(include=["attn"]).entries) == ["blk.0.attn_q.weight"]
    assert list(im.select(exclude=["blk.0."]).entries) == ["blk.1.ffn_down.weight"]


def test_which_tensors_need_an_imatrix():
    def needs(name, t, preset):
        return requires_imatrix(name, t, resolve_preset(preset))

    assert needs("blk.0.ffn_up.weight", T.IQ2_XXS, "IQ2_XXS")
    assert needs("blk.0.ffn_up.weight", T.IQ1_S, "IQ1_S")
    assert not needs("output.weight", T.IQ2_XXS, "IQ2_XXS")
    assert not needs("token_embd.weight", T.IQ1_M, "IQ1_M")
    assert not needs("blk.0.ffn_up.weight", T.IQ4_XS, "IQ4_XS")
    assert needs("blk.0.ffn_up.weight", T.Q2_K, "Q2_K_S")
    assert not needs("blk.0.ffn_up.weight", T.Q2_K, "Q2_K")


# --- llama-imatrix's files, read by smolq; smolq's, identical when written back ----------------

def test_llama_imatrix_files_read_and_rewritten_byte_for_byte(llama_imatrix, tmp_path):
    g, d = read_imatrix(llama_imatrix["gguf"]), read_imatrix(llama_imatrix["dat"])
    assert (g.chunk_count, g.chunk_size, g.datasets) == (CHUNKS, CTX, ["calib.txt"])
    assert (d.chunk_count, d.datasets, d.legacy) == (CHUNKS, ["calib.txt"], True)
    assert sorted(g.entries) == sorted(d.entries) and len(g.entries) == 14  # 7 Linears x 2 blocks
    assert all(e.counts.tolist() == [CHUNKS * CTX] for e in g.entries.values())
    for name in g.entries:
        np.testing.assert_allclose(g.importance(name), d.importance(name), rtol=2e-6)
    write_imatrix(tmp_path / "g.gguf", g)
    write_imatrix(tmp_path / "d.dat", d)
    write_imatrix(tmp_path / "g.dat", g)  # GGUF -> legacy as llama-imatrix itself writes legacy
    assert (tmp_path / "g.gguf").read_bytes() == llama_imatrix["gguf"].read_bytes()
    assert (tmp_path / "d.dat").read_bytes() == llama_imatrix["dat"].read_bytes()
    assert (tmp_path / "g.dat").read_bytes() == llama_imatrix["dat"].read_bytes()


def test_smolq_imatrix_matches_llama_imatrix(smolq_imatrix, llama_imatrix):
    ours, theirs = read_imatrix(smolq_imatrix), read_imatrix(llama_imatrix["gguf"])
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    for name in theirs.entries:
        assert ours.entries[name].counts.tolist() == theirs.entries[name].counts.tolist(), name
        assert _cosine(ours.importance(name), theirs.importance(name)) >= 0.999, name


def test_process_output_matches_llama_imatrix(tiny):
    tool = require_llama_tool("llama-imatrix")
    _llama(tool, "-m", "model-f32.gguf", "-f", "calib.txt", "-c", CTX, "--chunks", 2, "-t", "1", "--no-ppl",
           "--process-output", "-o", "po-llama.gguf", cwd=tiny)
    smolq.imatrix(tiny / "hf", tiny / "po.gguf", calib=tiny / "calib.txt", ctx=CTX, chunks=2, process_output=True)
    ours, theirs = read_imatrix(tiny / "po.gguf"), read_imatrix(tiny / "po-llama.gguf")
    assert "output.weight" in theirs.entries and sorted(ours.entries) == sorted(theirs.entries)
    assert _cosine(ours.importance("output.weight"), theirs.importance("output.weight")) >= 0.999


# --- quantize --imatrix: tensor for tensor what llama-quantize writes -------------------------

# (preset, pure). IQ types and their mixes join as the kernel learns them.
# --pure presets whose base type (IQ2_S's is IQ2_XS) cannot quantize token_embd/output without a
# vector, which no imatrix has: llama-quantize aborts in ggml; smolq refuses in one line (test below).
PURE_ABORTS = ("IQ1_S", "IQ2_XXS", "IQ2_XS", "IQ2_S")
QUANT_CASES = [(p, pure) for p in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                                   "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                                   "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
                                   "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS")
               for pure in (True, False)
               if not (pure and p in PURE_ABORTS)]


def _tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    import gguf

    return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _imatrix_keys(path: Path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("quantize.imatrix")}


@pytest.mark.parametrize("preset, pure", QUANT_CASES, ids=[f"{p}{'-pure' if u else ''}" for p, u in QUANT_CASES])
def test_quantize_with_imatrix_equals_llama_quantize(tiny, smolq_imatrix, preset, pure):
    tool = require_llama_tool("llama-quantize")
    tag = f"{preset}{'-pure' if pure else ''}"
    flags = ["--pure"] if pure else []
    _llama(tool, *flags, "--imatrix", smolq_imatrix.name, "model-f32.gguf", f"llama-{tag}.gguf", preset, "1",
           cwd=tiny)
    smolq.quantize(tiny / "model-f32.gguf", tiny / f"smolq-{tag}.gguf", type=preset, pure=pure,
                   imatrix=smolq_imatrix)
    ours, theirs = _tensors(tiny / f"smolq-{tag}.gguf"), _tensors(tiny / f"llama-{tag}.gguf")
    assert sorted(ours) == sorted(theirs)  # llama-quantize writes them in its own order
    for name in theirs:
        assert ours[name][0] == theirs[name][0], f"{name}: type {ours[name][0]} vs {theirs[name][0]}"
        assert ours[name][1] == theirs[name][1], f"{name}: bytes differ"
    # the imatrix changed something (else this would test RTN alone)
    plain = tiny / f"plain-{tag}.gguf"
    try:
        smolq.quantize(tiny / "model-f32.gguf", plain, type=preset, pure=pure)
    except smolq.InputError as exc:  # the types that cannot go without one
        assert "importance matrix" in str(exc) and not plain.exists()
    else:
        assert _tensors(plain) != ours
    keys = _imatrix_keys(tiny / f"smolq-{tag}.gguf")
    assert keys["quantize.imatrix.entries_count"] == 14 and keys["quantize.imatrix.chunks_count"] == CHUNKS
    assert keys["quantize.imatrix.dataset"] == "calib.txt"


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_0"])
def test_dat_and_llama_files_are_accepted_both_ways(tiny, smolq_imatrix, llama_imatrix, preset, tmp_path):
    """llama-quantize takes smolq's .dat; smolq takes llama-imatrix's GGUF and .dat; same bytes each way."""
    tool = require_llama_tool("llama-quantize")
    dat = tmp_path / "smolq.dat"
    write_imatrix(dat, read_imatrix(smolq_imatrix))
    runs = {"smolq-dat": dat, "llama-gguf": llama_imatrix["gguf"], "llama-dat": llama_imatrix["dat"]}
    for tag, im in runs.items():
        _llama(tool, "--imatrix", im, tiny / "model-f32.gguf", tmp_path / f"l-{tag}.gguf", preset, "1", cwd=tmp_path)
        smolq.quantize(tiny / "model-f32.gguf", tmp_path / f"s-{tag}.gguf", type=preset, imatrix=im)
        assert _tensors(tmp_path / f"s-{tag}.gguf") == _tensors(tmp_path / f"l-{tag}.gguf"), tag


def test_include_and_exclude_weights_as_llama_quantize(tiny, smolq_imatrix, tmp_path):
    tool = require_llama_tool("llama-quantize")
    for flag, value in (("--include-weights", "attn_"), ("--exclude-weights", "blk.1.")):
        _llama(tool, "--imatrix", smolq_imatrix, flag, value, tiny / "model-f32.gguf", tmp_path / "l.gguf",
               "Q4_K_M", "1", cwd=tmp_path)
        proc = _smolq("quantize", tiny / "model-f32.gguf", tmp_path / "s.gguf", "--type", "q4_k_m",
                      "--imatrix", smolq_imatrix, flag, value, "-q")
        assert proc.returncode == 0, proc.stderr
        assert _tensors(tmp_path / "s.gguf") == _tensors(tmp_path / "l.gguf"), flag
        assert _imatrix_keys(tmp_path / "s.gguf") == _imatrix_keys(tmp_path / "l.gguf"), flag


def test_convert_with_imatrix_equals_quantize_of_the_f32_file(tiny, smolq_imatrix, tmp_path):
    """convert HF -> Q4_K_M with --imatrix == quantize f32 GGUF -> Q4_K_M with --imatrix (same kernel,
    same vectors by GGUF name); and the summary says which tensors took one."""
    import json

    proc = _smolq("convert", tiny / "hf", tmp_path / "c.gguf", "--outtype", "q4_k_m", "--imatrix", smolq_imatrix,
                  "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["imatrix"]["n_tensors"] == 14
    assert _smolq("quantize", tiny / "model-f32.gguf", tmp_path / "q.gguf", "--type", "q4_k_m", "--imatrix",
                  smolq_imatrix, "-q").returncode == 0
    assert _tensors(tmp_path / "c.gguf") == _tensors(tmp_path / "q.gguf")
    assert _imatrix_keys(tmp_path / "c.gguf")["quantize.imatrix.entries_count"] == 14


GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def test_f16_checkpoint_matches_transformers_forward(tmp_path):
    """An f16 checkpoint of three blocks (decoded into buffers reused block after block; the last
    block's forward cut short after its last Linear's input): every entry is the mean square of
    that Linear's inputs in transformers' own forward of the whole model, chunk by chunk."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.tiny import make_tiny_model

    make_tiny_model("llama", tmp_path / "hf", hidden_size=128, n_layers=3, dtype="float16")
    (tmp_path / "calib.txt").write_text(_text(3))
    smolq.imatrix(tmp_path / "hf", tmp_path / "m.imatrix", calib=tmp_path / "calib.txt", ctx=CTX, chunks=3)
    ours = read_imatrix(tmp_path / "m.imatrix")

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok((tmp_path / "calib.txt").read_text(), add_special_tokens=True)["input_ids"]
    chunks = [[tok.bos_token_id] + ids[i * CTX + 1:(i + 1) * CTX] for i in range(3)]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        rel = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
        if rel in GGUF_OF:
            entry = f"blk.{name.split('.')[2]}.{GGUF_OF[rel]}.weight"
            module.register_forward_pre_hook(
                lambda _m, args, entry=entry: sums.__setitem__(
                    entry, sums.get(entry, 0) + args[0].reshape(-1, args[0].shape[-1]).double().square().sum(0)))
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]))
    assert sorted(ours.entries) == sorted(sums)
    for name, total in sums.items():
        assert ours.entries[name].counts.tolist() == [3 * CTX], name
        np.testing.assert_allclose(ours.importance(name), (total / (3 * CTX)).numpy(), rtol=2e-5, err_msg=name)


def test_api(tiny, tmp_path):
    import smolq

    s = smolq.imatrix(tiny / "hf", tmp_path / "a.dat", calib=tiny / "calib.txt", ctx=CTX, chunks=2)
    assert s["format"] == "dat" and s["chunks"] == 2 and s["tokens"] == 2 * CTX
    im = smolq.read_imatrix(tmp_path / "a.dat")
    assert im.legacy and im.chunk_count == 2
    q = smolq.quantize(tiny / "model-f32.gguf", tmp_path / "q.gguf", type="q4_0", imatrix=tmp_path / "a.dat",
                       exclude_weights=["ffn"])
    assert q["imatrix"]["entries"] == 8 and q["imatrix"]["n_tensors"] == 8  # 14 less 2 x ffn_gate/up/down


def test_inspect_shows_an_imatrix(smolq_imatrix, cli):
    r = cli("inspect", smolq_imatrix)
    assert r.returncode == 0
    assert "GGUF imatrix" in r.stdout and "blk.0.attn_q.weight" in r.stdout and "calib.txt" in r.stdout
    import json

    report = json.loads(cli("inspect", smolq_imatrix, "--json").stdout)
    assert report["n_entries"] == 14 and report["chunk_count"] == CHUNKS
    im = read_imatrix(smolq_imatrix)
    top = report["entries"][0]["top_columns"][0]
    assert top[0] == int(np.argmax(im.importance(report["entries"][0]["name"])))


# --- Ctrl-C and --resume ----------------------------------------------------------------------

def test_interrupted_run_leaves_no_output_and_resumes_to_the_same_file(tiny, tmp_path, monkeypatch):
    import smolq
    from smolq.pipeline import imatrix as pipe

    real = pipe._one_block
    calls = {"n": 0}

    def interrupt_second(block, index, *a, **k):
        calls["n"] += 1
        if index == 1:
            raise KeyboardInterrupt
        return real(block, index, *a, **k)

    out = tmp_path / "r.imatrix"
    monkeypatch.setattr(pipe, "SAVE_EVERY_S", 0.0)  # save after every block
    monkeypatch.setattr(pipe, "_one_block", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        smolq.imatrix(tiny / "hf", out, calib=tiny / "calib.txt", ctx=CTX, chunks=3)
    assert not out.exists() and not list(tmp_path.glob(".r.imatrix.*.part"))
    monkeypatch.setattr(pipe, "_one_block", real)
    resumed = []
    monkeypatch.setattr(pipe, "_one_block", lambda block, index, *a, **k: (resumed.append(index),
                                                                         real(block, index, *a, **k)))
    smolq.imatrix(tiny / "hf", out, calib=tiny / "calib.txt", ctx=CTX, chunks=3, resume=True)
    assert resumed == [1]  # block 0 came from the work directory
    smolq.imatrix(tiny / "hf", tmp_path / "whole.imatrix", calib=tiny / "calib.txt", ctx=CTX, chunks=3)
    a, b = read_imatrix(out), read_imatrix(tmp_path / "whole.imatrix")
    for name in b.entries:
        assert np.array_equal(a.importance(name), b.importance(name)), name
    assert not (tmp_path / ".r.imatrix.imatrix-work").exists()


# --- bad input: one line naming the file, exit 2, no output -----------------------------------

def _refused(proc, out: Path, names: Path | str, says: str) -> None:
    """proc: a CompletedProcess or the `cli` fixture's result (exit code, stderr)."""
    assert getattr(proc, "returncode") == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert str(names) in line and says in line, line
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*.part"))


def test_imatrix_for_another_model(tiny, tmp_path, cli):
    other = from_sums({"blk.0.attn_q.weight": np.ones(512, np.float32)}, {"blk.0.attn_q.weight": 64},
                      datasets=["x"], chunk_count=1, chunk_size=64)
    write_imatrix(tmp_path / "other.imatrix", other)
    out = tmp_path / "o.gguf"
    proc = cli("quantize", tiny / "model-f32.gguf", out, "--type", "q4_k_m", "--imatrix",
                  tmp_path / "other.imatrix")
    _refused(proc, out, tmp_path / "other.imatrix", "another model")
    proc = cli("convert", tiny / "hf", out, "--outtype", "q4_0", "--imatrix", tmp_path / "other.imatrix")
    _refused(proc, out, tmp_path / "other.imatrix", "another model")


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_truncated_imatrix(tiny, smolq_imatrix, tmp_path, cli, fmt):
    full = tmp_path / f"full.{fmt}"
    write_imatrix(full, read_imatrix(smolq_imatrix), fmt)
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out = tmp_path / "o.gguf"
    proc = cli("quantize", tiny / "model-f32.gguf", out, "--type", "q4_0", "--imatrix", cut)
    _refused(proc, out, cut, "truncated")


def test_include_with_exclude_is_refused(tiny, smolq_imatrix, tmp_path, cli):
    out = tmp_path / "o.gguf"
    proc = cli("quantize", tiny / "model-f32.gguf", out, "--type", "q4_0", "--imatrix", smolq_imatrix,
                  "--include-weights", "attn", "--exclude-weights", "ffn")
    assert proc.returncode == 2 and "cannot be used together" in proc.stderr and not out.exists()


def test_very_low_bit_types_without_an_imatrix_are_refused(tiny, tmp_path, cli):
    from smolq.errors import InputError
    from smolq.plan.mix import resolve_preset

    try:
        resolve_preset("iq2_xxs")
    except InputError:
        pytest.skip("IQ2_XXS is not a preset yet (the i-quant kernels and mixes land separately)")
    out = tmp_path / "o.gguf"
    proc = cli("quantize", tiny / "model-f32.gguf", out, "--type", "iq2_xxs")
    _refused(proc, out, tiny / "model-f32.gguf", "needs an importance matrix")


@pytest.mark.parametrize("preset", PURE_ABORTS)
def test_pure_types_that_cannot_go_without_a_vector(tiny, smolq_imatrix, tmp_path, cli, preset):
    """--pure puts token_embd in a type whose quantizer needs a vector the imatrix never has
    (llama-quantize aborts in ggml): one line naming the imatrix, exit 2, nothing written."""
    out = tmp_path / "o.gguf"
    proc = cli("quantize", tiny / "model-f32.gguf", out, "--type", preset, "--pure", "--imatrix", smolq_imatrix)
    _refused(proc, out, smolq_imatrix, "has no entry for token_embd.weight")


def test_short_text_and_bad_model(tiny, tmp_path, cli):
    (tmp_path / "short.txt").write_text("the quick brown fox")
    out = tmp_path / "x.imatrix"
    proc = cli("imatrix", tiny / "hf", "--calib", tmp_path / "short.txt", "-o", out, "--ctx", CTX)
    _refused(proc, out, tmp_path / "short.txt", "needs at least")
    proc = cli("imatrix", tiny / "model-f32.gguf", "--calib", tiny / "calib.txt", "-o", out)
    _refused(proc, out, tiny / "model-f32.gguf", "Hugging Face checkpoint")


def test_a_model_is_not_an_imatrix_and_back(tiny, smolq_imatrix, tmp_path, cli):
    out = tmp_path / "o.gguf"
    proc = cli("quantize", tiny / "model-f32.gguf", out, "--type", "q4_0", "--imatrix", tiny / "model-f32.gguf")
    _refused(proc, out, tiny / "model-f32.gguf", "not an imatrix")
    proc = cli("quantize", smolq_imatrix, out, "--type", "q4_0")
    _refused(proc, out, smolq_imatrix, "not a model")


# --- a real model (slow: make test-slow) ------------------------------------------------------

@pytest.mark.slow
def test_smollm2_imatrix_matches_llama_imatrix(smollm2_gguf, tmp_path):
    """SmolLM2-135M rebuilt as an HF directory; llama-imatrix on its f16 GGUF; same text, ctx, chunks."""
    import sysconfig

    from tests.script_module import load_script

    tool = require_llama_tool("llama-imatrix")
    hf = load_script("hf_from_gguf").hf_from_gguf(smollm2_gguf, tmp_path / "hf")
    smolq.convert(hf, tmp_path / "f16.gguf", outtype="f16")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (tmp_path / "calib.txt").write_text((stdlib / "argparse.py").read_text() + (stdlib / "textwrap.py").read_text())
    _llama(tool, "-m", "f16.gguf", "-f", "calib.txt", "-c", 128, "--chunks", 4, "--no-ppl", "-o", "llama.gguf",
           cwd=tmp_path)
    smolq.imatrix(hf, tmp_path / "smolq.gguf", calib=tmp_path / "calib.txt", ctx=128, chunks=4)
    ours, theirs = read_imatrix(tmp_path / "smolq.gguf"), read_imatrix(tmp_path / "llama.gguf")
    assert sorted(ours.entries) == sorted(theirs.entries) and len(ours.entries) == 30 * 7
    assert ours.chunk_count == theirs.chunk_count == 4
    worst = min((_cosine(ours.importance(n), theirs.importance(n)), n) for n in theirs.entries)
    assert worst[0] >= 0.999, worst


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """8 layers, so the rules for the first n/8 ffn_down layers (which look at has_imatrix) apply."""
    from smolq.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("imatrix-deep")
    make_tiny_model("llama", d / "hf", hidden_size=256, n_layers=8)
    smolq.convert(d / "hf", d / "model-f32.gguf", outtype="f32")
    (d / "calib.txt").write_text(_text(2))
    smolq.imatrix(d / "hf", d / "smolq.imatrix", calib=d / "calib.txt", ctx=CTX, chunks=2)
    return d


@pytest.mark.parametrize("preset", ["Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS", "IQ3_XXS"])
def test_mix_rules_that_look_at_the_imatrix(deep, preset):
    """With an imatrix, llama-quantize's Q4_0/Q5_0 give the first ffn_down Q4_1/Q5_1, IQ4_NL/XS keep
    their own type there, IQ3_XXS's attn_v changes: same types and bytes as llama-quantize."""
    tool = require_llama_tool("llama-quantize")
    _llama(tool, "--imatrix", "smolq.imatrix", "model-f32.gguf", f"llama-{preset}.gguf", preset, "1", cwd=deep)
    smolq.quantize(deep / "model-f32.gguf", deep / f"smolq-{preset}.gguf", type=preset,
                   imatrix=deep / "smolq.imatrix")
    ours, theirs = _tensors(deep / f"smolq-{preset}.gguf"), _tensors(deep / f"llama-{preset}.gguf")
    assert ours == theirs
    if preset in ("Q4_0", "Q5_0"):
        assert theirs["blk.0.ffn_down.weight"][0] == int(T.Q4_1 if preset == "Q4_0" else T.Q5_1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_leading_tokens_are_the_whole_texts_first_tokens(tmp_path, family):
    """A few chunks of a long text tokenize only its beginning: the ids must be those of the
    whole text's tokenization (the oracle: the tokenizer run on all of it)."""
    from transformers import AutoTokenizer

    from smolq.pipeline.imatrix import leading_tokens
    from smolq.tiny import make_tiny_model

    make_tiny_model(family, tmp_path / "hf", hidden_size=64, n_layers=1)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = _text(5, lines=2000).replace("fox", "fox,  \t").replace("dog", "dog...\n\n")
    full = tok(text, add_special_tokens=True)["input_ids"]
    for need in (64, 384, 1000):
        ids, whole = leading_tokens(tok, text, need)
        assert not whole and len(ids) >= need and ids == full[:len(ids)], need
    ids, whole = leading_tokens(tok, text, len(full))  # more than a prefix gives: the whole text
    assert whole and ids == full
    ids, whole = leading_tokens(tok, text, None)
    assert whole and ids == full
