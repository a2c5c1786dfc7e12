"""Quantization grids for the GPTQ solver: where a weight may land.

A grid belongs to one weight matrix W [rows, cols] (PyTorch order: rows are
output features, columns input features). The solver walks the columns in a
processing order and, at the first column of every group (`levels`, outermost
first, counted in processing positions), asks the grid to choose that group's
parameters from the *current*, error-updated weights; then it asks the grid to
round each column. Grids:

- `IntGrid`: the GPTQ integer grid of AutoGPTQ (bits 2/3/4/8, sym/asym,
  per-row scale and zero per group, g_idx), gptq.md 1.8.
- `BlockGrid`: a ggml block type whose blocks run along the input dimension
  (Q4_0 ... Q8_0, Q2_K ... Q6_K). Each block's scale (and K-quant sub-scales
  and mins) is chosen by Hessian-diagonal-weighted error, llama.cpp imatrix
  style, and snapped onto what the type can store, so the rounded weights are
  exactly the values its blocks decode to; `to_bytes()` emits those blocks.

All arithmetic is float32; stored fp16 fields are snapped with a round trip
through torch.float16 (IEEE round-to-nearest-even, as ggml's converter).
"""
from __future__ import annotations

from dataclasses import dataclass

from smolq.ggml_types import GGMLType
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

torch = lazy_module("torch")  # imported at first use: `smolq --help` stays fast

# Candidate offsets t of the scale search s = extreme / (n + t): llama.cpp's
# make_qx_quants tries nmax + 0.1*is for is in -9..9; the same spread here.
SEARCH_STEPS = tuple(0.1 * i for i in range(-9, 10))


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """Snap float32 values to the nearest float16 (and back to float32)."""
    return t.to(torch.float16).to(torch.float32)


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C roundf(): halves away from zero (ggml's Q8_0 reference rounding)."""
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def safe_reciprocal(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t != 0, 1.0 / torch.where(t != 0, t, torch.ones_like(t)), torch.zeros_like(t))


@dataclass
class ScaleBasis:
    """A grid's scales, once the codes are fixed: the decoded weights are linear in them.

    Each of a row's p sub-parameters acts on one group of g consecutive columns:
    Q[r, group[j]'s columns] += Z[r, j] * theta[r, j], with theta[r, j] = k[r, j] *
    scales[r, owner[j]]: an integer multiplier (a K-quant's 6-bit sub-scale or min, IQ4_XS's
    ls - 32) of a free fp16 scale (the super-block's d or dmin). Where the parameters are
    free fp16 values themselves (the legacy 32-blocks, IQ4_NL), k is 1 and owner the
    identity, and k_lo is None (no integer to move).
    """

    Z: torch.Tensor  # [rows, p, g] what each sub-parameter decodes to per unit
    group: torch.Tensor  # [p] the column group (of g) each acts on
    k: torch.Tensor  # [rows, p] integer multipliers, as floats
    owner: torch.Tensor  # [p] the free scale (column of `scales`) each is a multiple of
    scales: torch.Tensor  # [rows, n] the free fp16 scales
    k_lo: torch.Tensor | None = None  # [p] the integers' ranges: k_lo + k_step * i <= k_hi
    k_hi: torch.Tensor | None = None
    k_step: int = 1

    @classmethod
    def free(cls, Z: torch.Tensor, group: torch.Tensor, theta: torch.Tensor) -> ScaleBasis:
        """Free fp16 parameters, one per group (no integer sub-scales)."""
        return cls(Z, group, torch.ones_like(theta), torch.arange(theta.shape[1], device=theta.device), theta)

    @property
    def theta(self) -> torch.Tensor:
        return self.k * self.scales[:, self.owner]


class Grid:
    """What the solver needs from a grid (see module docstring)."""

    rows: int
    cols: int
    levels: tuple[int, ...]
    supports_static = True  # choose_static works (all scales before any rounding)
    kernel_rounding = False  # column_rounding describes quantize for the C kernel's column loop

    def order(self, hdiag: torch.Tensor, act_order: bool) -> torch.Tensor:
        """Processing order of the columns (a permutation of range(cols))."""
        if not act_order:
            return torch.arange(self.cols, device=hdiag.device)
        return torch.argsort(hdiag, descending=True, stable=True)

    def prepare(self, W: torch.Tensor) -> None:
        """Called once with the whole (unpermuted) W before any group is chosen."""

    def choose(self, level: int, cols: torch.Tensor, W: torch.Tensor, h: torch.Tensor) -> None:
        raise NotImplementedError

    def quantize(self, col: int, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def column_rounding(self, cols: torch.Tensor) -> tuple[str, list[torch.Tensor], float, float] | None:
        """What `quantize` does to the original columns `cols`, for the C kernel's column loop:
        (rule of smolq.kernels.GPTQ_ROUNDING, params [len(cols), rows] each, lo, hi), or None
        where the grid has no such rule (kernel_rounding False: the solver then calls quantize
        column by column)."""
        return None

    def store_levels(self, cols: torch.Tensor, levels: torch.Tensor) -> None:
        """Keep the kernel's levels [rows, len(cols)] as `quantize` keeps its own."""
        raise NotImplementedError

    refits_scales = False  # scale_basis describes the scales (for re-fitting after rounding)

    def scale_basis(self) -> ScaleBasis | None:
        """The grid's scales as transforms/gptq.refit_scales re-fits them with the codes fixed
        (ScaleBasis). None: the parameters are not re-fitted (GPTQ's integer zero points, or
        llama.cpp's reference "plain" rule, whose bytes must stay the reference's)."""
        return None

    def set_scales(self, basis: ScaleBasis) -> None:
        """Take the re-fitted scales (basis.scales fp16-exact, basis.k integers in range)."""
        raise NotImplementedError

    def choose_static(self, W: torch.Tensor, hdiag: torch.Tensor) -> None:
        """Choose every group up front from W on contiguous original columns."""
        self._choose_range(0, 0, self.cols, W, hdiag)

    def _choose_range(self, level: int, start: int, stop: int, W, hdiag) -> None:
        size = self.levels[level]
        for a in range(start, stop, size):
            b = min(a + size, stop)
            cols = torch.arange(a, b, device=W.device)
            self.choose(level, cols, W[:, a:b], hdiag[a:b])
            if level + 1 < len(self.levels):
                self._choose_range(level + 1, a, b, W, hdiag)


# ---------------------------------------------------------------------------
# GPTQ integer grid (AutoGPTQ / IST-DASLab quant.py conventions)
# ---------------------------------------------------------------------------


class IntGrid(Grid):
    """Per-row scale/zero per group; q = clamp(round(w/scale) + zero, 0, maxq).

    Scales are snapped to fp16 before rounding because the checkpoint stores
    them in fp16, so the solver's Q is exactly what a loader reconstructs.
    `min_zero=1` keeps asymmetric zeros storable in the v1 convention (stored
    zero = zero - 1 must not be negative; gptq.md 2.4, pain point 8).
    `mse` > 0 enables the reference's shrink search with |err|^mse, weighted
    by the Hessian diagonal.
    """

    def __init__(self, rows: int, cols: int, bits: int, group_size: int = 128, sym: bool = True,
                 mse: float = 0.0, min_zero: int = 1, device="cpu"):
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"GPTQ bits must be 2, 3, 4 or 8, not {bits}")
        self.rows, self.cols, self.bits = rows, cols, bits
        self.maxq = 2**bits - 1
        self.group_size = group_size
        self.sym, self.mse, self.min_zero = sym, mse, (0 if sym else min_zero)
        self.levels = (group_size if group_size > 0 else cols,)
        n_groups = -(-cols // self.levels[0])
        self.scales = torch.zeros(n_groups, rows, device=device)
        self.zeros = torch.zeros(n_groups, rows, device=device)
        self.g_idx = torch.full((cols,), -1, dtype=torch.int64, device=device)
        self.qint = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self._next_group = 0

    def _params(self, xmin, xmax):
        xmin = torch.clamp(xmin, max=0)
        xmax = torch.clamp(xmax, min=0)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
        scale = fp16_round((xmax - xmin) / self.maxq)
        scale = torch.clamp(scale, min=2.0**-24)  # smallest fp16 subnormal: never a zero scale
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            zero = torch.clamp(torch.round(-xmin / scale), self.min_zero, self.maxq)
        return scale, zero

    def _round(self, x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return q, scale * (q - zero)

    def choose(self, level, cols, W, h):
        xmin, xmax = W.min(dim=1).values, W.max(dim=1).values
        scale, zero = self._params(xmin, xmax)
        if self.mse > 0:
            scale, zero = self._shrink_search(W, h, xmin, xmax, scale, zero)
        g = self._next_group
        self._next_group += 1
        self.scales[g], self.zeros[g] = scale, zero
        self.g_idx[cols] = g

    def _shrink_search(self, W, h, xmin, xmax, scale, zero, grid=100, maxshrink=0.8):
        _, deq = self._round(W, scale[:, None], zero[:, None])
        best = ((deq - W).abs().pow(self.mse) * h).sum(1)
        for i in range(1, int(maxshrink * grid)):
            p = 1 - i / grid
            s1, z1 = self._params(p * xmin, p * xmax)
            _, deq = self._round(W, s1[:, None], z1[:, None])
            err = ((deq - W).abs().pow(self.mse) * h).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
        return scale, zero

    def quantize(self, col, w):
        g = int(self.g_idx[col])
        q, deq = self._round(w, self.scales[g], self.zeros[g])
        self.qint[:, col] = q.to(torch.uint8)
        return deq

    kernel_rounding = True

    def column_rounding(self, cols):
        g = self.g_idx[cols]
        return "int", [self.scales[g], self.zeros[g]], 0.0, float(self.maxq)

    def store_levels(self, cols, levels):
        self.qint[:, cols] = levels.to(torch.uint8)

    def dequantized(self) -> torch.Tensor:
        s = self.scales[self.g_idx].T
        z = self.zeros[self.g_idx].T
        return s * (self.qint.float() - z)


# ---------------------------------------------------------------------------
# ggml block grids
# ---------------------------------------------------------------------------


def whole_block_order(cols: int, levels: tuple[int, ...], hdiag: torch.Tensor, act_order: bool,
                      keep_last: bool = False) -> torch.Tensor:
    """Processing order of a block grid: natural, or group-aware act-order.

    Act-order ranks whole groups of each level (outermost first) by their
    summed diag(H), then the columns inside the innermost group, so each
    group's parameters are still chosen from up-to-date weights at its first
    column. keep_last: the innermost level's columns stay in natural order
    (lattice grids round those columns jointly).
    """
    every = torch.arange(cols, device=hdiag.device)
    if not act_order:
        return every
    return _group_aware(every, hdiag, levels, 0, keep_last)


def _group_aware(cols, hdiag, levels, level, keep_last):
    if level == len(levels):
        return cols[torch.argsort(hdiag[cols], descending=True, stable=True)]
    if keep_last and level == len(levels) - 1:
        units = cols.reshape(-1, levels[level])
        return units[torch.argsort(hdiag[units].sum(1), descending=True, stable=True)].reshape(-1)
    units = cols.reshape(-1, levels[level])
    ranked = units[torch.argsort(hdiag[units].sum(1), descending=True, stable=True)]
    return torch.cat([_group_aware(u, hdiag, levels, level + 1, keep_last) for u in ranked])


@dataclass(frozen=True)
class BlockSpec:
    """How one ggml type decodes: value = mul*q - sub per sub-block.

    legacy (outer == sub): mul = fp16 d (and sub = -fp16 m when affine).
    K-quants: mul = d*sc, sub = dmin*mn with integer sc in [sc_lo, sc_hi]
    and mn in [0, mn_hi] relative to the super-block's fp16 d / dmin.
    """

    outer: int
    sub: int
    qmin: int
    qmax: int
    affine: bool
    sc_lo: int = 0
    sc_hi: int = 0
    mn_hi: int = 0

    @property
    def kquant(self) -> bool:
        return self.outer != self.sub


T = GGMLType
BLOCK_SPECS: dict[GGMLType, BlockSpec] = {
    T.Q4_0: BlockSpec(32, 32, -8, 7, False),
    T.Q4_1: BlockSpec(32, 32, 0, 15, True),
    T.Q5_0: BlockSpec(32, 32, -16, 15, False),
    T.Q5_1: BlockSpec(32, 32, 0, 31, True),
    T.Q8_0: BlockSpec(32, 32, -128, 127, False),
    T.Q2_K: BlockSpec(256, 16, 0, 3, True, 0, 15, 15),
    T.Q3_K: BlockSpec(256, 16, -4, 3, False, -32, 31),
    T.Q4_K: BlockSpec(256, 32, 0, 15, True, 0, 63, 63),
    T.Q5_K: BlockSpec(256, 32, 0, 31, True, 0, 63, 63),
    T.Q6_K: BlockSpec(256, 16, -32, 31, False, -128, 127),
}


def _weighted_error(x, h, deq):
    return ((x - deq) ** 2 * h).sum(-1)


def _round_onto(x, mul, sub, qmin, qmax):
    """q = clamp(round((x + sub) / mul)) and its decoded value mul*q - sub."""
    q = torch.clamp(torch.round((x + sub[..., None]) * safe_reciprocal(mul)[..., None]), qmin, qmax)
    return q, mul[..., None] * q - sub[..., None]


def _initial_candidates(x, spec: BlockSpec, nonpos_min: bool):
    """Float (mul, sub) candidates [C, N] from each block's extremes (make_qx/qkx style)."""
    steps = torch.tensor(SEARCH_STEPS, dtype=x.dtype, device=x.device)[:, None]
    if not spec.affine:
        idx = x.abs().argmax(dim=-1, keepdim=True)
        extreme = x.gather(-1, idx).squeeze(-1)[None]
        return extreme / (spec.qmin - steps), torch.zeros_like(extreme).expand(len(SEARCH_STEPS), -1)
    lo, hi = x.min(-1).values, x.max(-1).values
    if nonpos_min:
        lo = torch.clamp(lo, max=0)
    return (hi - lo)[None] / (spec.qmax - spec.qmin + steps), (-lo)[None].expand(len(SEARCH_STEPS), -1)


def _refit(x, h, q, spec: BlockSpec, nonpos_min: bool):
    """Weighted least-squares (mul, sub) for fixed integer levels q."""
    if not spec.affine:
        num = (h * x * q).sum(-1)
        den = (h * q * q).sum(-1)
        return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0), torch.zeros_like(num)
    sw, sq, sqq = h.sum(-1), (h * q).sum(-1), (h * q * q).sum(-1)
    sx, sqx = (h * x).sum(-1), (h * q * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * (sw * sqq + 1e-30)
    det = torch.where(ok, det, 1)
    mul = torch.where(ok, (sw * sqx - sq * sx) / det, 0)
    m = torch.where(ok, (sqq * sx - sq * sqx) / det, 0)
    if nonpos_min:
        m = torch.clamp(m, max=0)
        mul = torch.where(sqq > 0, (h * q * (x - m[..., None])).sum(-1) / torch.where(sqq > 0, sqq, 1), 0)
    return mul, -m


SEARCH_CHUNK = 1 << 18  # candidate-values per chunk: temporaries of 1 MiB, which stay in cache (1 << 22: 3-7x slower)


def search_block_params(x, h, spec: BlockSpec, snap, nonpos_min: bool, ctx=()):
    """Best representable (mul, sub) per block by weighted error.

    x [N, n] block values (any leading shape), h broadcastable weights (the
    Hessian diagonal); snap(mul, sub, *ctx) -> representable (mul, sub, extra)
    where extra carries the stored integer fields and ctx are per-block
    tensors (shape x.shape[:-1]) that snap needs, chunked alongside x. Tries every extreme-based
    candidate and its weighted least-squares refit, snapped, all at once, and
    keeps the lowest weighted error.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h2 = h.expand_as(x).reshape(-1, x.shape[-1])
    rows_per_chunk = max(1, SEARCH_CHUNK // (2 * len(SEARCH_STEPS) * x2.shape[1]))
    ctx2 = [c.expand(lead).reshape(-1) for c in ctx]
    outs = [_search_chunk(x2[i:i + rows_per_chunk], h2[i:i + rows_per_chunk], spec, snap, nonpos_min,
                          [c[i:i + rows_per_chunk] for c in ctx2])
            for i in range(0, x2.shape[0], rows_per_chunk)]
    mul, sub = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    extra = tuple(torch.cat([o[2][k] for o in outs]).reshape(lead) for k in range(len(outs[0][2])))
    return mul.reshape(lead), sub.reshape(lead), extra


def _search_chunk(x, h, spec, snap, nonpos_min, ctx):
    mul0, sub0 = _initial_candidates(x, spec, nonpos_min)
    q, _ = _round_onto(x[None], mul0, sub0, spec.qmin, spec.qmax)
    mul1, sub1 = _refit(x[None], h[None], q, spec, nonpos_min)
    smul, ssub, extra = snap(torch.cat([mul0, mul1]), torch.cat([sub0, sub1]), *ctx)
    _, deq = _round_onto(x[None], smul, ssub, spec.qmin, spec.qmax)
    best = _weighted_error(x[None], h[None], deq).argmin(0, keepdim=True)  # [1, N]
    pick = lambda t: t.gather(0, best).squeeze(0)  # noqa: E731
    return pick(smul), pick(ssub), tuple(pick(e) for e in extra)


# llama.cpp's imatrix quantizers weight x[j] by imatrix[j]*sqrt(sigma2 + x[j]^2):
# sigma2 = SIGMA2_SCOPE[type] x the mean square over the whole row ("row") or
# the 256-super-block ("super"); Q6_K (and Q8_0, unweighted there) use imatrix[j].
SIGMA2_SCOPE: dict[GGMLType, tuple[str, float]] = {
    T.Q4_0: ("row", 1.0), T.Q4_1: ("row", 1.0), T.Q5_0: ("row", 1.0), T.Q5_1: ("row", 1.0),
    T.Q2_K: ("super", 1.0), T.Q3_K: ("super", 2.0), T.Q4_K: ("super", 2.0), T.Q5_K: ("super", 2.0),
}
SCALE_RULES = ("weighted", "imatrix", "plain")


class BlockGrid(Grid):
    """A ggml block type as a GPTQ grid. rule "imatrix", "weighted" or "plain".

    "plain" reproduces gguf.quants' reference quantizer for the legacy types
    (scale from the block's extreme, rounding with the unrounded reciprocal)
    so GPTQ without error propagation is RTN byte for byte; "weighted" picks
    each scale by Hessian-diagonal-weighted error; "imatrix" weights each
    value as llama.cpp's imatrix quantizers do, h[j]*sqrt(sigma2 + w[j]^2)
    (SIGMA2_SCOPE), on the current, error-updated weights.
    """

    def __init__(self, qtype: GGMLType, rows: int, cols: int, rule: str = "weighted", device="cpu"):
        if qtype not in BLOCK_SPECS:
            raise ValueError(f"no GPTQ grid for ggml type {qtype.name}")
        spec = BLOCK_SPECS[qtype]
        if cols % spec.outer:
            raise ValueError(f"{qtype.name} needs rows of a multiple of {spec.outer} inputs, not {cols}")
        if rule not in SCALE_RULES:
            raise ValueError(f"unknown scale rule {rule!r}")
        if rule == "plain" and spec.kquant:
            raise ValueError("the plain scale rule exists for the 32-blocks only")
        self.qtype, self.spec, self.rule = qtype, spec, rule
        self.rows, self.cols = rows, cols
        self.levels = (spec.outer, spec.sub) if spec.kquant else (spec.outer,)
        n_sub, n_outer = cols // spec.sub, cols // spec.outer
        z = lambda n, dt=torch.float32: torch.zeros(rows, n, dtype=dt, device=device)  # noqa: E731
        self.mul, self.sub = z(n_sub), z(n_sub)  # decode: mul*q - sub
        self.rid, self.roff = z(n_sub), z(n_sub)  # rounding: (w - roff) * rid
        self.d, self.dmin = z(n_outer), z(n_outer)  # K-quant super-block fp16 fields
        self.sc, self.mn = z(n_sub, torch.int32), z(n_sub, torch.int32)
        self.q = torch.zeros(rows, cols, dtype=torch.int16, device=device)
        self.super_sigma2 = z(n_outer)  # K-quant super-block mean squares, kept for the sub-blocks
        self.row_sigma2 = None  # set by prepare() for the "imatrix" rule on row-scoped types

    def prepare(self, W: torch.Tensor) -> None:
        """Row statistics the scale rule needs, from the weights before any update."""
        scope = SIGMA2_SCOPE.get(self.qtype)
        if self.rule == "imatrix" and scope and scope[0] == "row":
            self.row_sigma2 = scope[1] * (W * W).mean(1)

    def _value_weights(self, W: torch.Tensor, h: torch.Tensor, sigma2: torch.Tensor | None = None) -> torch.Tensor:
        """Per-value weights of the scale search for W [rows, ..., n] (one row's
        sigma2 given, else the row-scoped one, else W's own mean square)."""
        scope = SIGMA2_SCOPE.get(self.qtype)
        if self.rule != "imatrix" or scope is None:
            return h
        if sigma2 is None:
            sigma2 = self.row_sigma2
        if sigma2 is None:
            sigma2 = scope[1] * (W * W).reshape(W.shape[0], -1).mean(1)
        return h * torch.sqrt(sigma2.reshape((-1,) + (1,) * (W.dim() - 1)) + W * W)

    # -- processing order: act-order moves whole blocks (group-aware), so each
    # block's scale is still chosen from up-to-date weights at its first column.
    def order(self, hdiag, act_order):
        return whole_block_order(self.cols, self.levels, hdiag, act_order)

    # -- choosing parameters
    def choose(self, level, cols, W, h):
        spec = self.spec
        first = int(cols.min())
        if cols.numel() != self.levels[level] or int(cols.max()) - first + 1 != cols.numel() or first % self.levels[level]:
            raise ValueError("a block grid's group must be one whole block")
        srt = torch.argsort(cols)
        W, h = W[:, srt], h[srt]
        if not spec.kquant:
            self._choose_legacy(first // spec.sub, W, h)
        elif level == 0:
            self._choose_super(first // spec.outer, W, h)
        else:
            self._choose_sub(first // spec.sub, W, h)

    def _choose_legacy(self, b, W, h):
        spec = self.spec
        if self.rule == "plain":
            mul, sub, rid, roff = self._plain_params(W)
        else:
            def snap(mul, sub):
                mul16, sub16 = fp16_round(mul), -fp16_round(-sub)
                return mul16, sub16, ()
            mul, sub, _ = search_block_params(W, self._value_weights(W, h), spec, snap, nonpos_min=False)
            rid, roff = safe_reciprocal(mul), -sub
        self.mul[:, b], self.sub[:, b], self.rid[:, b], self.roff[:, b] = mul, sub, rid, roff

    def _plain_params(self, W):
        """gguf.quants' reference rule: extreme-based scale, unrounded reciprocal."""
        spec = self.spec
        if spec.affine:
            lo, hi = W.min(1).values, W.max(1).values
            d = (hi - lo) / spec.qmax
            return fp16_round(d), -fp16_round(lo), safe_reciprocal(d), lo
        if self.qtype == T.Q8_0:
            d = W.abs().max(1).values / 127
        else:
            idx = W.abs().argmax(1, keepdim=True)
            d = W.gather(1, idx).squeeze(1) / spec.qmin
        return fp16_round(d), torch.zeros_like(d), safe_reciprocal(d), torch.zeros_like(d)

    def _choose_super(self, s, W, h):
        """Super-block: float sub-block params -> fp16 d (and dmin) -> integer sub-params."""
        spec = self.spec
        per = spec.outer // spec.sub
        x = W.reshape(self.rows, per, spec.sub)
        hh = h.reshape(1, per, spec.sub)
        identity = lambda mul, sub: (mul, sub, ())  # noqa: E731 - floats; snapped per sub-block later
        self.super_sigma2[:, s] = SIGMA2_SCOPE.get(self.qtype, ("", 0.0))[1] * (W * W).mean(1)
        mul, sub, _ = search_block_params(x, self._value_weights(x, hh, self.super_sigma2[:, s]), spec, identity,
                                          nonpos_min=True)
        if spec.affine:
            d = fp16_round(mul.max(1).values.clamp(min=0) / spec.sc_hi)
            dmin = fp16_round(sub.max(1).values.clamp(min=0) / spec.mn_hi)
        else:
            idx = mul.abs().argmax(1, keepdim=True)
            d = fp16_round(mul.gather(1, idx).squeeze(1) / spec.sc_lo)
            dmin = torch.zeros_like(d)
        self.d[:, s], self.dmin[:, s] = d, dmin
        # the integer sub-scales follow at each sub-block's first column (level 1)

    def _choose_sub(self, b, W, h):
        spec = self.spec
        s = b * spec.sub // spec.outer
        d, dmin = self.d[:, s], self.dmin[:, s]

        def snap(mul, sub, d, dmin):
            sc = torch.clamp(torch.round(mul * safe_reciprocal(d)), spec.sc_lo, spec.sc_hi)
            mn = torch.clamp(torch.round(sub * safe_reciprocal(dmin)), 0, spec.mn_hi)
            return d * sc, dmin * mn, (sc, mn)

        hw = self._value_weights(W, h, self.super_sigma2[:, s])
        mul, sub, (sc, mn) = search_block_params(W, hw, spec, snap, nonpos_min=True, ctx=(d, dmin))
        self.mul[:, b], self.sub[:, b] = mul, sub
        self.rid[:, b], self.roff[:, b] = safe_reciprocal(mul), -sub
        self.sc[:, b], self.mn[:, b] = sc.to(torch.int32), mn.to(torch.int32)

    # -- rounding one column
    def quantize(self, col, w):
        spec = self.spec
        b = col // spec.sub
        t = (w - self.roff[:, b]) * self.rid[:, b]
        if self.rule == "plain" and self.qtype == T.Q8_0:
            q = round_half_away(t)
        elif self.rule == "plain":
            q = torch.floor(t + 0.5 - spec.qmin) + spec.qmin  # trunc(x*id + 8.5) - 8 for Q4_0
        else:
            q = torch.round(t)
        q = torch.clamp(q, spec.qmin, spec.qmax)
        self.q[:, col] = q.to(torch.int16)
        return self.mul[:, b] * q - self.sub[:, b]

    kernel_rounding = True

    def column_rounding(self, cols):
        spec = self.spec
        if self.rule != "plain":
            rule = "nearest"
        else:
            rule = "half_away" if self.qtype == T.Q8_0 else "floor"
        b = cols // spec.sub
        params = [a[:, b].T.contiguous() for a in (self.roff, self.rid, self.mul, self.sub)]
        return rule, params, float(spec.qmin), float(spec.qmax)

    def store_levels(self, cols, levels):
        self.q[:, cols] = levels.to(torch.int16)

    @property
    def refits_scales(self) -> bool:
        return self.rule != "plain"

    def scale_basis(self):
        """Legacy 32-blocks: Q = d*q (- m), d and m free fp16. K-quants: Q = d*sc*q (- dmin*mn),
        sc and mn integer sub-scales of the super-block's fp16 d and dmin. Not the "plain" rule
        (llama.cpp's reference bytes)."""
        if not self.refits_scales:
            return None
        spec = self.spec
        q = self.q.float().reshape(self.rows, -1, spec.sub)
        n_sub = q.shape[1]
        group = torch.arange(n_sub, device=q.device)
        Z, groups = (torch.cat([q, -torch.ones_like(q)], 1), torch.cat([group, group])) if spec.affine else (q, group)
        if not spec.kquant:
            theta = torch.cat([self.mul, self.sub], 1) if spec.affine else self.mul.clone()
            return ScaleBasis.free(Z, groups, theta)
        per = spec.outer // spec.sub
        n_outer = self.d.shape[1]
        owner, lo, hi = group // per, torch.full((n_sub,), float(spec.sc_lo)), torch.full((n_sub,), float(spec.sc_hi))
        k, scales = self.sc.float(), self.d.clone()
        if spec.affine:
            owner, k, scales = torch.cat([owner, owner + n_outer]), torch.cat([k, self.mn.float()], 1), \
                torch.cat([scales, self.dmin], 1)
            lo, hi = torch.cat([lo, torch.zeros(n_sub)]), torch.cat([hi, torch.full((n_sub,), float(spec.mn_hi))])
        return ScaleBasis(Z, groups, k, owner, scales, lo, hi)

    def set_scales(self, basis):
        spec = self.spec
        theta = basis.theta
        nb = self.mul.shape[1]
        self.mul = theta[:, :nb].clone()
        if spec.affine:
            self.sub = theta[:, nb:].clone()
        if spec.kquant:
            n_outer = self.d.shape[1]
            self.d, self.sc = basis.scales[:, :n_outer].clone(), basis.k[:, :nb].to(torch.int32)
            if spec.affine:
                self.dmin, self.mn = basis.scales[:, n_outer:].clone(), basis.k[:, nb:].to(torch.int32)

    def dequantized(self) -> torch.Tensor:
        spec = self.spec
        q = self.q.float().reshape(self.rows, -1, spec.sub)
        return (self.mul[..., None] * q - self.sub[..., None]).reshape(self.rows, self.cols)

    def to_bytes(self) -> np.ndarray:
        """The blocks, [rows, row_bytes] uint8, in the v3 / GGUF layout."""
        return pack_blocks(self)


def make_grid(rows: int, cols: int, *, qtype: GGMLType | None = None, bits: int = 4, group_size: int = 128,
              sym: bool = True, mse: float = 0.0, rule: str = "weighted", device="cpu") -> Grid:
    """A ggml block grid when `qtype` is given, else the GPTQ integer grid."""
    if qtype is not None:
        return BlockGrid(qtype, rows, cols, rule=rule, device=device)
    return IntGrid(rows, cols, bits, group_size=group_size, sym=sym, mse=mse, device=device)


# ---------------------------------------------------------------------------
# Emitting blocks (formats.md 5.2.3 / 5.2.4, v3 = GGUF layouts)
# ---------------------------------------------------------------------------


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    """[R, n] float32 values that are exact fp16 -> [R, n, 2] little-endian bytes."""
    return np.ascontiguousarray(a, dtype="<f2").view(np.uint8).reshape(*a.shape, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 15) | ((hi & 15) << 4)


def _bits_into_bytes(bits: np.ndarray) -> np.ndarray:
    """[..., k, L] single bits -> [..., L] bytes: bit i of byte l is bits[..., i, l]."""
    out = np.zeros(bits.shape[:-2] + bits.shape[-1:], dtype=np.uint8)
    for i in range(bits.shape[-2]):
        out |= (bits[..., i, :].astype(np.uint8) & 1) << i
    return out


def _pairs_into_bytes(pairs: np.ndarray) -> np.ndarray:
    """[..., 4, L] 2-bit values -> [..., L] bytes: value j at bits 2j, 2j+1."""
    out = np.zeros(pairs.shape[:-2] + pairs.shape[-1:], dtype=np.uint8)
    for j in range(4):
        out |= (pairs[..., j, :].astype(np.uint8) & 3) << (2 * j)
    return out


def _kquant_scales12(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and mins -> 12 bytes (formats.md 5.2.4)."""
    out = np.zeros(sc.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return out


def _q3k_scales12(sc6: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales (s + 32) -> 12 bytes (formats.md 5.2.4)."""
    out = np.zeros(sc6.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:8] = _nibbles(sc6[..., 0:8], sc6[..., 8:16])
    for k in range(4):
        for i in range(4):
            out[..., 8 + k] |= ((sc6[..., k + 4 * i] >> 4) & 3) << (2 * i)
    return out


def legacy_blocks(t: GGMLType, d: np.ndarray, m: np.ndarray | None, levels: np.ndarray) -> np.ndarray:
    """32-element blocks of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (formats.md 5.2.3) -> [R, row bytes].

    d, m: [R, nb] fp16-exact values (m only for the affine types); levels:
    [R, nb, 32] stored unsigned levels (value = d*(level + qmin) or d*level + m;
    Q8_0 stores level - 128 as int8).
    """
    R, nb = d.shape
    parts = [_f16_bytes(d)]
    if m is not None:
        parts.append(_f16_bytes(m))
    if t == T.Q8_0:
        parts.append((levels.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        levels = levels.astype(np.uint8)
        if t in (T.Q5_0, T.Q5_1):  # fifth bits: bit e of the little-endian u32 qh is element e's
            qh = np.zeros((R, nb), dtype=np.uint32)
            for e in range(32):
                qh |= ((levels[..., e] >> 4) & 1).astype(np.uint32) << np.uint32(e)
            parts.append(qh.astype("<u4").view(np.uint8).reshape(R, nb, 4))
        parts.append(_nibbles(levels[..., :16], levels[..., 16:]))
    return np.concatenate(parts, axis=-1).reshape(R, -1)


def pack_blocks(g: BlockGrid) -> np.ndarray:
    t, spec = g.qtype, g.spec
    R = g.rows
    q = g.q.cpu().numpy().astype(np.int32)
    qu = (q - spec.qmin).astype(np.uint8)  # stored unsigned levels
    if not spec.kquant:
        m = -g.sub.cpu().numpy() if spec.affine else None
        return legacy_blocks(t, g.mul.cpu().numpy(), m, qu.reshape(R, g.cols // 32, 32))

    ns = g.cols // 256
    qs_ = qu.reshape(R, ns, 256)
    d = _f16_bytes(g.d.cpu().numpy())
    dmin = _f16_bytes(g.dmin.cpu().numpy())
    sc = g.sc.cpu().numpy().reshape(R, ns, -1)
    mn = g.mn.cpu().numpy().reshape(R, ns, -1)
    if t == T.Q2_K:
        scales = (sc.astype(np.uint8) & 15) | ((mn.astype(np.uint8) & 15) << 4)
        qs = _pairs_into_bytes(qs_.reshape(R, ns, 2, 4, 32)).reshape(R, ns, 64)
        parts = [scales, qs, d, dmin]
    elif t == T.Q3_K:
        hmask = _bits_into_bytes((qs_ >> 2).reshape(R, ns, 8, 32))
        qs = _pairs_into_bytes(qs_.reshape(R, ns, 2, 4, 32)).reshape(R, ns, 64)
        parts = [hmask, qs, _q3k_scales12((sc + 32).astype(np.uint8)), d]
    elif t in (T.Q4_K, T.Q5_K):
        scales = _kquant_scales12(sc.astype(np.uint8), mn.astype(np.uint8))
        c = qs_.reshape(R, ns, 4, 2, 32)
        qs = _nibbles(c[:, :, :, 0], c[:, :, :, 1]).reshape(R, ns, 128)
        parts = [d, dmin, scales]
        if t == T.Q5_K:
            parts.append(_bits_into_bytes((qs_ >> 4).reshape(R, ns, 8, 32)))
        parts.append(qs)
    elif t == T.Q6_K:
        h = qs_.reshape(R, ns, 2, 2, 64)
        ql = _nibbles(h[:, :, :, 0], h[:, :, :, 1]).reshape(R, ns, 128)
        qh = _pairs_into_bytes((qs_ >> 4).reshape(R, ns, 2, 4, 32)).reshape(R, ns, 64)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    else:  # pragma: no cover - BLOCK_SPECS and this table move together
        raise ValueError(t)
    return np.concatenate(parts, axis=-1).reshape(R, -1)
