"""`smolq quantize --method gptq` from the command line: every GPTQ option reaches
the checkpoint it writes, and the GPTQ-only options are refused with --method rtn."""
from __future__ import annotations

import json

import numpy as np
import pytest

from smolq.pipeline import gptq as gptq_pipeline
from smolq.transforms import iq_grids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gptq-cli")
    hf = make_tiny_model("llama", root / "hf", hidden_size=64, n_layers=2, seed=4)
    (root / "calib.txt").write_text(" ".join(f"a {w} ran to {i % 13}" for i, w in enumerate(["fox", "owl"] * 300)))
    return root, hf


def _calib(root):
    return ["--calib", root / "calib.txt", "--nsamples", "4", "--seqlen", "32"]


def test_gptq_dir_options_reach_quantize_config(tiny, cli):
    root, hf = tiny
    out = root / "int3"
    r = cli("quantize", hf, out, "--method", "gptq", "--format", "gptq", "--bits", "3", "--group-size", "32",
            "--act-order", "--static-groups", "--asym", "--no-true-sequential", "--damp", "0.05", "--mse", "2.4",
            *_calib(root), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["method"] == "gptq" and summary["bits"] == 3 and summary["true_sequential"] is False
    cfg = json.loads((out / "quantize_config.json").read_text())
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"]) == (3, 32, True, False)
    assert cfg["static_groups"] is True and cfg["true_sequential"] is False
    assert cfg["damp_percent"] == pytest.approx(0.05)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["quantization_config"]["bits"] == 3


def test_mse_and_seed_change_what_is_solved(tiny, cli, monkeypatch):
    """--mse reaches the integer grid; --seed reaches calibration (data-free sampling)."""
    root, hf = tiny
    seen = []

    orig = iq_grids.grid_for

    def spy(*a, **k):
        seen.append(k.get("mse"))
        return orig(*a, **k)

    monkeypatch.setattr(gptq_pipeline, "grid_for", spy)
    r = cli("quantize", hf, root / "mse", "--method", "gptq", "--format", "gptq", "--mse", "2.4", *_calib(root), "-q")
    assert r.returncode == 0, r.stderr
    assert seen and set(seen) == {2.4}  # the grid the pipeline builds (it imports grid_for at module top)

    outs = []
    for seed in ("1", "1", "2"):
        out = root / f"free-{len(outs)}"
        r = cli("quantize", hf, out, "--method", "gptq", "--format", "gptq", "--bits", "8", "--nsamples", "2",
                "--seqlen", "16", "--seed", seed, "-q")
        assert r.returncode == 0, r.stderr
        outs.append(b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors"))))
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_scale_rule_reaches_block_grids(tiny, cli):
    root, hf = tiny
    files = {}
    for rule in ("weighted", "plain"):
        files[rule] = root / f"q40-{rule}.gguf"
        r = cli("quantize", hf, files[rule], "--method", "gptq", "--type", "q4_0", "--scale-rule", rule,
                *_calib(root), "-q")
        assert r.returncode == 0, r.stderr
    from gguf import GGUFReader

    a, b = (GGUFReader(files[k]) for k in ("weighted", "plain"))
    pick = lambda rd: {t.name: np.array(t.data) for t in rd.tensors if t.name.endswith("ffn_down.weight")}  # noqa: E731
    assert any(not np.array_equal(x, pick(b)[k]) for k, x in pick(a).items())


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.parametrize("args, message", [
    (["--scale-rule", "best"], "unknown --scale-rule"),
    (["--mse", "-1"], "--mse must be"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    pytest.param(["--device", "cuda"], "--device cuda requested but CUDA is not available here",
                 marks=pytest.mark.skipif(not _no_cuda(), reason="this machine has CUDA: the run would succeed")),
    (["--hessian-reg", "1.5"], "--hessian-reg must be"),
    (["--hessian-reg", "lots"], "--hessian-reg must be"),
])
def test_bad_gptq_options_are_one_line_errors(tiny, cli, args, message):
    root, hf = tiny
    r = cli("quantize", hf, root / "bad.gguf", "--method", "gptq", "--type", "q4_0", *args, *_calib(root))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (root / "bad.gguf").exists()


def test_unreadable_tokenizer_is_a_one_line_error(tiny, tmp_path, cli):
    """The tokenizers library raises a bare Exception for a tokenizer.json it cannot parse."""
    import shutil

    root, hf = tiny
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    for name in ("tokenizer.model", "vocab.json", "merges.txt"):
        (src / name).unlink(missing_ok=True)
    r = cli("quantize", src, tmp_path / "out", "--method", "gptq", "--format", "gptq", *_calib(root))
    assert r.returncode == 2 and "tokenizer cannot be loaded" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_plain_scale_rule_on_k_quants_is_a_one_line_error(tmp_path, cli):
    """"plain" is the 32-block reference rounding; a plan with K-quants (256-wide rows) is refused, not a traceback."""
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=256, n_layers=1, seed=1)
    (tmp_path / "calib.txt").write_text("the fox ran to the owl " * 50)
    r = cli("quantize", hf, tmp_path / "out.gguf", "--method", "gptq", "--type", "q3_k_m", "--scale-rule", "plain",
            "--calib", tmp_path / "calib.txt", "--nsamples", "2", "--seqlen", "16", "-q")
    assert r.returncode == 2 and "--scale-rule plain" in r.stderr and "Q3_K" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("flag", [["--resume"], ["--seed", "3"], ["--no-true-sequential"], ["--mse", "2.4"],
                                  ["--hessian-reg", "auto"]])
def test_gptq_only_options_refused_with_rtn(tiny, cli, flag):
    root, hf = tiny
    r = cli("quantize", hf, root / "rtn.gguf", "--type", "q4_0", *flag)
    assert r.returncode == 2 and "--method gptq" in r.stderr


def test_gptq_of_a_gptq_checkpoint_points_to_convert(tiny, cli):
    root, hf = tiny
    src = root / "g4"
    assert cli("quantize", hf, src, "--method", "gptq", "--format", "gptq", *_calib(root), "-q").returncode == 0
    r = cli("quantize", src, root / "again.gguf", "--method", "gptq", "--type", "q4_0", *_calib(root))
    assert r.returncode == 2 and "already GPTQ-quantized" in r.stderr and "smolq convert" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (root / "again.gguf").exists()
