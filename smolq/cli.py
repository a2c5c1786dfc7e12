"""The `smolq` command line.

Each command lives in smolq/commands/<name>.py and registers itself on the
app; this file only assembles them and turns smolq's own errors into one
line on stderr and exit code 2 (never a traceback).
"""
from __future__ import annotations

import importlib
import sys

import typer

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
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

@app.callback()
def _root() -> None:
    """smolq: convert, quantize, inspect, verify and migrate model files."""
    # An explicit callback keeps `smolq COMMAND` even if only one command registers.


# Commands in the order `smolq --help` lists them.
COMMAND_MODULES = ("convert", "quantize", "inspect", "verify", "migrate", "eval", "zoo", "demo")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"smolq.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"smolq.commands.{name}":
                continue  # not built yet
            raise
        module.register(app)


_register_commands()


INTERRUPTED = 130  # the shell's code for death by SIGINT


def _say_interrupted() -> None:
    print("smolq: interrupted; no output was left behind", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from smolq.errors import SmolqError

    try:
        app(args=argv, prog_name="smolq", standalone_mode=True)
    except SmolqError as exc:
        print(f"smolq: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into Exit(130)
            _say_interrupted()
        return code
    except KeyboardInterrupt:
        _say_interrupted()
        return INTERRUPTED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"smolq: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
