"""`smolq convert` from the command line: bad input exits 2 with one line and no output;
the snoozy header; the tied-embedding rule; suffix defaults; --json / --dry-run."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from smolq.arch import Llama
from smolq.formats.gguf import read_gguf
from smolq.formats.legacy import read_legacy, write_legacy


@pytest.fixture
def run(cli):
    return lambda *args: cli("convert", *args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("cli-models")
    return {
        "llama": make_tiny_model("llama", root / "llama", shards=2),
        "tied": make_tiny_model("llama", root / "tied", tied=True),
        "mpt": make_tiny_model("mpt", root / "mpt"),
        "gptj": make_tiny_model("gptj", root / "gptj", weights="bin"),
    }


def _copy(src, tmp_path, name="src"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def assert_one_line_failure(result, out, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temp file left behind


def test_unknown_architecture(tiny, tmp_path, run):
    src = _copy(tiny["llama"], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_one_line_failure(run(src, out), out, "config.json", "unknown architecture FalconForCausalLM")


def test_missing_shard(tiny, tmp_path, run):
    src = _copy(tiny["llama"], tmp_path)
    shard = sorted(src.glob("model-0000*.safetensors"))[-1]
    shard.unlink()
    out = tmp_path / "o.gguf"
    assert_one_line_failure(run(src, out), out, shard.name, "missing shard")


def test_truncated_safetensors(tiny, tmp_path, run):
    src = _copy(tiny["llama"], tmp_path)
    shard = sorted(src.glob("model-0000*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4096])
    out = tmp_path / "o.bin"
    assert_one_line_failure(run(src, out), out, shard.name, "truncated")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pickle(tiny, tmp_path, run):
    src = _copy(tiny["gptj"], tmp_path)
    (src / "pytorch_model.bin").unlink(missing_ok=True)
    for f in src.glob("pytorch_model*"):
        f.unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": _Payload()}, src / "pytorch_model.bin")
    out = tmp_path / "o.gguf"
    result = run(src, out)
    assert_one_line_failure(result, out, "pytorch_model.bin", "refusing")
    assert "this must never run" not in result.stdout


def test_shape_disagreeing_with_config(tiny, tmp_path, run):
    src = _copy(tiny["mpt"], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["d_model"] = 32
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_one_line_failure(run(src, out), out, "model.safetensors", "shape")


def test_format_family_mismatch(tiny, tmp_path, run):
    out = tmp_path / "o.bin"
    assert_one_line_failure(run(tiny["gptj"], out, "--format", "ggjt-v3"), out, "gptj cannot be written as ggjt-v3")


def test_bf16_not_in_legacy(tiny, tmp_path, run):
    out = tmp_path / "o.bin"
    assert_one_line_failure(run(tiny["llama"], out, "--outtype", "bf16"), out, "cannot hold BF16")


@pytest.mark.parametrize("outtype", ["q5_0", "q8_0"])
def test_ggmm_refuses_a_file_type_gpt4all_cannot_name(tiny, tmp_path, run, outtype):
    """GPT4All's MPT header names F32, F16, Q4_0, Q4_1, Q4_2 as file types only: one line that says so."""
    out = tmp_path / "o.bin"
    assert_one_line_failure(run(tiny["mpt"], out, "--format", "ggmm", "--outtype", outtype), out,
                            f"no file type for a file of mostly {outtype.upper()}", "Q4_0")


def test_suffix_defaults_and_json(tiny, tmp_path, run):
    """.bin -> newest legacy format GPT4All's legacy backend loads: ggjt v3 / ggml / ggmm."""
    for fam, magic in (("llama", b"tjgg"), ("gptj", b"lmgg"), ("mpt", b"mmgg")):
        out = tmp_path / f"{fam}.bin"
        r = run(tiny[fam], out, "--json", "--quiet")
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["output"] == str(out) and summary["n_tensors"] > 0
        head = out.read_bytes()[:8]
        assert head[:4] == magic
        if fam == "llama":
            assert struct.unpack("<I", head[4:8])[0] == 3
    out = tmp_path / "x.gguf"
    assert run(tiny["mpt"], out, "--quiet").returncode == 0
    assert out.read_bytes()[:8] == b"GGUF" + struct.pack("<I", 3)


def test_dry_run_prints_plan(tiny, tmp_path, run):
    out = tmp_path / "o.gguf"
    r = run(tiny["llama"], out, "--dry-run", "--outtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "Q8_0" in r.stdout and "F32" in r.stdout
    assert not out.exists()


def test_tied_embeddings_rule(tiny, tmp_path, run):
    """GGUF omits output.weight (llama.cpp reuses token_embd); legacy writes it (= the embedding)."""
    gg, bn = tmp_path / "t.gguf", tmp_path / "t.bin"
    assert run(tiny["tied"], gg, "-q").returncode == 0
    assert run(tiny["tied"], bn, "-q").returncode == 0
    names = {t.name for t in read_gguf(gg).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    lf = read_legacy(bn)
    assert bytes(lf.tensor("output.weight").load()) == bytes(lf.tensor("tok_embeddings.weight").load())


SNOOZY = {  # GPT4All-13b-snoozy config.json (LLaMA-13B shapes)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
    "num_attention_heads": 40, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
}


def test_snoozy_n_mult_and_header(tmp_path):
    arch = Llama(SNOOZY, tmp_path / "config.json")
    hp = arch.legacy_hparams(arch.legacy_targets["ggjt-v3"])
    # convert.py searched n_mult from 8192 down for the first that rebuilds n_ff with the
    # loader's formula n_ff = ((2*(4*n_embd)/3 + n_mult - 1) / n_mult) * n_mult (formats.md 2.1).
    rebuild = lambda n_mult: ((2 * (4 * 5120) // 3 + n_mult - 1) // n_mult) * n_mult  # noqa: E731
    want_n_mult = next(m for m in range(8192, 1, -1) if rebuild(m) == 13824)
    assert hp["n_mult"] == want_n_mult and rebuild(hp["n_mult"]) == 13824
    assert arch.guesses == ["rope_theta not in config.json (neither top level nor rope_parameters); using 10000.0"]
    out = tmp_path / "snoozy-vocab-only.bin"
    vocab = [(b"", 0.0)] * 32000
    write_legacy(out, "ggjt", 3, "llama", hp, vocab, [], ftype=2)
    header = out.read_bytes()[:36]
    assert header == struct.pack("<9I", 0x67676A74, 3, 32000, 5120, want_n_mult, 40, 40, 128, 2)
