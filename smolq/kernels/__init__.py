"""numpy binding of the smolq C kernel.

The kernel is a plain shared library (built by setup.py next to this file)
loaded with ctypes; ctypes releases the GIL for the length of every call, so
Python threads can overlap kernel work. Every size and type is checked here,
before C sees it: bad input raises ValueError / TypeError, never a crash.

Layouts are "v1", "v2", "v3" (formats.md 5.2); they matter only for Q4_0,
Q4_1, Q5_0, Q5_1 and Q8_0, and every other type accepts any of them.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any, Sequence

from smolq.ggml_types import LAYOUTS, TYPE_INFO, VERSIONED_TYPES, GGMLType, type_size
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

__all__ = [
    "KERNEL_TYPES", "QUANTIZE_TYPES", "DEQUANTIZE_TYPES", "NEEDS_IMATRIX", "quantize", "dequantize", "requantize", "row_size", "relayout",
    "iq4_rounding_scales", "LATTICE_GROUPS", "lattice_rounding_plan", "lattice_round_groups", "gptq_pack", "gptq_unpack", "GPTQ_ROUNDING", "gptq_columns", "error_stats", "checksum", "count_nonfinite",
    "BNB_QUANT_TYPES", "bnb_code", "bnb4_quantize", "bnb4_dequantize", "bnb8_quantize", "bnb8_dequantize", "bnb_mean",
]

_ABI_VERSION = 6
_ERRORS = {-1: "type/layout not supported", -2: "row length not a multiple of the block size", -3: "bad argument",
           -4: "the type needs an importance matrix",
           -5: "values too large for the type's search (llama.cpp aborts on them)",
           -6: "NaN or infinite values cannot be quantized"}


def _load_library() -> ctypes.CDLL:
    here = Path(__file__).resolve().parent
    candidates = sorted(here.glob("_smolq_kernel*.so")) + sorted(here.glob("_smolq_kernel*.pyd"))
    if not candidates:
        raise ImportError(f"smolq C kernel is not built (no _smolq_kernel*.so in {here}); run `make kernel`")
    lib = ctypes.CDLL(str(candidates[0]))
    if not hasattr(lib, "smolq_kernel_abi_version") or lib.smolq_kernel_abi_version() != _ABI_VERSION:
        raise ImportError(f"smolq C kernel at {candidates[0]} is stale (ABI mismatch); run `make kernel`")
    return lib


_lib = _load_library()

_i64, _int, _vp, _u64 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64
_SIGNATURES = {
    "smolq_quantize": (_i64, [_int, _int, _vp, _vp, _i64, _i64, _vp, _int, _int]),
    "smolq_dequantize": (_i64, [_int, _int, _vp, _vp, _i64, _i64, _int, _int]),
    "smolq_requantize": (_i64, [_int, _int, _vp, _int, _int, _vp, _i64, _i64, _vp, _int, _int, _int]),
    "smolq_row_size": (_i64, [_int, _int, _i64]),
    "smolq_relayout": (_i64, [_int, _int, _int, _vp, _vp, _i64, ctypes.POINTER(_int)]),
    "smolq_gptq_pack": (_i64, [_vp, _vp, _i64, _i64, _int, _int]),
    "smolq_gptq_unpack": (_i64, [_vp, _vp, _i64, _i64, _int, _int]),
    "smolq_gptq_columns": (_int, [_vp, _i64, _vp, _i64, _vp, _vp, _i64, _i64, _i64, _i64, _i64, _int, _vp, _vp, _vp,
                                  _vp, ctypes.c_float, ctypes.c_float, _vp, _vp, _int]),
    "smolq_error_stats": (_int, [_vp, _vp, _i64, _int, ctypes.POINTER(ctypes.c_double)]),
    "smolq_checksum": (_u64, [_vp, _i64, _int]),
    "smolq_count_nonfinite": (_i64, [_vp, _i64, _int]),
    "smolq_iq4_rounding_scales": (_i64, [_int, _vp, _vp, _vp, _i64, _i64, _vp]),
    "smolq_iq3_rounding_plan": (_i64, [_int, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i64, _vp]),
    "smolq_iq3_round_groups": (_i64, [_int, _vp, _vp, _vp, _vp, _i64, _vp, _vp]),
    "smolq_iq2_rounding_plan": (_i64, [_int, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i64, _vp]),
    "smolq_iq2_round_groups": (_i64, [_int, _vp, _vp, _vp, _vp, _i64, _vp, _vp]),
    "smolq_bnb_code": (_int, [_int, _vp]),
    "smolq_bnb4_quantize": (_i64, [_int, _vp, _vp, _vp, _i64, _i64, _int, _int]),
    "smolq_bnb4_dequantize": (_i64, [_int, _vp, _vp, _vp, _i64, _i64, _int]),
    "smolq_bnb8_quantize": (_i64, [_vp, _vp, _vp, _i64, _i64, _int]),
    "smolq_bnb8_dequantize": (_i64, [_vp, _vp, _vp, _i64, _i64]),
    "smolq_bnb_mean": (_int, [_vp, _i64, _int, _int, ctypes.POINTER(ctypes.c_float)]),
}
for _name, (_res, _args) in _SIGNATURES.items():
    _fn = getattr(_lib, _name)
    _fn.restype, _fn.argtypes = _res, _args

T = GGMLType
_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
_IQ12 = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M})
_QUANTIZABLE = frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                          T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.TQ1_0, T.TQ2_0,
                          T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.IQ3_XXS, T.IQ3_S}) | _IQ12
#: Types llama.cpp refuses to quantize without an importance matrix (ggml_quantize_requires_imatrix).
NEEDS_IMATRIX: frozenset[GGMLType] = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})
_READ_ONLY_V1 = frozenset({T.Q4_2, T.Q4_3})  # removed 2023 types: decoded from v1 files only


def _pairs(types: frozenset[GGMLType]) -> frozenset[tuple[GGMLType, str]]:
    return frozenset((t, lay) for t in types for lay in LAYOUTS)


#: (type, layout) pairs the kernel quantizes (and dequantizes).
QUANTIZE_TYPES: frozenset[tuple[GGMLType, str]] = _pairs(_QUANTIZABLE)
#: (type, layout) pairs the kernel dequantizes: the above plus Q4_2/Q4_3 in v1.
DEQUANTIZE_TYPES: frozenset[tuple[GGMLType, str]] = QUANTIZE_TYPES | frozenset((t, "v1") for t in _READ_ONLY_V1)
#: Everything the kernel handles in either direction.
KERNEL_TYPES = DEQUANTIZE_TYPES


# --------------------------------------------------------------------------- argument checks

def _qtype(qtype: Any) -> GGMLType:
    if isinstance(qtype, str):
        return GGMLType.from_name(qtype)
    try:
        return GGMLType(int(qtype))
    except (ValueError, TypeError):
        raise ValueError(f"unknown ggml type {qtype!r}") from None


def _layout(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    return LAYOUTS.index(layout) + 1


def _impl(impl: str) -> int:
    if impl not in ("ref", "fast"):
        raise ValueError(f"impl must be 'ref' or 'fast', not {impl!r}")
    return 0 if impl == "ref" else 1


def _threads(threads: int) -> int:
    threads = int(threads)
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all cores), not {threads}")
    return min(threads, 256)


def _check_pair(t: GGMLType, layout: str, allowed: frozenset, what: str) -> None:
    if (t, layout) not in allowed:
        raise ValueError(f"the kernel cannot {what} {t.name} in layout {layout}")


def _block_bytes(t: GGMLType, layout: str) -> tuple[int, int]:
    return TYPE_INFO[t].block_size, type_size(t, layout)


def _raise_on(code: int, what: str) -> int:
    if code < 0:
        raise ValueError(f"{what}: {_ERRORS.get(code, f'error {code}')}")
    return code


def _as_bytes(data: Any) -> np.ndarray:
    """A flat, contiguous uint8 view (no copy when possible) of bytes-like data or an array."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        raise TypeError(f"expected bytes-like data or a numpy array, not {type(data).__name__}") from None


def _ptr(a: np.ndarray) -> int | None:
    return a.ctypes.data if a.size else None


def _out_array(out: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A fresh array, or the caller's (checked: the C code writes through its pointer)."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}")
    return out


# --------------------------------------------------------------------------- quantize / dequantize

def row_size(qtype: Any, n_per_row: int, layout: str = "v3") -> int:
    """Bytes of one row of n_per_row elements."""
    t = _qtype(qtype)
    _check_pair(t, layout, DEQUANTIZE_TYPES, "handle")
    return _raise_on(_lib.smolq_row_size(int(t), _layout(layout), int(n_per_row)), f"{t.name} row of {n_per_row}")


def quantize(x: np.ndarray, qtype: Any, layout: str = "v3", imatrix: np.ndarray | None = None,
             threads: int = 0, impl: str = "fast", out: np.ndarray | None = None) -> np.ndarray:
    """Quantize rows (the last dimension) of float data; returns uint8 (nrows, row_bytes).

    out: a C-contiguous uint8 (nrows, row_bytes) array to write into (returned).

    imatrix: None (llama.cpp's reference quantizer) or one importance weight per
    column (llama.cpp's quantize_* with quant_weights; ignored by Q8_0, TQ, MXFP4
    and the float types; required by the types in NEEDS_IMATRIX). The i-quants
    follow ggml_quantize_chunk (what llama-quantize writes) with and without one."""
    t = _qtype(qtype)
    _check_pair(t, layout, QUANTIZE_TYPES, "quantize to")
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError("quantize needs at least a 1-D array (the last dimension is the row)")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"quantize needs float data, not {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = math.prod(x.shape[:-1])
    block, bpb = _block_bytes(t, layout)
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} elements is not a multiple of {t.name}'s block of {block}")
    if t not in _FLOAT_TYPES and count_nonfinite(x, threads):
        raise ValueError(f"cannot quantize NaN or infinite values to {t.name}")
    w = _importance(t, imatrix, n_per_row)
    out = _out_array(out, (nrows, n_per_row // block * bpb), np.uint8)
    _raise_on(_lib.smolq_quantize(int(t), _layout(layout), _ptr(x), _ptr(out), nrows, n_per_row,
                                  _ptr(w) if w is not None else None, _threads(threads), _impl(impl)),
              f"quantize to {t.name}")
    return out


def _importance(t: GGMLType, imatrix: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    """The checked float32 importance weights for rows of n_per_row (None without an imatrix)."""
    if imatrix is None:
        if t in NEEDS_IMATRIX:
            raise ValueError(f"{t.name} needs an importance matrix (imatrix=...), as in llama.cpp")
        return None
    w = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if w.size != n_per_row:
        raise ValueError(f"imatrix has {w.size} weights for rows of {n_per_row} elements")
    if count_nonfinite(w) or (w < 0).any():
        raise ValueError("imatrix weights must be finite and >= 0")
    return w


def requantize(data: Any, src_type: Any, shape: Sequence[int], qtype: Any, src_layout: str = "v3",
               layout: str = "v3", imatrix: np.ndarray | None = None, threads: int = 0, impl: str = "fast",
               out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows of `src_type` decoded and quantized to `qtype` in one pass (uint8 (nrows,
    row_bytes), into `out` when given): the bytes of quantize(dequantize(data, ...), ...),
    without a float32 copy of the tensor. NaN or infinite values raise ValueError."""
    s, t = _qtype(src_type), _qtype(qtype)
    _check_pair(s, src_layout, DEQUANTIZE_TYPES, "dequantize")
    _check_pair(t, layout, QUANTIZE_TYPES, "quantize to")
    shape = tuple(int(d) for d in shape) or (1,)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    n_per_row, nrows = shape[-1], math.prod(shape[:-1])
    for typ, lay in ((s, src_layout), (t, layout)):
        if n_per_row % TYPE_INFO[typ].block_size:
            raise ValueError(f"row of {n_per_row} elements is not a multiple of {typ.name}'s block of "
                             f"{TYPE_INFO[typ].block_size}")
    raw = _as_bytes(data)
    need = nrows * row_size(s, n_per_row, src_layout)
    if raw.size != need:
        raise ValueError(f"{s.name} ({src_layout}) tensor of shape {shape} needs {need} bytes, got {raw.size}")
    w = _importance(t, imatrix, n_per_row)
    out = _out_array(out, (nrows, row_size(t, n_per_row, layout)), np.uint8)
    code = _lib.smolq_requantize(int(s), _layout(src_layout), _ptr(raw), int(t), _layout(layout), _ptr(out),
                                 nrows, n_per_row, _ptr(w) if w is not None else None,
                                 int(t not in _FLOAT_TYPES), _threads(threads), _impl(impl))
    if code == -6:
        raise ValueError(f"cannot quantize NaN or infinite values to {t.name}")
    _raise_on(code, f"quantize {s.name} to {t.name}")
    return out


def dequantize(data: Any, qtype: Any, shape: Sequence[int], layout: str = "v3", threads: int = 0,
               impl: str = "fast", out: np.ndarray | None = None) -> np.ndarray:
    """Decode a tensor of `shape` (PyTorch order, last dimension contiguous) to float32
    (into `out`, a C-contiguous float32 array of that shape, when given)."""
    t = _qtype(qtype)
    _check_pair(t, layout, DEQUANTIZE_TYPES, "dequantize")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    n_per_row = shape[-1] if shape else 1
    nrows = math.prod(shape[:-1])
    block, bpb = _block_bytes(t, layout)
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} elements is not a multiple of {t.name}'s block of {block}")
    raw = _as_bytes(data)
    need = nrows * (n_per_row // block) * bpb
    if raw.size != need:
        raise ValueError(f"{t.name} ({layout}) tensor of shape {shape} needs {need} bytes, got {raw.size}")
    out = _out_array(out, shape, np.float32)
    _raise_on(_lib.smolq_dequantize(int(t), _layout(layout), _ptr(raw), _ptr(out), nrows, n_per_row,
                                    _threads(threads), _impl(impl)), f"dequantize {t.name}")
    return out


def iq4_rounding_scales(x: np.ndarray, qtype: Any, imatrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_NL / IQ4_XS blocks of 2-D float rows, as quantize() writes them, and
    the float scale whose inverse picked each 32-element block's levels
    ([nrows, n/32]; ggml stores only an fp16 of it). For grids that re-round."""
    t = _qtype(qtype)
    if t not in (T.IQ4_NL, T.IQ4_XS):
        raise ValueError(f"rounding scales exist for IQ4_NL and IQ4_XS, not {t.name}")
    x, w, out = _plan_args(x, t, imatrix)
    nrows, n_per_row = x.shape
    scales = np.empty((nrows, n_per_row // 32), dtype=np.float32)
    _raise_on(_lib.smolq_iq4_rounding_scales(int(t), _ptr(x), _ptr(out), _ptr(scales), nrows, n_per_row,
                                             _ptr(w) if w is not None else None), f"quantize to {t.name}")
    return out, scales


def _plan_args(x, t: GGMLType, imatrix):
    """Checked rows, importance weights and the output blocks of the rounding-plan entries."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"a rounding plan needs 2-D rows, got shape {x.shape}")
    nrows, n_per_row = x.shape
    block, bpb = _block_bytes(t, "v3")
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} elements is not a multiple of {t.name}'s block of {block}")
    if count_nonfinite(x):
        raise ValueError(f"cannot quantize NaN or infinite values to {t.name}")
    w = None
    if imatrix is not None:
        w = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if w.size != n_per_row or count_nonfinite(w) or (w < 0).any():
            raise ValueError(f"imatrix must be {n_per_row} finite weights >= 0")
    return x, w, np.empty((nrows, n_per_row // block * bpb), dtype=np.uint8)


#: Lattice i-quants: (values per grid point, values per decode scale, the kernel's plan and
#: rounding entries).
LATTICE_GROUPS: dict[GGMLType, tuple[int, int]] = {T.IQ3_XXS: (4, 32), T.IQ3_S: (4, 32), T.IQ2_XXS: (8, 32),
                                                   T.IQ2_XS: (8, 16), T.IQ2_S: (8, 16)}


def _lattice_entries(t: GGMLType):
    if t not in LATTICE_GROUPS:
        raise ValueError(f"no lattice rounding for {t.name}")
    if t in (T.IQ3_XXS, T.IQ3_S):
        return _lib.smolq_iq3_rounding_plan, _lib.smolq_iq3_round_groups
    return _lib.smolq_iq2_rounding_plan, _lib.smolq_iq2_round_groups


def lattice_rounding_plan(x: np.ndarray, qtype: Any, imatrix: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Lattice i-quant blocks of 2-D float rows, as quantize() writes them, and how ggml
    picked their grid points: "blocks"; per g-element group "id", "scale" [nrows, n/g];
    per element "sign", "waux" [nrows, n]; per decode block "db" and "skipped"
    (see smolq_kernel.h; g and the decode block from LATTICE_GROUPS)."""
    t = _qtype(qtype)
    plan_fn, _ = _lattice_entries(t)
    group, dblock = LATTICE_GROUPS[t]
    x, w, out = _plan_args(x, t, imatrix)
    nrows, n = x.shape
    f = lambda k: np.empty((nrows, k), dtype=np.float32)  # noqa: E731
    plan = {"blocks": out, "id": f(n // group), "scale": f(n // group), "sign": f(n), "waux": f(n),
            "db": f(n // dblock), "skipped": np.empty((nrows, n // dblock), dtype=np.uint8)}
    _raise_on(plan_fn(int(t), _ptr(x), _ptr(out), *(_ptr(plan[k]) for k in ("id", "scale", "sign", "waux", "db",
                                                                            "skipped")),
                      nrows, n, _ptr(w) if w is not None else None), f"quantize to {t.name}")
    return plan


def lattice_round_groups(qtype: Any, xval: np.ndarray, waux: np.ndarray, gid: np.ndarray,
                         gscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g-element groups xval, waux [n, g] onto the lattice with their (id, scale) [n], as
    ggml rounds them: (point index uint16 [n], its grid bytes uint8 [n, g])."""
    t = _qtype(qtype)
    _, round_fn = _lattice_entries(t)
    group = LATTICE_GROUPS[t][0]
    xval = np.ascontiguousarray(xval, dtype=np.float32).reshape(-1, group)
    n = xval.shape[0]
    waux = np.ascontiguousarray(waux, dtype=np.float32).reshape(-1, group)
    gid = np.ascontiguousarray(gid, dtype=np.float32).reshape(-1)
    gscale = np.ascontiguousarray(gscale, dtype=np.float32).reshape(-1)
    if waux.shape[0] != n or gid.size != n or gscale.size != n:
        raise ValueError(f"{n} groups need {n} x {group} weights and {n} ids and scales")
    if count_nonfinite(xval):
        raise ValueError("cannot round NaN or infinite values")
    points = np.empty(n, dtype=np.uint16)
    mags = np.empty((n, group), dtype=np.uint8)
    _raise_on(round_fn(int(t), _ptr(xval), _ptr(waux), _ptr(gid), _ptr(gscale), n, _ptr(points), _ptr(mags)),
              f"round onto {t.name}")
    return points, mags


# --------------------------------------------------------------------------- relayout

def relayout(data: Any, qtype: Any, src_layout: str, dst_layout: str) -> tuple[np.ndarray, bool]:
    """Move blocks of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 from one ggjt-era layout to another.

    Returns (bytes, lossless): lossless is False when some f32 scale had no exact
    f16 (v1/v2 -> v3); nibble reordering and f16 -> f32 are always exact."""
    t = _qtype(qtype)
    if t not in VERSIONED_TYPES:
        raise ValueError(f"{t.name} has one layout; nothing to relayout")
    src_n, dst_n = _layout(src_layout), _layout(dst_layout)
    raw = _as_bytes(data)
    sb, db = type_size(t, src_layout), type_size(t, dst_layout)
    if raw.size % sb:
        raise ValueError(f"{raw.size} bytes is not a whole number of {t.name} {src_layout} blocks of {sb} bytes")
    nblocks = raw.size // sb
    out = np.empty(nblocks * db, dtype=np.uint8)
    lossless = ctypes.c_int(1)
    _raise_on(_lib.smolq_relayout(int(t), src_n, dst_n, _ptr(raw), _ptr(out), nblocks, ctypes.byref(lossless)),
              f"relayout {t.name}")
    return out, bool(lossless.value)


# --------------------------------------------------------------------------- GPTQ words

_GPTQ_BITS = (2, 3, 4, 8)


def _gptq_axis(axis: int) -> int:
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"axis must be 0 (pack rows, qweight) or 1 (pack columns, qzeros), not {axis}")
    return axis % 2


def _gptq_bits(bits: int) -> int:
    if bits not in _GPTQ_BITS:
        raise ValueError(f"GPTQ packing supports bits {_GPTQ_BITS}, not {bits}")
    return bits


def gptq_pack(values: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Pack a 2-D array of integers in [0, 2**bits) into int32 words along `axis`.

    axis 0: qweight style, [in, out] -> [in*bits/32, out]; axis 1: qzeros style,
    [G, out] -> [G, out*bits/32]. Values are packed as given (apply the GPTQ v1
    "zero - 1" yourself)."""
    bits, ax = _gptq_bits(bits), _gptq_axis(axis)
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"gptq_pack needs a 2-D array, got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.integer):
        raise TypeError(f"gptq_pack needs integers, not {v.dtype}")
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values must be in [0, {1 << bits}) for {bits}-bit packing")
    n = v.shape[ax]
    if n * bits % 32:
        raise ValueError(f"{n} values of {bits} bits along axis {ax} do not fill whole int32 words")
    v = np.ascontiguousarray(v, dtype=np.int32)
    shape = list(v.shape)
    shape[ax] = n * bits // 32
    out = np.zeros(shape, dtype=np.int32)
    _raise_on(_lib.smolq_gptq_pack(_ptr(v), _ptr(out), v.shape[0], v.shape[1], bits, ax), "gptq_pack")
    return out


def gptq_unpack(packed: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Inverse of gptq_pack: n is the unpacked length along `axis`."""
    bits, ax = _gptq_bits(bits), _gptq_axis(axis)
    p = np.asarray(packed)
    if p.ndim != 2:
        raise ValueError(f"gptq_unpack needs a 2-D array, got shape {p.shape}")
    if p.dtype not in (np.int32, np.uint32):
        raise TypeError(f"gptq_unpack needs int32 words, not {p.dtype}")
    n = int(n)
    if n < 0 or n * bits % 32 or p.shape[ax] != n * bits // 32:
        raise ValueError(f"{n} values of {bits} bits need {n * bits / 32:g} words along axis {ax}, "
                         f"packed has {p.shape[ax]}")
    p = np.ascontiguousarray(p).view(np.int32)
    shape = list(p.shape)
    shape[ax] = n
    out = np.empty(shape, dtype=np.int32)
    _raise_on(_lib.smolq_gptq_unpack(_ptr(p), _ptr(out), shape[0], shape[1], bits, ax), "gptq_unpack")
    return out


# --------------------------------------------------------------------------- bitsandbytes

#: bitsandbytes 4-bit quant types -> the kernel's ids (the dynamic 8-bit map is 2).
BNB_QUANT_TYPES = {"nf4": 0, "fp4": 1}
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bnb_type(quant_type: str) -> int:
    if quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', not {quant_type!r}")
    return BNB_QUANT_TYPES[quant_type]


def _bnb_blocksize(blocksize: int, allowed: Sequence[int] = BNB_BLOCKSIZES) -> int:
    if int(blocksize) not in allowed:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, allowed))}, not {blocksize}")
    return int(blocksize)


def bnb_code(which: str) -> np.ndarray:
    """bitsandbytes' code table: "nf4", "fp4" (16 floats) or "dynamic" (256: the nested absmax map)."""
    ids = dict(BNB_QUANT_TYPES, dynamic=2)
    if which not in ids:
        raise ValueError(f"unknown bitsandbytes code {which!r}")
    out = np.empty(256, dtype=np.float32)
    n = _raise_on(_lib.smolq_bnb_code(ids[which], _ptr(out)), "bnb_code")
    return out[:n].copy()


def bnb4_quantize(x: np.ndarray, quant_type: str = "nf4", blocksize: int = 64, threads: int = 0,
                  impl: str = "fast") -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes quantize_4bit of float data (flattened): (packed uint8 [ceil(n/2)], absmax float32 [blocks])."""
    qt, bs = _bnb_type(quant_type), _bnb_blocksize(blocksize)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if count_nonfinite(x, threads):
        raise ValueError(f"cannot quantize NaN or infinite values to {quant_type}")
    packed = np.empty((x.size + 1) // 2, dtype=np.uint8)
    absmax = np.empty(-(-x.size // bs), dtype=np.float32)
    _raise_on(_lib.smolq_bnb4_quantize(qt, _ptr(x), _ptr(packed), _ptr(absmax), x.size, bs, _threads(threads),
                                       _impl(impl)), f"quantize to {quant_type}")
    return packed, absmax


def bnb4_dequantize(packed: Any, absmax: np.ndarray, n: int, quant_type: str = "nf4", blocksize: int = 64,
                    threads: int = 0) -> np.ndarray:
    """Inverse of bnb4_quantize: n float32 values."""
    qt, bs = _bnb_type(quant_type), _bnb_blocksize(blocksize)
    raw = _as_bytes(packed)
    a = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)
    n = int(n)
    if n < 0 or raw.size != (n + 1) // 2 or a.size != -(-n // bs):
        raise ValueError(f"{n} values need {(n + 1) // 2} bytes and {-(-n // bs)} absmax, "
                         f"got {raw.size} and {a.size}")
    out = np.empty(n, dtype=np.float32)
    _raise_on(_lib.smolq_bnb4_dequantize(qt, _ptr(raw), _ptr(a), _ptr(out), n, bs, _threads(threads)),
              f"dequantize {quant_type}")
    return out


def bnb8_quantize(x: np.ndarray, blocksize: int = 256, impl: str = "fast") -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes quantize_blockwise with the dynamic map (CPU): (uint8 [n], absmax float32 [blocks])."""
    if int(blocksize) <= 0:
        raise ValueError(f"blocksize must be positive, not {blocksize}")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if count_nonfinite(x):
        raise ValueError("cannot quantize NaN or infinite values")
    q = np.empty(x.size, dtype=np.uint8)
    absmax = np.empty(-(-x.size // int(blocksize)), dtype=np.float32)
    _raise_on(_lib.smolq_bnb8_quantize(_ptr(x), _ptr(q), _ptr(absmax), x.size, int(blocksize), _impl(impl)),
              "quantize_blockwise")
    return q, absmax


def bnb8_dequantize(q: Any, absmax: np.ndarray, blocksize: int = 256) -> np.ndarray:
    raw = _as_bytes(q)
    a = np.ascontiguousarray(absmax, dtype=np.float32).reshape(-1)
    if int(blocksize) <= 0 or a.size != -(-raw.size // int(blocksize)):
        raise ValueError(f"{raw.size} values in blocks of {blocksize} need {-(-raw.size // max(int(blocksize), 1))} "
                         f"absmax, got {a.size}")
    out = np.empty(raw.size, dtype=np.float32)
    _raise_on(_lib.smolq_bnb8_dequantize(_ptr(raw), _ptr(a), _ptr(out), raw.size, int(blocksize)), "dequantize_blockwise")
    return out


def bnb_mean(x: np.ndarray, lanes: int = 8, threads: int = 1) -> float:
    """torch's float32 CPU mean (the double-quantization offset): lanes 8 (AVX2) or 16 (AVX-512), torch's threads."""
    a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if a.size == 0:
        raise ValueError("mean of no values")
    out = ctypes.c_float()
    _raise_on(_lib.smolq_bnb_mean(_ptr(a), a.size, int(lanes), max(int(threads), 1), ctypes.byref(out)), "bnb_mean")
    return out.value


# The GPTQ column loop's rounding rules (smolq_kernel.h, smolq_gptq_columns): "int" is the GPTQ
# integer grid (params scale, zero), the others a ggml block grid's (params roff, rid, mul, sub).
GPTQ_ROUNDING = {"int": 0, "nearest": 1, "floor": 2, "half_away": 3}


def _rows_f32(a: np.ndarray, name: str, rows: int, min_cols: int) -> int:
    """Row stride (in floats) of a float32 [rows, >= min_cols] array whose columns are adjacent."""
    if a.dtype != np.float32 or a.ndim != 2 or a.shape[0] != rows or a.shape[1] < min_cols or \
            (a.shape[1] > 1 and a.strides[1] != 4) or a.strides[0] % 4 or a.strides[0] < 0:
        raise ValueError(f"gptq_columns: {name} must be float32 [{rows}, >= {min_cols}] with adjacent columns")
    return a.strides[0] // 4 if rows > 1 else a.shape[1]


def gptq_columns(w: np.ndarray, q: np.ndarray, err: np.ndarray, hinv: np.ndarray, start: int, stop: int,
                 rounding: str, params: Sequence[np.ndarray], lo: float, hi: float, levels: np.ndarray,
                 row_loss: np.ndarray, threads: int = 0) -> None:
    """GPTQ's column loop over columns [start, stop) of one lazy batch, in place (see
    smolq_kernel.h): w and err [rows, end], q [rows, >= end] (the batch's first column at
    q[:, 0]), hinv [end, end] (views of larger arrays allowed: rows may be strided, columns
    adjacent), params [stop - start, rows] C-contiguous float32 each (2 for "int", else 4),
    levels [rows, stop - start] float32 and row_loss [rows] float64 outputs."""
    if rounding not in GPTQ_ROUNDING:
        raise ValueError(f"gptq_columns: rounding must be one of {', '.join(GPTQ_ROUNDING)}, not {rounding!r}")
    rows, end = w.shape if w.ndim == 2 else (-1, -1)
    if rows < 0 or not 0 <= start <= stop <= end:
        raise ValueError(f"gptq_columns: columns [{start}, {stop}) outside a batch of {end}")
    ldw = _rows_f32(w, "w", rows, end)
    if err.shape != w.shape or _rows_f32(err, "err", rows, end) != ldw:
        raise ValueError("gptq_columns: err must have w's shape and row stride")
    ldq = _rows_f32(q, "q", rows, end)
    ldh = _rows_f32(hinv, "hinv", end, end)
    span = stop - start
    need = 2 if rounding == "int" else 4
    if len(params) != need or any(p.dtype != np.float32 or p.shape != (span, rows) or not p.flags.c_contiguous
                                  for p in params):
        raise ValueError(f"gptq_columns: {rounding!r} takes {need} C-contiguous float32 [{span}, {rows}] params")
    if levels.dtype != np.float32 or levels.shape != (rows, span) or not levels.flags.c_contiguous:
        raise ValueError(f"gptq_columns: levels must be C-contiguous float32 [{rows}, {span}]")
    if row_loss.dtype != np.float64 or row_loss.shape != (rows,) or not row_loss.flags.c_contiguous:
        raise ValueError(f"gptq_columns: row_loss must be C-contiguous float64 [{rows}]")
    if rows == 0 or span == 0:
        return
    p = [_ptr(x) for x in params] + [None] * (4 - need)
    _raise_on(_lib.smolq_gptq_columns(_ptr(w), ldw, _ptr(q), ldq, _ptr(err), _ptr(hinv), ldh, rows, start, stop,
                                      end, GPTQ_ROUNDING[rounding], *p, float(lo), float(hi), _ptr(levels),
                                      _ptr(row_loss), _threads(threads)), "gptq_columns")


# --------------------------------------------------------------------------- verification

def error_stats(ref: np.ndarray, test: np.ndarray, threads: int = 0) -> dict[str, float]:
    """rmse, max_abs, snr_db and cosine of `test` against `ref` (double accumulation)."""
    r = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1)
    s = np.ascontiguousarray(test, dtype=np.float32).reshape(-1)
    if r.size != s.size:
        raise ValueError(f"error_stats: {r.size} reference values vs {s.size} test values")
    out = (ctypes.c_double * 4)()
    _raise_on(_lib.smolq_error_stats(_ptr(r), _ptr(s), r.size, _threads(threads), out), "error_stats")
    return {"rmse": out[0], "max_abs": out[1], "snr_db": out[2], "cosine": out[3]}


def checksum(buf: Any, threads: int = 0) -> int:
    """64-bit checksum of raw bytes (FNV-1a 64 per 1 MiB chunk, combined; see smolq_kernel.h)."""
    raw = _as_bytes(buf)
    return int(_lib.smolq_checksum(_ptr(raw), raw.size, _threads(threads)))


def count_nonfinite(x: np.ndarray, threads: int = 0) -> int:
    """Number of NaN / inf values in float32 data."""
    a = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return _raise_on(_lib.smolq_count_nonfinite(_ptr(a), a.size, _threads(threads)), "count_nonfinite")
