"""Entry point of a zoo worker process: run one job, send its events and its result.

Messages on the connection: ("event", {...}) any number of times, then
exactly one ("done", result) or ("error", {"message", "traceback"}). A
worker that dies without the last message (killed, out of memory) is
noticed by the parent through its exit code.
"""
from __future__ import annotations

import traceback
from typing import Any

from smolq.errors import SmolqError
from smolq.zoo import build

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_job(kind: str, request: dict[str, Any], conn: Any, threads: int = 0) -> None:
    """`threads` > 0 caps BLAS / OpenMP threads, so that N jobs share the cores instead of
    each starting one thread per core (set before numpy is first imported in this process)."""
    import os

    if threads > 0:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, str(threads))
    _die_with_parent()
    if request.get("log"):
        _redirect_output(request["log"])

    def emit(event: dict[str, Any]) -> None:
        conn.send(("event", event))

    try:
        fn = {"prepare": build.prepare_model, "output": build.build_output}[kind]
        conn.send(("done", fn(request, emit)))
    except SmolqError as exc:
        conn.send(("error", {"message": exc.one_line(), "traceback": None}))
    except BaseException as exc:  # a bug or a failure inside a library: keep the traceback for the report
        last = f"{type(exc).__name__}: {exc}".strip()
        conn.send(("error", {"message": last, "traceback": traceback.format_exc()}))
    finally:
        conn.close()


def _redirect_output(log_path: str) -> None:
    """Libraries' prints and warnings go to the job's log file, not through the zoo's display."""
    import os
    import sys

    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent (the fork server, which exits with the zoo
    process) goes, so that a killed zoo leaves no orphan still writing outputs."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
