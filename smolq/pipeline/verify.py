"""Checking a model file: every tensor decodes to finite values, optionally compared with a reference.

verify_file: per-tensor decode / NaN / shape checks and error statistics
against a reference GGUF or legacy file (legacy names matched by role).
verify_logits: logits of the file against transformers on an HF checkpoint.
Both return plain JSON-able reports; `smolq verify` renders them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from smolq import kernels
from smolq.errors import InputError
from smolq.formats.detect import open_model, sniff_container
from smolq.lazy import lazy_module
from smolq.plan.mix import canonical_name
from smolq.progress import WorkProgress
from smolq.sources.reference import compare_logits
from smolq.transforms.rtn import to_float32

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# --- per-tensor checks ---------------------------------------------------------------------

def _decode(entry: Any, threads: int) -> tuple[np.ndarray | None, str | None]:
    """(float32 values, None) or (None, what went wrong)."""
    try:
        return to_float32(entry, threads), None
    except (ValueError, TypeError, InputError) as exc:
        msg = exc.one_line() if isinstance(exc, InputError) else str(exc)
        return None, f"does not decode: {msg}"


def _ref_index(ref: Any) -> dict[str, Any]:
    return {canonical_name(t.name): t for t in ref.tensors}


def _check_one(entry: Any, ref_entry: Any, threads: int) -> dict[str, Any]:
    """One tensor's row: checksum, NaN/inf count and, with a reference entry, its error statistics."""
    row: dict[str, Any] = {"name": entry.name, "type": entry.type.name, "shape": list(entry.shape),
                           "bytes": entry.nbytes, "problems": []}
    values, problem = _decode(entry, threads)
    if problem:
        row["problems"].append(problem)
        return row
    row["checksum"] = f"{kernels.checksum(entry.load(), threads):016x}"
    bad = kernels.count_nonfinite(values, threads)
    if bad:
        row["problems"].append(f"{bad} NaN/inf values")
    if ref_entry is None:
        return row
    row["reference"] = ref_entry.name
    if tuple(ref_entry.shape) != tuple(entry.shape):
        row["problems"].append(f"shape {list(entry.shape)} differs from the reference's {list(ref_entry.shape)}")
        return row
    ref_values, problem = _decode(ref_entry, threads)
    if problem:
        row["problems"].append(f"reference {problem}")
        return row
    stats = kernels.error_stats(ref_values, values, threads)
    row.update({k: _finite_or_none(v) for k, v in stats.items()})
    row["sq_err_sum"] = stats["rmse"] ** 2 * values.size
    row["n_elements"] = int(values.size)
    return row


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def verify_file(path: Path, against: Path | None = None, max_rmse: float | None = None,
                threads: int = 0, quiet: bool = True) -> dict[str, Any]:
    """Decode every tensor of `path` (one at a time) and compare it with `against`'s tensor of the same role.

    Returns {"file", "format", "architecture", "reference", "reference_format", "max_rmse",
    "ok", "summary", "only_in_reference", "tensors": [row per tensor]}.
    """
    with open_model(path) as mf:
        ref = open_model(against) if against is not None else None
        try:
            index = _ref_index(ref) if ref is not None else {}
            rows = []
            total = sum(t.nbytes for t in mf.tensors)
            with WorkProgress(len(mf.tensors), total, "verify", quiet=quiet) as bar:
                for entry in mf.tensors:
                    bar.start(entry.name)
                    key = canonical_name(entry.name)
                    row = _check_one(entry, index.pop(key, None), threads)
                    if ref is not None and "reference" not in row and not row["problems"]:
                        row["note"] = "not in the reference"
                    if max_rmse is not None and row.get("rmse") is not None and row["rmse"] > max_rmse:
                        row["problems"].append(f"rmse {row['rmse']:.6g} > --max-rmse {max_rmse:g}")
                    rows.append(row)
                    bar.done(entry.nbytes)
            report = _report(mf, ref, rows, sorted(t.name for t in index.values()), max_rmse)
        finally:
            if ref is not None:
                ref.close()
    return report


def _report(mf: Any, ref: Any, rows: list[dict], only_in_ref: list[str], max_rmse: float | None) -> dict[str, Any]:
    compared = [r for r in rows if r.get("rmse") is not None]
    n_el = sum(r["n_elements"] for r in compared)
    summary: dict[str, Any] = {
        "n_tensors": len(rows),
        "n_bytes": sum(r["bytes"] for r in rows),
        "n_problems": sum(bool(r["problems"]) for r in rows),
        "n_compared": len(compared),
    }
    if compared:
        worst = max(compared, key=lambda r: r["rmse"])
        summary.update({
            "rmse_overall": math.sqrt(sum(r["sq_err_sum"] for r in compared) / max(n_el, 1)),
            "rmse_max": worst["rmse"], "rmse_max_tensor": worst["name"],
            "max_abs": max(r["max_abs"] or 0.0 for r in compared),
            "snr_db_min": min((r["snr_db"] for r in compared if r["snr_db"] is not None), default=None),
            "cosine_min": min((r["cosine"] for r in compared if r["cosine"] is not None), default=None),
        })
    for r in compared:
        r.pop("sq_err_sum", None)
        r.pop("n_elements", None)
    return {
        "file": str(mf.path), "format": mf.format_name, "architecture": mf.architecture,
        "reference": str(ref.path) if ref is not None else None,
        "reference_format": ref.format_name if ref is not None else None,
        "max_rmse": max_rmse, "ok": summary["n_problems"] == 0,
        "summary": summary, "only_in_reference": only_in_ref, "tensors": rows,
    }


# --- logits against an HF checkpoint ---------------------------------------------------------

def verify_logits(path: Path, hf_dir: Path, max_kl: float | None) -> dict[str, Any]:
    """Logits of the model file against transformers on `hf_dir`; "ok" unless non-finite or KL > max_kl."""
    sniff_container(path)  # a one-line error for a non-model file before loading torch
    if not (hf_dir / "config.json").is_file():
        raise InputError(hf_dir, "not a Hugging Face checkpoint (no config.json)")
    try:
        stats = compare_logits(path, hf_dir)
    except (ValueError, KeyError) as exc:
        raise InputError(path, f"logits check failed: {exc}") from None
    ok = all(math.isfinite(v) for v in stats.values())
    if max_kl is not None and not stats["kl_div"] <= max_kl:
        ok = False
    return {"file": str(path), "reference": str(hf_dir), "logits": stats, "max_kl": max_kl, "ok": ok}
