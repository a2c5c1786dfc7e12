"""The harness that runs real readers (llama.cpp, GPT4All) in child processes,
and the portable build of llama.cpp that `make setup` installs.

A reader that crashes must fail one test that names the reader, the file and
the signal, and leave the test process alive: these tests crash children on
purpose through the same `run_reader` the real-reader tests use.
"""
from __future__ import annotations

import os
import re

import pytest

from real_loaders import READER_CRASHES, ReaderError, ReaderRefused, open_llama, require_llama_cpp, run_reader


@pytest.mark.parametrize("code,signal_name", [
    ("import os; os.abort()", "SIGABRT"),
    ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
])
def test_a_crashing_reader_is_one_error_naming_the_signal(code, signal_name):
    pid = os.getpid()
    crashes = READER_CRASHES["crash-test"]
    with pytest.raises(ReaderError) as info:
        run_reader("crash-test", code, {}, model="/models/some.gguf")
    err = info.value
    assert err.signal == signal_name
    assert not isinstance(err, ReaderRefused)
    message = str(err)
    assert "crash-test" in message and "/models/some.gguf" in message and signal_name in message
    assert os.getpid() == pid  # this process ran on; the child died
    assert READER_CRASHES["crash-test"] == crashes + 1


def test_a_reader_that_exits_with_an_error_is_reported_with_its_output():
    with pytest.raises(ReaderError) as info:
        run_reader("exit-test", "import sys; print('bad header'); sys.exit(3)", {}, model="m.bin")
    assert info.value.signal is None
    assert "exited with 3" in str(info.value) and "bad header" in str(info.value)


def test_a_hanging_reader_is_cut_off():
    with pytest.raises(ReaderError, match="ran past 2 s"):
        run_reader("hang-test", "import time; time.sleep(60)", {}, model="m.bin", timeout=2)


def test_the_child_gets_the_request_and_returns_its_result():
    code = ("import json, sys; r = json.load(open(sys.argv[1])); "
            "json.dump({'twice': [2 * x for x in r['xs']]}, open(sys.argv[2], 'w'))")
    assert run_reader("echo-test", code, {"xs": [1, 2, 3]})["twice"] == [2, 4, 6]


def test_llama_cpp_refusal_is_not_a_crash(tmp_path):
    require_llama_cpp()
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ReaderRefused) as info:
        open_llama(bogus).tokenize(b"hello")
    assert info.value.signal is None


def test_llama_cpp_build_is_portable():
    """make setup builds llama.cpp with GGML_NATIVE=OFF and AVX2 at most: a
    native build crashed on every quantized model on an AVX-512/AMX Xeon.
    ggml reports the instruction sets it was COMPILED for, so this holds on
    any machine, whatever its CPU has."""
    require_llama_cpp()
    code = ("import json, sys, llama_cpp; "
            "json.dump({'info': llama_cpp.llama_print_system_info().decode()}, open(sys.argv[2], 'w'))")
    text = run_reader("llama-cpp-python", code, {})["info"]
    enabled = set(re.findall(r"(\w+) = 1", text))
    assert not enabled & {"AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8", "AVX_VNNI"}, text
    if os.uname().machine == "x86_64":
        assert {"AVX2", "FMA", "F16C"} <= enabled, text
