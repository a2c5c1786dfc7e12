"""The size allocator's KL probe (pipeline/sensitivity.py), streamed block by block.

s_t = KL(model || model with only t at Q4_0) / loss_t(Q4_0) is recomputed here with the whole
model in transformers (gguf-py's Q4_0 quantizer and decoder, numpy's loss, no importance vector)
for tensors of the first and last blocks, the embedding (tied: the head moves with it) and an
untied head, on LLaMA and Gemma 3 (sliding and global blocks, soft-capped logits); and the
probe never has more than one block's weights in memory.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from smolq.pipeline import sensitivity
from smolq.tiny import make_tiny_model

TEXT = " ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(["cat", "dog", "bird"] * 60))
CTX = 48
N_LAYERS = 4


@pytest.fixture(scope="module", params=[("llama", False), ("llama", True), ("gemma3", True)],
                ids=["llama-untied", "llama-tied", "gemma3-tied"])
def tiny(request, tmp_path_factory):
    family, tied = request.param
    root = tmp_path_factory.mktemp(f"kl-{family}-{tied}")
    overrides = {"final_logit_softcapping": 3.0} if family == "gemma3" else None
    hf = make_tiny_model(family, root / "hf", tied=tied, n_layers=N_LAYERS, seed=5, config_overrides=overrides)
    (root / "calib.txt").write_text(TEXT)
    return root, hf, tied


def _names(tied: bool) -> dict[str, str]:
    """GGUF name -> the HF parameter the test perturbs."""
    last = N_LAYERS - 1
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             f"blk.{last}.ffn_down.weight": f"model.layers.{last}.mlp.down_proj.weight",
             f"blk.{last}.attn_v.weight": f"model.layers.{last}.self_attn.v_proj.weight"}
    if not tied:
        names["output.weight"] = "lm_head.weight"
    return names


def _whole_model_sensitivities(hf, names: dict[str, str]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(hf)(TEXT)["input_ids"][:CTX]
    tokens = torch.tensor(ids)[None]
    params = dict(m.named_parameters())
    out = {}
    with torch.no_grad():
        ref = torch.log_softmax(m(input_ids=tokens, use_cache=False).logits.double(), -1)
        for name, hf_name in names.items():
            p = params[hf_name]  # a tied head is this same parameter
            w = p.data.clone()
            x = w.numpy()
            q = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0),
                                       gguf.GGMLQuantizationType.Q4_0).reshape(x.shape)
            loss = float(((x.astype(np.float64) - q) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
            p.data.copy_(torch.from_numpy(q))
            got = torch.log_softmax(m(input_ids=tokens, use_cache=False).logits.double(), -1)
            p.data.copy_(w)
            out[name] = float((ref.exp() * (ref - got)).sum(-1).mean()) / loss
    return out


def test_streamed_probe_is_the_whole_models_kl(tiny):
    root, hf, tied = tiny
    names = _names(tied)
    got = sensitivity.kl_sensitivities(hf, root / "calib.txt", list(names), lambda name, shape: None, ctx=CTX)
    expected = _whole_model_sensitivities(hf, names)
    assert set(got) == set(names)
    for name in names:
        assert expected[name] > 0 and got[name] == pytest.approx(expected[name], rel=2e-3), name


def test_probe_holds_one_block_at_a_time(tiny, monkeypatch):
    """Never more parameters in memory than one block plus the embedding and the head."""
    root, hf, tied = tiny
    seen = []

    class Counting(sensitivity._Weights):
        def materialize(self, module, prefix="", read_only=False):
            super().materialize(module, prefix, read_only)
            seen.append(sum(p.numel() for p in self.model.parameters() if p.device.type != "meta"))

    monkeypatch.setattr(sensitivity, "_Weights", Counting)
    got = sensitivity.kl_sensitivities(hf, root / "calib.txt", list(_names(tied)), lambda name, shape: None, ctx=CTX)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    block = sum(p.numel() for p in m.model.layers[0].parameters())
    outside = sum(p.numel() for n, p in m.named_parameters(remove_duplicate=False) if ".layers." not in n)
    whole = sum(p.numel() for p in m.parameters())
    assert got and seen and max(seen) <= block + outside < whole
