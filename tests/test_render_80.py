"""`inspect` and `verify` tables at 80 columns: no cell is broken mid-word.

Every tensor's name, type and numbers appear whole on one line, every
metadata key and value type whole on its line (and a scalar value's words
whole), and no line is wider than 80.
"""
from __future__ import annotations

import json

import pytest
from rich.cells import cell_len

from tests.test_cli_support import ggjt_by_hand


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaMA converted to GGUF f32 and q4_k_m (mixed types, real metadata) and to a legacy file,
    plus a hand-packed ggjt v3 (long legacy tensor names)."""
    from smolq.cli import main
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("render80")
    hf = make_tiny_model("llama", root / "hf")
    out = {"f32": root / "m-f32.gguf", "q4_k_m": root / "m-q4_k_m.gguf", "legacy": root / "m-q4_0.bin"}
    for key, outtype in (("f32", "f32"), ("q4_k_m", "q4_k_m"), ("legacy", "q4_0")):
        assert main(["convert", str(hf), str(out[key]), "--outtype", outtype, "-q"]) == 0
    out["ggjt"] = root / "hand.bin"
    ggjt_by_hand(out["ggjt"], version=3)
    return out


def _lines(text: str) -> list[str]:
    lines = text.splitlines()
    wide = [line for line in lines if cell_len(line) > 80]
    assert not wide, f"{len(wide)} lines wider than 80 columns:\n" + "\n".join(wide)
    return lines


def _whole_on_one_line(lines: list[str], *words: str) -> None:
    """Some line holds every word in `words` as a whole token."""
    for line in lines:
        tokens = set(line.replace("│", " ").replace("┃", " ").split())
        if all(w in tokens for w in words):
            return
    raise AssertionError(f"no line holds {words} whole:\n" + "\n".join(lines))


@pytest.mark.parametrize("key", ["f32", "q4_k_m", "legacy", "ggjt"])
def test_inspect_at_80_columns(cli, monkeypatch, files, key):
    path = files[key]
    report = json.loads(cli("inspect", path, "--json").stdout)
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("inspect", path)
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stdout)
    assert report["tensors"]
    for t in report["tensors"]:
        _whole_on_one_line(lines, t["name"], t["type"], f"{t['bytes']:,}")
    for name, e in report.get("metadata", {}).items():
        _whole_on_one_line(lines, name, e["type"] + (f"[{e['item_type']}]" if "item_type" in e else ""))
        if "item_type" not in e:  # a scalar's words (e.g. 9.999999747378752e-06) stay whole too
            for word in str(e["value"]).split():
                if len(word) <= 24:
                    _whole_on_one_line(lines, word)
    for name in report.get("hyperparameters", {}):
        _whole_on_one_line(lines, name)


@pytest.mark.parametrize("key", ["q4_k_m", "legacy"])
def test_verify_table_at_80_columns(cli, monkeypatch, files, key):
    args = ("verify", files[key], "--against", files["f32"])
    report = json.loads(cli(*args, "--json").stdout)
    monkeypatch.setenv("COLUMNS", "80")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stdout)
    assert report["summary"]["n_compared"] == len(report["tensors"]) > 0
    for t in report["tensors"]:
        _whole_on_one_line(lines, t["name"], t["type"], "x".join(map(str, t["shape"])),
                           format(t["rmse"], ".3g"), format(t["cosine"], ".5f"))


def test_verify_table_without_reference_at_80_columns(cli, monkeypatch, files):
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("verify", files["ggjt"])
    assert r.returncode == 0, r.stderr
    lines = _lines(r.stdout)
    report = json.loads(cli("verify", files["ggjt"], "--json").stdout)
    for t in report["tensors"]:
        _whole_on_one_line(lines, t["name"], t["type"], "ok")
