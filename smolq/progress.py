"""Progress bars and the `--json` summary convention, shared by the commands.

Bars and notes go to stderr so stdout stays clean for `--json`: a command
run with `--json` prints exactly one JSON object on stdout when it finishes
(see `emit_json`). `quiet=True` silences bars and notes, never errors.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


class WorkProgress:
    """Two bars: tensors done (m/n) and bytes produced; the current tensor's name beside them.

    Use as a context manager:
        with WorkProgress(len(plan), total_bytes, "quantize", quiet=q) as bar:
            bar.start(name); ...; bar.done(nbytes)
    """

    def __init__(self, n_tensors: int, n_bytes: int, label: str = "working", quiet: bool = False):
        self.quiet = quiet
        self.console = stderr_console()
        self._progress: Progress | None = None
        self._tensors = self._bytes = None
        self.n_tensors, self.n_bytes, self.label = n_tensors, n_bytes, label

    def __enter__(self) -> "WorkProgress":
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<10}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._tensors = self._progress.add_task(self.label, total=self.n_tensors, detail="")
            self._bytes = self._progress.add_task("bytes", total=max(self.n_bytes, 1), detail="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start(self, name: str) -> None:
        """The tensor now being worked on (shown beside the tensor bar)."""
        if self._progress is not None:
            done = int(self._progress.tasks[0].completed)
            self._progress.update(self._tensors, detail=f"{done + 1}/{self.n_tensors} {name}")

    def done(self, nbytes: int) -> None:
        """One tensor finished, having produced `nbytes` bytes."""
        if self._progress is not None:
            self._progress.advance(self._tensors, 1)
            self._progress.advance(self._bytes, nbytes)
            done = self._progress.tasks[1].completed
            self._progress.update(self._bytes, detail=f"{human_bytes(done)} / {human_bytes(self.n_bytes)}")

    def note(self, message: str) -> None:
        """A one-line remark for the user (warnings, fallbacks); silent when quiet."""
        if not self.quiet:
            self.console.print(message, markup=False)


@contextmanager
def event_progress(label: str, quiet: bool = False) -> Iterator[Callable[[dict], None]]:
    """An `on_progress` callback for the pipelines' events that drives a WorkProgress.

    Events: {"event": "start", "n_tensors", "n_bytes"} opens the bar,
    {"event": "tensor", "name", "nbytes"} advances it; others are ignored.
    The bar (if one was opened) is closed when the block exits.
    """
    holder: dict[str, WorkProgress] = {}

    def on_progress(event: dict) -> None:
        if event.get("event") == "start":
            holder["bar"] = WorkProgress(event["n_tensors"], event["n_bytes"], label, quiet=quiet).__enter__()
        elif event.get("event") == "tensor" and "bar" in holder:
            holder["bar"].start(event["name"])
            holder["bar"].done(event["nbytes"])

    try:
        yield on_progress
    finally:
        if "bar" in holder:
            holder.pop("bar").__exit__(None, None, None)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        stderr_console().print(message, markup=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def emit_json(obj: Any) -> None:
    """The `--json` convention: one JSON object on stdout, nothing else there."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False))
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    import enum
    import os

    import numpy as np

    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("utf-8", "backslashreplace")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
