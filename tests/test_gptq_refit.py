"""Scale re-fitting after rounding (--refit-scales, transforms/gptq.refit_scales).

With the codes fixed, each row's free fp16 parameters (d of the legacy 32-blocks, and m of
the affine ones; d of IQ4_NL) are re-solved against the layer error tr((W−Q)H(W−Q)ᵀ).
Checked against a hand-computed least squares (one row, identity and diagonal Hessians),
the layer error in float64 (never higher, row by row), gguf-py's decoding of the written
bytes (the grid's dequantized weights are what the file holds), and the grids it must not
touch (llama.cpp's reference "plain" rule, K-quants, IQ4_XS: their scales are not free).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smolq.ggml_types import GGMLType as T
from smolq.transforms.gptq import gptq_solve, layer_error, refit_scales, regularise
from smolq.transforms.grids import fp16_round
from smolq.transforms.iq_grids import grid_for

gguf = pytest.importorskip("gguf")

REFITTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL)


def _problem(rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) @ (0.2 * torch.randn(cols, cols, generator=g) + torch.eye(cols))
    return 0.05 * torch.randn(rows, cols, generator=g), X.T @ X / X.shape[0]


def _row_errors(W, Q, H):
    D = (W - Q).double()
    return torch.einsum("rj,jk,rk->r", D, H.double(), D)


def test_one_row_identity_hessian_is_the_least_squares_scale():
    """One Q4_0 row, H = I: each block's new d is Σ w·q / Σ q² over its 32 values (hand formula)."""
    W, _ = _problem(rows=1, cols=64, seed=1)
    grid = grid_for(1, 64, qtype=T.Q4_0)
    H = torch.eye(64)
    gptq_solve(W, H.clone(), grid)
    grid.mul = fp16_round(grid.mul * 1.2)  # codes kept, scales off: the least squares must bring them back
    q = grid.q.double().reshape(2, 32)  # the signed levels GPTQ chose
    w = W.reshape(2, 32).double()
    expected = fp16_round(((w * q).sum(1) / (q * q).sum(1)).float())
    before = _row_errors(W, grid.dequantized(), H)
    assert refit_scales(W, H, grid) == 1
    assert torch.equal(grid.mul[0], expected)
    assert _row_errors(W, grid.dequantized(), H) <= before


def test_diagonal_hessian_weights_each_value():
    W, _ = _problem(rows=1, cols=32, seed=2)
    h = torch.linspace(0.1, 3.0, 32)
    grid = grid_for(1, 32, qtype=T.IQ4_NL)
    gptq_solve(W, torch.diag(h), grid)
    grid.set_scales(fp16_round(grid.mul * 0.8))
    v = grid.values[grid.codes.long()].double()[0]  # the kvalues GPTQ chose
    expected = fp16_round(((h * W[0]).double() @ v / ((h * v).double() @ v)).float().reshape(1))
    assert refit_scales(W, torch.diag(h), grid) == 1
    assert torch.equal(grid.mul[0], expected)


@pytest.mark.parametrize("qtype", REFITTED, ids=lambda t: t.name)
@pytest.mark.parametrize("reg", [0.0, 0.75])
def test_never_raises_a_rows_error_and_the_bytes_decode_to_it(qtype, reg):
    W, H = _problem()
    Hr = regularise(H.clone(), reg)
    grid = grid_for(*W.shape, qtype=qtype)
    gptq_solve(W, Hr.clone(), grid)
    before = _row_errors(W, grid.dequantized(), Hr)
    changed = refit_scales(W, Hr, grid)
    after = _row_errors(W, grid.dequantized(), Hr)
    assert changed > W.shape[0] // 2  # it does something
    assert (after <= before).all()
    assert after.sum() < before.sum()
    decoded = gguf.quants.dequantize(grid.to_bytes(), gguf.GGMLQuantizationType[qtype.name]).reshape(W.shape)
    np.testing.assert_array_equal(decoded, grid.dequantized().numpy())


@pytest.mark.parametrize("qtype, rule", [(T.Q4_0, "plain"), (T.Q4_K, "weighted"), (T.IQ4_XS, "weighted"),
                                         (T.Q6_K, "weighted")], ids=lambda x: getattr(x, "name", x))
def test_grids_whose_scales_are_not_free_are_untouched(qtype, rule):
    W, H = _problem()
    grid = grid_for(*W.shape, qtype=qtype, rule=rule)
    gptq_solve(W, H.clone(), grid)
    before = grid.to_bytes().copy()
    assert not grid.refits_scales and refit_scales(W, H, grid) == 0
    assert np.array_equal(grid.to_bytes(), before)


def test_the_pipeline_option_changes_only_refittable_tensors(tmp_path):
    """--refit-scales on a tiny LLaMA: Q4_0 Linears move, and the file's layer errors drop."""
    from smolq.pipeline.gptq import quantize_hf_gptq
    from test_gptq_pipeline import tiny_with_text

    _, hf = tiny_with_text(tmp_path)
    kw = dict(format="gguf", qtype="q4_0", calib=tmp_path / "calib.txt", nsamples=3, seqlen=24, quiet=True)
    on = quantize_hf_gptq(hf, tmp_path / "on.gguf", refit_scales=True, **kw)
    off = quantize_hf_gptq(hf, tmp_path / "off.gguf", refit_scales=False, **kw)
    assert on["refit_scales"] and not off["refit_scales"]
    a, b = (gguf.GGUFReader(str(tmp_path / n)) for n in ("on.gguf", "off.gguf"))
    differ = [t.name for t, u in zip(a.tensors, b.tensors) if not np.array_equal(t.data, u.data)]
    assert differ and all(n.startswith("blk.") for n in differ)
