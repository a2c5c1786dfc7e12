"""Running the typer app: smolq's errors become one line on stderr and exit
code 2 (never a traceback); Ctrl-C exits 130 with a line saying nothing was
left behind. Used by the console script and by `smolq demo`."""
from __future__ import annotations

import sys

import typer

from smolq.errors import SmolqError

INTERRUPTED = 130  # the shell's code for death by SIGINT


def _say_interrupted() -> None:
    print("smolq: interrupted; no output was left behind", file=sys.stderr)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
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
