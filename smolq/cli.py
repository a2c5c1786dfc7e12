"""The `smolq` command line.

Each command lives in smolq/commands/<name>.py and registers itself on the
app; this file only assembles them and turns smolq's own errors into one
line on stderr and exit code 2 (never a traceback).
"""
from __future__ import annotations

import sys

import typer

from smolq.commands import convert, demo, eval, imatrix, inspect, migrate, quantize, split, verify, zoo
from smolq.commands.runner import run_app

app = typer.Typer(
    name="smolq",
    help=(
        "Convert Hugging Face checkpoints into GGUF and legacy ggml files, and quantize them.\n\n"
        "Examples:\n\n"
        "  smolq convert ./hf-model out.gguf\n\n"
        "  smolq quantize out-f16.gguf out-q4_0.gguf --type q4_0\n\n"
        "  smolq inspect out.gguf"
    ),
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

@app.callback()
def _root() -> None:
    """smolq: convert, quantize, inspect, verify and migrate model files."""
    # An explicit callback keeps `smolq COMMAND` even if only one command registers.


# Commands in the order `smolq --help` lists them.
for command in (convert, quantize, imatrix, inspect, verify, migrate, split, eval, zoo, demo):
    command.register(app)


def main(argv: list[str] | None = None) -> int:
    """The console script: run the app, smolq's errors as one line (exit 2)."""
    return run_app(app, argv)


if __name__ == "__main__":
    sys.exit(main())
