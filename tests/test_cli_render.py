"""What the CLI prints is readable at 80 columns: help and --dry-run plans are never
split mid-word across lines, and no line is wider than the terminal.

Rich wraps prose at spaces; what breaks words is a table cell with overflow="fold" (or a
column collapsed below its longest token). So: every option name in the help, and every
tensor name and type name in a plan, must appear whole on some line.
"""
from __future__ import annotations

import json
import re

import pytest
import typer.main

from smolq.cli import app
from smolq.formats.gguf import read_gguf

WIDTH = 80
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def narrow(monkeypatch):
    """A terminal 80 columns wide, as typer and rich read it."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)  # typer's own override


def lines_of(text: str) -> list[str]:
    return ANSI.sub("", text).splitlines()


def assert_fits(text: str) -> None:
    wide = [line for line in lines_of(text) if len(line.rstrip()) > WIDTH]
    assert not wide, f"{len(wide)} lines wider than {WIDTH}:\n" + "\n".join(wide[:5])


def assert_whole(token: str, text: str) -> None:
    """`token` appears on one line, not glued to more name characters on either side
    (a name cut at the end of a line, or truncated with an ellipsis, does not count)."""
    pattern = re.compile(rf"(?<![\w.-]){re.escape(token)}(?![\w.…-])")
    assert any(pattern.search(line) for line in lines_of(text)), f"{token!r} is not whole on any line"


def option_names(command: str | None) -> list[str]:
    click_app = typer.main.get_command(app)
    cmd = click_app if command is None else click_app.commands[command]
    return [name for p in cmd.params for name in (*p.opts, *p.secondary_opts) if name.startswith("--")]


COMMANDS = [None, "convert", "quantize", "inspect", "verify", "migrate", "eval", "zoo", "demo"]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "smolq")
def test_help_at_80_columns_keeps_option_names_whole(cli, narrow, command):
    args = ([command] if command else []) + ["--help"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout)
    names = option_names(command)
    assert names  # at least --help
    for name in names:
        assert_whole(name, r.stdout)


def test_quantize_help_is_grouped_into_panels(cli, narrow):
    r = cli("quantize", "--help")
    titles = re.findall(r"╭─ (.+?) ─", r.stdout)
    for panel in ("Input/output", "Types and mix", "GPTQ", "Performance", "Output control"):
        assert panel in titles
    gptq = r.stdout[r.stdout.index("╭─ GPTQ"):]
    gptq = gptq[:gptq.index("╰")]
    for name in ("--calib", "--damp", "--nsamples", "--act-order"):
        assert name in gptq


def test_shell_completion_is_offered(cli, narrow):
    r = cli("--help")
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout


# --- --dry-run plans ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=[64, 256], ids=["hidden64-fallbacks", "hidden256-kquants"])
def tiny_gguf(request, tmp_path_factory):
    """A tiny LLaMA as an HF directory and as an F16 GGUF (converted by the CLI)."""
    from smolq.cli import main
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp(f"render{request.param}")
    hf = make_tiny_model("llama", root / "hf", hidden_size=request.param)
    assert main(["convert", str(hf), str(root / "f16.gguf"), "--quiet"]) == 0
    return root


def _types_in(summary: dict) -> set[str]:
    types = set()
    for t in summary["tensors"]:
        types.add(t["type"])
        types.add(t.get("source_type") or t.get("source_dtype"))
    return types


def _check_plan(cli, args, names):
    r = cli(*args, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout)
    for name in names:
        assert_whole(name, r.stdout)
    summary = json.loads(cli(*args, "--dry-run", "--json").stdout)
    for type_name in _types_in(summary):
        assert_whole(type_name, r.stdout)
    return r.stdout


@pytest.mark.parametrize("preset", ["q4_k_m", "q4_0", "q8_0"])
def test_quantize_dry_run_fits_80_columns(cli, narrow, tiny_gguf, monkeypatch, preset):
    monkeypatch.chdir(tiny_gguf)  # short relative paths in the title
    names = [t.name for t in read_gguf("f16.gguf").tensors]
    _check_plan(cli, ["quantize", "f16.gguf", "out.gguf", "--type", preset], names)


@pytest.mark.parametrize("outtype", ["f16", "q4_k_m"])
def test_convert_dry_run_fits_80_columns(cli, narrow, tiny_gguf, monkeypatch, outtype):
    """GGUF tensor names stay whole; the HF source names may be shortened with an
    ellipsis at 80 columns (they are whole in --json), never folded onto a second line."""
    monkeypatch.chdir(tiny_gguf)
    names = [t.name for t in read_gguf("f16.gguf").tensors]
    out = _check_plan(cli, ["convert", "hf", "out.gguf", "--outtype", outtype], names)
    summary = json.loads(cli("convert", "hf", "out.gguf", "--outtype", outtype, "--dry-run", "--json").stdout)
    source_of = {t["name"]: t["source"] for t in summary["tensors"]}
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines_of(out) if line.startswith("│")]
    assert len([r for r in rows if r[0]]) == len(source_of)
    for cells in rows:
        tensor, source = cells[0], cells[1]
        if not tensor:  # a continuation line ("(fallback)" under its type) carries no piece of a name
            assert source == "", cells
        elif source != source_of[tensor]:
            assert source.endswith("…") and source_of[tensor].startswith(source[:-1]), cells
