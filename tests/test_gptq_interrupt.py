"""Ctrl-C during `smolq quantize --method gptq` (a real SIGINT to a real process):
no output is left, the finished blocks stay, and `--resume` finishes the job with
the bytes an uninterrupted run writes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_LAYERS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gptq-sigint")
    hf = make_tiny_model("llama", root / "hf", hidden_size=128, n_layers=N_LAYERS, seed=11)
    words = ["cat", "dog", "bird", "fish"] * 200
    (root / "calib.txt").write_text(" ".join(f"the {w} sat on mat {i % 23}" for i, w in enumerate(words)))
    return root, hf


def _command(hf: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smolq.cli", "quantize", str(hf), str(out), "--method", "gptq", "--type", "q4_0",
            "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--act-order", "--seed", "3", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _interrupt_after_first_block(cmd: list[str], work: Path) -> subprocess.CompletedProcess:
    # A shell runs background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the disposition of a terminal's foreground job.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(work.glob("block-*.safetensors")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no block was saved before the run ended (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigint_leaves_no_output_and_resume_finishes_identically(model):
    root, hf = model
    calib = root / "calib.txt"
    straight = root / "straight.gguf"
    done = subprocess.run(_command(hf, straight, calib, "-q"), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr

    out = root / "out.gguf"
    work = root / ".out.gguf.gptq-work"
    stopped = _interrupt_after_first_block(_command(hf, out, calib), work)
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert "interrupted" in stopped.stderr and "--resume" in stopped.stderr
    assert not out.exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("out", ".out"))) == [work.name]
    kept = sorted(work.glob("block-*.safetensors"))
    assert 1 <= len(kept) < N_LAYERS  # stopped part way

    resumed = subprocess.run(_command(hf, out, calib, "--resume"), capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("restored") >= len(kept)
    assert out.read_bytes() == straight.read_bytes()
    assert not work.exists()
