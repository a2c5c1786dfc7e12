"""GPTQ defaults that follow the input and the machine (issue #19): calibration windows from the
text's length, the thread budget, OpenMP threads that yield, the time estimate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smolq.pipeline.gptq import estimate_seconds
from smolq.threads import one_thread, resolve_threads
from smolq.transforms.calib import AUTO_MAX_SAMPLES, auto_windows, load_calibration

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n_tokens, ctx, want", [
    (8000, 8192, (31, 512)),  # the 35 KB text: 2 x 8000 // 512 windows
    (100_000, 8192, (AUTO_MAX_SAMPLES, 512)),  # a long text: capped
    (300, 2048, (2, 300)),  # shorter than one window: the whole text, twice
    (6183, 128, (AUTO_MAX_SAMPLES, 128)),  # a short context caps the window
    (1000, None, (3, 512)),
])
def test_auto_windows_by_hand(n_tokens, ctx, want):
    assert auto_windows(n_tokens, None, None, ctx) == want


def test_auto_windows_keep_what_is_given():
    assert auto_windows(8000, 7, None, 8192) == (7, 512)
    assert auto_windows(8000, None, 1000, 8192) == (16, 1000)


def test_default_calibration_sees_each_token_about_twice(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=64, n_layers=1,
                         config_overrides={"max_position_embeddings": 4096})
    text = " ".join(f"word{i % 97} and {i}" for i in range(900))
    (tmp_path / "t.txt").write_text(text)
    tok = AutoTokenizer.from_pretrained(hf)
    n = len(tok(text)["input_ids"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    cal = load_calibration(model, tok, tmp_path / "t.txt", seed=3)
    assert cal.seqlen == min(512, n)
    assert cal.n_tokens <= 2 * n < cal.n_tokens + cal.seqlen  # about twice, never more
    assert any("windows of" in note for note in cal.notes)
    explicit = load_calibration(model, tok, tmp_path / "t.txt", nsamples=5, seqlen=40, seed=3)
    assert (len(explicit.samples), explicit.seqlen) == (5, 40) and not explicit.notes


def _child(code: str, **env) -> str:
    """Run `code` in a fresh interpreter (torch not imported yet) and return its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    full_env.update(PYTHONPATH=str(REPO), **env)
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_importing_smolq_makes_openmp_threads_yield_unless_told_otherwise():
    code = "import os, smolq; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _child(code) == "PASSIVE"
    assert _child(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stands


def test_threads_size_torch_before_and_after_its_import():
    before = ("import json, smolq.threads as t; n = t.set_threads(1); import torch; "
              "print(json.dumps([n, torch.get_num_threads()]))")
    assert json.loads(_child(before)) == [1, 1]
    after = ("import json, torch, smolq.threads as t; n = t.set_threads(2); "
             "print(json.dumps([n, torch.get_num_threads()]))")
    assert json.loads(_child(after)) == [2, 2]


def test_one_thread_restores_the_pool():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert resolve_threads(3) == 3 and resolve_threads(0) >= 1
    with pytest.raises(ValueError):
        resolve_threads(-1)


def test_the_column_loop_on_one_thread_gives_the_same_weights():
    """The solver's result must not depend on the thread count (resume and golden bytes rely on it)."""
    from smolq.transforms.gptq import gptq_solve
    from smolq.transforms.grids import make_grid

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(96, 256, generator=gen)
    X = torch.randn(512, 256, generator=gen)
    H = X.T @ X / 512
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            grid = make_grid(96, 256, qtype=None, bits=4, group_size=64, sym=True, mse=0.0, rule="weighted")
            results.append(gptq_solve(W, H, grid, act_order=True).Q)
        finally:
            torch.set_num_threads(old)
    assert torch.equal(results[0], results[1])


def test_estimate_grows_with_tokens_and_width(monkeypatch):
    from smolq.pipeline import gptq as gptq_pipeline

    # one measured speed for every call: the formula is under test, not how busy the machine is
    # (a probe per call made this flaky on a loaded machine)
    monkeypatch.setattr(gptq_pipeline, "_probe_speed", lambda dev: (3e11, 2e-6))
    cpu = torch.device("cpu")
    small = estimate_seconds([(576, 576)] * 4, 8192, 80, cpu)
    assert 0 < small < estimate_seconds([(576, 576)] * 4, 32768, 320, cpu)
    assert small < estimate_seconds([(2048, 2048)] * 4, 8192, 80, cpu)
