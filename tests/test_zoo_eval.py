"""smolq zoo with tiny models built from the manifest, perplexity gates and a GPTQ directory.

The reference perplexity is recomputed here with transformers and the
checkpoint's own tokenizer.json; the GPTQ directory is checked on disk.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from smolq.zoo import report as zreport
from smolq.zoo.manifest import load_manifest
from smolq.zoo.runner import LOCK_NAME, RunOptions, run_zoo

CTX = 32

MANIFEST = """
[zoo]
eval = { text = "eval.txt", ctx = 32 }
[gates]
max_ppl_increase_pct = 25

[[models]]
name = "mpt"
tiny = { family = "mpt", seed = 3 }
  [[models.outputs]]
  type = "q8_0"
  [[models.outputs]]
  type = "q4_0"
  gates = { max_ppl_increase = -1000.0 }

[[models]]
name = "llama"
tiny = { family = "llama", seed = 4 }
  [[models.outputs]]
  container = "gptq"
  bits = 4
  group_size = 32
  nsamples = 2
  seqlen = 32
  calibration = "calib.txt"
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from smolq.tiny import TINY_TEXT

    root = tmp_path_factory.mktemp("zoo-eval")
    (root / "eval.txt").write_text(TINY_TEXT[len(TINY_TEXT) // 2:] + TINY_TEXT[: len(TINY_TEXT) // 2])
    (root / "calib.txt").write_text(TINY_TEXT)
    (root / "zoo.toml").write_text(MANIFEST)
    rep = run_zoo(load_manifest(root / "zoo.toml", root / "out"), RunOptions(jobs=2, quiet=True))
    return root, rep


def rows(rep: dict) -> dict[str, dict]:
    return {r["id"]: r for r in zreport.rows_of(rep)}


def test_reference_perplexity_matches_transformers(built):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    root, rep = built
    tiny_dirs = sorted((root / "out" / ".zoo" / "tiny").glob("mpt-*"))
    assert len(tiny_dirs) == 1 and (tiny_dirs[0] / "config.json").is_file()
    ids = Tokenizer.from_file(str(tiny_dirs[0] / "tokenizer.json")).encode(
        (root / "eval.txt").read_text(), add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[0], dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for w in range(len(ids) // CTX):
        window = torch.tensor([ids[w * CTX:(w + 1) * CTX]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
        nll -= float(logp[torch.arange(CTX - 1), window[0, 1:]].sum())
        count += CTX - 1
    expected = math.exp(nll / count)
    group = next(g for g in rep["models"] if g["name"] == "mpt")
    assert group["reference_ppl"] == pytest.approx(expected, rel=1e-4)
    q8 = rows(rep)["mpt/q8_0"]
    assert q8["ppl_delta"] == pytest.approx(q8["ppl"] - group["reference_ppl"])
    assert q8["ppl_delta_pct"] == pytest.approx(100 * q8["ppl_delta"] / group["reference_ppl"])
    assert abs(q8["ppl_delta_pct"]) < 5 and q8["ok"]


def test_perplexity_gate_fails_with_its_row_named(built):
    _, rep = built
    r = rows(rep)["mpt/q4_0"]
    assert not r["ok"] and [g["gate"] for g in r["gates"] if not g["ok"]] == ["max_ppl_increase"]
    assert any(line.startswith("mpt/q4_0: ") and "max_ppl_increase -1000" in line
               for line in rep["summary"]["gate_failures"])
    assert not rep["ok"]


def test_gptq_directory_built_and_measured(built):
    root, rep = built
    r = rows(rep)["llama/gptq-int4"]
    assert r["status"] == "built", r.get("error")
    d = root / "out" / "llama" / "gptq-int4"
    cfg = json.loads((d / "quantize_config.json").read_text())
    assert cfg["bits"] == 4 and cfg["group_size"] == 32
    lock = json.loads((root / "out" / LOCK_NAME).read_text())["outputs"]["llama/gptq-int4"]
    assert "quantize_config.json" in lock["files"] and any(f.endswith(".safetensors") for f in lock["files"])
    assert lock["bytes"] == sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    # every quantized linear was compared with the source; 4-bit g32 error is small but not zero
    rmse = lock["metrics"]["tensor_rmse"]
    assert any(".q_proj." in n for n in rmse) and all(0 < v < 0.1 for v in rmse.values())
    assert r["ppl"] is not None and np.isfinite(r["ppl"])


def test_rerun_skips_tiny_models_gptq_and_metrics(built):
    root, _ = built
    rep = run_zoo(load_manifest(root / "zoo.toml", root / "out"), RunOptions(jobs=2, quiet=True))
    assert {r["status"] for r in zreport.rows_of(rep)} == {"skipped"}
