"""`smolq zoo MANIFEST.toml`: requantize a model zoo; `smolq zoo report DIRS... --out DIR`: merge shards.

Exit codes: 0 every output built (or up to date) and every gate passed;
1 an output failed or a gate failed (the rows are named on stderr and in
report.md); 2 the manifest or the request is bad (one-line error).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from smolq.errors import InputError
from smolq.progress import emit_json
from smolq.zoo.keys import parse_shard
from smolq.zoo.manifest import load_manifest, parse_size
from smolq.zoo.report import merge_reports, print_summary
from smolq.zoo.runner import RunOptions, run_zoo

EPILOG = (
    "Examples:\n\n"
    "  smolq zoo examples/zoo.toml --out zoo-out --jobs 2\n\n"
    "  smolq zoo zoo.toml --out shard-2 --shard 2/3 --quiet   (one CI matrix job)\n\n"
    "  smolq zoo report shard-1 shard-2 shard-3 --out merged   (one report from all shards)"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    def zoo(
        manifest: str = typer.Argument(..., metavar="MANIFEST", help="Zoo manifest (TOML), or the word 'report' to merge shard reports."),
        shard_dirs: Optional[List[Path]] = typer.Argument(None, metavar="[SHARD_DIRS]...", help="With 'report': the output directories of the shards."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the manifest's zoo.out); with 'report': where the merged report goes.", rich_help_panel="Input/output"),
        jobs: int = typer.Option(1, "--jobs", "-j", help="Outputs built at once (worker processes); memory permitting.", rich_help_panel="Performance"),
        shard: Optional[str] = typer.Option(None, "--shard", help="K/N: build only this stable share of the outputs (CI matrices).", rich_help_panel="Performance"),
        fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed output or gate.", rich_help_panel="Output control"),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for concurrent jobs, e.g. '8 GiB' (default: 90% of what is available).", rich_help_panel="Performance"),
        verify_outputs: bool = typer.Option(False, "--verify-outputs", help="Re-checksum up-to-date outputs before skipping them (a restored CI cache, a disk you do not trust); a changed file is rebuilt.", rich_help_panel="Input/output"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; only failures.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print report.json on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Requantize a model zoo from a manifest: incremental, parallel, sharded, with gates and a report."""

        if manifest == "report" and not Path(manifest).is_file():
            result = _merge(shard_dirs or [], out)
        else:
            if shard_dirs:
                raise InputError(None, f"unexpected argument {shard_dirs[0]} (did you mean `smolq zoo report`?)")
            result = _run(Path(manifest), out, jobs, shard, fail_fast, max_memory, verify_outputs, quiet or json_out)
        print_summary(result, quiet or json_out)
        if json_out:
            emit_json(result)
        if not result["ok"]:
            raise typer.Exit(1)


def _run(manifest: Path, out: Optional[Path], jobs: int, shard: Optional[str], fail_fast: bool,
         max_memory: Optional[str], verify_outputs: bool, quiet: bool) -> dict:

    if jobs < 1:
        raise InputError(None, f"--jobs {jobs}: must be at least 1")
    opts = RunOptions(jobs=jobs, shard=parse_shard(shard) if shard else None, fail_fast=fail_fast, quiet=quiet,
                      max_memory=parse_size(max_memory, "--max-memory") if max_memory else None,
                      verify_outputs=verify_outputs)
    return run_zoo(load_manifest(manifest, out), opts)


def _merge(shard_dirs: List[Path], out: Optional[Path]) -> dict:

    if out is None:
        raise InputError(None, "zoo report: give --out DIR for the merged report")
    return merge_reports(shard_dirs, out)
