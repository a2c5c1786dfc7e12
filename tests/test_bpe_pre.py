"""tokenizer.ggml.pre: the table of known hashes, the hashing, and what happens to an unknown tokenizer.

- The table (smolq/sources/bpe_pre_table.py) is what scripts/gen_bpe_pre_table.py extracts
  from the pinned converter (--check), and, independently of that script's parsing, what
  the converter's own get_vocab_base_pre returns: it is run in a child process with its
  sha256 replaced, once for every hash of the table, and once for a hash it does not know.
- The hashing, on a tokenizer whose ids are known by construction (byte-level, no merges:
  each byte of the check text is one token, its id the byte's place in the alphabet).
- The fallback for a hash nobody knows: the pre-tokenizer's form names it, with a note.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smolq import tiny
from smolq.errors import InputError
from smolq.sources import bpe_pre
from smolq.sources.bpe_pre_table import CHECK_TEXT, KNOWN_PRE
from tests.test_vs_llama_converter import FETCH_HINT, converter_dir

REPO = Path(__file__).resolve().parents[1]

# The child: conversion.base's get_vocab_base_pre with a sha256 whose digest we choose and a
# tokenizer that records the text it is asked to encode.
CHILD = r"""
import json, sys
conv, table_path, out_path = sys.argv[1:4]
sys.path[:0] = [conv + "/gguf-py", conv]
import conversion.base as base
table = json.load(open(table_path))
texts, answers = [], {}

class Tokenizer:
    def encode(self, text):
        texts.append(text)
        return [0]

for digest in table + ["0" * 64]:
    class Digest:
        def __init__(self, data): pass
        def hexdigest(self): return digest
    base.sha256 = Digest
    try:
        answers[digest] = base.TextModel.get_vocab_base_pre(None, Tokenizer())
    except NotImplementedError:
        answers[digest] = None
json.dump({"answers": answers, "texts": sorted(set(texts))}, open(out_path, "w"))
"""


def test_table_is_what_the_script_extracts():
    if converter_dir() is None:
        pytest.skip(f"llama.cpp's converter is not fetched; {FETCH_HINT}")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_bpe_pre_table.py"), "--check",
                           "--converter", str(converter_dir())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_table_is_the_converters_function(tmp_path):
    conv = converter_dir()
    if conv is None:
        pytest.skip(f"llama.cpp's converter is not fetched; {FETCH_HINT}")
    table, out = tmp_path / "table.json", tmp_path / "out.json"
    table.write_text(json.dumps(list(KNOWN_PRE)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(conv), str(table), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["texts"] == [CHECK_TEXT]
    unknown = result["answers"].pop("0" * 64)
    assert unknown is None  # the converter stops on a hash it does not know
    assert result["answers"] == KNOWN_PRE
    assert {"llama-bpe", "qwen2", "smollm", "gpt-2"} <= set(KNOWN_PRE.values())


def _alphabet_tokenizer(directory: Path) -> Path:
    """Byte-level BPE without merges: every byte one token, ids in GPT-2's alphabet order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = tiny._alphabet_in_gpt2_order()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_hash_of_a_tokenizer_with_known_ids(tmp_path):
    path = _alphabet_tokenizer(tmp_path)
    table = tiny.bytes_to_unicode()
    place = {c: i for i, c in enumerate(tiny._alphabet_in_gpt2_order())}
    ids = [place[table[b]] for b in CHECK_TEXT.encode("utf-8")]
    assert bpe_pre.check_hash(path) == hashlib.sha256(str(ids).encode()).hexdigest()


def test_known_hash_wins_over_the_form(tmp_path, monkeypatch):
    path = _alphabet_tokenizer(tmp_path)
    monkeypatch.setitem(bpe_pre.KNOWN_PRE, bpe_pre.check_hash(path), "qwen2")
    notes: list[str] = []
    assert bpe_pre.identify_pre(path, json.loads(path.read_text()), notes) == "qwen2" and notes == []


@pytest.mark.parametrize("style,name", [("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_unknown_hash_named_by_its_form_with_a_note(tmp_path, style, name):
    d = tiny.make_tiny_model("llama", tmp_path / style, bpe=style, n_layers=1)
    notes: list[str] = []
    data = json.loads((d / "tokenizer.json").read_text())
    assert bpe_pre.identify_pre(d / "tokenizer.json", data, notes) == name
    assert len(notes) == 1 and bpe_pre.check_hash(d / "tokenizer.json") in notes[0]


def test_gpt2_form_from_the_alphabet_tokenizer(tmp_path):
    path = _alphabet_tokenizer(tmp_path)
    notes: list[str] = []
    assert bpe_pre.identify_pre(path, json.loads(path.read_text()), notes) == "gpt-2" and notes


def test_neither_hash_nor_form_is_refused(tmp_path):
    path = _alphabet_tokenizer(tmp_path)
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True  # a form llama.cpp has no name for
    with pytest.raises(InputError, match="unknown BPE pre-tokenizer"):
        bpe_pre.identify_pre(path, data, [])


def test_tiny_regexes_are_the_recognised_ones():
    """smolq.tiny (base layer) spells the real tokenizers' regexes itself; they must be these."""
    assert tiny.LLAMA3_SPLIT_REGEX == bpe_pre.LLAMA3_REGEX
    assert tiny.QWEN2_SPLIT_REGEX == bpe_pre.QWEN2_REGEX


@pytest.mark.parametrize("name", sorted(bpe_pre.PRE_TOKENIZER_FORMS))
def test_export_writes_the_form_it_reads(name):
    """`--format hf` builds each named pre-tokenizer (sources.hf_tokenizer); serialized by the
    tokenizers library, it reads back as the same form, so a converted export gets the same name."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from smolq.sources.hf_tokenizer import _pre_tokenizer_step

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([_pre_tokenizer_step(s) for s in bpe_pre.PRE_TOKENIZER_FORMS[name]])
    data = json.loads(tok.to_str())["pre_tokenizer"]
    if len(data["pretokenizers"]) == 1:
        data = data["pretokenizers"][0]
    assert bpe_pre.pre_tokenizer_form(data) == bpe_pre.PRE_TOKENIZER_FORMS[name]
