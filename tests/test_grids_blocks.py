"""ggml block grids: the solver's rounded weights are exactly what the emitted
blocks decode to (checked through gguf.quants, an independent decoder), and
the plain scale rule is gguf.quants' reference quantizer byte for byte."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from smolq.transforms.gptq import rtn_solve
from smolq.transforms.grids import BLOCK_SPECS, BlockGrid, make_grid
from smolq.ggml_types import GGMLType, type_size

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add overhead (and fight other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALL_BLOCK_TYPES = sorted(BLOCK_SPECS, key=int)
LEGACY = [t for t in ALL_BLOCK_TYPES if BLOCK_SPECS[t].outer == 32]


def _weights(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[0] = 0  # an all-zero row: scale 0 must still decode
    W[1, :40] *= 30  # outliers
    W[2] = W[2].abs()  # all non-negative: exercises min clamping
    return W


@pytest.mark.parametrize("qtype", ALL_BLOCK_TYPES, ids=lambda t: t.name)
def test_emitted_blocks_decode_to_solver_values(qtype):
    rows, cols = 8, 512
    W = _weights(rows, cols, int(qtype))
    h = torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.05
    grid = make_grid(rows, cols, qtype=qtype)
    Q = rtn_solve(W, grid, h)
    blocks = grid.to_bytes()
    assert blocks.shape == (rows, cols // BLOCK_SPECS[qtype].outer * type_size(qtype))
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(int(qtype)))
    np.testing.assert_array_equal(decoded, Q.numpy())
    np.testing.assert_array_equal(decoded, grid.dequantized().numpy())
    # the quantized weights are close to the originals (sanity, not exactness)
    rel = float(((Q - W) ** 2).sum() / (W**2).sum())
    assert rel < {GGMLType.Q2_K: 0.2, GGMLType.Q3_K: 0.06}.get(qtype, 0.03)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_plain_rule_is_gguf_reference_quantizer(qtype):
    W = _weights(6, 256, 7)
    grid = make_grid(6, 256, qtype=qtype, rule="plain")
    rtn_solve(W, grid)
    expected = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType(int(qtype)))
    np.testing.assert_array_equal(grid.to_bytes(), expected)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q3_K], ids=lambda t: t.name)
def test_weighted_scale_beats_plain_on_weighted_error(qtype):
    rows, cols = 32, 512
    W = _weights(rows, cols, 3)
    h = torch.exp(2 * torch.randn(cols, generator=torch.Generator().manual_seed(5)))
    weighted = rtn_solve(W, make_grid(rows, cols, qtype=qtype), h)
    unweighted = rtn_solve(W, make_grid(rows, cols, qtype=qtype))
    err = lambda Q: float((((W - Q) ** 2) * h).sum())  # noqa: E731
    assert err(weighted) < err(unweighted)


def test_block_grid_rejects_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 256"):
        BlockGrid(GGMLType.Q4_K, 4, 300)
    with pytest.raises(ValueError):
        BlockGrid(GGMLType.Q4_K, 4, 256, rule="plain")
