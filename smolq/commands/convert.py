"""`smolq convert SRC OUT`: a Hugging Face checkpoint directory -> GGUF or legacy ggml."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from smolq import api
from smolq.commands.render import note_shards, render_quantized
from smolq.errors import InputError
from smolq.progress import emit_json, event_progress, human_bytes, note


def register(app: typer.Typer) -> None:
    @app.command()
    def convert(
        src: Path = typer.Argument(..., help="Hugging Face checkpoint directory (config.json + weights + tokenizer), "
                                             "plain or GPTQ-quantized; with --format hf a GGUF or legacy model file."),
        out: Path = typer.Argument(..., help="Output file; .gguf -> GGUF v3, .bin -> the family's GPT4All legacy format "
                                             "(--format mlc / hf: a directory)."),
        format: Optional[str] = typer.Option(
            None, "--format", "-f", rich_help_panel="Input/output",
            help="gguf, gguf-v1, gguf-v2, gguf-v3, ggml, ggmf, ggjt-v1, ggjt-v2, ggjt-v3, ggmm (default: from OUT's suffix); "
                 "mlc: MLC-LLM weights (LLaMA) in the directory OUT; hf: SRC (a GGUF or legacy LLaMA file) back "
                 "as a Hugging Face checkpoint directory OUT (safetensors, config, tokenizer).",
        ),
        outtype: Optional[str] = typer.Option(
            None, "--outtype", "-t", rich_help_panel="Types and mix",
            help="f32, f16, bf16, q8_0, any RTN type (q4_0, q6_k ...) or a mix (q4_k_m ...). Default f16; for a GPTQ "
                 "directory each Linear's exact type (Q4_0/Q4_1/Q8_0) where its grid maps onto one, else Q2_K/Q3_K/Q4_K/Q8_0 by bits. "
                 "With --format mlc: q4f16_1, q4f16_0, q3f16_1 or q0f16 (default). With --format hf: f32, f16 or "
                 "bf16 (default: the file's float type, else f16).",
        ),
        max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", metavar="SIZE", help="--format hf: safetensors shards of at most SIZE (5GB default; decimal units, or 2GiB), with model.safetensors.index.json.", rich_help_panel="Input/output"),
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE", help="GGUF in shards of at most SIZE bytes of tensor data (decimal K/M/G: 2G = 2*10^9), named OUT-00001-of-0000N.gguf as llama.cpp's gguf-split writes them.", rich_help_panel="Split GGUF"),
        split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", metavar="N", min=1, help="GGUF in shards of at most N tensors each (with --split-max-size: whichever comes first).", rich_help_panel="Split GGUF"),
        imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp's GGUF or .dat) for a quantized --outtype, as llama-quantize --imatrix.", rich_help_panel="Importance matrix"),
        include_weights: Optional[List[str]] = typer.Option(None, "--include-weights", help="Use the imatrix only for entries whose name contains this (repeatable).", rich_help_panel="Importance matrix"),
        exclude_weights: Optional[List[str]] = typer.Option(None, "--exclude-weights", help="Do not use the imatrix for entries whose name contains this (repeatable; not with --include-weights).", rich_help_panel="Importance matrix"),
        target_bpw: Optional[float] = typer.Option(None, "--target-bpw", metavar="B", help="Instead of --outtype: each tensor's type chosen for the least predicted loss within B bits per weight (as smolq quantize --target-bpw; an F32 copy is made on disk meanwhile).", rich_help_panel="Size budget"),
        target_size: Optional[str] = typer.Option(None, "--target-size", metavar="SIZE", help="As --target-bpw, for a file of at most SIZE bytes (80MiB, 1.2G, bytes).", rich_help_panel="Size budget"),
        candidates: Optional[str] = typer.Option(None, "--candidates", metavar="T1,T2,...", help="Types the budget chooses from (default: q2_k ... q8_0 and the i-quants).", rich_help_panel="Size budget"),
        recipe: Optional[Path] = typer.Option(None, "--recipe", metavar="FILE", help="Apply a saved recipe (JSON tensor -> type) instead of --outtype.", rich_help_panel="Size budget"),
        save_recipe: Optional[Path] = typer.Option(None, "--save-recipe", metavar="FILE", help="Write the run's tensor -> type as a JSON recipe.", rich_help_panel="Size budget"),
        vocab_only: bool = typer.Option(False, "--vocab-only", help="Write the header and vocabulary only, no tensors.", rich_help_panel="Input/output"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensor, source dtype, target type, bytes) and write nothing.", rich_help_panel="Output control"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Convert a Hugging Face checkpoint (LLaMA, GPT-J, MPT; plain or GPTQ) into GGUF or a legacy ggml file,
        or a GGUF / legacy LLaMA file back into a Hugging Face checkpoint (--format hf)."""

        if save_recipe is not None and target_bpw is None and target_size is None and recipe is None:
            raise InputError(None, "--save-recipe goes with --target-bpw/--target-size/--recipe here "
                                   "(or use smolq quantize, or smolq inspect --recipe on the output)")
        if target_bpw is not None or target_size is not None or recipe is not None:
            if outtype is not None:
                raise InputError(None, "--target-bpw/--target-size/--recipe choose every tensor's type: drop --outtype")
            # the quantize pipeline's budget step (it converts, then chooses)
            summary = api.quantize(src, out, format=format, imatrix=imatrix, include_weights=include_weights or [],
                                   exclude_weights=exclude_weights or [], target_bpw=target_bpw,
                                   target_size=target_size, candidates=candidates, recipe=recipe,
                                   save_recipe=save_recipe, dry_run=dry_run, quiet=quiet or json_out)
            render_quantized(summary, dry_run, quiet, json_out)
            return
        with event_progress("convert", quiet=quiet or json_out) as on_progress:
            summary = api.convert(src, out, format=format, outtype=outtype, vocab_only=vocab_only,
                                  dry_run=dry_run, split_max_size=split_max_size,
                                  split_max_tensors=split_max_tensors, max_shard_size=max_shard_size,
                                  imatrix=imatrix, include_weights=include_weights or [],
                                  exclude_weights=exclude_weights or [], on_progress=on_progress)

        for line in summary["guesses"]:
            note(f"guess: {line}", quiet)
        for line in summary["notes"]:
            note(f"note: {line}", quiet)
        for line in summary.get("warnings", []):
            # Even with --quiet (the file is not what a lossless import would give), and one unwrapped line.
            print(f"warning: {line}", file=sys.stderr)
        if json_out:
            emit_json(summary)
        elif dry_run:
            _print_plan(summary)
        elif not quiet:
            note(f"wrote {summary['output']}: {summary['format']}, {summary['n_tensors']} tensors, "
                 f"{summary['bytes']} bytes in {summary['seconds']} s")
            note_shards(summary, quiet)


def _gptq_mark(t: dict) -> str:
    """GPTQ Linears: whether the grid is copied exactly or requantized."""
    if "exact" not in t:
        return ""
    return " (exact)" if t["exact"] else " (requantized)" if t["type"] not in ("F32", "F16", "BF16") else ""


def _print_plan(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table


    table = Table(title=f"{summary['source']} -> {summary['output']} ({summary['format']}, {summary['outtype']})")
    # Tensor names, dtypes, shapes and sizes never wrap; a narrow terminal shortens the HF
    # name ("model.layers.0.self_a…", full in --json) and breaks "Q4_0 (requantized)" at its space.
    for col in ("tensor", "source", "dtype", "shape", "type", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", no_wrap=col not in ("source", "type"),
                         overflow="ellipsis")
    for t in summary["tensors"]:
        table.add_row(t["name"], t["source"], t["source_dtype"], "x".join(map(str, t["shape"])),
                      t["type"] + (" (fallback)" if t.get("fallback") else "") + _gptq_mark(t), str(t["bytes"]))
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(console.width, 150)  # full names when piped; a terminal or COLUMNS sets the width
    console.print(table)
    console.print(f"{summary['n_tensors']} tensors, {human_bytes(summary['tensor_bytes'])} of tensor data, "
                  f"{summary['n_vocab']} tokens", markup=False)
