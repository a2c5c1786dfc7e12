"""Scale re-fitting after rounding (--refit-scales, transforms/gptq.refit_scales).

With the codes fixed, each row's scales are re-solved against the layer error
tr((W−Q)H(W−Q)ᵀ): the free fp16 d (and m) of the legacy 32-blocks and IQ4_NL by least squares;
the K-quants' and IQ4_XS's fp16 super-block d (and dmin) by least squares and their integer
sub-scales one at a time. Checked against hand-computed least squares (identity and diagonal
Hessians), a brute force over every integer sub-scale, the layer error in float64 (never
higher, row by row), gguf-py's decoding of the written bytes (the grid's dequantized weights
are what the file holds), and the grids it must not touch (llama.cpp's reference "plain" rule;
the lattice and ternary grids).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smolq.ggml_types import GGMLType as T
import smolq.transforms.gptq as gptq_mod
from smolq.transforms.gptq import _group_columns, _refit_integers, _row_systems, gptq_solve, refit_scales, regularise
from smolq.transforms.grids import fp16_round
from smolq.transforms.iq_grids import grid_for

gguf = pytest.importorskip("gguf")

REFITTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)


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
    basis = grid.scale_basis()
    basis.scales = fp16_round(basis.scales * 0.8)
    grid.set_scales(basis)
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
    assert changed > W.shape[0] // 4  # it does something
    assert (after <= before).all()
    assert after.sum() < before.sum()
    decoded = gguf.quants.dequantize(grid.to_bytes(), gguf.GGMLQuantizationType[qtype.name]).reshape(W.shape)
    np.testing.assert_array_equal(decoded, grid.dequantized().numpy())


def test_super_block_scale_is_the_least_squares_d(monkeypatch):
    """Q6_K, one row, H = I, no integer rounds: d = Σ k_j Σ w q / Σ k_j² Σ q² over the
    super-block (its sub-scales k_j fixed), by hand."""
    monkeypatch.setattr(gptq_mod, "REFIT_ROUNDS", 0)
    W, _ = _problem(rows=1, cols=256, seed=3)
    grid = grid_for(1, 256, qtype=T.Q6_K)
    H = torch.eye(256)
    gptq_solve(W, H.clone(), grid)
    basis = grid.scale_basis()
    basis.scales = fp16_round(basis.scales * 1.3)  # sub-scales kept, d off
    grid.set_scales(basis)
    kq = (grid.sc.double().repeat_interleave(16, 1) * grid.q.double())[0]  # each value's k_j * q
    expected = fp16_round((W[0].double() @ kq / (kq @ kq)).float().reshape(1))
    assert refit_scales(W, H, grid) == 1
    assert torch.equal(grid.d[0], expected)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q3_K, T.IQ4_XS], ids=lambda t: t.name)
def test_integer_sweep_gives_each_sub_scale_its_best_integer(qtype):
    """With a diagonal Hessian the sub-scales of a symmetric type do not interact, so one sweep
    must leave every k_j at the integer of its range that a brute force over all of them finds
    best for its sub-block, d fixed."""
    W, _ = _problem(rows=6, cols=256, seed=4)
    h = torch.linspace(0.2, 2.0, 256)
    grid = grid_for(6, 256, qtype=qtype)
    gptq_solve(W, torch.diag(h), grid)
    basis = grid.scale_basis()
    basis.scales = fp16_round(basis.scales * 0.9)  # so the old integers are not all still best
    d = basis.scales[:, basis.owner].double()  # [rows, p]
    g = basis.Z.shape[2]
    H = torch.diag(h)
    A, b = _row_systems(basis.Z, basis.group, _group_columns(H, basis.group, g), W @ H, g)
    k = _refit_integers(A, b, basis.k.double(), basis.owner, basis.scales.double(), basis)
    z = basis.Z.double()
    w = W.double().reshape(6, -1, g)
    hh = h.double().reshape(-1, g)
    ints = torch.arange(int(basis.k_lo[0]), int(basis.k_hi[0]) + 1, dtype=torch.float64)
    err = (((w[..., None, :] - d[..., None, None] * ints[:, None] * z[..., None, :]) ** 2) * hh[:, None, :]).sum(-1)
    best = err.min(-1).values  # [rows, p]
    chosen = err.gather(-1, (k - ints[0]).long()[..., None])[..., 0]
    assert torch.allclose(chosen, best, rtol=1e-9, atol=1e-12)
    assert not torch.equal(k, basis.k.double())  # it moved some


@pytest.mark.parametrize("qtype, rule", [(T.Q4_0, "plain"), (T.Q8_0, "plain"), (T.IQ3_S, "weighted"),
                                         (T.TQ2_0, "weighted")], ids=lambda x: getattr(x, "name", x))
def test_grids_whose_scales_are_not_refitted_are_untouched(qtype, rule):
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
