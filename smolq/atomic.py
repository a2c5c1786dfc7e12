"""Atomic output: write beside the target, fsync, rename; never a half file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from smolq.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `path` only if the block finishes.

    The temporary file lives in the target's directory so the final rename is
    atomic on one filesystem. Any exception (KeyboardInterrupt included)
    removes it and leaves an existing target untouched.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise InputError(target, f"cannot write output: {exc.strerror or exc}") from None
    try:
        # mkstemp creates 0600; give the output the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


class AtomicSet:
    """Several output files that appear together: each is written beside its
    target under a temporary name, and all are renamed only when every one
    is complete (atomic_outputs). A failure removes every temporary file."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, Path]] = []
        self._open: list[BinaryIO] = []

    def open(self, path: str | os.PathLike) -> BinaryIO:
        target = Path(path)
        directory = target.parent if str(target.parent) else Path(".")
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise InputError(target, f"cannot write output: {exc.strerror or exc}") from None
        self._pending.append((tmp_name, target))
        os.fchmod(fd, 0o666 & ~_umask())
        fh = os.fdopen(fd, "wb")
        self._open.append(fh)
        return fh

    def finish(self, fh: BinaryIO) -> None:
        """Flush, fsync and close one file (its rename waits for the rest)."""
        if not fh.closed:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()

    def _commit(self) -> None:
        for fh in self._open:
            self.finish(fh)
        for tmp_name, target in self._pending:
            os.replace(tmp_name, target)

    def _abort(self) -> None:
        for fh in self._open:
            with contextlib.suppress(OSError):
                fh.close()
        for tmp_name, _ in self._pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


@contextlib.contextmanager
def atomic_outputs() -> Iterator[AtomicSet]:
    """Yield an AtomicSet; its files become their targets only if the block finishes."""
    files = AtomicSet()
    try:
        yield files
        files._commit()
    except BaseException:
        files._abort()
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only on success."""
    import shutil

    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
