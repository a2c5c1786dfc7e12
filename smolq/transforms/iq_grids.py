"""GPTQ grids for the ggml types whose scales come from smolq's C kernel:
the non-linear IQ4_NL / IQ4_XS, the IQ3_XXS / IQ3_S / IQ2_XXS / IQ2_XS / IQ2_S
lattices and the ternary TQ1_0 / TQ2_0.

The solver contract is grids.py's: at the first column of every block the
grid chooses the block's parameters from the current, error-updated weights;
then it rounds one column at a time.

- IQ4_NL / IQ4_XS (`IQ4Grid`): the block is quantized by the kernel exactly as
  llama.cpp's quantizer does it (the Hessian diagonal is the importance
  matrix), which fixes the stored scales and also reports the unrounded
  per-32 scale whose inverse ggml rounds with. Each column is then rounded
  to the nearest of the 16 kvalues_iq4nl by that inverse scale, with ggml's
  tie rule, and decodes with the stored scale. With a diagonal Hessian no
  error moves, so the blocks are llama.cpp's RTN bytes.
- IQ3_XXS / IQ3_S / IQ2_XXS / IQ2_XS / IQ2_S (`LatticeGrid`): the same for
  grid points of 4 or 8 values, rounded jointly at each group's first column
  (see the class).
- TQ1_0 / TQ2_0 (`TernaryGrid`): codes lroundf(w/d) in {-1, 0, 1} with one
  fp16 d per 256: ggml's max |w| under rule "plain" (its quantizer takes no
  importance matrix), else the Hessian-weighted best scale.

`grid_for` is the one entry that picks a grid for any GPTQ target.
"""
from __future__ import annotations

from smolq import kernels
from smolq.ggml_types import GGMLType, type_size
from smolq.lazy import lazy_module
from smolq.transforms.grids import (BLOCK_SPECS, Grid, ScaleBasis, fp16_round, make_grid, round_half_away,
                                    safe_reciprocal, whole_block_order)

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

torch = lazy_module("torch")  # imported at first use: `smolq --help` stays fast

T = GGMLType

# llama.cpp's kvalues_iq4nl (ggml-common.h): the 16 levels of IQ4_NL / IQ4_XS.
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Elements per block (the grid's group) of each type.
KERNEL_GRID_BLOCKS: dict[GGMLType, int] = {T.IQ4_NL: 32, T.IQ4_XS: 256, T.TQ1_0: 256, T.TQ2_0: 256,
                                           T.IQ3_XXS: 256, T.IQ3_S: 256, T.IQ2_XXS: 256, T.IQ2_XS: 256,
                                           T.IQ2_S: 256}

#: Types whose grid points span several columns (rounded jointly; no static groups).
JOINT_GRID_TYPES: frozenset[GGMLType] = frozenset({T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S})

#: Every ggml type the GPTQ pipeline can round onto.
GPTQ_GRID_TYPES: frozenset[GGMLType] = frozenset(BLOCK_SPECS) | frozenset(KERNEL_GRID_BLOCKS)


def _check_shape(qtype: GGMLType, cols: int) -> int:
    block = KERNEL_GRID_BLOCKS[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} inputs, not {cols}")
    return block


def _whole_block(cols: torch.Tensor, block: int) -> tuple[int, torch.Tensor]:
    """(first column, the sort that puts the group in column order); refuses partial blocks."""
    first = int(cols.min())
    if cols.numel() != block or int(cols.max()) - first + 1 != block or first % block:
        raise ValueError("a block grid's group must be one whole block")
    return first, torch.argsort(cols)


def nearest_kvalue(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8: index of the sorted `values` nearest t, the upper one on a tie."""
    mu = torch.searchsorted(values, t.contiguous(), right=True).clamp(1, len(values) - 1)
    lower = (t - values[mu - 1]) < (values[mu] - t)
    idx = torch.where(lower, mu - 1, mu)
    idx = torch.where(t <= values[0], 0, idx)
    return torch.where(t >= values[-1], len(values) - 1, idx)


class IQ4Grid(Grid):
    """IQ4_NL / IQ4_XS: the kernel picks each block's scales, columns round onto kvalues x scale.

    rule "plain" quantizes the blocks without importance weights (llama.cpp
    without an imatrix); any other rule passes the Hessian diagonal as one.
    """

    def __init__(self, qtype: GGMLType, rows: int, cols: int, rule: str = "weighted", device="cpu"):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        self.block = _check_shape(qtype, cols)
        self.levels = (self.block,)
        self.weighted = rule != "plain"
        self.bpb = type_size(qtype)
        self.code_offset = 2 if qtype == T.IQ4_NL else 8  # where qs starts in a block
        self.blocks = np.zeros((rows, cols // self.block, self.bpb), dtype=np.uint8)
        self.rid = torch.zeros(rows, cols // 32, device=device)  # rounding: nearest kvalue to w * rid
        self.mul = torch.zeros(rows, cols // 32, device=device)  # decode: mul * kvalue
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self.values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)

    def order(self, hdiag, act_order):
        return whole_block_order(self.cols, self.levels, hdiag, act_order)

    def choose(self, level, cols, W, h):
        first, srt = _whole_block(cols, self.block)
        x = W[:, srt].detach().to("cpu", torch.float32).numpy()
        imatrix = h[srt].detach().to("cpu", torch.float32).numpy() if self.weighted else None
        raw, rscale = kernels.iq4_rounding_scales(x, self.qtype, imatrix)
        b = first // self.block
        self.blocks[:, b] = raw.reshape(self.rows, self.bpb)
        subs = slice(first // 32, (first + self.block) // 32)
        rs = torch.from_numpy(rscale).to(self.rid.device)
        self.rid[:, subs] = safe_reciprocal(rs)
        self.mul[:, subs] = torch.from_numpy(self._decode_scales(raw.reshape(self.rows, self.bpb))).to(self.mul.device)

    def _decode_scales(self, block: np.ndarray) -> np.ndarray:
        """[rows, block bytes] -> the float32 multiplier of each 32 values, as ggml decodes."""
        d = block[:, 0:2].copy().view("<f2").astype(np.float32)  # [rows, 1]
        if self.qtype == T.IQ4_NL:
            return d
        return d * (self._sub_scales(block) - 32).astype(np.float32)

    @staticmethod
    def _sub_scales(block: np.ndarray) -> np.ndarray:
        """IQ4_XS: [blocks, block bytes] -> the 6-bit ls of each 32 values [blocks, 8] (int32)."""
        scales_h = block[:, 2:4].copy().view("<u2").astype(np.int32)  # [blocks, 1]
        ib = np.arange(8)
        low = (block[:, 4 + ib // 2] >> (4 * (ib % 2))) & 15
        high = (scales_h >> (2 * ib)) & 3
        return (low | (high << 4)).astype(np.int32)

    def quantize(self, col, w):
        sb = col // 32
        idx = nearest_kvalue(w * self.rid[:, sb], self.values)
        self.codes[:, col] = idx.to(torch.uint8)
        return self.mul[:, sb] * self.values[idx]

    refits_scales = True

    def scale_basis(self):
        """Q = scale * kvalue per 32: IQ4_NL's scale is its free fp16 d; IQ4_XS's is d * (ls - 32),
        ls a 6-bit integer under the super-block's fp16 d."""
        v = self.values[self.codes.long()].reshape(self.rows, -1, 32)
        group = torch.arange(v.shape[1], device=v.device)
        if self.qtype == T.IQ4_NL:
            return ScaleBasis.free(v, group, self.mul.clone())
        d = torch.from_numpy(self.blocks[:, :, 0:2].copy().view("<f2").astype(np.float32)[..., 0]).to(v.device)
        k = torch.from_numpy(self._sub_scales(self.blocks.reshape(-1, self.bpb)).reshape(self.rows, -1)).to(v.device)
        per = self.block // 32
        return ScaleBasis(v, group, k.float() - 32, group // per, d, torch.full((v.shape[1],), -32.0),
                          torch.full((v.shape[1],), 31.0))

    def set_scales(self, basis):
        self.mul = basis.theta.clone()
        self.blocks[:, :, 0:2] = basis.scales.cpu().numpy().astype("<f2").view(np.uint8).reshape(self.rows, -1, 2)
        if self.qtype == T.IQ4_XS:
            ls = (basis.k.cpu().numpy().astype(np.int32) + 32).reshape(self.rows, -1, self.block // 32)
            high = ((ls >> 4) << (2 * np.arange(ls.shape[-1]))).sum(-1).astype("<u2")
            self.blocks[:, :, 2:4] = high[..., None].view(np.uint8).reshape(self.rows, -1, 2)
            low = ls & 15
            self.blocks[:, :, 4:8] = (low[..., 0::2] | (low[..., 1::2] << 4)).astype(np.uint8)

    def dequantized(self) -> torch.Tensor:
        v = self.values[self.codes.long()].reshape(self.rows, -1, 32)
        return (self.mul[..., None] * v).reshape(self.rows, self.cols)

    def to_bytes(self) -> np.ndarray:
        """The blocks, [rows, row bytes] uint8: the kernel's scales with the solver's codes."""
        out = self.blocks.copy()
        L = self.codes.cpu().numpy().reshape(self.rows, -1, self.block // 32, 2, 16)
        qs = (L[..., 0, :] | (L[..., 1, :] << 4)).reshape(self.rows, -1, self.block // 2)
        out[..., self.code_offset:] = qs
        return out.reshape(self.rows, -1)


class LatticeGrid(Grid):
    """IQ3_XXS / IQ3_S / IQ2_XXS / IQ2_XS / IQ2_S: grid points of g = 4 or 8
    values, rounded jointly under GPTQ's error feedback.

    At each 256-block the kernel quantizes the current weights as llama.cpp
    does (stored scales and signs, and for every g-group the inverse scale and
    scale ggml rounded its point with). At each group's first column the grid
    rounds the group's current values, signs fixed, onto the lattice the way
    ggml does (kernels.lattice_round_groups); the solver then pushes the g
    columns' errors on, one column at a time. Act-order moves whole groups
    only. A super-block row where ggml skipped a block (all zero, or levels no
    single rounding reproduces) keeps ggml's bytes: IQ3_S even shifts the
    later blocks' points there, so there is nothing to re-round consistently.
    """

    def __init__(self, qtype: GGMLType, rows: int, cols: int, rule: str = "weighted", device="cpu"):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        self.block = _check_shape(qtype, cols)
        self.group, self.dblock = kernels.LATTICE_GROUPS[qtype]
        self.levels = (self.block, self.group)
        self.weighted = rule != "plain" or qtype in kernels.NEEDS_IMATRIX
        self.bpb = type_size(qtype)
        n_super = cols // self.block
        self.blocks = np.zeros((rows, n_super, self.bpb), dtype=np.uint8)
        self.frozen = np.zeros((rows, n_super), dtype=bool)
        self.points = np.zeros((rows, cols // self.group), dtype=np.uint16)
        self.plan: dict[str, np.ndarray] = {}  # the current super-block's rounding plan
        self.Q = torch.zeros(rows, cols, device=device)  # decoded values, set a group at a time

    def order(self, hdiag, act_order):
        return whole_block_order(self.cols, self.levels, hdiag, act_order, keep_last=True)

    supports_static = False

    def choose_static(self, W, hdiag):
        raise ValueError(f"{self.qtype.name} rounds {self.group} columns jointly as GPTQ reaches them: "
                         f"no static groups")

    def choose(self, level, cols, W, h):
        if level == 0:
            self._choose_super(cols, W, h)
        else:
            self._round_group(cols, W)

    def _choose_super(self, cols, W, h):
        first, srt = _whole_block(cols, self.block)
        x = W[:, srt].detach().to("cpu", torch.float32).numpy()
        imatrix = h[srt].detach().to("cpu", torch.float32).numpy() if self.weighted else None
        plan = kernels.lattice_rounding_plan(x, self.qtype, imatrix)
        s = first // self.block
        self.blocks[:, s] = plan["blocks"]
        self.frozen[:, s] = plan["skipped"].any(1)
        self.plan = dict(plan, first=first, decoded=kernels.dequantize(plan["blocks"], self.qtype, x.shape))

    def _round_group(self, cols, W):
        g = self.group
        first, srt = _whole_block(cols, g)
        p = self.plan
        at = first - p["first"]
        if not 0 <= at < self.block:
            raise ValueError("a lattice group outside the super-block chosen last")
        sign = p["sign"][:, at:at + g]
        x = W[:, srt].detach().to("cpu", torch.float32).numpy()
        points, mags = kernels.lattice_round_groups(self.qtype, sign * x, p["waux"][:, at:at + g], p["id"][:, at // g],
                                                    p["scale"][:, at // g])
        q = p["db"][:, at // self.dblock][:, None] * mags.astype(np.float32) * sign
        frozen = self.frozen[:, p["first"] // self.block]
        q[frozen] = p["decoded"][frozen, at:at + g]
        self.points[:, first // g] = points
        self.Q[:, first:first + g] = torch.from_numpy(q).to(self.Q.device)

    def quantize(self, col, w):
        return self.Q[:, col]

    def dequantized(self) -> torch.Tensor:
        return self.Q.clone()

    def to_bytes(self) -> np.ndarray:
        """ggml's blocks with the solver's grid points (frozen super-block rows as ggml wrote them)."""
        out = self.blocks.copy()
        live = ~self.frozen
        pts = self.points.reshape(self.rows, -1, self.block // self.group)[live]
        blocks = out[live]
        _set_points(self.qtype, blocks, pts)
        out[live] = blocks
        return out.reshape(self.rows, -1)


def _set_points(qtype: GGMLType, blocks: np.ndarray, pts: np.ndarray) -> None:
    """Write grid point indices pts [n, points per block] into blocks [n, block bytes] (ggml's layouts)."""
    low = (pts & 255).astype(np.uint8)
    high = (pts >> 8).astype(np.uint8)
    if qtype == T.IQ3_XXS:
        blocks[:, 2:66] = low
    elif qtype == T.IQ3_S:  # 9th bit of point 8 ib + k: bit k of qh[ib]
        blocks[:, 2:66] = low
        blocks[:, 66:74] = (high.reshape(-1, 8, 8) << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)
    elif qtype == T.IQ2_XXS:  # per 32: a u32 of 4 point bytes, then a u32 of signs and scale
        i = np.arange(32)
        blocks[:, 2 + 8 * (i // 4) + i % 4] = low
    elif qtype == T.IQ2_XS:  # per group a little-endian u16: 9-bit point, 7 sign bits above it
        at = 2 + 2 * np.arange(32)
        blocks[:, at] = low
        blocks[:, at + 1] = (blocks[:, at + 1] & 0xFE) | high
    elif qtype == T.IQ2_S:  # low 8 bits in qs, the top 2 bits of point 4 ib + k at bits 2k of qh[ib]
        blocks[:, 2:34] = low
        blocks[:, 66:74] = (high.reshape(-1, 8, 4) << (2 * np.arange(4, dtype=np.uint8))).sum(-1, dtype=np.uint8)
    else:  # pragma: no cover - LATTICE_GROUPS and this table move together
        raise ValueError(qtype)


# Fractions f of max|w| tried as ternary scales by the weighted rule (ggml's own is f = 1).
TERNARY_FRACTIONS = tuple(1 / (1 + 0.1 * i) for i in range(40))


class TernaryGrid(Grid):
    """TQ1_0 / TQ2_0: one fp16 scale per 256, codes {-1, 0, 1}.

    rule "plain": ggml's reference rule, d = max|w| (llama.cpp's TQ
    quantizers take no importance matrix, so this is its RTN). Any other
    rule: the d of least Hessian-diagonal-weighted error among fractions of
    max|w| and their least-squares refits (at max|w| nearly every weight of
    a Gaussian-like row rounds to 0).
    """

    def __init__(self, qtype: GGMLType, rows: int, cols: int, rule: str = "weighted", device="cpu"):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        self.weighted = rule != "plain"
        self.block = _check_shape(qtype, cols)
        self.levels = (self.block,)
        n = cols // self.block
        self.rid = torch.zeros(rows, n, device=device)
        self.d = torch.zeros(rows, n, device=device)  # fp16-exact stored scale
        self.codes = torch.zeros(rows, cols, dtype=torch.int8, device=device)

    def order(self, hdiag, act_order):
        return whole_block_order(self.cols, self.levels, hdiag, act_order)

    def choose(self, level, cols, W, h):
        first, srt = _whole_block(cols, self.block)
        amax = W.abs().max(dim=1).values
        d = self._weighted_scale(W[:, srt], h[srt], amax) if self.weighted else amax
        b = first // self.block
        self.rid[:, b] = safe_reciprocal(d)
        self.d[:, b] = fp16_round(d)

    @staticmethod
    def _weighted_scale(x, h, amax):
        """Per row, the scale of least sum h (x - d q)^2 with q = clamp(round(x / d), -1, 1)."""
        fr = torch.tensor(TERNARY_FRACTIONS, dtype=x.dtype, device=x.device)
        d0 = amax[None, :] * fr[:, None]  # [C, rows]
        q = torch.clamp(round_half_away(x[None] * safe_reciprocal(d0)[..., None]), -1, 1)
        den = (h * q * q).sum(-1)
        d1 = torch.where(den > 0, (h * q * x[None]).sum(-1) / torch.where(den > 0, den, 1), d0)
        cand = fp16_round(torch.cat([d0, d1]))
        q = torch.clamp(round_half_away(x[None] * safe_reciprocal(cand)[..., None]), -1, 1)
        err = (h * (x[None] - cand[..., None] * q) ** 2).sum(-1)
        return cand.gather(0, err.argmin(0, keepdim=True)).squeeze(0)

    def quantize(self, col, w):
        b = col // self.block
        q = torch.clamp(round_half_away(w * self.rid[:, b]), -1, 1)  # error feedback may push |w| past d
        self.codes[:, col] = q.to(torch.int8)
        return q * self.d[:, b]

    def dequantized(self) -> torch.Tensor:
        q = self.codes.float().reshape(self.rows, -1, self.block)
        return (q * self.d[..., None]).reshape(self.rows, self.cols)

    def to_bytes(self) -> np.ndarray:
        trits = (self.codes.cpu().numpy().astype(np.int32) + 1).reshape(self.rows, -1, self.block)
        d = np.ascontiguousarray(self.d.cpu().numpy(), dtype="<f2").view(np.uint8).reshape(self.rows, -1, 2)
        qs = _tq1_bytes(trits) if self.qtype == T.TQ1_0 else _tq2_bytes(trits)
        return np.concatenate([qs, d], axis=-1).reshape(self.rows, -1)


def _base3_bytes(digits: np.ndarray) -> np.ndarray:
    """[..., k, L] trits, most significant first -> [..., L] bytes ceil(v * 256 / 243) (v padded to 5 trits)."""
    v = np.zeros(digits.shape[:-2] + digits.shape[-1:], dtype=np.int32)
    for i in range(digits.shape[-2]):
        v = v * 3 + digits[..., i, :]
    v = v * 3 ** (5 - digits.shape[-2])
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _tq1_bytes(t: np.ndarray) -> np.ndarray:
    """TQ1_0 qs[48] + qh[4] of [R, nb, 256] trits (0, 1, 2): element m + 32n in byte m, etc."""
    a = _base3_bytes(t[..., :160].reshape(*t.shape[:-1], 5, 32))
    b = _base3_bytes(t[..., 160:240].reshape(*t.shape[:-1], 5, 16))
    c = _base3_bytes(t[..., 240:].reshape(*t.shape[:-1], 4, 4))
    return np.concatenate([a, b, c], axis=-1)


def _tq2_bytes(t: np.ndarray) -> np.ndarray:
    """TQ2_0 qs[64] of [R, nb, 256] trits: byte 32c + m holds element 128c + 32n + m at bits 2n."""
    c = t.reshape(*t.shape[:-1], 2, 4, 32).astype(np.uint8)
    out = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    return out.reshape(*t.shape[:-1], 64)


def grid_for(rows: int, cols: int, *, qtype: GGMLType | None = None, bits: int = 4, group_size: int = 128,
             sym: bool = True, mse: float = 0.0, rule: str = "weighted", device="cpu") -> Grid:
    """The GPTQ grid of `qtype` (a ggml type), or the GPTQ integer grid without one."""
    if qtype in (T.IQ4_NL, T.IQ4_XS):
        return IQ4Grid(qtype, rows, cols, rule=rule, device=device)
    if qtype in JOINT_GRID_TYPES:
        return LatticeGrid(qtype, rows, cols, rule=rule, device=device)
    if qtype in (T.TQ1_0, T.TQ2_0):
        return TernaryGrid(qtype, rows, cols, rule=rule, device=device)
    return make_grid(rows, cols, qtype=qtype, bits=bits, group_size=group_size, sym=sym, mse=mse, rule=rule,
                     device=device)
