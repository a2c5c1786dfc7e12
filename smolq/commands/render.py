"""Rendering a summary for the terminal: the per-tensor plan table of --dry-run, shard lists."""
from __future__ import annotations

from typing import Any

from smolq.progress import emit_json, human_bytes, note


def note_shards(summary: dict[str, Any], quiet: bool) -> None:
    """One line per shard of a split GGUF output (nothing for one file)."""
    for shard in summary.get("shards") or []:
        note(f"  shard {shard if isinstance(shard, str) else shard['path']}", quiet)


def render_quantized(summary: dict[str, Any], dry_run: bool, quiet: bool, json_out: bool) -> None:
    """A quantize summary for the terminal: notes, then the JSON, the plan (--dry-run) or one line."""
    for line in summary.get("notes", []):
        note(f"note: {line}", quiet or json_out)
    if json_out:
        emit_json(summary)
    elif dry_run:
        print_plan(summary)
    elif not quiet:
        what = (f"{summary['n_layers_quantized']} linears by GPTQ" if summary.get("method") == "gptq"
                else f"{summary['n_quantized']} linears" if summary.get("format") in ("nf4", "fp4")
                else f"{summary['n_tensors']} tensors")
        note(f"wrote {summary['output']}: {summary['format']}, {summary['preset']}, {what}, "
             f"{human_bytes(summary['bytes'])} in {summary.get('seconds', 0)} s")
        note_shards(summary, quiet)
        if summary.get("allocation"):
            note(allocation_line(summary["allocation"]), quiet)


def print_plan(summary: dict[str, Any]) -> None:
    """The plan of a quantize (or delegated convert) summary: tensor, shape, from, to, bytes."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title = f"{summary.get('source')} -> {summary.get('output')} ({summary.get('format')}, {summary.get('preset')})"
    table = Table(title=title, title_justify="left")
    # Names, shapes and sizes never wrap; only "to" may break, at its space ("Q5_0 (fallback)").
    losses = any("loss" in t for t in summary.get("tensors", []))  # a --target-* run: each tensor's predicted loss
    for col in ("tensor", "shape", "from", "to", "bytes") + (("loss",) if losses else ()):
        table.add_column(col, justify="right" if col in ("bytes", "loss") else "left", no_wrap=col != "to",
                         overflow="ellipsis")
    for t in summary.get("tensors", []):
        src = t.get("source_type") or t.get("source_dtype", "")
        to = t["type"] + (" (fallback)" if t.get("fallback") else "") + (" (imatrix)" if t.get("needs_imatrix") else "")
        cells = [Text(t["name"]), "x".join(map(str, t["shape"])), src, to, f"{t['bytes']:,}"]
        table.add_row(*cells, *([f"{t['loss']:.3g}" if "loss" in t else ""] if losses else []))
    console = Console(highlight=False)
    console.print(table)
    total = summary.get("tensor_bytes", 0)
    line = f"{summary.get('n_tensors')} tensors, {human_bytes(total)} of tensor data"
    if summary.get("source_bytes"):
        line += f" (from {human_bytes(summary['source_bytes'])})"
    console.print(line, markup=False)
    if summary.get("allocation"):
        console.print(allocation_line(summary["allocation"]), markup=False)


def allocation_line(a: dict[str, Any]) -> str:
    """What a --target-* or --recipe run chose, in one line: the file's size and bpw, the loss."""
    line = f"file {a['file_bytes']:,} bytes ({human_bytes(a['file_bytes'])}), {a['bpw']:.4f} bpw"
    if "target" in a:
        what = ("each tensor's importance-weighted relative error times its measured KL factor, in nats"
                if a.get("sensitivity") else "sum of each tensor's importance-weighted error / its weighted energy")
        line = (f"target {a['target']}: {line}; predicted loss {a['predicted_loss']:.6g} over {a['n_tensors']} "
                f"tensors ({what})")
    else:
        line = f"recipe {a['recipe']}: {line}"
    return line


def fit_table(console: Any, table: Any) -> Any:
    """Borders and padding give way (one space between columns) when the boxed table cannot fit the
    console with its cells whole: no_wrap columns at their widest cell, the others at their longest
    word (or their min_width, past which a token may fold)."""
    import rich.box
    from rich.measure import Measurement

    opts = console.options.update_width(10_000)

    def need(col: Any) -> int:
        sizes = [Measurement.get(console, opts, c) for c in (col.header, *col.cells)]
        if col.no_wrap:
            return max(m.maximum for m in sizes)
        return col.min_width if col.min_width is not None else max(m.minimum for m in sizes)

    if sum(need(c) + 3 for c in table.columns) + 1 > console.width:  # a divider and 2 spaces a column
        table.box, table.show_edge, table.padding = rich.box.SIMPLE_HEAD, False, 0
    return table
