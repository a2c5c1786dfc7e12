"""Rendering a summary for the terminal: the per-tensor plan table of --dry-run."""
from __future__ import annotations

from typing import Any

from smolq.progress import human_bytes


def print_plan(summary: dict[str, Any]) -> None:
    """The plan of a quantize (or delegated convert) summary: tensor, shape, from, to, bytes."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title = f"{summary.get('source')} -> {summary.get('output')} ({summary.get('format')}, {summary.get('preset')})"
    table = Table(title=title, title_justify="left")
    # Names, shapes and sizes never wrap; only "to" may break, at its space ("Q5_0 (fallback)").
    for col in ("tensor", "shape", "from", "to", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", no_wrap=col != "to",
                         overflow="ellipsis")
    for t in summary.get("tensors", []):
        src = t.get("source_type") or t.get("source_dtype", "")
        to = t["type"] + (" (fallback)" if t.get("fallback") else "")
        table.add_row(Text(t["name"]), "x".join(map(str, t["shape"])), src, to, f"{t['bytes']:,}")
    console = Console(highlight=False)
    console.print(table)
    total = summary.get("tensor_bytes", 0)
    line = f"{summary.get('n_tensors')} tensors, {human_bytes(total)} of tensor data"
    if summary.get("source_bytes"):
        line += f" (from {human_bytes(summary['source_bytes'])})"
    console.print(line, markup=False)
