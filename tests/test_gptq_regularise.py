"""Hessian regularisation toward its diagonal (--hessian-reg), chosen per Linear by
cross-validation on a held-out part of the calibration set.

- regularise() against a hand-computed 2x2 case;
- a = 1 (a diagonal Hessian: no error feedback) is importance-weighted RTN byte for
  byte, and with the "plain" rule gguf.quants' own reference quantizer;
- the choice minimises the held-out error, recomputed here from its own solves, so it
  never exceeds a = 0's; where the fit part's correlations do not hold on the held-out
  part it moves away from 0; it is deterministic;
- the calibration split never shares a window between the parts;
- the pipeline: --hessian-reg auto on a tiny LLaMA chooses per Linear, is deterministic,
  and falls back to 0 (with a note) when the calibration set cannot be split.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from smolq.ggml_types import GGMLType
from smolq.pipeline.gptq import quantize_hf_gptq
from smolq.transforms import calib
from smolq.transforms import gptq as solver
from smolq.transforms.gptq import (REG_CANDIDATES, choose_regularisation, diagonal_solve, gptq_solve, layer_error,
                                   regularise, rtn_solve)
from smolq.transforms.grids import BlockGrid, make_grid


def _hessian(n_tokens, cols, seed, mix=0.9):
    """2XXᵀ/n of inputs whose channels are strongly correlated (a shared factor, weight `mix`)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n_tokens, 1, generator=g)
    X = mix * shared * torch.linspace(0.5, 1.5, cols) + torch.randn(n_tokens, cols, generator=g)
    return 2 * X.T @ X / n_tokens


def _weights(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_regularise_keeps_the_diagonal_and_shrinks_the_rest():
    H = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert torch.equal(regularise(H, 0.25), torch.tensor([[4.0, 1.5], [1.5, 9.0]]))
    assert torch.equal(regularise(H, 1.0), torch.tensor([[4.0, 0.0], [0.0, 9.0]]))
    assert regularise(H, 0) is H
    assert torch.equal(H, torch.tensor([[4.0, 2.0], [2.0, 9.0]]))  # not modified


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q3_K, None], ids=str)
def test_full_regularisation_is_importance_weighted_rtn(qtype):
    W, H = _weights(8, 256, 1), _hessian(512, 256, 2)
    grids = [make_grid(8, 256, qtype=qtype, group_size=64) for _ in range(3)]
    Q = gptq_solve(W, regularise(H, 1.0), grids[0]).Q
    R = rtn_solve(W, grids[1], torch.diag(H))
    torch.testing.assert_close(Q, R, rtol=0, atol=0)
    D = diagonal_solve(W, H, grids[2])
    torch.testing.assert_close(D, R, rtol=0, atol=0)
    if qtype is not None:
        assert np.array_equal(grids[0].to_bytes(), grids[1].to_bytes())
        assert np.array_equal(grids[0].to_bytes(), grids[2].to_bytes())


def test_full_regularisation_with_the_plain_rule_is_ggufs_reference_quantizer():
    """No error feedback and no weighting: exactly gguf-py's Q4_0 (an independent implementation)."""
    W, H = _weights(8, 256, 3), _hessian(512, 256, 4)
    grid = BlockGrid(GGMLType.Q4_0, 8, 256, rule="plain")
    gptq_solve(W, regularise(H, 1.0), grid)
    ref = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(grid.to_bytes(), ref)


def test_diagonal_solve_treats_dead_columns_as_gptq_does():
    W, H = _weights(4, 64, 5), _hessian(256, 64, 6)
    H[:, 7] = H[7, :] = 0
    grids = [make_grid(4, 64, qtype=GGMLType.Q4_0) for _ in range(2)]
    torch.testing.assert_close(diagonal_solve(W, H, grids[0]), gptq_solve(W, regularise(H, 1.0), grids[1]).Q,
                               rtol=0, atol=0)


def _shifted_split(cols=128, seed=7):
    """Fit part: channels strongly correlated; held-out part: the same channels, independent
    (the domain shift that makes the fit part's error feedback wrong elsewhere)."""
    return _hessian(2048, cols, seed, mix=3.0), _hessian(2048, cols, seed + 1, mix=0.0)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K], ids=lambda t: t.name)
def test_choice_minimises_the_held_out_error_and_never_exceeds_plain_gptq(qtype):
    W = _weights(16, 256, 8)
    H_fit, H_held = _shifted_split(256)
    new_grid = lambda: make_grid(16, 256, qtype=qtype)  # noqa: E731
    choice = choose_regularisation(W, H_fit, H_held, new_grid)
    # recomputed here, one plain GPTQ solve per candidate
    mine = {a: layer_error(W, gptq_solve(W, regularise(H_fit, a), new_grid()).Q, H_held) for a in REG_CANDIDATES}
    assert choice.held_errors == pytest.approx(mine, rel=1e-9)
    assert mine[choice.a] == min(mine.values()) and mine[choice.a] <= mine[0.0]
    assert choice.a > 0 and mine[choice.a] < mine[0.0]  # the shift is there: plain GPTQ is not the best


def test_choice_is_plain_gptq_when_the_held_out_part_agrees():
    """Held-out inputs from the fit part itself: nothing beats the solve fitted to them
    (not guaranteed for every draw; this one is checked)."""
    W = _weights(16, 128, 9)
    H = _hessian(4096, 128, 10, mix=3.0)
    choice = choose_regularisation(W, H, H, lambda: make_grid(16, 128, qtype=GGMLType.Q4_0))
    assert choice.a == 0.0 and choice.held_errors[0.0] == min(choice.held_errors.values())


def test_choice_is_deterministic():
    W = _weights(8, 128, 11)
    H_fit, H_held = _shifted_split(128, 12)
    runs = [choose_regularisation(W, H_fit, H_held, lambda: make_grid(8, 128, qtype=GGMLType.Q4_0))
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_text_split_never_shares_a_window():
    n, seqlen = 1000, 100  # cut at 750
    starts = [0, 640, 650, 700, 750, 900]
    samples = [torch.zeros(1, seqlen) for _ in starts]
    assert calib._text_parts(starts, samples, n) == ["fit", "fit", "fit", None, "held", "held"]
    assert calib._every_kth(range(8)) == ["fit", "fit", "fit", "held"] * 2


def test_parse_hessian_reg():
    assert solver.parse_hessian_reg("auto") == "auto" and solver.parse_hessian_reg("0.2") == 0.2
    for bad in ("1.5", "-0.1", "x"):
        with pytest.raises(ValueError):
            solver.parse_hessian_reg(bad)


# --- the pipeline ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gptq-reg")
    hf = make_tiny_model("llama", root / "hf", hidden_size=64, n_layers=2, seed=3)
    words = ["cat", "dog", "bird", "owl", "fox"]
    (root / "calib.txt").write_text(" ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(words * 120)))
    return root, hf


def test_pipeline_auto_chooses_per_linear_by_the_held_out_part(tiny, monkeypatch):
    root, hf = tiny
    seen = []

    def recording(*args, **kw):
        choice = choose_regularisation(*args, **kw)
        seen.append(choice)
        return choice

    monkeypatch.setattr("smolq.pipeline.gptq.choose_regularisation", recording)
    kw = dict(format="gguf", qtype="q4_0", calib=root / "calib.txt", nsamples=12, seqlen=32, quiet=True,
              hessian_reg="auto")
    s = quantize_hf_gptq(hf, root / "auto.gguf", **kw)
    chosen = s["hessian_reg"]["chosen"]
    assert s["hessian_reg"]["mode"] == "auto" and len(chosen) == 14 == len(seen)
    assert [c.a for c in seen] == list(chosen.values())
    assert all(c.held_errors[c.a] <= c.held_errors[0.0] for c in seen)
    assert any("cross-validation" in n for n in s["notes"])
    again = quantize_hf_gptq(hf, root / "auto2.gguf", **kw)
    assert again["hessian_reg"]["chosen"] == chosen
    assert (root / "auto.gguf").read_bytes() == (root / "auto2.gguf").read_bytes()


def test_pipeline_fixed_amount_is_gptq_on_the_regularised_hessian(tiny):
    root, hf = tiny
    kw = dict(format="gguf", qtype="q4_0", calib=root / "calib.txt", nsamples=4, seqlen=32, quiet=True)
    default = quantize_hf_gptq(hf, root / "default.gguf", **kw)
    quantize_hf_gptq(hf, root / "zero.gguf", hessian_reg="0", **kw)
    quantize_hf_gptq(hf, root / "three-quarters.gguf", hessian_reg=0.75, attention_aware=True, **kw)
    # onto a ggml grid the default is 0.75 (README: GPTQ, the measurements)
    assert set(default["hessian_reg"]["chosen"].values()) == {0.75} and default["attention_aware"]
    assert (root / "default.gguf").read_bytes() == (root / "three-quarters.gguf").read_bytes()
    assert (root / "zero.gguf").read_bytes() != (root / "three-quarters.gguf").read_bytes()
    gptq_dir = quantize_hf_gptq(hf, root / "default-gptq", **dict(kw, format="gptq", qtype=None))
    assert set(gptq_dir["hessian_reg"]["chosen"].values()) == {0.0} and not gptq_dir["attention_aware"]


def test_pipeline_auto_without_a_split_falls_back_to_plain_gptq(tiny):
    root, hf = tiny
    (root / "short.txt").write_text("the cat sat on the mat")  # one short window: nothing to hold out
    kw = dict(format="gguf", qtype="q4_0", calib=root / "short.txt", quiet=True)
    s = quantize_hf_gptq(hf, root / "short-auto.gguf", hessian_reg="auto", **kw)
    quantize_hf_gptq(hf, root / "short-zero.gguf", hessian_reg="0", **kw)
    assert any("too small to hold a part out" in n for n in s["notes"])
    assert set(s["hessian_reg"]["chosen"].values()) == {0.0}
    assert (root / "short-auto.gguf").read_bytes() == (root / "short-zero.gguf").read_bytes()
