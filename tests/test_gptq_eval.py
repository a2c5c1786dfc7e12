"""`smolq eval`: perplexity against transformers' own loss, on HF and GGUF models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smolq.errors import InputError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("eval")
    hf = make_tiny_model("llama", root / "hf", hidden_size=64, n_layers=2, seed=1)
    (root / "text.txt").write_text(" ".join(f"one two three {i}" for i in range(200)))
    return root, hf


def test_perplexity_matches_transformers_loss(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.pipeline.evaluate import evaluate

    root, hf = tiny
    res = evaluate(hf, root / "text.txt", ctx=32, max_windows=3, score="all")
    ids = AutoTokenizer.from_pretrained(hf)((root / "text.txt").read_text(), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    losses = []
    with torch.no_grad():
        for w in range(3):
            x = torch.tensor(ids[w * 32:(w + 1) * 32])[None]
            losses.append(float(model(input_ids=x, labels=x).loss))  # mean over 31 predictions
    assert res["n_windows"] == 3 and res["n_tokens"] == 93
    assert res["ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)


def test_gguf_file_and_kl_and_cli(tiny, capsys):
    from smolq.cli import main
    from smolq.pipeline.evaluate import evaluate
    from smolq.pipeline.convert import convert

    root, hf = tiny
    f16 = root / "m.gguf"
    convert(hf, f16, outtype="f32")
    res = evaluate(f16, root / "text.txt", ctx=32, max_windows=2, kl_against=hf, backend="reference")
    ref = evaluate(hf, root / "text.txt", ctx=32, max_windows=2)
    assert res["ppl"] == pytest.approx(ref["ppl"], rel=1e-3)
    assert 0 <= res["kld"] < 1e-5
    with pytest.raises(InputError, match="tokenizer"):
        evaluate(f16, root / "text.txt", ctx=32, backend="reference")
    assert main(["eval", str(hf), "--text", str(root / "text.txt"), "--ctx", "32", "--max-windows", "1"]) == 0
    assert "PPL" in capsys.readouterr().out
    assert main(["eval", str(root / "nope"), "--text", str(root / "text.txt")]) == 2
