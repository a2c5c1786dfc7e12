"""smolq's legacy output in real 2023 loaders: GPT4All 1.0.8's backends, and llama-cpp-python for GGUF.

Tiny HF models are converted to GGUF by smolq, migrated by smolq into each
legacy format, and loaded by the loader libraries GPT4All 1.0.8 ships
(llamamodel-230511 for ggjt v1, -230519 for v2, -mainline for v3, gptj for
'ggml' GPT-J, mpt for 'ggmm'). Their greedy tokens must equal transformers'
greedy tokens on the HF model for the same prompt ids.

GPT-J and MPT go through GPT4All's own prompt loop (top_k=1; the callbacks
give the prompt and the generated ids). GPT4All 1.0.8's LLaMA prompt loop
evaluates an extra BOS at a shifted position (its evalTokens prepends BOS
with n_past already advanced), so for LLaMA the test drives the variant
library's llama.cpp C API (llama_init_from_file / llama_eval) directly, after
checking that GPT4All's own dispatch loads the file.

GPT4All needs pkg_resources (setuptools<70), so it lives in its own
directory and runs in a subprocess with PYTHONPATH pointing there. The
LLaMA loaders of May 2023 know model sizes by n_layer, so the tiny LLaMA
has 32 layers (of width 64); legacy vocab sizes make GPT4All recognise the
families (formats.md 1).
"""
from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import pytest
from real_loaders import gpt4all_dir, open_llama, run_reader

from smolq.pipeline.convert import convert
from smolq.pipeline.migrate import migrate

# Found where real_loaders finds every GPT4All (beside the running venv, then the repo's .venv).
GPT4ALL_DIR = gpt4all_dir("1.0.8") or Path(__file__).resolve().parents[1] / ".venv/real/gpt4all-1.0.8"
BUILD = GPT4ALL_DIR / "gpt4all" / "llmodel_DO_NOT_MODIFY" / "build"
LLAMA_VARIANT = {"ggjt-v1": "230511", "ggjt-v2": "230519", "ggjt-v3": "mainline"}
N_NEW = 8
PROMPT = "The quick brown fox jumps over the lazy dog"

needs_gpt4all = pytest.mark.skipif(not BUILD.is_dir(), reason=f"gpt4all 1.0.8 is not installed in {GPT4ALL_DIR} "
                                                              "(make setup installs it)")

# Runs in the subprocess: load with GPT4All's dispatch, then generate.
RUNNER = textwrap.dedent('''
    import ctypes, json, sys
    from gpt4all import pyllmodel
    args = json.load(open(sys.argv[1]))
    m = pyllmodel.LLModel()
    loaded = bool(m.load_model(args["path"]))
    result = {"loaded": loaded}
    if loaded and args["mode"] == "prompt":
        prompt_ids, out_ids = [], []
        m._prompt_callback = staticmethod(lambda tid: (prompt_ids.append(tid), True)[1])
        m.prompt_model(args["prompt"], lambda tid, resp: (out_ids.append(tid), True)[1], n_predict=args["n"],
                       top_k=1, top_p=1.0, temp=1.0, repeat_penalty=1.0, repeat_last_n=0, n_batch=64)
        result.update(prompt=prompt_ids, out=out_ids)
    elif loaded:
        lib = ctypes.CDLL(args["lib"])
        class Params(ctypes.Structure):  # defaults as returned, passed back unchanged (by memory)
            _fields_ = [("raw", ctypes.c_ubyte * 512)]
        lib.llama_context_default_params.restype = Params
        lib.llama_init_from_file.restype = ctypes.c_void_p
        lib.llama_init_from_file.argtypes = [ctypes.c_char_p, Params]
        lib.llama_eval.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.llama_get_logits.restype = ctypes.POINTER(ctypes.c_float)
        lib.llama_get_logits.argtypes = [ctypes.c_void_p]
        lib.llama_n_vocab.argtypes = [ctypes.c_void_p]
        ctx = lib.llama_init_from_file(args["path"].encode(), lib.llama_context_default_params())
        n_vocab = lib.llama_n_vocab(ctx)
        def step(tokens, n_past):
            arr = (ctypes.c_int * len(tokens))(*tokens)
            assert lib.llama_eval(ctx, arr, len(tokens), n_past, 1) == 0
            logits = lib.llama_get_logits(ctx)
            return max(range(n_vocab), key=lambda i: logits[i])
        ids, out = args["ids"], []
        tok, n_past = step(ids, 0), len(ids)
        for _ in range(args["n"]):
            out.append(tok)
            tok, n_past = step([tok], n_past), n_past + 1
        result.update(prompt=ids, out=out)
    json.dump(result, open(sys.argv[2], "w"))
''')


def run_gpt4all(tmp_path: Path, **args) -> dict:
    """RUNNER in a child process (real_loaders.run_reader: a crash fails this test, naming the signal)."""
    data = run_reader("gpt4all 1.0.8", RUNNER, args, model=args["path"], timeout=300,
                      env={"PYTHONPATH": str(GPT4ALL_DIR)})
    return {k: v for k, v in data.items() if k != "_log"}


def hf_greedy(hf_dir: Path, ids: list[int], n: int) -> list[int]:
    return list(_hf_greedy(str(hf_dir), tuple(ids), n))


@functools.lru_cache(maxsize=8)
def _hf_greedy(hf_dir: str, ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return tuple(out[0, len(ids):].tolist())


def _variant_lib(name: str) -> Path:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "default" if " avx2" in flags else "avxonly"
    return BUILD / f"libllamamodel-{name}-{kind}.so"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("real-llama")
    # The 2023 loaders know no RoPE base or epsilon but 10000 and 1e-6; 32 layers: a known model size.
    hf = make_tiny_model("llama", root / "hf", vocab_size="legacy", n_layers=32, config_overrides={
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-6})
    convert(hf, root / "src.gguf", format="gguf", outtype="f32")
    return hf, root


LLAMA_IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203]


@needs_gpt4all
@pytest.mark.parametrize("fmt", sorted(LLAMA_VARIANT))
def test_gpt4all_llama_loaders_run_migrated_files(llama, tmp_path, fmt):
    hf, root = llama
    out = tmp_path / f"{fmt}.bin"
    migrate(root / "src.gguf", out, format=fmt)
    got = run_gpt4all(tmp_path, mode="llama_eval", path=str(out), lib=str(_variant_lib(LLAMA_VARIANT[fmt])),
                      ids=LLAMA_IDS, n=N_NEW)
    assert got["loaded"], f"GPT4All 1.0.8 did not load {fmt}"
    assert got["out"] == hf_greedy(hf, LLAMA_IDS, N_NEW)


@pytest.mark.parametrize("fmt", ["ggjt-v1", "ggml"])
def test_llama_cpp_python_runs_the_migrated_gguf(llama, tmp_path, fmt):
    hf, root = llama
    convert(hf, tmp_path / "legacy.bin", format=fmt, outtype="f16")
    s = migrate(tmp_path / "legacy.bin", tmp_path / "out.gguf")  # no --config: the listed defaults are right here
    assert {g["key"] for g in s["guesses"]} >= {"llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"}
    llm = open_llama(tmp_path / "out.gguf", n_ctx=128, threads=2, f32_kv=False)
    assert llm.greedy(LLAMA_IDS, N_NEW) == hf_greedy(hf, LLAMA_IDS, N_NEW)


@needs_gpt4all
@pytest.mark.parametrize("family,fmt", [("gptj", "ggml"), ("mpt", "ggmm")])
def test_gpt4all_runs_migrated_gptj_and_mpt(tmp_path, family, fmt):
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model(family, tmp_path / "hf", vocab_size="legacy" if family == "gptj" else None)
    convert(hf, tmp_path / "src.gguf", format="gguf", outtype="f16")
    migrate(tmp_path / "src.gguf", tmp_path / "out.bin", format=fmt)
    got = run_gpt4all(tmp_path, mode="prompt", path=str(tmp_path / "out.bin"), prompt=PROMPT, n=N_NEW)
    assert got["loaded"], f"GPT4All 1.0.8 did not load the {family} file"
    assert len(got["prompt"]) > 3 and len(got["out"]) == N_NEW
    assert got["out"] == hf_greedy(hf, got["prompt"], N_NEW)
