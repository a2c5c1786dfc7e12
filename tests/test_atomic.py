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


# --- runs killed outright (SIGKILL): the part they leave, and the next run -----------------------

_KILLED_WRITER = r"""
import os, signal, sys
from smolq.atomic import atomic_output, atomic_directory
target, kind = sys.argv[1], sys.argv[2]
if kind == "file":
    with atomic_output(target) as fh:
        fh.write(b"half a model")
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
with atomic_directory(target) as d:
    (d / "shard-1.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""

_LIVE_WRITER = r"""
import sys, time
from smolq.atomic import atomic_output
with atomic_output(sys.argv[1]) as fh:
    fh.write(b"busy")
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def _parts(directory, name):
    return sorted(directory.glob(f".{name}.*.part"))


def _run_child(code, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_the_next_run_removes_what_a_killed_run_left(tmp_path, kind):
    import signal

    target = tmp_path / ("out.gguf" if kind == "file" else "out-gptq")
    proc = _run_child(_KILLED_WRITER, target, kind)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists() and len(_parts(tmp_path, target.name)) == 1  # what SIGKILL leaves

    if kind == "file":
        with atomic_output(target) as fh:
            fh.write(b"whole")
        assert target.read_bytes() == b"whole"
    else:
        with atomic_directory(target) as d:
            (d / "f").write_bytes(b"whole")
        assert (target / "f").read_bytes() == b"whole"
    assert _parts(tmp_path, target.name) == []


def test_a_live_writers_part_is_left_alone(tmp_path):
    import subprocess
    import sys

    from smolq.atomic import remove_stale_parts

    target = tmp_path / "out.gguf"
    child = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert remove_stale_parts(tmp_path, target.name) == []
        assert len(_parts(tmp_path, target.name)) == 1
    finally:
        child.kill()
        child.wait()
    assert len(remove_stale_parts(tmp_path, target.name)) == 1  # its writer is gone now
    assert _parts(tmp_path, target.name) == []


def test_a_conversion_killed_mid_write_leaves_nothing_stale_after_the_next_run(tmp_path):
    """A real `smolq convert` process SIGKILLed while its temporary part exists; the rerun
    writes the output, says what it removed, and leaves no part behind."""
    import signal
    import subprocess
    import sys
    import time

    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", vocab_size="legacy", hidden_size=512, n_layers=4)
    out = tmp_path / "out.gguf"
    cmd = [sys.executable, "-m", "smolq.cli", "convert", str(hf), str(out), "--outtype", "q6_k", "-q"]
    for _attempt in range(5):  # the part lives for the whole write (about a second here)
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while child.poll() is None and not _parts(tmp_path, out.name) and time.monotonic() < deadline:
            time.sleep(0.002)
        if child.poll() is None and _parts(tmp_path, out.name):
            child.send_signal(signal.SIGKILL)
            child.wait()
            break
        child.wait()
        out.unlink(missing_ok=True)
    else:
        pytest.fail("the conversion never left a temporary part to kill it on")
    assert not out.exists() and len(_parts(tmp_path, out.name)) == 1

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted run" in rerun.stderr
    assert out.exists() and _parts(tmp_path, out.name) == []
