"""Atomic output: nothing under the target name until success, normal permissions after."""
from __future__ import annotations

import os
import stat

import pytest

from smolq.atomic import atomic_directory, atomic_output


def test_output_gets_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.bin") as fh:
            fh.write(b"x")
        with atomic_directory(tmp_path / "outdir") as d:
            (d / "f").write_bytes(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "outdir").stat().st_mode) == 0o755


def test_failure_leaves_nothing_and_keeps_an_existing_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as fh:
            fh.write(b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
