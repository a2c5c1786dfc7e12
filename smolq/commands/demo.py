"""`smolq demo`: the whole product on a tiny model made offline.

Runs the same commands a user would type, printing each one first, so the
output doubles as a tour: build a tiny LLaMA checkpoint, convert it to GGUF
f16 and to a GPT4All-style ggjt v3 .bin, quantize with a llama.cpp mix,
inspect, and verify tensors and logits against the original checkpoint.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.console import Console

from smolq.commands.runner import run_app
from smolq.errors import InputError
from smolq.tiny import make_tiny_model


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Example: smolq demo --out demo-out",
    )
    def demo(
        out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for the tiny model and every output.", rich_help_panel="Input/output"),
    ) -> None:
        """Build a tiny LLaMA offline, convert, quantize, inspect and verify it."""
        run_demo(app, out)


def _steps(out: Path) -> list[list[str]]:
    hf = out / "tiny-llama"
    f16 = out / "tiny-llama-f16.gguf"
    q4km = out / "tiny-llama-q4_k_m.gguf"
    q40 = out / "tiny-llama-q4_0.bin"
    return [
        ["convert", str(hf), str(f16)],
        ["convert", str(hf), str(q40), "--outtype", "q4_0"],
        ["quantize", str(f16), str(q4km), "--type", "q4_k_m"],
        ["inspect", str(q4km)],
        ["inspect", str(q40)],
        ["verify", str(q4km), "--against", str(f16)],
        ["verify", str(q40), "--against", str(f16)],
        ["verify", str(q4km), "--logits", "--against", str(hf)],
    ]


def run_demo(app: typer.Typer, out: Path) -> None:
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "tiny-llama"
    console.rule("[bold]smolq demo")
    # 256-wide rows so the K-quant mixes apply without fallbacks.
    console.print(f"[bold]$[/] (python) smolq.tiny.make_tiny_model('llama', {str(hf)!r}, gqa=True, hidden_size=256)")
    make_tiny_model("llama", hf, gqa=True, hidden_size=256, n_layers=2, seed=0)
    for argv in _steps(out):
        console.print(f"\n[bold]$[/] smolq {shlex.join(argv)}")
        code = run_app(app, argv)
        if code:
            raise InputError(None, f"demo step failed with exit code {code}: smolq {shlex.join(argv)}")
    console.rule(f"[bold green]done: outputs in {out}/")
