"""`smolq verify FILE`: decode every tensor, check sizes and finiteness, compare with a reference.

Exit codes: 0 all good; 1 the check failed (a tensor does not decode, has
NaN/inf, mismatches the reference's shape, or exceeds --max-rmse / --max-kl);
2 the file or request itself is bad (one-line error).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from smolq import kernels
from smolq.errors import InputError
from smolq.formats.detect import open_model, sniff_container
from smolq.plan.mix import canonical_name
from smolq.progress import WorkProgress, emit_json
from smolq.sources.reference import compare_logits
from smolq.transforms.rtn import to_float32

EPILOG = (
    "Examples:\n\n"
    "  smolq verify model-q4_0.gguf\n\n"
    "  smolq verify model-q4_0.gguf --against model-f16.gguf --max-rmse 0.01\n\n"
    "  smolq verify ggml-model-q4_0.bin --against model-f16.gguf --json\n\n"
    "  smolq verify model-q4_0.gguf --logits --against ./hf-model"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    def verify(
        file: Path = typer.Argument(..., help="GGUF or legacy ggml model file to check."),
        against: Optional[Path] = typer.Option(None, "--against", help="Reference GGUF/legacy file (per-tensor error), or an HF checkpoint directory (logits).", rich_help_panel="Input/output"),
        max_rmse: Optional[float] = typer.Option(None, "--max-rmse", help="Fail when a tensor's RMSE against the reference exceeds this.", rich_help_panel="Output control"),
        logits: bool = typer.Option(False, "--logits", help="Compare logits with transformers on the HF checkpoint given by --against.", rich_help_panel="Input/output"),
        max_kl: Optional[float] = typer.Option(None, "--max-kl", help="With --logits: fail when the mean KL divergence exceeds this.", rich_help_panel="Output control"),
        threads: int = typer.Option(0, "--threads", help="Kernel threads (0 = all cores).", rich_help_panel="Performance"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only the summary.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.", rich_help_panel="Output control"),
    ) -> None:
        """Check that every tensor decodes to finite values; compare with a reference file or HF model."""

        if max_rmse is not None and against is None:
            raise InputError(None, "--max-rmse needs --against REF")
        if against is not None and against.is_dir():
            logits = True
        if logits:
            if against is None or not against.is_dir():
                raise InputError(against, "--logits needs --against HF_DIR (a Hugging Face checkpoint directory)")
            report = verify_logits(file, against, max_kl)
        else:
            report = verify_file(file, against, max_rmse, threads, quiet or json_out)
        if json_out:
            emit_json(report)
        else:
            render(report, quiet)
        if not report["ok"]:
            raise typer.Exit(1)


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


# --- output --------------------------------------------------------------------------------

def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def render(report: dict[str, Any], quiet: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if "logits" in report:
        s = report["logits"]
        console.print(f"{report['file']} vs {report['reference']} (transformers): max |diff| "
                      f"{s['max_abs_diff']:.4g}, top-1 agreement {s['top1_agreement']:.1%}, "
                      f"KL {s['kl_div']:.4g}", markup=False)
        console.print("OK" if report["ok"] else "FAILED", markup=False)
        return
    rows = report["tensors"]
    if not quiet:
        table = Table(title=f"{report['file']} ({report['format']})"
                      + (f" vs {report['reference']}" if report["reference"] else ""), title_justify="left")
        cols = ["tensor", "type", "shape"]
        if report["reference"]:
            cols += ["rmse", "max abs", "SNR dB", "cosine"]
        cols.append("status")
        for c in cols:
            table.add_column(c, overflow="fold", justify="left" if c in ("tensor", "type", "shape", "status") else "right")
        for r in rows:
            cells = [Text(r["name"]), r["type"], "x".join(map(str, r["shape"]))]
            if report["reference"]:
                cells += [_fmt(r.get("rmse"), ".3g"), _fmt(r.get("max_abs"), ".3g"),
                          _fmt(r.get("snr_db"), ".1f"), _fmt(r.get("cosine"), ".5f")]
            status = "; ".join(r["problems"]) or r.get("note", "ok")
            cells.append(Text(status, style="red" if r["problems"] else ""))
            table.add_row(*cells)
        console.print(table)
    s = report["summary"]
    line = f"{s['n_tensors']} tensors, {s['n_problems']} with problems"
    if s["n_compared"]:
        line += (f"; vs reference: overall rmse {s['rmse_overall']:.4g}, worst {s['rmse_max']:.4g} "
                 f"({s['rmse_max_tensor']}), min SNR {_fmt(s['snr_db_min'], '.1f')} dB, "
                 f"min cosine {_fmt(s['cosine_min'], '.5f')}")
    if report["only_in_reference"]:
        line += f"; {len(report['only_in_reference'])} reference tensors not in the file"
    console.print(line, markup=False)
    console.print("OK" if report["ok"] else "FAILED", markup=False)
