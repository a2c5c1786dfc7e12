"""The GPTQ solver's upper Cholesky factor of H⁻¹, computed in H's own memory.

torch's `linalg.cholesky` and `cholesky_inverse` each work on a column-major copy of their
input: +121 MiB for a 5632-wide down_proj per call, even with `out=` (measured), and the
solver's chain of three calls held H, two results and a working copy at once. The same
LAPACK routines torch calls (MKL's `spotrf_` / `spotri_`, exported by torch's own CPU
library) run here on the matrix itself, in the order torch runs them and on the same
triangles, so the factor is torch's bit for bit (tests/test_gptq_solver.py holds them equal).

A row-major n x n buffer B read by LAPACK (column-major) is Bᵀ; H is symmetric, so that is H:
  1. spotrf 'L'  -> the factor L in LAPACK's lower triangle (B's upper); B's strict lower
                    triangle still holds H, so a failed try can be undone in place;
  2. spotri 'L'  -> H⁻¹'s lower triangle in the same place;
  3. mirror it into LAPACK's upper triangle (B's lower), as torch's symmetric copy has it;
  4. spotrf 'U'  -> U with H⁻¹ = UᵀU in LAPACK's upper triangle (B's lower);
  5. zero the rest: Bᵀ (a view) is U.
Integers are passed as 8-byte values holding a small number, which reads the same through
an LP64 (4-byte) and an ILP64 (8-byte) interface on a little-endian machine.
Where the symbols are missing (a torch without MKL) `routines()` is None and the solver
uses torch's calls.
"""
from __future__ import annotations

import ctypes
import sys
from functools import lru_cache

from smolq.lazy import lazy_module

torch = lazy_module("torch")

MIRROR_ROWS = 512  # rows mirrored at a time: a temporary of at most n x 512 floats


@lru_cache(maxsize=1)
def routines():
    """(spotrf, spotri) from torch's CPU library, or None."""
    if sys.byteorder != "little":
        return None
    import os

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            potrf, potri = lib.spotrf_, lib.spotri_
        except (OSError, AttributeError):
            return None
        for f in (potrf, potri):
            f.restype = None
            f.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return potrf, potri
    return None


def usable(H) -> bool:
    return (routines() is not None and H.device.type == "cpu" and H.dtype == torch.float32 and H.dim() == 2
            and H.shape[0] == H.shape[1] and H.is_contiguous())


def _call(f, uplo: bytes, B) -> int:
    n = ctypes.c_int64(B.shape[0])
    info = ctypes.c_int64(0)
    f(uplo, ctypes.byref(n), ctypes.c_void_p(B.data_ptr()), ctypes.byref(n), ctypes.byref(info))
    return ctypes.c_int32(info.value & 0xFFFFFFFF).value  # LP64 writes only the low 4 bytes


def factor(B) -> bool:
    """Step 1 in place; False (B's lower triangle untouched) when H is not positive definite."""
    potrf, _ = routines()
    return _call(potrf, b"L", B) == 0


def undo_factor(B) -> None:
    """After a failed step 1: B's upper triangle back from its untouched lower one (the
    diagonal is the caller's to restore)."""
    _mirror(B, lower_to_upper=True)


def finish(B):
    """Steps 2-5 after a successful factor(B): the upper factor of H⁻¹ (a view of B), or None
    when H⁻¹ is not positive definite."""
    potrf, potri = routines()
    if _call(potri, b"L", B) != 0:
        return None
    _mirror(B, lower_to_upper=False)
    if _call(potrf, b"U", B) != 0:
        return None
    B.tril_()
    return B.T


def _mirror(B, lower_to_upper: bool) -> None:
    """Copy one strict triangle of B onto the other, a band of rows at a time."""
    n = B.shape[0]
    for i0 in range(0, n, MIRROR_ROWS):
        i1 = min(i0 + MIRROR_ROWS, n)
        if lower_to_upper:  # rows i0:i1 of the lower triangle -> columns i0:i1 of the upper
            B[:i0, i0:i1].copy_(B[i0:i1, :i0].T)
        else:
            B[i0:i1, :i0].copy_(B[:i0, i0:i1].T)
        blk = B[i0:i1, i0:i1]
        src = blk.tril(-1) if lower_to_upper else blk.triu(1)
        keep = blk.tril() if lower_to_upper else blk.triu()
        blk.copy_(keep + src.T)
