"""`smolq inspect FILE`: container, version, header, metadata and tensor table of any model file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from smolq.commands.render import fit_table
from smolq.pipeline.allocate import save_file_recipe
from smolq.pipeline.describe import describe_file
from smolq.progress import emit_json, note

STRING_PREVIEW = 160  # characters of a long string shown in the table unless --all
WORD_MAX = 24  # a metadata value's word up to this long is never broken across lines

EPILOG = (
    "Examples:\n\n"
    "  smolq inspect model.gguf\n\n"
    "  smolq inspect old-ggjt-v3.bin --json | jq '.tensors[0]'\n\n"
    "  smolq inspect model.gguf --all   (every array item, every tensor detail)\n\n"
    "  smolq inspect model-q4_k_m.gguf --recipe q4_k_m.json   (its types, for smolq quantize --recipe)\n\n"
    "  smolq inspect model.imatrix   (entries, chunks, datasets, each entry's top columns)"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    def inspect(
        file: Path = typer.Argument(..., help="A GGUF (v1-v3) or legacy ggml/ggmf/ggjt/ggmm model file, or an imatrix file (GGUF or .dat)."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.", rich_help_panel="Output control"),
        show_all: bool = typer.Option(False, "--all", help="Do not shorten long arrays and strings.", rich_help_panel="Output control"),
        recipe: Optional[Path] = typer.Option(None, "--recipe", metavar="OUT", help="Also write the file's tensor -> type as a JSON recipe (for smolq quantize --recipe).", rich_help_panel="Output control"),
    ) -> None:
        """Show a model file's container, version, header, metadata and tensors."""
        if recipe is not None:
            saved = save_file_recipe(file, recipe)
            note(f"wrote recipe {recipe}: {len(saved)} tensors", json_out)
        report = describe_file(file, full=show_all)
        if json_out:
            emit_json(report)
        elif report["container"] == "imatrix":
            render_imatrix(report)
        else:
            render(report, full=show_all)


# --- the tables ----------------------------------------------------------------------------

def _short(value: Any, count: int | None, full: bool) -> str:
    if isinstance(value, list):
        text = "[" + ", ".join(repr(v) if isinstance(v, str) else str(v) for v in value)
        if count is not None and count > len(value):
            return text + ", …] … (" + f"{count} items)"
        return text + "]"
    text = str(value)
    if not full and len(text) > STRING_PREVIEW:
        return text[:STRING_PREVIEW].replace("\n", "\\n") + f"… ({len(text)} chars)"
    return text


def render(report: dict[str, Any], full: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    head = Table(title=f"{report['file']}", show_header=False, title_justify="left")
    head.add_column("field", style="bold", no_wrap=True)
    head.add_column("value", overflow="fold")  # wraps at spaces; only a token wider than the cell breaks
    rows = [("format", report["format"]), ("endian", report["endian"]),
            ("alignment", report["alignment"] if report["alignment"] is not None else "none"),
            ("architecture", report["architecture"]), ("vocab size", report["vocab_size"])]
    if report["file_type"] is not None:
        name = report["file_type_name"]
        rows.append(("file type", f"{report['file_type']}" + (f" ({name})" if name else "")))
    rows += [(k, v) for k, v in report["header"].items() if k not in ("ftype",)]
    summary = report["summary"]
    rows.append(("tensors", f"{summary['n_tensors']}, {summary['n_bytes']:,} bytes, "
                            f"{summary['n_elements']:,} parameters"))
    rows.append(("types", ", ".join(f"{k} x{v}" for k, v in summary["types"].items())))
    for k, v in rows:
        head.add_row(Text(str(k)), Text(str(v)))
    console.print(head)

    if "metadata" in report:
        meta = Table(title="metadata", title_justify="left")
        cells = [(key, e["type"] + (f"[{e['item_type']}]" if "item_type" in e else ""),
                  _short(e["value"], e.get("count"), full)) for key, e in report["metadata"].items()]
        # Keys and types stay whole; values wrap at spaces, and only a token over WORD_MAX folds.
        words = [len(w) for _, _, v in cells for w in v.split() if len(w) <= WORD_MAX]
        meta.add_column("key", style="bold", no_wrap=True)
        meta.add_column("type", no_wrap=True)
        meta.add_column("value", overflow="fold", min_width=max(words, default=1))
        for row in cells:
            meta.add_row(*map(Text, row))
        console.print(fit_table(console, meta))
    else:
        hp = Table(title="hyperparameters", title_justify="left", show_header=False)
        hp.add_column("field", style="bold", no_wrap=True)
        hp.add_column("value", overflow="fold")
        for k, v in report["hyperparameters"].items():
            hp.add_row(Text(k), Text(str(v)))
        vocab = report["vocab"]
        hp.add_row(Text("vocab"), Text(_short(vocab["tokens"], vocab["count"], full)))
        console.print(hp)

    tensors = Table(title="tensors", title_justify="left")
    # Names, types and numbers never break; a shape wraps after a comma if the table must narrow.
    for col, just in (("#", "right"), ("name", "left"), ("type", "left"), ("shape", "left"),
                      ("offset", "right"), ("bytes", "right")):
        tensors.add_column(col, justify=just, no_wrap=col != "shape")
    for i, t in enumerate(report["tensors"]):
        offset = "" if t["offset"] is None else f"{t['offset']:,}"
        tensors.add_row(str(i), Text(t["name"]), t["type"], Text(str(t["shape"])), offset, f"{t['bytes']:,}")
    console.print(fit_table(console, tensors))


def render_imatrix(report: dict[str, Any]) -> None:
    """An importance matrix: the file's fields, then per entry its tokens and its top columns."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    head = Table(title=f"{report['file']}", show_header=False, title_justify="left")
    head.add_column("field", style="bold", no_wrap=True)
    head.add_column("value", overflow="fold")
    kind = "GGUF imatrix" if report["format"] == "gguf" else "legacy imatrix (.dat)"
    size = f", {report['chunk_size']} tokens each" if report["chunk_size"] else ""
    for k, v in (("format", kind), ("entries", report["n_entries"]), ("chunks", f"{report['chunk_count']}{size}"),
                 ("datasets", ", ".join(report["datasets"]) or "none")):
        head.add_row(Text(k), Text(str(v)))
    console.print(head)
    table = Table(title="entries (importance: mean squared input; top columns as column:importance)",
                  title_justify="left")
    for col, just in (("name", "left"), ("columns", "right"), ("counts", "right"), ("mean", "right"),
                      ("max", "right"), ("top columns", "left")):
        table.add_column(col, justify=just, no_wrap=col != "top columns")
    for e in report["entries"]:
        top = " ".join(f"{c}:{v:.3g}" for c, v in e["top_columns"])
        counts = ", ".join(str(c) for c in e["counts"])
        table.add_row(Text(e["name"]), str(e["n_per_row"]), counts, f"{e['mean']:.4g}", f"{e['max']:.4g}", Text(top))
    console.print(fit_table(console, table))
