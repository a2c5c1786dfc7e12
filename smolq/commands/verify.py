"""`smolq verify FILE`: decode every tensor, check sizes and finiteness, compare with a reference.

Exit codes: 0 all good; 1 the check failed (a tensor does not decode, has
NaN/inf, mismatches the reference's shape, or exceeds --max-rmse / --max-kl);
2 the file or request itself is bad (one-line error).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from smolq.commands.render import fit_table
from smolq.errors import InputError
from smolq.pipeline.verify import verify_file, verify_logits
from smolq.progress import emit_json

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
        for c in cols:  # names and numbers stay whole; the status wraps at spaces
            table.add_column(c, no_wrap=c != "status", overflow="fold",
                             justify="left" if c in ("tensor", "type", "shape", "status") else "right")
        for r in rows:
            cells = [Text(r["name"]), r["type"], "x".join(map(str, r["shape"]))]
            if report["reference"]:
                cells += [_fmt(r.get("rmse"), ".3g"), _fmt(r.get("max_abs"), ".3g"),
                          _fmt(r.get("snr_db"), ".1f"), _fmt(r.get("cosine"), ".5f")]
            status = "; ".join(r["problems"]) or r.get("note", "ok")
            cells.append(Text(status, style="red" if r["problems"] else ""))
            table.add_row(*cells)
        console.print(fit_table(console, table))
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
