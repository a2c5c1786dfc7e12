"""Atomic output: write beside the target, fsync, rename; never a half file.

A temporary file (or directory) is named `.NAME.XXXX.part` beside NAME and
holds an exclusive flock while it is written. A run killed outright (SIGKILL,
power loss) cannot remove it, but its lock dies with the process: the next
run that writes NAME finds such a part unlocked, removes it and says so.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from smolq.errors import InputError
from smolq.fileio import OutputFile, phase

PART_SUFFIX = ".part"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _is_stale(part: Path) -> bool:
    """Unlocked: its writer is gone (a live writer holds LOCK_EX until it renames or removes it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if part.is_dir() else 0)
    try:
        fd = os.open(part, flags)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the probe's lock


def remove_stale_parts(directory: Path, name: str = "*", recursive: bool = False) -> list[Path]:
    """Remove the temporary parts of killed runs (`.NAME.*.part`, unlocked) under `directory`."""
    pattern = f".{glob.escape(name) if name != '*' else '*'}.*{PART_SUFFIX}"
    found = directory.rglob(pattern) if recursive else directory.glob(pattern)
    removed = []
    for part in sorted(found, reverse=True):
        if not _is_stale(part):
            continue
        if part.is_dir():
            shutil.rmtree(part, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                part.unlink()
        removed.append(part)
    return removed


def _clean_beside(target: Path) -> None:
    for part in remove_stale_parts(_parent(target), target.name):
        print(f"smolq: removed {part}, left by an interrupted run", file=sys.stderr)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[OutputFile]:
    """Yield a binary file that becomes `path` only if the block finishes.

    The temporary file lives in the target's directory so the final rename is
    atomic on one filesystem. Any exception (KeyboardInterrupt included)
    removes it and leaves an existing target untouched.
    """
    target = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PART_SUFFIX, dir=_parent(target))
    except OSError as exc:
        raise InputError(target, f"cannot write output: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: marks the part as in use
        _clean_beside(target)
        # mkstemp creates 0600; give the output the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            out = OutputFile(fh)
            try:
                yield out
            finally:
                out.settle()
            with phase("fsync"):
                fh.flush()
                os.fsync(fh.fileno())
            with phase("rename"):
                os.replace(tmp_name, target)  # still locked: no other run can take it for stale
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
        self._open: list[OutputFile] = []

    def open(self, path: str | os.PathLike) -> OutputFile:
        target = Path(path)
        directory = target.parent if str(target.parent) else Path(".")
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise InputError(target, f"cannot write output: {exc.strerror or exc}") from None
        self._pending.append((tmp_name, target))
        os.fchmod(fd, 0o666 & ~_umask())
        fh = OutputFile(os.fdopen(fd, "wb"))
        self._open.append(fh)
        return fh

    def finish(self, fh: OutputFile) -> None:
        """Flush, fsync and close one file (its rename waits for the rest)."""
        fh.settle()
        if not fh.closed:
            with phase("fsync"):
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
            fh.settle()
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
    target = Path(path)
    parent = _parent(target)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PART_SUFFIX, dir=parent))
    lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _clean_beside(target)
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
