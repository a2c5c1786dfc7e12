"""`smolq --help` and each of this helper's commands' --help show usage with an example."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_cli_support import run_cli


def test_top_level_help_lists_commands_with_an_example(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    for command in ("inspect", "quantize", "verify"):
        assert command in out
    assert "smolq quantize" in out  # an example line


@pytest.mark.parametrize("command, example", [
    ("inspect", "smolq inspect model.gguf"),
    ("quantize", "smolq quantize model-f16.gguf model-q4_k_m.gguf --type q4_k_m"),
    ("verify", "smolq verify model-q4_0.gguf --against model-f16.gguf"),
    ("imatrix", "smolq imatrix ./hf-model --calib text.txt -o model.imatrix"),
])
def test_command_help_has_usage_and_example(capsys, monkeypatch, command, example):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, _ = run_cli(capsys, command, "--help")
    assert rc == 0
    assert "Usage" in out and example in out


def test_python_dash_m_runs_and_errors_in_one_line(tmp_path):
    """The real process: exit code 2 and a single stderr line for a bad file."""
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nonsense!")
    proc = subprocess.run([sys.executable, "-m", "smolq", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a GGUF or ggml file" in proc.stderr
    assert proc.stdout == ""
