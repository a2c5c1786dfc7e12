"""`smolq split IN OUT-PREFIX` and `smolq merge FIRST-SHARD OUT.gguf`: re-shard a GGUF
file as llama.cpp's gguf-split does. The work is smolq/pipeline/split.py (via smolq.api)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smolq import api
from smolq.progress import emit_json, human_bytes, note

SPLIT_EPILOG = (
    "Examples:\n\n"
    "  smolq split model.gguf model --split-max-size 2G     (model-00001-of-0000N.gguf ...)\n\n"
    "  smolq split model.gguf model --split-max-tensors 128"
)
MERGE_EPILOG = "Example:\n\n  smolq merge model-00001-of-00003.gguf model.gguf"


def register(app: typer.Typer) -> None:
    @app.command(epilog=SPLIT_EPILOG)
    def split(
        src: Path = typer.Argument(..., metavar="IN", help="GGUF file (or the first shard of a split GGUF)."),
        prefix: Path = typer.Argument(..., metavar="OUT-PREFIX", help="Shards are written as OUT-PREFIX-00001-of-0000N.gguf (all or none)."),
        split_max_size: Optional[str] = typer.Option(None, "--split-max-size", metavar="SIZE", help="At most SIZE bytes of tensor data per shard (decimal K/M/G: 2G = 2*10^9).", rich_help_panel="Split GGUF"),
        split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", metavar="N", min=1, help="At most N tensors per shard.", rich_help_panel="Split GGUF"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the shards and write nothing.", rich_help_panel="Output control"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Split a GGUF file into shards that llama.cpp loads from the first one (as llama-gguf-split)."""
        summary = api.split(src, prefix, split_max_size=split_max_size, split_max_tensors=split_max_tensors,
                            dry_run=dry_run)
        if json_out:
            emit_json(summary)
            return
        for shard in summary["shards"]:
            note(f"{'would write' if dry_run else 'wrote'} {shard['path']}: {shard['n_tensors']} tensors, "
                 f"{human_bytes(shard['tensor_bytes'])} of tensor data", quiet and not dry_run)

    @app.command(epilog=MERGE_EPILOG)
    def merge(
        first: Path = typer.Argument(..., metavar="FIRST-SHARD", help="The first shard, NAME-00001-of-0000N.gguf."),
        out: Path = typer.Argument(..., metavar="OUT", help="The merged GGUF file (written atomically)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check the set and write nothing.", rich_help_panel="Output control"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Merge a split GGUF into one file (the split.* keys dropped: split -> merge is byte-identical)."""
        summary = api.merge(first, out, dry_run=dry_run)
        if json_out:
            emit_json(summary)
            return
        what = "would write" if dry_run else "wrote"
        size = "" if dry_run else f", {human_bytes(summary['bytes'])}"
        note(f"{what} {summary['output']}: {summary['n_tensors']} tensors from {len(summary['inputs'])} shards{size}",
             quiet and not dry_run)
