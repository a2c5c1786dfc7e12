"""GPTQ solver on small random layers with a known Hessian."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from smolq.transforms.gptq import HessianAccumulator, gptq_solve, inverse_cholesky_upper, layer_error, rtn_solve
from smolq.transforms.grids import IntGrid, fp16_round, make_grid
from smolq.ggml_types import GGMLType

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add overhead (and fight other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _layer(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven feature scales: a realistic, strongly non-diagonal H
    X = torch.randn(1024, cols, generator=g) * (0.2 + 3 * torch.rand(cols, generator=g))
    X = X + torch.randn(1024, 8, generator=g) @ torch.randn(8, cols, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    return W, H


GRIDS = {
    "int4-sym-g128": dict(bits=4, group_size=128, sym=True),
    "int4-asym-g128": dict(bits=4, group_size=128, sym=False),
    "int3-sym-g128": dict(bits=3, group_size=128, sym=True),
    "int3-asym-g-1": dict(bits=3, group_size=-1, sym=False),
    "Q4_0": dict(qtype=GGMLType.Q4_0),
    "Q4_K": dict(qtype=GGMLType.Q4_K),
    "Q3_K": dict(qtype=GGMLType.Q3_K),
}


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("name", list(GRIDS))
def test_gptq_beats_rtn_on_the_same_grid(name, act_order):
    W, H = _layer(seed=len(name))
    rows, cols = W.shape
    res = gptq_solve(W, H, make_grid(rows, cols, **GRIDS[name]), act_order=act_order)
    rtn = rtn_solve(W, make_grid(rows, cols, **GRIDS[name]))
    e_gptq, e_rtn = layer_error(W, res.Q, H), layer_error(W, rtn, H)
    assert e_gptq < 0.95 * e_rtn, (e_gptq, e_rtn)


def test_diagonal_hessian_is_rtn_byte_for_byte_q4_0():
    W, _ = _layer(16, 256, seed=3)
    H = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.1)
    grid = make_grid(16, 256, qtype=GGMLType.Q4_0, rule="plain")
    gptq_solve(W, H, grid, act_order=True)
    expected = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(grid.to_bytes(), expected)


@pytest.mark.parametrize("spec", [dict(qtype=GGMLType.Q4_K), dict(bits=3, group_size=64, sym=False)])
def test_diagonal_hessian_equals_weighted_rtn(spec):
    W, _ = _layer(16, 512, seed=5)
    hd = torch.rand(512, generator=torch.Generator().manual_seed(6)) + 0.1
    res = gptq_solve(W, torch.diag(hd), make_grid(16, 512, **spec))
    rtn = rtn_solve(W, make_grid(16, 512, **spec), hd)
    torch.testing.assert_close(res.Q, rtn, rtol=0, atol=0)


def test_int_grid_conventions_hand_computed():
    # one row, one group, 4-bit: sym -> zero 8, scale = 2*absmax/15; asym -> zero = round(-min/scale)
    w = torch.tensor([[-1.0, 0.5, 0.25, 3.0]])
    g = IntGrid(1, 4, 4, group_size=-1, sym=True)
    g.choose_static(w, torch.ones(4))
    assert float(g.zeros[0, 0]) == 8
    assert float(g.scales[0, 0]) == float(fp16_round(torch.tensor(6.0 / 15)))
    g = IntGrid(1, 4, 4, group_size=-1, sym=False)
    g.choose_static(w, torch.ones(4))
    s = float(fp16_round(torch.tensor(4.0 / 15)))
    assert float(g.scales[0, 0]) == s and float(g.zeros[0, 0]) == round(1.0 / s)
    q = [float(g.quantize(c, w[:, c])[0]) for c in range(4)]
    assert q == [s * (min(max(round(x / s) + round(1.0 / s), 0), 15) - round(1.0 / s)) for x in w[0].tolist()]


def test_asym_zero_never_zero_so_v1_storage_works():
    w = torch.rand(4, 64) + 0.5  # all positive: the min-max zero would be 0
    g = IntGrid(4, 64, 4, group_size=32, sym=False)
    g.choose_static(w, torch.ones(64))
    assert float(g.zeros.min()) >= 1


def test_static_groups_give_contiguous_g_idx_and_act_order_permutes():
    W, H = _layer(16, 256, seed=8)
    g = make_grid(16, 256, bits=4, group_size=64)
    gptq_solve(W, H, g, act_order=True, static_groups=True)
    assert g.g_idx.tolist() == [c // 64 for c in range(256)]
    g2 = make_grid(16, 256, bits=4, group_size=64)
    res = gptq_solve(W, H, g2, act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    # without static groups, group k is the k-th run of 64 columns in processing order
    assert torch.equal(res.perm, perm)
    assert g2.g_idx[perm].tolist() == [p // 64 for p in range(256)]
    torch.testing.assert_close(g2.dequantized(), res.Q, rtol=0, atol=0)


def test_dead_columns_are_zeroed():
    W, H = _layer(8, 128, seed=9)
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq_solve(W, H, make_grid(8, 128, bits=4, group_size=32))
    assert torch.all(res.Q[:, 5] == 0)
    assert torch.all(W[:, 5] != 0)  # the caller's W is untouched


@pytest.mark.parametrize("act_order", [False, True])
def test_callers_hessian_is_left_as_it_was(act_order):
    """The solve damps its own copy of H in place (no identity, no H + λI): the
    caller's H must come back bit for bit, even with a dead column and a retry."""
    W, H = _layer(8, 128, seed=4)
    H[3, :] = 0
    H[:, 3] = 0
    before = H.clone()
    gptq_solve(W, H, make_grid(8, 128, bits=4, group_size=32), act_order=act_order)
    assert torch.equal(H, before)
    bad = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    kept = bad.clone()
    inverse_cholesky_upper(bad, 0.01)  # retries before it succeeds
    assert torch.equal(bad, kept)


def test_damp_retry_is_logged(caplog):
    H = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # indefinite: needs damp > 0.05
    with caplog.at_level(logging.WARNING, logger="smolq.gptq"):
        U, damp = inverse_cholesky_upper(H, 0.01)
    assert damp > 0.05 and "retrying" in caplog.text
    Hd = H + damp * torch.eye(2)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky_upper(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 0.01)


def test_hessian_accumulator_matches_direct_formula_and_masks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)
    acc = HessianAccumulator(4)
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 4)
    torch.testing.assert_close(acc.H, 2 * flat.T @ flat / 3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    acc = HessianAccumulator(4)
    acc.add(x, mask)
    kept = x[mask]
    torch.testing.assert_close(acc.H, 2 * kept.T @ kept / 3)


@pytest.mark.parametrize("threads", [1, 2])
def test_hessian_bands_are_the_whole_product_bit_for_bit(threads):
    """The accumulator builds H's upper bands only and mirrors them: exactly symmetric, and equal
    to H = Σ (scaled x)ᵀx as one whole product per add (the formula it replaces). Here MKL gives
    the same bits; the tolerance is for a BLAS that blocks the two shapes differently (the golden
    matrix pins GPTQ's bytes in its fixed float environment)."""
    from smolq.transforms.gptq import HESSIAN_BAND

    n = 2 * HESSIAN_BAND + 77  # three bands, the last one short
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 300, n, generator=g) * (0.1 + 3 * torch.rand(n, generator=g)) for _ in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acc = HessianAccumulator(n)
        whole, seen = torch.zeros(n, n), 0
        for x in xs:
            acc.add(x)
            whole *= seen / (seen + x.shape[0])
            seen += x.shape[0]
            flat = x.reshape(-1, n) * (2.0 / seen) ** 0.5
            whole.addmm_(flat.T, flat)
        H = acc.H
    finally:
        torch.set_num_threads(before)
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H, whole, rtol=1e-6, atol=0)


def _spd(n, seed, deficient=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n + 8 - deficient, generator=g)
    return (A @ A.T / n).contiguous()


@pytest.mark.parametrize("n", [64, 176, 700])
def test_in_place_factor_is_torchs_bit_for_bit(n):
    """The factor computed in H's own memory (MKL's LAPACK called directly) against torch's
    own chain, cholesky -> cholesky_inverse -> cholesky(upper): the same bits."""
    from smolq.transforms import lapack_inplace

    if not lapack_inplace.usable(torch.zeros(2, 2)):
        pytest.skip("this torch exports no LAPACK symbols: the solver uses torch's calls")
    H = _spd(n, n)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    B = H.clone()
    U, damp = inverse_cholesky_upper(B, 0.0, consume=True)
    assert damp == 0.0 and U.data_ptr() == B.data_ptr()  # a view of H's memory
    assert torch.equal(U, ref)


def test_in_place_retry_undoes_a_failed_factor(caplog):
    """A factor that fails part-way is undone in place from the untouched triangle: the retry
    sees H + λI exactly, and its result equals the copying path's."""
    from smolq.transforms import lapack_inplace

    if not lapack_inplace.usable(torch.zeros(2, 2)):
        pytest.skip("this torch exports no LAPACK symbols: the solver uses torch's calls")
    H = _spd(300, 1, deficient=80)  # rank 228 of 300
    H.diagonal().sub_(0.02 * H.diagonal().mean())  # and indefinite: needs damp > 0.02
    with caplog.at_level(logging.WARNING, logger="smolq.gptq"):
        copied, damp_a = inverse_cholesky_upper(H.clone(), 0.0)
        in_place, damp_b = inverse_cholesky_upper(H.clone(), 0.0, consume=True)
    assert damp_a == damp_b > 0 and caplog.text.count("retrying") >= 2
    assert torch.equal(in_place, copied)


KERNEL_GRIDS = {
    **GRIDS,
    "int8-sym-g64": dict(bits=8, group_size=64, sym=True),
    "int2-asym-g32": dict(bits=2, group_size=32, sym=False),
    "int4-sym-g128-mse": dict(bits=4, group_size=128, sym=True, mse=2.4),
    "Q4_0-plain": dict(qtype=GGMLType.Q4_0, rule="plain"),
    "Q4_1-plain": dict(qtype=GGMLType.Q4_1, rule="plain"),
    "Q8_0-plain": dict(qtype=GGMLType.Q8_0, rule="plain"),
    "Q5_1": dict(qtype=GGMLType.Q5_1),
    "Q6_K-imatrix": dict(qtype=GGMLType.Q6_K, rule="imatrix"),
    "Q2_K": dict(qtype=GGMLType.Q2_K),
    "Q5_K-imatrix": dict(qtype=GGMLType.Q5_K, rule="imatrix"),
}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("order", ["natural", "act-order", "static-groups"])
@pytest.mark.parametrize("name", list(KERNEL_GRIDS))
def test_kernel_column_loop_is_the_torch_loop_bit_for_bit(name, order, threads):
    """The C kernel's column loop against the torch loop it replaces (the reference): the same
    dequantized weights, the same stored levels and parameters, bit for bit, for every grid with
    a kernel rounding rule, every processing order, and rows split over threads or not."""
    W, H = _layer(rows=37, cols=512, seed=len(name) + len(order))
    W[:, 7] = 0  # ties and zeros on the grid's edges
    W[3, :64] = 0
    kw = dict(act_order=order != "natural", static_groups=order == "static-groups", blocksize=128)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref_grid, fast_grid = make_grid(37, 512, **KERNEL_GRIDS[name]), make_grid(37, 512, **KERNEL_GRIDS[name])
        assert fast_grid.kernel_rounding
        ref = gptq_solve(W, H, ref_grid, column_kernel=False, **kw)
        fast = gptq_solve(W, H, fast_grid, column_kernel=True, **kw)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(ref.Q, fast.Q)
    assert torch.equal(ref.perm, fast.perm)
    for field in ("qint", "scales", "zeros", "g_idx", "q", "mul", "sub", "sc", "mn", "d", "dmin"):
        if hasattr(ref_grid, field):
            assert torch.equal(getattr(ref_grid, field), getattr(fast_grid, field)), field
    assert fast.loss == pytest.approx(ref.loss, rel=1e-4)


def test_kernel_column_loop_is_the_default_on_cpu_grids_that_have_it():
    """gptq_solve takes the kernel where the grid has a rounding rule, the torch loop elsewhere
    (the i-quant grids)."""
    from smolq.transforms import gptq as G
    from smolq.transforms.iq_grids import grid_for

    calls = []
    real = G._KernelColumns.batch
    G._KernelColumns.batch = lambda self, *a: (calls.append(1), real(self, *a))[1]
    try:
        W, H = _layer(rows=8, cols=256, seed=1)
        gptq_solve(W, H, make_grid(8, 256, qtype=GGMLType.Q4_K), act_order=True)
        assert calls
        calls.clear()
        gptq_solve(W, H, grid_for(8, 256, qtype=GGMLType.IQ4_NL), act_order=True)
        assert not calls
    finally:
        G._KernelColumns.batch = real
