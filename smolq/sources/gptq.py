"""GPTQ checkpoint directories as a convert source (`smolq convert GPTQ_DIR out.gguf`).

A GPTQ directory is opened like any HF checkpoint (checkpoint.py: shards,
index, truncation checks), then each quantized Linear's four tensors
(qweight, qzeros, scales, g_idx; gptq.md 2.1) are replaced by one
`<module>.weight` source that dequantizes lazily to float32 [out, in]. The
convert pipeline then treats it like any float weight (requantize path), or,
when the planned type is one the GPTQ grid maps onto exactly, asks it for the
ggml blocks directly (exact path).

When a GPTQ layer maps exactly (GPTQ value = s·(q − z), s fp16 per group):
- every ggml block (32 consecutive input columns of one output row) must lie
  in one GPTQ group: g_idx constant on each 32-column block. True for any
  group size that is a multiple of 32 (32, 64, 128, -1) and for act-order with
  static groups; false for act-order's scattered groups.
- symmetric 32-blocks (Q4_0, Q5_0, Q8_0: x = d·(c − offset), c in [0, levels)):
  d = s and c = q − z + offset, exact when that stays in range for every q,
  i.e. 2^bits − levels + offset <= z <= offset in every group. So 4-bit with
  z = 8 -> Q4_0, any 2/3-bit -> Q4_0, any <= 4-bit -> Q5_0, 8-bit with
  z = 128 -> Q8_0, any <= 7-bit -> Q8_0.
- affine 32-blocks (Q4_1, Q5_1: x = d·c + m): d = s, c = q, m = −s·z rounded
  to fp16, exact up to that rounding (reported as max |Δm|); needs
  2^bits <= levels.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from smolq.errors import FormatError, InputError
from smolq.formats.gptq_ckpt import CONFIG_NAMES, SUFFIXES, GPTQLayer, read_quantize_config, unpack_words
from smolq.ggml_types import GGMLType, is_quantized
from smolq.lazy import lazy_module
from smolq.plan.mix import with_shape_fallback
from smolq.sources.checkpoint import Checkpoint, SourceTensor, open_checkpoint
from smolq.transforms.grids import legacy_blocks

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

T = GGMLType
QK = 32  # elements per legacy ggml block


@dataclass(frozen=True)
class BlockMap:
    """How a 32-block type holds integer levels: x = d·(c − offset) or x = d·c + m."""

    levels: int
    offset: int
    affine: bool


EXACT_BLOCK_TYPES: dict[GGMLType, BlockMap] = {
    T.Q4_0: BlockMap(16, 8, False),
    T.Q5_0: BlockMap(32, 16, False),
    T.Q8_0: BlockMap(256, 128, False),  # stored as int8 c − 128
    T.Q4_1: BlockMap(16, 0, True),
    T.Q5_1: BlockMap(32, 0, True),
}

SIZE_ORDER = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)  # bytes per block: 18, 20, 22, 24, 34

# Default type of a quantized Linear that does not map exactly, by GPTQ bits (lead's brief: predictable).
DEFAULT_BY_BITS: dict[int, GGMLType] = {2: T.Q2_K, 3: T.Q3_K, 4: T.Q4_K, 8: T.Q8_0}
# Exact types a Linear prefers by default, smallest first.
EXACT_PREFERENCE: dict[int, tuple[GGMLType, ...]] = {4: (T.Q4_0, T.Q4_1), 8: (T.Q8_0,)}


# ------------------------------------------------------------------ one quantized Linear

@dataclass
class Exactness:
    """Which block types a layer's grid maps onto exactly, and the cost of fp16 m."""

    contiguous: bool  # every 32-column block inside one group
    types: frozenset
    max_dm: float  # max |fp16(−s·z) − (−s·z)| over the layer (affine types)
    fp16_scales: bool = True  # ggml blocks hold d as fp16; f32-stored scales must be fp16 values


class GPTQSourceTensor(SourceTensor):
    """`<module>.weight` of a GPTQ Linear: load() dequantizes; exact_blocks() copies the grid."""

    def __init__(self, module: str, shape: tuple[int, int], parts: dict[str, SourceTensor], qcfg: dict):
        super().__init__(f"{module}.weight", "F32", shape, parts["qweight"].file, self._dequantized)
        self.module = module
        self.parts = parts
        self.qcfg = qcfg
        self.bits = int(qcfg["bits"])
        self._exactness: Exactness | None = None

    def layer(self) -> GPTQLayer:
        t = {s: p.load_raw() for s, p in self.parts.items()}
        t["g_idx"] = self.g_idx()
        return GPTQLayer.from_packed(t, self.bits, self.qcfg["checkpoint_format"])

    def g_idx(self) -> np.ndarray:
        n_in = self.shape[1]
        if "g_idx" in self.parts:
            g = np.asarray(self.parts["g_idx"].load_raw()).astype(np.int64)
        else:  # early GfL checkpoints: contiguous groups (gptq.md 2.7)
            gs = int(self.qcfg.get("group_size") or -1)
            g = np.arange(n_in) // (gs if gs > 0 else n_in)
        n_groups = self.parts["scales"].shape[0]
        if g.shape != (n_in,) or g.min(initial=0) < 0 or g.max(initial=0) >= n_groups:
            raise FormatError(self.file, f"{self.module}: g_idx does not index the {n_groups} groups of scales")
        return g

    def zeros(self) -> np.ndarray:

        z = unpack_words(self.parts["qzeros"].load_raw(), self.bits, self.shape[0], 1).astype(np.int64)
        return z + 1 if self.qcfg["checkpoint_format"] == "gptq" else z  # v1 stores zero − 1 (gptq.md 2.4)

    def _dequantized(self) -> np.ndarray:
        return self.layer().dequantize()

    def exactness(self) -> Exactness:
        if self._exactness is None:
            self._exactness = self._find_exactness()
        return self._exactness

    def _find_exactness(self) -> Exactness:
        g = self.g_idx()
        blocks = g.reshape(-1, QK)
        contiguous = bool((blocks == blocks[:, :1]).all())
        if not contiguous:
            return Exactness(False, frozenset(), 0.0)
        used = np.unique(blocks[:, 0])  # groups some block reads (others are never looked at)
        z = self.zeros()[used]
        s = self.parts["scales"].load_raw()[used].astype(np.float32)
        top = (1 << self.bits) - 1
        types = set()
        if not np.array_equal(s.astype(np.float16).astype(np.float32), s):  # f32 scales: d is fp16 in ggml blocks
            return Exactness(True, frozenset(), 0.0, fp16_scales=False)
        for t, bm in EXACT_BLOCK_TYPES.items():
            if bm.affine:
                ok = top < bm.levels
            else:
                ok = bool(z.min() >= top - (bm.levels - 1) + bm.offset and z.max() <= bm.offset)
            if ok:
                types.add(t)
        m = -s * z.astype(np.float32)  # exact in f32: fp16 × integer below 2^9
        max_dm = float(np.abs(m.astype(np.float16).astype(np.float32) - m).max(initial=0.0))
        return Exactness(True, frozenset(types), max_dm)

    def exact_blocks(self, t: GGMLType) -> np.ndarray:
        """The layer as `t` blocks (GGUF / ggjt v3 layout), uint8 [out, in/32 · block bytes]."""
        if t not in self.exactness().types:
            raise ValueError(f"{self.module} does not map exactly onto {t.name}")
        return emit_blocks(self.layer(), t)


def emit_blocks(layer: GPTQLayer, t: GGMLType) -> np.ndarray:
    """ggml v3 blocks holding exactly s·(q − z) (formats.md 5.2.3); caller checked the ranges."""

    bm = EXACT_BLOCK_TYPES[t]
    rows, cols = layer.qint.shape
    nb = cols // QK
    g = layer.g_idx.reshape(nb, QK)[:, 0]
    d = layer.scales[g].T.astype(np.float32)  # [rows, nb], exact fp16 values
    z = layer.zeros[g].T.astype(np.int64)
    q = layer.qint.reshape(rows, nb, QK).astype(np.int64)
    levels = q if bm.affine else q - z[..., None] + bm.offset
    if levels.min(initial=0) < 0 or levels.max(initial=0) >= bm.levels:  # pragma: no cover - exactness() rules it out
        raise ValueError(f"levels out of range for {t.name}")
    m = -d * z.astype(np.float32) if bm.affine else None
    return legacy_blocks(t, d, m, levels)


# ------------------------------------------------------------------ the directory

@dataclass
class GPTQCheckpoint(Checkpoint):
    qcfg: dict = field(default_factory=dict)
    linears: dict[str, GPTQSourceTensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop_zero_biases(self, used: set[str]) -> None:
        """Drop `<module>.bias` of GPTQ Linears that the architecture has no place for, when all zero.

        Some GPTQ writers save a bias buffer for every quantized Linear, zeros where
        the model has none (vLLM's loaders skip this "extra bias for GPTQ models").
        A zero bias changes nothing, so it goes with a note; a nonzero one stays and
        the architecture check rejects it as an unexpected tensor.
        """
        dropped = []
        for weight in self.linears:
            name = weight[: -len("weight")] + "bias"
            bias = self.tensors.get(name)
            if bias is not None and name not in used and not np.any(bias.load_raw()):
                dropped.append(name)
        for name in dropped:
            del self.tensors[name]
        if dropped:
            self.notes.append(f"{len(dropped)} all-zero bias tensors of GPTQ linears dropped "
                              f"(the architecture has no bias there), e.g. {dropped[0]}")


def looks_like_gptq(directory: str | Path) -> bool:
    """A quantization config is present (read_quantize_config then says whether it is usable)."""
    d = Path(directory)
    if not d.is_dir():
        return False
    if any((d / n).is_file() for n in CONFIG_NAMES if n != "config.json"):
        return True
    try:
        return "quantization_config" in json.loads((d / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def open_gptq_checkpoint(path: str | Path) -> GPTQCheckpoint:
    """The directory with every quantized Linear presented as a float `<module>.weight`."""
    directory = Path(path)
    qcfg = read_quantize_config(directory)
    ckpt = open_checkpoint(directory)
    try:
        groups: dict[str, dict[str, SourceTensor]] = {}
        rest: dict[str, SourceTensor] = {}
        for name, st in ckpt.tensors.items():
            module, _, suffix = name.rpartition(".")
            if suffix in SUFFIXES:
                groups.setdefault(module, {})[suffix] = st
            else:
                rest[name] = st
        linears: dict[str, GPTQSourceTensor] = {}
        for module, parts in groups.items():
            if "qweight" not in parts:
                for st in parts.values():  # a stray g_idx/scales without its layer
                    rest[st.name] = st
                continue
            linears[f"{module}.weight"] = _linear(module, parts, qcfg)
        if not linears:
            raise InputError(directory, "has a GPTQ quantization config but no *.qweight tensors")
        tensors = {}
        for name, st in ckpt.tensors.items():  # keep file order: each layer where its qweight was
            module, _, suffix = name.rpartition(".")
            if suffix == "qweight" and f"{module}.weight" in linears:
                tensors[f"{module}.weight"] = linears[f"{module}.weight"]
            elif name in rest:
                tensors[name] = rest[name]
    except BaseException:
        ckpt.close()
        raise
    return GPTQCheckpoint(ckpt.path, ckpt.config, tensors, ckpt.files, f"gptq-{qcfg['bits']}bit",
                          ckpt._keepalive, qcfg=qcfg, linears=linears)


def _linear(module: str, parts: dict[str, SourceTensor], qcfg: dict) -> GPTQSourceTensor:
    """Check the packed shapes against each other (gptq.md 2.1) before anything is read."""
    bits = int(qcfg["bits"])
    qw = parts["qweight"]
    missing = [s for s in ("qzeros", "scales") if s not in parts]
    if missing:
        raise FormatError(qw.file, f"{module}: GPTQ layer lacks {', '.join(missing)}")
    for s, want in (("qweight", "I32"), ("qzeros", "I32"), ("scales", "F16"), ("g_idx", "I32")):
        if s in parts and parts[s].dtype not in ((want, "F32") if s == "scales" else (want,)):
            raise FormatError(parts[s].file, f"{module}.{s} has dtype {parts[s].dtype}, expected {want}")
    sc = parts["scales"]
    if len(qw.shape) != 2 or len(sc.shape) != 2:
        raise FormatError(qw.file, f"{module}: qweight/scales must be 2-D")
    n_out = sc.shape[1]
    if qw.shape[0] * 32 % bits or qw.shape[0] * 32 // bits % QK:
        raise FormatError(qw.file, f"{module}.qweight has {qw.shape[0]} rows: not a whole number of {bits}-bit "
                                   f"groups of 32 inputs")
    n_in = qw.shape[0] * 32 // bits
    checks = [
        ("qweight", qw.shape, (n_in * bits // 32, n_out)),
        ("qzeros", parts["qzeros"].shape, (sc.shape[0], n_out * bits // 32)),
    ]
    if "g_idx" in parts:
        checks.append(("g_idx", parts["g_idx"].shape, (n_in,)))
    for s, got, want in checks:
        if tuple(got) != tuple(want):
            raise FormatError(parts[s].file, f"{module}.{s} has shape {list(got)}, expected {list(want)} "
                                             f"({bits}-bit, {n_in} inputs, {n_out} outputs, {sc.shape[0]} groups)")
    if n_out % 32 or sc.shape[0] < 1:
        raise FormatError(sc.file, f"{module}.scales has shape {list(sc.shape)}: outputs must be a multiple of 32")
    return GPTQSourceTensor(module, (n_out, n_in), parts, qcfg)


# ------------------------------------------------------------------ choosing types

def default_type(src: GPTQSourceTensor, shape: tuple[int, ...]) -> tuple[GGMLType, bool]:
    """Per-tensor default when --outtype is not given: the exact type, else by bits."""

    ex = src.exactness()
    for t in EXACT_PREFERENCE.get(src.bits, ()):
        if t in ex.types:
            return t, False
    t, fell_back = with_shape_fallback(DEFAULT_BY_BITS[src.bits], tuple(shape))
    return t, fell_back


def why_not_exact(src: GPTQSourceTensor, t: GGMLType) -> str:
    ex = src.exactness()
    if not ex.contiguous:
        return "act-order groups are not contiguous 32-column blocks"
    if t not in EXACT_BLOCK_TYPES:
        return f"{t.name} has no grid the {src.bits}-bit GPTQ levels map onto"
    if not ex.fp16_scales:
        return "scales are not fp16 values"
    if EXACT_BLOCK_TYPES[t].affine:
        return f"{src.bits}-bit levels do not fit {t.name}'s {EXACT_BLOCK_TYPES[t].levels}"
    return f"zero points do not fit {t.name}'s symmetric grid"


def summarize(steps: list) -> tuple[list[str], str | None]:
    """Notes on what was exact, and the one warning line about what was not."""
    gsteps = [s for s in steps if isinstance(s.source, GPTQSourceTensor)]
    notes: list[str] = []
    exact = [s for s in gsteps if s.exact]
    by_type = Counter(s.type.name for s in exact)
    for tname, n in sorted(by_type.items()):
        dm = max((s.source.exactness().max_dm for s in exact if s.type.name == tname), default=0.0)
        affine = EXACT_BLOCK_TYPES[T[tname]].affine
        tail = f" (max |Δm| = {dm:.3g} from rounding m = −scale·zero to fp16)" if affine else " (bit for bit)"
        notes.append(f"{n} of {len(gsteps)} GPTQ linears copied exactly as {tname}{tail}")
    floats = [s for s in gsteps if not s.exact and not is_quantized(s.type)]
    if floats:
        types = ", ".join(sorted({s.type.name for s in floats}))
        notes.append(f"{len(floats)} of {len(gsteps)} GPTQ linears dequantized to {types}")
    rest = [s for s in gsteps if not s.exact and is_quantized(s.type)]
    warning = None
    if rest:
        reasons = Counter(why_not_exact(s.source, s.type) for s in rest)
        types = ", ".join(sorted({s.type.name for s in rest}))
        why = "; ".join(f"{n}: {r}" for r, n in reasons.most_common())
        warning = (f"{len(rest)} of {len(gsteps)} GPTQ linears dequantized and requantized (round to nearest) "
                   f"to {types}, not exact ({why})")
        common = frozenset.intersection(*(s.source.exactness().types for s in rest))
        smallest = next((t for t in SIZE_ORDER if t in common), None)
        if smallest is not None:
            warning += f"; --outtype {smallest.name.lower()} would copy them exactly"
    return notes, warning
