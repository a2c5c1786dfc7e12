"""`smolq migrate IN OUT`: any GGUF / legacy ggml model file -> GGUF v3 or another container/version."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolq import api
from smolq.commands.render import note_shards
from smolq.progress import emit_json, event_progress, note


def register(app: typer.Typer) -> None:
    @app.command()
    def migrate(
        src: Path = typer.Argument(..., help="Model file: GGUF v1-v3, 'ggml', 'ggmf', 'ggjt' v1-v3 or GPT4All 'ggmm'."),
        out: Path = typer.Argument(..., help="Output file."),
        format: Optional[str] = typer.Option(
            None, "--format", "-f", rich_help_panel="Input/output",
            help="gguf (v3, default), gguf-v1, gguf-v2, gguf-v3, ggml, ggmf, ggjt-v1, ggjt-v2, ggjt-v3, ggmm.",
        ),
        config: Optional[Path] = typer.Option(
            None, "--config", "-c", rich_help_panel="Input/output",
            help="HF checkpoint directory or config.json: context length, eps, RoPE base, tokenizer ... "
                 "that legacy headers never stored (otherwise guessed, and listed).",
        ),
        type: Optional[str] = typer.Option(
            None, "--type", "-t", rich_help_panel="Types and mix",
            help="Type for tensors that cannot be carried exactly (default: the nearest type the target holds; "
                 "f32 makes the migration lossless).",
        ),
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE", help="GGUF in shards of at most SIZE bytes of tensor data (decimal K/M/G: 2G = 2*10^9), named OUT-00001-of-0000N.gguf as llama.cpp's gguf-split writes them.", rich_help_panel="Split GGUF"),
        split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", metavar="N", min=1, help="GGUF in shards of at most N tensors each (with --split-max-size: whichever comes first).", rich_help_panel="Split GGUF"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing.", rich_help_panel="Output control"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Migrate a model file between GGUF and legacy ggml containers and versions (LLaMA, GPT-J, MPT)."""

        with event_progress("migrate", quiet=quiet or json_out) as on_progress:
            summary = api.migrate(src, out, format=format, config=config, type=type, dry_run=dry_run,
                                  split_max_size=split_max_size, split_max_tensors=split_max_tensors,
                                  on_progress=on_progress)

        quiet_notes = quiet or json_out
        for g in summary["guesses"]:
            note(f"guess: {g['key']} = {g['value']} ({g['why']})", quiet_notes)
        for line in summary["notes"]:
            note(f"note: {line}", quiet_notes)
        if json_out:
            emit_json(summary)
            return
        if dry_run:
            _print_table(summary, plan=True)
            return
        if not quiet:
            _print_table(summary, plan=False)
            note(f"wrote {summary['output']}: {summary['format']}, {summary['n_tensors']} tensors "
                 f"({summary['n_copied']} copied, {summary['n_lossless']} lossless, {summary['n_lossy']} lossy), "
                 f"{summary['bytes']} bytes in {summary['seconds']} s")
            note_shards(summary, quiet)


def _print_table(summary: dict, plan: bool) -> None:
    """The plan (all tensors) or the report (tensors that were not plain copies)."""
    from rich.console import Console
    from rich.table import Table

    rows = summary["tensors"] if plan else [t for t in summary["tensors"] if t["action"] != "copy"]
    if not rows:
        return
    title = f"{summary['source']} ({summary['source_format']}) -> {summary['output']} ({summary['format']})"
    table = Table(title=title)
    cols = ["tensor", "change", "action"] + ([] if plan else ["lossless", "max_abs", "snr_db"])
    for col in cols:
        table.add_column(col, no_wrap=col == "tensor")
    for t in rows:
        change = f"{t['source_type']} {t['source_layout']} -> {t['type']} {t['layout']}"
        row = [t["name"], change, t["action"]]
        if not plan:
            stats = t.get("stats") or {}
            row += ["yes" if t["lossless"] else "no", _fmt(stats.get("max_abs")), _fmt(stats.get("snr_db"))]
        table.add_row(*row)
    Console(stderr=True, highlight=False).print(table)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"
