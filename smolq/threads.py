"""One thread budget for torch's intra-op pool, OpenMP and the C kernel, and threads that
yield the CPU when they wait.

Why (issue #19): a GPTQ run with two threads on two cores shared with one other busy
process slowed ~30x, not ~2x. The column loop of GPTQ is thousands of small torch ops,
each an OpenMP parallel region ending in a barrier; with a competitor on the cores, one
of the two threads is often descheduled, and every barrier waits for it while the other
spins. Two things fix it:
- waiting threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), so the cores go to
  whoever has work. OpenMP reads the variable once, when its runtime starts (torch
  loads it with its first import), so `yielding_defaults` must run before anything
  imports torch: the CLI calls it first thing; a library user who imported torch
  already keeps their own policy.
- ops too small to gain from threads run on one (`one_thread`; the GPTQ column loop).

`set_threads(n)` sizes torch (and through it OpenMP) to n; the C kernel takes the same
n per call (0 there means all online cores, the same count `available_cores` gives
without an affinity mask).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from smolq.lazy import lazy_module

torch = lazy_module("torch")  # bound at first use: importing this module must not start OpenMP

YIELDING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def yielding_defaults() -> None:
    """Put the yielding OpenMP policy in the environment unless the user chose one.
    Effective only while torch is not imported yet (see the module docstring)."""
    for key, value in YIELDING_ENV.items():
        os.environ.setdefault(key, value)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int) -> int:
    """--threads as a count: 0 means every available core."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all cores), not {threads}")
    return threads or available_cores()


def set_threads(threads: int) -> int:
    """Size torch's intra-op pool (OpenMP underneath) to `threads` (0: all available cores);
    returns the count. Before torch is imported, OMP_NUM_THREADS carries it to torch's start."""
    n = resolve_threads(threads)
    if "torch" in sys.modules:
        torch.set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block: for runs of small ops whose parallel regions
    cost more in barriers than they gain, above all on a loaded machine."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
