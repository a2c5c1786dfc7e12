"""`smolq convert` straight to legacy .bin files, run by GPT4All 1.0.8's 2023 loaders.

This is the check that each version's block layout is what the loaders of
its time decode: Q4_0/Q4_1 with interleaved nibbles and f32 scales for ggjt v1
(llamamodel-230511), split nibbles for v2 (-230519), f16 scales for v3
(-mainline); GPT-J 'ggml' and MPT 'ggmm' on GPT4All's 230511 ggml (v1 layouts).

f16 files must continue exactly as transformers does. For quantized files the
loaders' own arithmetic (8-bit activations in the quantized matmuls) differs
from any float reference, so each token the loader picks must be the best, or
within MARGIN of the best, next token under smolq's reference forward pass on
the same file, fed the loader's own sequence (teacher forcing). A wrong block
layout decodes to noise and fails this at once.
"""
from __future__ import annotations

import numpy as np
import pytest

from smolq.pipeline.convert import convert
from smolq.sources.reference import hf_hparams, logits_from_file

from test_real_loaders_legacy import (  # noqa: F401  (llama is a fixture)
    LLAMA_IDS, LLAMA_VARIANT, N_NEW, PROMPT, _variant_lib, hf_greedy, llama, needs_gpt4all, run_gpt4all,
)

MARGIN = 0.05


def assert_near_greedy(path, hf_dir, prompt_ids, out_ids):
    tokens = np.array([list(prompt_ids) + list(out_ids)])
    logits = logits_from_file(path, tokens, hparams_override=hf_hparams(hf_dir))[0]
    for i, tok in enumerate(out_ids):
        row = logits[len(prompt_ids) - 1 + i]
        gap = float(row.max() - row[tok])
        assert gap <= MARGIN, f"step {i}: picked {tok}, {gap:.3f} below the reference's best {int(row.argmax())}"


@needs_gpt4all
@pytest.mark.parametrize("outtype", ["f16", "q4_0", "q4_1"])
@pytest.mark.parametrize("fmt", sorted(LLAMA_VARIANT))
def test_llama_loaders_run_converted_files(llama, tmp_path, fmt, outtype):
    hf, _ = llama
    out = tmp_path / f"{fmt}-{outtype}.bin"
    convert(hf, out, format=fmt, outtype=outtype)
    got = run_gpt4all(tmp_path, mode="llama_eval", path=str(out), lib=str(_variant_lib(LLAMA_VARIANT[fmt])),
                      ids=LLAMA_IDS, n=N_NEW)
    assert got["loaded"], f"GPT4All 1.0.8 did not load {fmt} {outtype}"
    if outtype == "f16":
        assert got["out"] == hf_greedy(hf, LLAMA_IDS, N_NEW)
    else:
        assert_near_greedy(out, hf, LLAMA_IDS, got["out"])


@needs_gpt4all
@pytest.mark.parametrize("outtype", ["f16", "q4_0"])
@pytest.mark.parametrize("family,fmt", [("gptj", "ggml"), ("mpt", "ggmm")])
def test_gptj_and_mpt_loaders_run_converted_files(tmp_path, family, fmt, outtype):
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model(family, tmp_path / "hf", vocab_size="legacy" if family == "gptj" else None)
    out = tmp_path / "out.bin"
    convert(hf, out, format=fmt, outtype=outtype)
    got = run_gpt4all(tmp_path, mode="prompt", path=str(out), prompt=PROMPT, n=N_NEW)
    assert got["loaded"], f"GPT4All 1.0.8 did not load the {family} {outtype} file"
    assert len(got["prompt"]) > 3 and len(got["out"]) == N_NEW
    if outtype == "f16":
        assert got["out"] == hf_greedy(hf, got["prompt"], N_NEW)
    else:
        assert_near_greedy(out, hf, got["prompt"], got["out"])
