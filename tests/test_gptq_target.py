"""--target-bpw / --target-size / --recipe with GPTQ (issue 15, item 3).

The allocator chooses each tensor's type from the imatrix-weighted RTN loss (its
own tests: tests/test_target_bpw.py) scaled by the tensor's measured KL factor
(pipeline/sensitivity.py); GPTQ then rounds each Linear onto the type chosen for
it. Checked here on a tiny LLaMA whose rows fit every block: the written file
against the budget (gguf-py reads the sizes and types), each chosen loss against
the RTN loss times the factor, the factor against a KL recomputed with gguf-py's
Q4_0 and transformers' forward, the types recorded in quantize.recipe, a saved recipe reapplied byte for byte without the loss pass,
the output against transformers' forward pass (closer than the RTN file of the
same recipe), and bad requests refused in one line with nothing written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smolq import api
from smolq.ggml_types import GGMLType
from smolq.tiny import make_tiny_model

gguf = pytest.importorskip("gguf")

CANDIDATES = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0,iq4_xs,iq3_s"
FAST = dict(nsamples=4, seqlen=64, quiet=True)
BUDGET = 1_200_000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny LLaMA (rows of 256 and 768), a calibration text, its imatrix (the windows GPTQ uses)."""
    d = tmp_path_factory.mktemp("gptq-target")
    hf = make_tiny_model("llama", d / "hf", hidden_size=256, seed=0, config_overrides={"intermediate_size": 768})
    text = " ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(["cat", "dog", "bird"] * 400))
    (d / "calib.txt").write_text(text)
    api.imatrix(hf, d / "calib.imatrix", calib=d / "calib.txt", ctx=64, chunks=4)
    api.convert(hf, d / "f32.gguf", outtype="f32")
    return d, hf


def _types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _recipe_key(path):
    return json.loads(str(gguf.GGUFReader(str(path)).fields["quantize.recipe"].contents()))


def test_budget_is_kept_and_losses_are_the_rtn_losses_times_the_kl_probe(model, tmp_path):
    from smolq.pipeline.allocate import rtn_loss

    d, hf = model
    out = tmp_path / "g.gguf"
    s = api.quantize(hf, out, target_size=BUDGET, candidates=CANDIDATES, calib=d / "calib.txt", **FAST)
    assert s["method"] == "gptq" and s["preset"] == "MIXED"
    written = out.stat().st_size
    assert written == s["bytes"] and written <= BUDGET
    # the header is the plan's less its imatrix keys: never larger than the size the allocator fitted
    assert written <= s["allocation"]["file_bytes"]
    f32 = {t.name: t for t in gguf.GGUFReader(str(d / "f32.gguf")).tensors}
    largest_tensor = max(int(t.n_elements) for t in f32.values()) * 34 // 32  # Q8_0, the largest candidate
    assert BUDGET - written < largest_tensor, (written, BUDGET)
    types = _types(out)
    quantized = {n: t for n, t in types.items() if t != "F32"}
    assert len(set(quantized.values())) > 1 and _recipe_key(out) == quantized
    # each chosen loss is the tensor's RTN loss at its type (tests/test_target_bpw.py checks those
    # against gguf-py) times its measured KL factor
    sens, losses = s["allocation"]["sensitivity"], s["allocation"]["losses"]
    imatrix = api.read_imatrix(d / "calib.imatrix")  # the same windows as the one computed in the run
    assert set(sens) == set(quantized) and all(v > 0 for v in sens.values())
    for name, t in quantized.items():
        w = np.asarray(f32[name].data, dtype=np.float32).reshape(-1, int(f32[name].shape[0]))
        expected = sens[name] * rtn_loss(w, GGMLType[t], imatrix.importance(name))
        assert losses[name] == pytest.approx(expected, rel=1e-6), name


def test_kl_probe_is_the_kl_of_one_quantized_tensor(model):
    """s_t = KL(model || model with only t at Q4_0) / loss_t(Q4_0), recomputed here: gguf-py's Q4_0
    quantizer and decoder, numpy's loss, transformers' forward (no importance vector)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.pipeline.sensitivity import kl_sensitivities

    d, hf = model
    names = ["blk.0.attn_v.weight", "blk.1.ffn_down.weight"]
    got = kl_sensitivities(hf, d / "calib.txt", names, lambda name, shape: None, ctx=64)
    m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.tensor(AutoTokenizer.from_pretrained(hf)((d / "calib.txt").read_text())["input_ids"][:64])[None]
    sources = {"blk.0.attn_v.weight": m.model.layers[0].self_attn.v_proj,
               "blk.1.ffn_down.weight": m.model.layers[1].mlp.down_proj}
    with torch.no_grad():
        ref = torch.log_softmax(m(input_ids=tokens).logits.double(), -1)
        for name, lin in sources.items():
            w = lin.weight.data.clone()
            x = w.numpy()
            q = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0),
                                       gguf.GGMLQuantizationType.Q4_0).reshape(x.shape)
            loss = float(((x.astype(np.float64) - q) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
            lin.weight.data.copy_(torch.from_numpy(q))
            lq = torch.log_softmax(m(input_ids=tokens).logits.double(), -1)
            lin.weight.data.copy_(w)
            kl = float((ref.exp() * (ref - lq)).sum(-1).mean())
            assert got[name] == pytest.approx(kl / loss, rel=2e-3), name


def test_gptq_budget_file_is_closer_to_the_model_than_rtn_of_the_same_recipe(model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.sources.reference import hf_hparams, logits_from_file

    d, hf = model
    gptq_out, rtn_out, recipe = tmp_path / "g.gguf", tmp_path / "r.gguf", tmp_path / "recipe.json"
    api.quantize(hf, gptq_out, target_bpw=4.0, candidates=CANDIDATES, calib=d / "calib.txt",
                 save_recipe=recipe, **FAST)
    api.quantize(d / "f32.gguf", rtn_out, recipe=recipe, imatrix=d / "calib.imatrix")
    assert _types(gptq_out) == _types(rtn_out)
    text = (d / "calib.txt").read_text()
    tokens = np.array(AutoTokenizer.from_pretrained(hf)(text)["input_ids"][200:264])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(
            input_ids=torch.as_tensor(tokens)[None], use_cache=False).logits[0].double()
    lp = torch.log_softmax(ref, -1)

    def kl(path):
        got = torch.as_tensor(logits_from_file(path, tokens[None], hparams_override=hf_hparams(hf))[0])
        return float((lp.exp() * (lp - torch.log_softmax(got, -1))).sum(-1).mean())

    k_gptq, k_rtn = kl(gptq_out), kl(rtn_out)
    assert k_gptq < k_rtn < 0.5, (k_gptq, k_rtn)


def test_a_saved_recipe_gives_the_same_file_without_the_loss_pass(model, tmp_path, monkeypatch):
    d, hf = model
    first, again, saved = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "r.json"
    api.quantize(hf, first, target_size=BUDGET, candidates=CANDIDATES, calib=d / "calib.txt", save_recipe=saved,
                 **FAST)
    from smolq.pipeline import requantize

    def no_loss_pass(*a, **k):
        raise AssertionError("a recipe needs no loss pass")

    monkeypatch.setattr(requantize, "quantize_file", no_loss_pass)
    monkeypatch.setattr(requantize, "compute_imatrix", no_loss_pass)
    api.quantize(hf, again, recipe=saved, calib=d / "calib.txt", **FAST)
    assert first.read_bytes() == again.read_bytes()
    saved_types = {n: t for n, t in json.loads(saved.read_text()).items()}
    assert _types(again) == saved_types


def test_imatrix_given_is_used_for_the_loss_pass(model, tmp_path, monkeypatch):
    d, hf = model
    from smolq.pipeline import requantize

    def not_computed(*a, **k):
        raise AssertionError("--imatrix given: nothing to compute")

    monkeypatch.setattr(requantize, "compute_imatrix", not_computed)
    s = api.quantize(hf, tmp_path / "d.gguf", target_bpw=4.0, candidates=CANDIDATES, calib=d / "calib.txt",
                     imatrix=d / "calib.imatrix", dry_run=True, **FAST)
    assert s["dry_run"] and s["imatrix"]["chunks"] == 4 and not (tmp_path / "d.gguf").exists()


def test_dry_run_prints_the_choice_and_writes_nothing(model, tmp_path, cli):
    d, hf = model
    out, recipe = tmp_path / "d.gguf", tmp_path / "r.json"
    r = cli("quantize", hf, out, "--target-bpw", "4", "--candidates", CANDIDATES, "--calib", d / "calib.txt",
            "--nsamples", "4", "--seqlen", "64", "--dry-run", "--save-recipe", recipe)
    assert r.returncode == 0, r.stderr
    assert "target 4 bpw: file" in r.stdout and "predicted loss" in r.stdout
    assert not out.exists() and json.loads(recipe.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the temporary directory is gone


@pytest.mark.parametrize("args, message", [
    (["--format", "gptq"], "writes GGUF"),
    ([], "give --calib TEXT"),  # data-free calibration has no text for the importance matrix
])
def test_bad_requests_one_line_exit_2_nothing_written(model, tmp_path, cli, args, message):
    d, hf = model
    out = tmp_path / "bad.gguf"
    r = cli("quantize", hf, out, "--target-bpw", "4", "--method", "gptq", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())
