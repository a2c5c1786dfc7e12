"""The GPTQ solver (Frantar et al.; IST-DASLab gptq.py), torch, CPU or CUDA, float32.

Given one linear layer's weight W [out, in] and the Hessian H = 2XXᵀ/n of its
inputs, quantize the columns one at a time onto a pluggable grid
(smolq.transforms.grids) and push each column's rounding error onto the columns
not yet quantized, through the upper Cholesky factor of H⁻¹ (gptq.md 1.1-1.7).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from smolq import kernels
from smolq.fileio import phase
from smolq.lazy import lazy_module
from smolq.threads import one_thread
from smolq.transforms import lapack_inplace
from smolq.transforms.grids import Grid, fp16_round

torch = lazy_module("torch")  # imported at first use: `smolq --help` stays fast
np = lazy_module("numpy")

log = logging.getLogger("smolq.gptq")

MAX_DAMP = 1.0  # relative to mean(diag H); past this the layer's Hessian is hopeless


HESSIAN_BAND = 256  # rows of H per product: the upper triangle is built band by band


class HessianAccumulator:
    """Running H = (2/n_seq) Σ x xᵀ in float32, n counting sequences (gptq.md 1.1).

    `add(x)` takes inputs [batch, tokens, in] (or [tokens, in] as one
    sequence); an optional mask [batch, tokens] drops padding tokens.
    H is symmetric, so each add computes only the bands of rows on and above the diagonal
    blocks (58-70 % of the products at SmolLM2's widths, HESSIAN_BAND rows a band); reading `H`
    mirrors them below once. Each element is the
    same dot product over the same tokens as in one whole product xᵀx, and with MKL it comes
    out in the same bits (tests/test_gptq_solver.py).
    """

    def __init__(self, n_in: int, device="cpu"):
        self._H = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        self._mirrored = True
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if x.dim() == 2:
            x = x[None]
            mask = None if mask is None else mask.reshape(1, -1)
        b = x.shape[0]
        x = x.to(self._H.device, torch.float32)
        if mask is not None:
            x = x[mask.to(self._H.device).bool()]
        x = x.reshape(-1, x.shape[-1])
        with phase("gptq hessian accumulate"):
            H = self._H
            H *= self.n / (self.n + b)
            self.n += b
            x = x * (2.0 / self.n) ** 0.5
            for i0 in range(0, H.shape[0], HESSIAN_BAND):
                i1 = min(i0 + HESSIAN_BAND, H.shape[0])
                H[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])
            self._mirrored = False

    def add_gram(self, G: torch.Tensor, count: int = 1) -> None:
        """Add Σ y yᵀ formed elsewhere (G [in, in], symmetric) for `count` sequences, on the same
        scale as `add` (the attention-aware value Hessian, pipeline/fast_forward.attention_mix)."""
        H = self._H
        H *= self.n / (self.n + count)
        self.n += count
        H.add_(G.to(H.device, torch.float32), alpha=2.0 / self.n)

    @property
    def H(self) -> torch.Tensor:
        """The Hessian, whole (its lower triangle filled in from the upper on first read)."""
        if not self._mirrored:
            H = self._H
            for i0 in range(0, H.shape[0], HESSIAN_BAND):
                i1 = min(i0 + HESSIAN_BAND, H.shape[0])
                H[i1:, i0:i1].copy_(H[i0:i1, i1:].T)
            self._mirrored = True
        return self._H


@dataclass
class SolveResult:
    Q: torch.Tensor  # dequantized weights, [out, in], original column order
    loss: float  # Σ (w-q)²/d²/2 over columns (the reference's reported loss)
    damp: float  # relative dampening that finally gave a positive-definite H
    perm: torch.Tensor  # processing order


def inverse_cholesky_upper(H: torch.Tensor, damp: float, consume: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H).

    H's diagonal is damped in place while this runs and restored before it
    returns (every try sees H + λI exactly): no identity matrix, no H + λI
    copy, and each intermediate is dropped as soon as the next exists. For a
    5632-wide down_proj each n x n matrix is 121 MiB.
    consume: H is the caller's to give up; on CPU the factor is then computed
    in H's own memory (lapack_inplace: the same bits, no n x n temporaries)
    and returned as a view of it.
    When a factorisation fails the dampening grows (×2, +0.01) and the retry
    is logged, as GPTQModel's "damp recovery" does (gptq.md 1.3).
    """
    diag = H.diagonal()
    undamped = diag.clone()
    mean_diag = torch.mean(undamped)
    in_place = consume and lapack_inplace.usable(H)
    try:
        while True:
            diag.copy_(undamped).add_(damp * mean_diag)
            if in_place:
                if lapack_inplace.factor(H):
                    U = lapack_inplace.finish(H)
                    if U is not None and torch.isfinite(U.sum()):  # NaN/inf anywhere reach the sum
                        return U, damp
                    # Its inverse failed to factor: H is spent (rare: the inverse of a matrix
                    # that factored is positive definite up to rounding).
                    raise ValueError(f"the inverse of a {H.shape[0]}-column Hessian does not factor "
                                     f"(damp {damp:.3g}); raise --damp")
                lapack_inplace.undo_factor(H)
            else:
                L, info = torch.linalg.cholesky_ex(H)
                if int(info) == 0:
                    L = torch.cholesky_inverse(L)
                    U, info = torch.linalg.cholesky_ex(L, upper=True)
                    del L
                    if int(info) == 0 and torch.isfinite(U).all():
                        return U, damp
            new = damp * 2 + 0.01
            if new > MAX_DAMP:
                raise ValueError(f"Hessian not positive definite even with damp {damp:.3g}")
            log.warning("Cholesky failed with damp %.3g; retrying with damp %.3g", damp, new)
            damp = new
    finally:
        if not in_place:
            diag.copy_(undamped)


def permute_symmetric_(A: torch.Tensor, perm: torch.Tensor) -> None:
    """A[perm][:, perm] in A's own memory (square A): rows permuted, transposed, rows
    permuted, transposed; each step a data move, so the bits are the gather's. Temporaries:
    one row, one band of TRANSPOSE_ROWS rows."""
    order = perm.tolist()
    for _ in range(2):
        _permute_rows_(A, order)
        _transpose_(A)


TRANSPOSE_ROWS = 256


def _permute_rows_(A: torch.Tensor, order: list[int]) -> None:
    """A[i] <- A[order[i]] for every i, following each cycle of the permutation."""
    done = bytearray(len(order))
    for start in range(len(order)):
        if done[start]:
            continue
        done[start] = 1
        if order[start] == start:
            continue
        first = A[start].clone()
        i = start
        while order[i] != start:
            A[i].copy_(A[order[i]])
            i = order[i]
            done[i] = 1
        A[i].copy_(first)


def _transpose_(A: torch.Tensor) -> None:
    """A <- Aᵀ in place, a band of rows at a time."""
    n = A.shape[0]
    for i0 in range(0, n, TRANSPOSE_ROWS):
        i1 = min(i0 + TRANSPOSE_ROWS, n)
        left = A[i0:i1, :i0].clone()
        A[i0:i1, :i0].copy_(A[:i0, i0:i1].T)
        A[:i0, i0:i1].copy_(left.T)
        blk = A[i0:i1, i0:i1]
        blk.copy_(blk.T.clone())


def _block_size(grid: Grid, blocksize: int, n_cols: int) -> int:
    """Lazy-batch width, a multiple of the grid's outer group when that is small.

    Then every group lies inside one lazy block, so its parameters are chosen
    from weights that carry every earlier column's error update.
    """
    outer = grid.levels[0]
    if 0 < outer < n_cols and outer <= 1024:
        return -(-blocksize // outer) * outer
    return blocksize


def gptq_solve(W: torch.Tensor, H: torch.Tensor, grid: Grid, *, blocksize: int = 128, damp: float = 0.01,
               act_order: bool = False, static_groups: bool = False, consume_h: bool = False,
               column_kernel: bool | None = None) -> SolveResult:
    """Quantize W onto `grid` minimising tr((W−Ŵ)H(W−Ŵ)ᵀ) the GPTQ way.

    act_order: process columns by decreasing diag(H) (block grids keep whole
    blocks together); static_groups: choose every group up front from the
    original W on contiguous columns, then process in act-order.
    W is not modified, and neither is H unless consume_h: H is then the solve's
    to use up (the caller holds no other reference), and it is permuted and
    factored in its own memory instead of in a copy (121 MiB less for a
    5632-wide down_proj).
    column_kernel: run the column loop in the C kernel (the same bits as the torch loop, which
    stays the reference; tests/test_gptq_solver.py holds them equal). None: where it can, that is
    on CPU for a grid with a kernel rounding rule (Grid.kernel_rounding, Grid.column_rounding).
    """
    W = W.to(torch.float32).clone()
    n_cols = W.shape[1]

    hdiag = torch.diag(H).to(device=W.device, dtype=torch.float32).clone()
    dead = hdiag == 0
    hdiag[dead] = 1
    W[:, dead] = 0
    grid.prepare(W)

    if static_groups:
        grid.choose_static(W, hdiag)
        perm = torch.argsort(hdiag, descending=True, stable=True) if act_order else torch.arange(n_cols, device=W.device)
    else:
        perm = grid.order(hdiag, act_order)
    perm_list = perm.tolist()
    W = W[:, perm]
    # H permuted into memory the solve owns: H's own when given up, else a copy made in one
    # gather (then a dead column's diagonal is set to 1)
    if consume_h and H.device == W.device and H.dtype == torch.float32 and H.is_contiguous() and H.dim() == 2:
        permute_symmetric_(H, perm)
    else:
        H = H.to(device=W.device, dtype=torch.float32)[perm[:, None], perm]
    dead = dead[perm]
    H[dead, dead] = 1
    hp = hdiag[perm]
    with phase("gptq cholesky"):
        Hinv, damp_used = inverse_cholesky_upper(H, damp, consume=True)  # the solve's own copy
    del H

    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    B = _block_size(grid, blocksize, n_cols)
    levels = [s if s > 0 else n_cols for s in grid.levels]
    if column_kernel is None:
        column_kernel = W.device.type == "cpu" and grid.kernel_rounding
    if column_kernel:
        columns = _KernelColumns(grid, W, Q, torch.get_num_threads())
    for i1 in range(0, n_cols, B):
        i2 = min(i1 + B, n_cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with one_thread():  # ops of one column: too small for threads (smolq/threads.py)
            if column_kernel:
                columns.batch(levels, perm, static_groups, W, W1, Err1, Hinv1, i1, i2, hp, n_cols)
            else:
                _solve_columns(grid, levels, perm, perm_list, static_groups, W, W1, Err1, Hinv1, Q, loss, i1, i2,
                               hp, n_cols)
        with phase("gptq column solve"):
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if column_kernel:
        loss += columns.loss()
    inv = torch.argsort(perm)
    return SolveResult(Q=Q[:, inv], loss=float(loss), damp=damp_used, perm=perm)


class _KernelColumns:
    """The column loop of each lazy batch in the C kernel (smolq.kernels.gptq_columns), one call
    per run of columns between group starts: the groups are still chosen here (torch), at the
    same columns and from the same error-updated weights as in _solve_columns, which the kernel
    reproduces bit for bit, with rows split over `threads`."""

    def __init__(self, grid, W, Q, threads: int):
        self.grid, self.Q, self.threads = grid, Q, threads
        self.row_loss = np.zeros(W.shape[0], dtype=np.float64)

    def batch(self, levels, perm, static_groups, W, W1, Err1, Hinv1, i1, i2, hp, n_cols):
        Hinv1 = Hinv1.contiguous().numpy()  # the factor may be a transposed view; 64 KiB a batch
        w, err, q = W1.numpy(), Err1.numpy(), self.Q[:, i1:].numpy()
        cuts = [i for i in range(i1, i2) if not static_groups and any(i % size == 0 for size in levels)]
        for a, b in zip([i1] + cuts, cuts + [i2]):
            if a == b:
                continue
            with phase("gptq grid rounding"):
                if not static_groups:
                    for level, size in enumerate(levels):
                        if a % size == 0:
                            _choose_group(self.grid, level, perm, a, min(a + size, n_cols), W, W1, i1, i2, hp)
                cols = perm[a:b]
                rule, params, lo, hi = self.grid.column_rounding(cols)
                out = torch.empty(W1.shape[0], b - a)
            with phase("gptq column solve"):
                kernels.gptq_columns(w, q, err, Hinv1, a - i1, b - i1, rule, [p.numpy() for p in params], lo,
                                          hi, out.numpy(), self.row_loss, self.threads)
            with phase("gptq grid rounding"):
                self.grid.store_levels(cols, out)

    def loss(self) -> float:
        return float(self.row_loss.sum())


def _solve_columns(grid, levels, perm, perm_list, static_groups, W, W1, Err1, Hinv1, Q, loss, i1, i2, hp, n_cols):
    """Columns i1..i2 of one lazy batch: round each, push its error onto the rest of the batch
    (W1, Q, Err1 and loss are updated in place)."""
    for i in range(i2 - i1):
        p = i1 + i
        with phase("gptq grid rounding"):
            if not static_groups:
                for level, size in enumerate(levels):
                    if p % size == 0:
                        _choose_group(grid, level, perm, p, min(p + size, n_cols), W, W1, i1, i2, hp)
            w = W1[:, i]
            q = grid.quantize(perm_list[p], w)
        with phase("gptq column solve"):
            d = Hinv1[i, i]
            Q[:, p] = q
            err = (w - q) / d
            loss += (err * err).sum() / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err


def _choose_group(grid, level, perm, a, b, W, W1, i1, i2, hp):
    """Hand the grid the group's current weights: in-block columns from W1."""
    inside = min(b, i2)
    cur = W1[:, a - i1:inside - i1]
    if b > i2:
        cur = torch.cat([cur, W[:, i2:b]], dim=1)
    grid.choose(level, perm[a:b], cur, hp[a:b])


def rtn_solve(W: torch.Tensor, grid: Grid, hdiag: torch.Tensor | None = None) -> torch.Tensor:
    """Round to nearest on `grid` (no error propagation); scales still chosen
    with `hdiag` weights when given (llama.cpp imatrix-style RTN)."""
    W = W.to(torch.float32)
    h = torch.ones(W.shape[1], device=W.device) if hdiag is None else hdiag.to(W.device, torch.float32)
    grid.prepare(W)
    grid.choose_static(W, h)
    return torch.stack([grid.quantize(c, W[:, c]) for c in range(W.shape[1])], dim=1)


REFIT_CHUNK_BYTES = 8 << 20  # refit_scales' [p, cols, rows] temporary per step of rows (cache-sized)
# Rounds of (free scales, then integer sub-scales) where a grid has both (K-quants, IQ4_XS);
# one more free-scale solve follows the last. Each step can only lower a row's error.
REFIT_ROUNDS = 2


def refit_scales(W: torch.Tensor, H: torch.Tensor, grid: Grid) -> int:
    """Scale re-fitting after rounding: the codes stay, the scales (and offsets) become the ones
    that minimise the layer error tr((W−Q)H(W−Q)ᵀ) row by row.

    With the codes fixed, Q is linear in the grid's sub-parameters θ (Grid.scale_basis), so a
    row's error is θᵀAθ − 2bᵀθ + wᵀHw with A = Zᵀ H Z and b = Zᵀ H w, Z the row's basis (one
    column per parameter, nonzero on its group only). GPTQ chose each group's scale before the
    error feedback of the group's own columns arrived; this takes the whole row's rounding into
    account. Where θ is free fp16 (legacy 32-blocks, IQ4_NL) one least squares solves it. Where
    θ = k·d, an integer sub-scale k under a free fp16 super-block scale d (K-quants, IQ4_XS),
    the d's are solved with the k's fixed, then each k in turn moves to its best integer with
    the rest fixed (exact for one coordinate), REFIT_ROUNDS times, and the d's once more.
    New d's are rounded to fp16 as stored, and every step, and the whole, is kept for a row only
    where it lowers that row's error (float64). Returns the number of rows changed.
    """
    basis = grid.scale_basis()
    if basis is None:
        return 0
    rows, p, g = basis.Z.shape
    cols = W.shape[1]
    W, H = W.to(torch.float32), H.to(device=W.device, dtype=torch.float32)
    Hg = _group_columns(H, basis.group, g)
    # θ = k·d[owner] as a product with a one-hot [p, n]; None where θ = d (free parameters)
    owner = None if basis.k_lo is None else \
        torch.nn.functional.one_hot(basis.owner, basis.scales.shape[1]).to(torch.float64)
    theta0 = basis.theta
    scales, k = basis.scales.clone(), basis.k.clone()
    step = max(1, REFIT_CHUNK_BYTES // (4 * cols * p))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        A, b = _row_systems(basis.Z[r0:r1], basis.group, Hg, W[r0:r1] @ H, g)
        d, kk = scales[r0:r1].to(torch.float64), k[r0:r1].to(torch.float64)
        for _ in range(REFIT_ROUNDS if basis.k_lo is not None else 1):
            d = _refit_free(A, b, kk, owner, d)
            if basis.k_lo is not None:
                kk = _refit_integers(A, b, kk, basis.owner, d, basis)
        if basis.k_lo is not None:
            d = _refit_free(A, b, kk, owner, d)
        t0 = theta0[r0:r1].to(torch.float64)
        better = _row_error(A, b, kk * d[:, basis.owner]) < _row_error(A, b, t0)
        scales[r0:r1] = torch.where(better[:, None], d.to(torch.float32), scales[r0:r1])
        k[r0:r1] = torch.where(better[:, None], kk.to(torch.float32), k[r0:r1])
    basis.scales, basis.k = scales, k
    grid.set_scales(basis)
    return int((basis.theta != theta0).any(1).sum())


def _group_columns(H, group, g):
    """[p, cols, g]: H's columns of each parameter's group, for one batched product per step of rows."""
    cols = H.shape[0]
    return H.reshape(cols, cols // g, g)[:, group, :].permute(1, 0, 2).contiguous()


def _row_systems(z, group, Hg, WH, g):
    """(A [r, p, p], b [r, p]) in float64 for rows with basis z [r, p, g] and W·H rows WH."""
    r, p, _ = z.shape
    HZ = torch.bmm(Hg, z.permute(1, 2, 0))  # [p, cols, r]: H times each basis column
    HZ = HZ.reshape(p, -1, g, r)[:, group]  # [q, p, g, r]: its entries on parameter p's group
    A = torch.einsum("qpir,pir->rpq", HZ, z.permute(1, 2, 0)).to(torch.float64)
    b = torch.einsum("rpi,rpi->rp", z, WH.reshape(r, -1, g)[:, group]).to(torch.float64)
    return A, b


def _row_error(A, b, theta):
    """Each row's error less its constant wᵀHw."""
    return torch.einsum("rp,rpq,rq->r", theta, A, theta) - 2 * (theta * b).sum(1)


def _refit_free(A, b, k, owner, d):
    """The free fp16 scales d [r, n] re-solved with the integer multipliers k fixed (θ = k·d[owner],
    owner as a one-hot [p, n], or None where θ = d); a row keeps its d unless the fp16-rounded
    solution is better."""
    if owner is None:  # free parameters: θ = d
        As, bs = A, b
    else:
        As = owner.T @ (A * k[:, :, None] * k[:, None, :]) @ owner
        bs = (b * k) @ owner
    # solved relative to the current scales, with a tiny ridge: a scale whose codes are all zero
    # (a zero column) keeps its value
    n = d.shape[1]
    ridge = 1e-9 * As.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-300)
    delta = torch.linalg.solve(As + ridge[:, None, None] * torch.eye(n, dtype=As.dtype, device=As.device),
                               bs - torch.einsum("rij,rj->ri", As, d))
    d1 = fp16_round((d + delta).to(torch.float32)).to(torch.float64)
    theta = (lambda s: s) if owner is None else (lambda s: k * (s @ owner.T))  # noqa: E731
    better = _row_error(A, b, theta(d1)) < _row_error(A, b, theta(d))
    return torch.where(better[:, None], d1, d)


def _refit_integers(A, b, k, owner, d, basis):
    """One sweep over the integer multipliers: each moves to the integer of its range (k_lo +
    k_step·i ≤ k_hi) that minimises the row's error with all others fixed. The error is a
    parabola in that one k, so the best integer is the one nearest its vertex."""
    k = k.clone()
    scale = d[:, owner]  # [r, p]
    theta = k * scale
    grad = torch.einsum("rpq,rq->rp", A, theta)
    lo, hi, step = basis.k_lo.to(k), basis.k_hi.to(k), basis.k_step
    for j in range(k.shape[1]):
        a, s = A[:, j, j], scale[:, j]
        usable = (a > 0) & (s != 0)
        vertex = (b[:, j] - grad[:, j] + a * theta[:, j]) / torch.where(usable, a * s, torch.ones_like(a))
        best = lo[j] + step * torch.round((vertex - lo[j]) / step)
        best = torch.where(usable, torch.minimum(torch.maximum(best, lo[j]), hi[j]), k[:, j])
        moved = (best - k[:, j]) * s
        grad += A[:, :, j] * moved[:, None]
        theta[:, j] += moved
        k[:, j] = best
    return k


def layer_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W−Q) H (W−Q)ᵀ): the layer's output error on the calibration inputs."""
    D = (W - Q).to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", D, H.to(torch.float64), D))


# ---------------------------------------------------------------------------
# Hessian regularisation toward its diagonal, chosen by cross-validation
# ---------------------------------------------------------------------------

# The amounts `choose_regularisation` tries, smallest first (a tie keeps the smaller one).
# 0 is plain GPTQ, so the choice can never be worse than it on the held-out part;
# 1 drops every correlation: Hessian-weighted RTN, no error feedback.
REG_CANDIDATES = (0.0, 0.05, 0.2, 1.0)
# --hessian-reg when not given: GGML_GRID_HESSIAN_REG onto ggml grids (GGUF / legacy files), 0 (the
# reference GPTQ that GPTQModel and AutoGPTQ run) for --format gptq. 0.75 was chosen on a text of a
# third domain, neither the calibration's nor the evaluation's (README: GPTQ, the measurements).
HESSIAN_REG_DEFAULT = "default"
GGML_GRID_HESSIAN_REG = 0.75


def default_hessian_reg(value, gptq_format: bool):
    """--hessian-reg as given, or its default for the output (HESSIAN_REG_DEFAULT)."""
    if isinstance(value, str) and value.strip().lower() == HESSIAN_REG_DEFAULT:
        return 0.0 if gptq_format else GGML_GRID_HESSIAN_REG
    return value


# Scale re-fitting after rounding (refit_scales) when --refit-scales is not given: onto ggml grids
# GGML_GRID_REFIT, never for --format gptq (the reference GPTQ). On by the third-domain text (README:
# GPTQ): SmolLM2 Q4_0 10.804 -> 10.767, IQ4_XS 11.277 -> 11.183, Q4_K_M 10.736 -> 10.740.
GGML_GRID_REFIT = True


def default_refit(gptq_format: bool) -> bool:
    return GGML_GRID_REFIT and not gptq_format


def regularise(H: torch.Tensor, a: float) -> torch.Tensor:
    """H_a = (1−a)·H + a·diag(H): the input correlations shrunk by 1−a, the diagonal kept.

    The correlations a calibration set of one domain measures are the part of H that
    transfers worst to other text (the diagonal is what an importance matrix keeps);
    shrinking them trades error feedback fitted to the calibration set for robustness.
    The diagonal is untouched, so dead columns, act-order and the grid's
    Hessian-weighted scale choice are the same for every `a`.
    """
    if a == 0:
        return H
    out = H * (1.0 - a)
    out.diagonal().copy_(torch.diagonal(H))
    return out


@dataclass
class RegChoice:
    a: float  # the chosen amount
    held_errors: dict[float, float]  # candidate -> tr((W−Q) H_held (W−Q)ᵀ) of its solve on H_fit


def choose_regularisation(W: torch.Tensor, H_fit: torch.Tensor, H_held: torch.Tensor, new_grid,
                          candidates=REG_CANDIDATES, **solve_kw) -> RegChoice:
    """The amount of `regularise` whose GPTQ solve on the fit part's Hessian has the least
    output error on the held-out part's inputs.

    `new_grid()` makes a fresh grid for each solve; `solve_kw` go to gptq_solve. Only the
    weight is solved again per candidate, never the model's forward. a = 1 is solved as
    Hessian-weighted RTN, which is what GPTQ on a diagonal Hessian computes (no error is
    propagated through a diagonal inverse; tests/test_gptq_regularise.py checks the bytes).
    """
    errors = {}
    for a in candidates:
        grid = new_grid()
        if a == 1.0 and not solve_kw.get("act_order") and not solve_kw.get("static_groups") \
                and grid.supports_static:  # lattice grids round jointly inside the column loop only
            Q = diagonal_solve(W, H_fit, grid)
        else:
            Q = gptq_solve(W, regularise(H_fit, a), grid, **solve_kw).Q
        errors[a] = layer_error(W, Q, H_held)
    best = min(candidates, key=lambda a: errors[a])  # the first (smallest) of equal errors
    return RegChoice(best, errors)


def diagonal_solve(W: torch.Tensor, H: torch.Tensor, grid: Grid) -> torch.Tensor:
    """gptq_solve(W, regularise(H, 1), grid) without its column loop: Hessian-weighted RTN,
    dead columns (zero diagonal) handled as gptq_solve handles them."""
    hdiag = torch.diag(H).to(torch.float32).clone()
    dead = hdiag == 0
    W = W.to(torch.float32).clone()
    W[:, dead] = 0
    hdiag[dead] = 1
    return rtn_solve(W, grid, hdiag)


def parse_hessian_reg(value) -> str | float:
    """--hessian-reg: "auto" or an amount in [0, 1]; ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    a = float(value)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"--hessian-reg must be auto or a number in [0, 1], not {value}")
    return a
