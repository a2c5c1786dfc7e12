"""`smolq imatrix MODEL --calib TEXT -o FILE`: llama.cpp's importance matrix, computed by smolq.

The work lives in smolq/pipeline/imatrix.py (through smolq.api.imatrix); this
module parses and renders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolq import api
from smolq.progress import emit_json, event_progress, human_bytes, note

EPILOG = (
    "Examples:\n\n"
    "  smolq imatrix ./hf-model --calib text.txt -o model.imatrix\n\n"
    "  smolq imatrix ./hf-model --calib text.txt -o model.dat --ctx 512 --chunks 100   (legacy .dat)\n\n"
    "  smolq imatrix ./hf-model --calib text.txt -o model.imatrix --resume   (after Ctrl-C)\n\n"
    "  smolq quantize model-f16.gguf model-iq4_xs.gguf --type iq4_xs --imatrix model.imatrix"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    def imatrix(
        model: Path = typer.Argument(..., metavar="MODEL", help="Hugging Face checkpoint directory (LLaMA, GPT-J, MPT)."),
        calib: Path = typer.Option(..., "--calib", help="Calibration text file (tokenized whole, cut into chunks as llama-imatrix does).", rich_help_panel="Input/output"),
        out: Path = typer.Option(..., "--output", "-o", help="The imatrix file (written atomically): GGUF, or legacy with a .dat suffix.", rich_help_panel="Input/output"),
        fmt: Optional[str] = typer.Option(None, "--output-format", help="gguf (llama-imatrix's default) or dat (legacy); default: from the suffix.", rich_help_panel="Input/output"),
        ctx: int = typer.Option(512, "--ctx", "-c", min=2, help="Tokens per chunk (llama-imatrix --ctx-size).", rich_help_panel="Calibration"),
        chunks: int = typer.Option(-1, "--chunks", help="Chunks to process (-1: all the text gives).", rich_help_panel="Calibration"),
        process_output: bool = typer.Option(False, "--process-output", help="Also collect output.weight's inputs (llama-imatrix leaves it out).", rich_help_panel="Calibration"),
        threads: int = typer.Option(0, "--threads", help="Torch threads (0 = all cores).", rich_help_panel="Performance"),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its saved blocks (same model, text and settings).", rich_help_panel="Calibration"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Compute an importance matrix (llama.cpp's imatrix file) from an HF checkpoint and a text."""
        with event_progress("imatrix", quiet=quiet or json_out) as on_progress:
            summary = api.imatrix(model, out, calib=calib, ctx=ctx, chunks=chunks, process_output=process_output,
                                  format=fmt, threads=threads, resume=resume, quiet=quiet or json_out,
                                  on_progress=on_progress)
        for line in summary.get("notes", []):
            note(f"note: {line}", quiet or json_out)
        if json_out:
            emit_json(summary)
        elif not quiet:
            note(f"wrote {summary['output']}: {summary['format']} imatrix, {summary['n_entries']} entries, "
                 f"{summary['chunks']} chunks x {summary['ctx']} tokens, {human_bytes(summary['bytes'])} "
                 f"in {summary['seconds']} s")
