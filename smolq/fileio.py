"""The I/O path under every sink: copy unchanged bytes file to file, write
behind, release input pages as they are consumed, and time each phase.

Converting or requantizing a model is I/O-bound (issue #18's profile): most
of a 2 GB f16 -> f16 conversion was system time spent copying mapped pages
through Python buffers and one long fsync at the end. This module holds the
pieces that fix that, below the formats so every writer shares them:

- `SpanLoad`: a tensor loader that knows its bytes are exactly a byte range
  of a file (a safetensors or GGUF tensor stored unchanged). A sink that sees
  one copies the range with `copy_file_range` (kernel to kernel, no user
  buffer, no page faults in this process) instead of calling it.
- `OutputFile`: the file atomic_output yields. Plain `write` as before, plus
  `copy_span`, and write-behind: every WRITE_BEHIND bytes it asks the kernel
  to start writing the finished range back (`sync_file_range` on Linux), so
  the fsync that makes the final rename durable has little left to do.
- `MappedWindow`: views of one read-only mmap that hand pages back
  (`MADV_DONTNEED`) once the next tensor is asked for, so a whole-file map
  keeps about one tensor resident instead of the whole input.
- `PROFILE`: wall, user and system time per phase (per thread, so a phase run
  on a worker thread is charged to itself). SMOLQ_PROFILE=PATH turns it on and
  writes the table to PATH as JSON at exit; scripts/bench_convert.py and
  scripts/bench_rtn.py --profile do that and print it.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import queue
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")

WRITE_BEHIND = 64 << 20  # start write-back of every finished 64 MiB
COPY_CHUNK = 1 << 30  # copy_file_range request size (the kernel may copy less per call)
FALLBACK_CHUNK = 16 << 20  # readinto/write buffer where copy_file_range is unavailable
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # the Linux value; Python < 3.13 lacks the name
POPULATE_MIN = 1 << 20  # views smaller than this fault in cheaply enough


# --------------------------------------------------------------------------- phase profile

class PhaseProfile:
    """Accumulated (calls, wall, user, system) seconds per named phase; off unless enabled."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("SMOLQ_PROFILE"))
        self._lock = threading.Lock()
        self.phases: dict[str, list[float]] = {}

    def reset(self) -> None:
        with self._lock:
            self.phases = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0, r0 = time.perf_counter(), _thread_rusage()
        try:
            yield
        finally:
            r1 = _thread_rusage()
            self.add(name, time.perf_counter() - t0, r1[0] - r0[0], r1[1] - r0[1])

    def add(self, name: str, wall: float, user: float = 0.0, system: float = 0.0) -> None:
        with self._lock:
            row = self.phases.setdefault(name, [0, 0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += wall
            row[2] += user
            row[3] += system

    def as_dict(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"calls": int(v[0]), "wall_s": round(v[1], 4), "user_s": round(v[2], 4),
                        "sys_s": round(v[3], 4)} for k, v in self.phases.items()}


def _thread_rusage() -> tuple[float, float]:
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime


PROFILE = PhaseProfile()
phase = PROFILE.phase


def _dump_profile(path: str) -> None:
    """At exit: the phase table as JSON to `path` (SMOLQ_PROFILE=PATH), for the benchmarks."""
    try:
        with open(path, "w") as fh:
            json.dump(PROFILE.as_dict(), fh, indent=1)
    except OSError:
        pass


if PROFILE.enabled and os.environ["SMOLQ_PROFILE"] not in ("1", "true"):
    atexit.register(_dump_profile, os.environ["SMOLQ_PROFILE"])


# --------------------------------------------------------------------------- unchanged byte ranges

@dataclass(frozen=True)
class FileSpan:
    """Bytes [offset, offset + nbytes) of the file at `path`."""

    path: Path
    offset: int
    nbytes: int


class SpanLoad:
    """A loader whose result is exactly `span`'s bytes (read through `read`).

    Sinks copy the span file to file (OutputFile.copy_span) instead of calling
    it. Only a reader may make one, for bytes it hands out unchanged; anything
    that transforms a tensor wraps the load in a new callable, which is not a
    SpanLoad, so a transformed tensor can never be copied raw by mistake.
    """

    __slots__ = ("span", "_read")

    def __init__(self, span: FileSpan, read: Callable[[], Any]):
        self.span = span
        self._read = read

    def __call__(self) -> Any:
        return self._read()


def span_of(load: Any) -> FileSpan | None:
    return load.span if isinstance(load, SpanLoad) else None


# --------------------------------------------------------------------------- libc

def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """madvise(addr, n, advice) through ctypes (which releases the GIL), on Linux only."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def _mapping_address(mm: mmap.mmap) -> int | None:
    """The address of a read-only mmap's first byte (None where it cannot be had). The
    temporary export is dropped at once, so the map can still be closed."""
    import numpy as np  # only where a map is read, never at `smolq --help`

    try:
        view = np.frombuffer(mm, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        return None
    address = int(view.ctypes.data)
    del view
    return address


# --------------------------------------------------------------------------- output

def _libc_sync_file_range() -> Callable[[int, int, int, bool], None] | None:
    """sync_file_range(fd, offset, n, flags), or None where it does not exist: start the
    range's write-back, or with wait=True also wait until it is on the disk."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    wait_before, write, wait_after = 1, 2, 4

    def writeback(fd: int, offset: int, nbytes: int, wait: bool = False) -> None:
        flags = wait_before | write | wait_after if wait else write
        fn(fd, offset, nbytes, flags)  # advisory: a failure only loses the head start

    return writeback


_START_WRITEBACK = _libc_sync_file_range()


class OutputFile:
    """A buffered binary output file with file-to-file copies and write-behind.

    It keeps its own position (every write, copy and seek goes through it), so
    write-behind costs no system call per small write. Write-back of each
    finished window is started from a helper thread (sync_file_range can
    block while the device queue is full; the writer should not). Call
    `settle()` before the final fsync. Everything else (fileno, flush,
    closed, ...) is the wrapped file's.
    """

    def __init__(self, fh: BinaryIO, write_behind: int = WRITE_BEHIND):
        self._fh = fh
        self._fd = fh.fileno()
        self._window = write_behind if _START_WRITEBACK is not None else 0
        self._pos = fh.tell()
        self._kicked = 0  # write-back has been asked for [0, _kicked)
        self._flusher: _Flusher | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._fh.seek(offset, whence)
        return self._pos

    def write(self, data: Any) -> int:
        n = self._fh.write(data)
        self._pos += n
        self._write_behind()
        return n

    def copy_span(self, span: FileSpan) -> int:
        """Append span's bytes, kernel to kernel where the platform allows; returns span.nbytes."""
        self._fh.flush()
        at = self._pos
        with phase("copy"), open(span.path, "rb") as src:
            done = _copy_file_range(src.fileno(), span.offset, self._fd, at, span.nbytes)
            if done < span.nbytes:
                _copy_by_reading(src, span.offset + done, self._fd, at + done, span.nbytes - done)
        self.seek(at + span.nbytes)
        self._write_behind()
        return span.nbytes

    def settle(self) -> None:
        """Wait for the helper thread's write-back requests (before fsync or close)."""
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None

    def _write_behind(self) -> None:
        if not self._window or self._pos - self._kicked < self._window:
            return
        self._fh.flush()
        if self._flusher is None:
            self._flusher = _Flusher(self._fd)
        self._flusher.request(self._kicked, self._pos - self._kicked)
        self._kicked = self._pos


class _Flusher:
    """A thread that starts write-back of the ranges it is given, on its own dup of the fd."""

    def __init__(self, fd: int):
        self._fd = os.dup(fd)  # the writer may close its fd while a request is in flight
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="smolq-writeback", daemon=True)
        self._thread.start()

    def request(self, offset: int, nbytes: int) -> None:
        self._queue.put((offset, nbytes))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        """Start each window's write-back, then wait for the one before it: where the disk is
        slower than the writer (this machine's sustains ~0.3-0.4 GB/s) the backlog stays at
        about two windows, so the final fsync waits for those rather than for everything the
        disk fell behind by (600 MB written at 0.55 GB/s: fsync 0.51 s with start-only
        write-back, 0.20 s with this). Only this thread waits; the writer never does."""
        previous = None
        try:
            while (item := self._queue.get()) is not None:
                with phase("writeback"):
                    _START_WRITEBACK(self._fd, *item)
                    if previous is not None:
                        _START_WRITEBACK(self._fd, *previous, True)
                previous = item
        finally:
            os.close(self._fd)


def _copy_file_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> int:
    """Bytes copied with os.copy_file_range (0 where the call is unsupported here)."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    while copy is not None and done < nbytes:
        try:
            n = copy(src_fd, dst_fd, min(COPY_CHUNK, nbytes - done), src_off + done, dst_off + done)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                break  # another filesystem or an old kernel: fall back to reading
            raise
        if n == 0:
            break  # source shorter than the span: let the reading fallback say so
        done += n
    return done


def _copy_by_reading(src: BinaryIO, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    buf = bytearray(min(FALLBACK_CHUNK, nbytes))
    view = memoryview(buf)
    src.seek(src_off)
    while nbytes:
        n = src.readinto(view[:min(len(buf), nbytes)])
        if not n:
            raise OSError(errno.EIO, f"{src.name}: ended {nbytes} bytes before the tensor's end")
        _pwrite_all(dst_fd, view[:n], dst_off)
        dst_off += n
        nbytes -= n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# --------------------------------------------------------------------------- overlap

def produce_ahead(items: Iterable[Item], produce: Callable[[Item], Any],
                  overlap: bool = True) -> Iterator[tuple[Item, Any]]:
    """Yield (item, produce(item)) in order, producing the next item on a
    worker thread while the caller writes this one (the kernel and file
    writes release the GIL). At most two results exist at a time. A failure
    in produce() is raised here, at its item; leaving early waits for the one
    item in flight."""
    items = list(items)
    if not overlap or len(items) < 2:
        for item in items:
            yield item, produce(item)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="smolq-produce")
    try:
        pending = pool.submit(produce, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(produce, items[i + 1])
            yield item, result
            del result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- input

class MappedWindow:
    """Views of a read-only mmap; asking for one hands the pages of the
    previous views back to the kernel (MADV_DONTNEED). The data stays valid:
    a page touched again is read back from the file (page cache), so this
    only bounds what this process keeps resident to about one tensor.

    Each view's pages are mapped in one call (MADV_POPULATE_READ, Linux 5.14+)
    rather than a fault per 64 KiB as the kernel reads them, through libc so
    the GIL is released meanwhile (mmap.madvise keeps it, which would stall
    the writer thread). Mapping the next tensor ahead on a helper thread was
    measured too: no faster on 2 cores, and 110 MiB more resident."""

    def __init__(self, mm: mmap.mmap):
        self._mm = mm
        self._lock = threading.Lock()
        self._held: list[tuple[int, int]] = []
        self._can_release = hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
        self._base = _mapping_address(mm) if _MADVISE is not None else None

    def view(self, offset: int, nbytes: int) -> memoryview:
        with self._lock:
            self._release_except(offset, nbytes)
            self._held.append((offset, nbytes))
        self._populate(offset, nbytes)
        return memoryview(self._mm)[offset:offset + nbytes]

    def _populate(self, offset: int, nbytes: int) -> None:
        """Map [offset, offset + nbytes) in one call; advisory, so a failure (an older kernel)
        leaves the pages to fault in as they are read."""
        if self._base is None or nbytes < POPULATE_MIN:
            return
        lo = offset - offset % mmap.PAGESIZE
        if _MADVISE(self._base + lo, min(offset + nbytes, len(self._mm)) - lo, MADV_POPULATE_READ) != 0:
            self._base = None

    def _release_except(self, offset: int, nbytes: int) -> None:
        if not self._can_release:
            self._held.clear()
            return
        keep = []
        for start, n in self._held:
            if start < offset + nbytes and offset < start + n:
                keep.append((start, n))  # overlaps the new view (e.g. a tied tensor asked twice)
                continue
            lo = start - start % mmap.PAGESIZE
            hi = min(start + n, len(self._mm))
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass  # advisory only
        self._held = keep
