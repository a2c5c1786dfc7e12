"""`smolq quantize HF_DIR OUT`: through the convert pipeline; `smolq verify --logits` against transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_cli_support import run_cli

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("hf") / "tiny-llama", hidden_size=64)


@pytest.fixture(scope="module")
def f32_gguf(hf_dir, tmp_path_factory):
    from smolq.cli import main

    out = tmp_path_factory.mktemp("hf-out") / "f32.gguf"
    assert main(["quantize", str(hf_dir), str(out), "-t", "f32", "-q"]) == 0
    return out


def test_hf_dir_to_q8_0_equals_gguf_quants_of_the_f32_conversion(capsys, hf_dir, f32_gguf, tmp_path):
    out = tmp_path / "q8.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", hf_dir, out, "-t", "q8_0", "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["output"] == str(out) and summary["preset"] == "Q8_0"
    ref = {t.name: t for t in gguf.GGUFReader(str(f32_gguf)).tensors}
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == 7
    n_q = 0
    for t in r.tensors:
        src = np.asarray(ref[t.name].data, dtype=np.float32)
        if t.tensor_type == Q.Q8_0:
            n_q += 1
            assert np.asarray(t.data).tobytes() == gguf.quants.quantize(src, Q.Q8_0).tobytes(), t.name
        else:
            assert t.tensor_type == Q.F32 and src.ndim == 1
    assert n_q > 0


def test_hf_dir_rejects_file_only_options(capsys, hf_dir, tmp_path):
    rc, _, err = run_cli(capsys, "quantize", hf_dir, tmp_path / "x.gguf", "-t", "q4_0", "--pure")
    assert rc == 2 and "smolq convert" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "quantize", hf_dir, tmp_path / "x.gguf", "-t", "q4_0", "--group-size", "64")
    assert rc == 2 and "--method gptq" in err
    assert list(tmp_path.iterdir()) == []


def test_verify_logits_against_transformers(capsys, hf_dir, f32_gguf):
    pytest.importorskip("smolq.sources.reference")
    rc, stdout, err = run_cli(capsys, "verify", f32_gguf, "--logits", "--against", hf_dir, "--json",
                              "--max-kl", "1e-6")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["ok"] and report["logits"]["top1_agreement"] == 1.0
