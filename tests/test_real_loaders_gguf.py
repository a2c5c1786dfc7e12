"""smolq's GGUF files in real engines: llama.cpp (llama-cpp-python) and GPT4All 2.5.1.

What is checked, and against what:
- LLaMA (MHA, GQA, tied, GQA+tied) and MPT (plain and clip_qkv), f32 and f16:
  llama.cpp's logits at every position of a few sequences against
  transformers' on the HF checkpoint. The pick at each position must be
  transformers' argmax, or (a near-tie) within the type's tolerance of it;
  and max |logit diff| stays under that tolerance.
- LLaMA and MPT q8_0 / q4_0: llama.cpp decodes the blocks with its own code,
  smolq's reference forward pass with smolq's kernel, both from the same file;
  they must agree (top-1 up to near-ties, small max |diff| and KL). A wrong
  block layout, scale or nibble order would make them disagree. Against
  transformers only a sanity bound holds: q4_0 of a 64-wide model is lossy.
- llama.cpp's own greedy sampler continues as transformers' greedy decoding.
- llama.cpp's tokenizer, reading smolq's tokenizer.ggml.* keys, splits text
  as SentencePiece (LLaMA, tokenizer.model) and `tokenizers` (MPT) do.
- GGUF v2 gives llama.cpp's logits bit for bit as v3; v1 is refused by modern
  llama.cpp (so --format gguf-v1 is for old readers) but reads back in smolq.
- GPT-J in GPT4All 2.5.1 (libgptj reads GGUF `gptj`): greedy tokens after a
  few prompts equal transformers' greedy continuation of the same prompt ids,
  and its tokenizer's ids decode back to the prompt through the HF vocab.

Near-tie tolerances (what the engine's arithmetic changes, measured on these
models; the bounds leave a few times headroom):
  f32 LLaMA: ~3e-6 with an F32 KV cache -> 1e-4
  f32 MPT:   ~3e-3 (ggml's GELU reads a table indexed by the f16-rounded
             input; transformers uses exact erf GELU) -> 2e-2
  f16:       ~1e-2 (weights and, in ggml's f16 matmul, activations rounded) -> 6e-2
  q8_0/q4_0 vs reference: ~0.1-0.2 (llama.cpp quantizes activations to q8
             for these dot products) -> 0.5, KL < 5e-3
"""
from __future__ import annotations

import numpy as np
import pytest
from real_loaders import (
    ReaderRefused,
    check_choices,
    gpt4all_dir,
    hf_greedy,
    llama_cpp_greedy,
    llama_cpp_logits,
    open_llama,
    probe_sequences,
    require_gpt4all,
    require_llama_cpp,
    run_gpt4all,
    top2_margin,
)

from smolq.pipeline.convert import convert
from smolq.sources.reference import hf_logits, logit_stats, logits_from_file

LLAMA_VARIANTS = {"llama": {}, "llama-gqa": {"gqa": True}, "llama-tied": {"tied": True},
                  "llama-gqa-tied": {"gqa": True, "tied": True}}
MPT_VARIANTS = {"mpt": {}, "mpt-clip": {"config_overrides": {"attn_config": {"clip_qkv": 0.5}}}}
FLOAT_TOL = {("llama", "f32"): 1e-4, ("mpt", "f32"): 2e-2, ("llama", "f16"): 6e-2, ("mpt", "f16"): 6e-2}
QUANT_TOL, QUANT_KL = 0.5, 5e-3
# GPT-J: the default tiny vocab, and GPT-J-6B's 50400 (50257 BPE + 143 added tokens).
GPTJ_VARIANTS = {"gptj": {}, "gptj-50400": {"vocab_size": "legacy"}}
SEQ_LEN = 24


def _family(name: str) -> str:
    return name.split("-")[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> HF checkpoint dir, built once per module on first use."""
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("real-gguf")
    made: dict = {}

    def get(name: str):
        if name not in made:
            kwargs = {**LLAMA_VARIANTS, **MPT_VARIANTS, **GPTJ_VARIANTS}[name]
            made[name] = make_tiny_model(_family(name), root / name, **kwargs)
        return made[name]

    return get


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """(name, outtype, format) -> converted file, cached."""
    root = tmp_path_factory.mktemp("real-gguf-out")
    made: dict = {}

    def get(name: str, outtype: str, fmt: str = "gguf"):
        key = (name, outtype, fmt)
        if key not in made:
            made[key] = root / f"{name}-{outtype}-{fmt}.gguf"
            convert(tiny(name), made[key], format=fmt, outtype=outtype)
        return made[key]

    return get


def _sequences(src, llm) -> np.ndarray:
    import json

    return probe_sequences(llm, json.loads((src / "config.json").read_text())["vocab_size"], SEQ_LEN)


def _assert_picks_match(reference: np.ndarray, engine: np.ndarray, tol: float, what: str) -> None:
    """At every position the engine's argmax is the reference's, or a near-tie within tol."""
    ref = reference.reshape(-1, reference.shape[-1])
    got = engine.reshape(-1, engine.shape[-1])
    check = check_choices(ref, got.argmax(-1))
    stats = logit_stats(ref, got)
    assert check.worst_gap <= tol, f"{what}: engine picked tokens the reference ranks lower ({check}; {stats})"
    assert stats["max_abs_diff"] <= tol, f"{what}: logits differ ({stats}; picks {check})"
    # Near-ties within tol are rare; most positions must match outright.
    near_ties = int(np.sum(top2_margin(ref) <= tol))
    assert check.n_exact >= check.n_positions - near_ties, f"{what}: {check}, only {near_ties} near-ties"


# ------------------------------------------------------------------------------------------ llama.cpp


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("name", [*LLAMA_VARIANTS, *MPT_VARIANTS])
def test_llama_cpp_float_logits_match_transformers(converted, tiny, name, outtype):
    require_llama_cpp()
    path = converted(name, outtype)
    llm = open_llama(path)
    tokens = _sequences(tiny(name), llm)
    ours = np.stack(llama_cpp_logits(llm, tokens))
    theirs = hf_logits(tiny(name), tokens)
    _assert_picks_match(theirs, ours, FLOAT_TOL[_family(name), outtype], f"{name} {outtype} llama.cpp vs transformers")


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["llama", "llama-gqa", "llama-tied", "mpt"])
def test_llama_cpp_quantized_logits_match_reference(converted, tiny, name, outtype):
    require_llama_cpp()
    path = converted(name, outtype)
    llm = open_llama(path)
    tokens = _sequences(tiny(name), llm)
    ours = np.stack(llama_cpp_logits(llm, tokens))
    reference = logits_from_file(path, tokens)
    _assert_picks_match(reference, ours, QUANT_TOL, f"{name} {outtype} llama.cpp vs smolq reference")
    stats = logit_stats(reference, ours)
    assert stats["kl_div"] < QUANT_KL, stats
    # Sanity: still the same model as the checkpoint, only rounded.
    vs_hf = logit_stats(hf_logits(tiny(name), tokens), ours)
    assert vs_hf["kl_div"] < 0.5 and vs_hf["top1_agreement"] >= 0.4, vs_hf


@pytest.mark.parametrize("name", ["llama-gqa", "mpt"])
def test_llama_cpp_greedy_generation_matches_transformers(converted, tiny, name):
    require_llama_cpp()
    llm = open_llama(converted(name, "f32"))
    prompt = llm.tokenize(b"The dog sleeps while the fox", add_bos=True)
    n = 12
    got = llama_cpp_greedy(llm, prompt, n)
    want = hf_greedy(tiny(name), prompt, n)
    if got != want:  # allowed only where transformers itself has a near-tie on the engine's path
        logits = hf_logits(tiny(name), np.asarray([prompt + got]))[0, len(prompt) - 1:-1]
        check = check_choices(logits, got)
        assert check.worst_gap <= FLOAT_TOL[_family(name), "f32"], (got, want, str(check))


def _reference_tokenizer(name, src):
    """The tokenizer the checkpoint was made with: SentencePiece's own model for
    LLaMA (tokenizer.model), the `tokenizers` BPE for MPT."""
    if _family(name) == "llama":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        return lambda text: [sp.bos_id(), *sp.encode(text)]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    return lambda text: tok.encode(text).ids


@pytest.mark.parametrize("name", ["llama", "mpt"])
def test_llama_cpp_tokenizer_matches_source_tokenizer(converted, tiny, name):
    require_llama_cpp()
    from smolq.tiny import TINY_TEXT

    llm = open_llama(converted(name, "f16"))
    reference = _reference_tokenizer(name, tiny(name))
    add_bos = _family(name) == "llama"
    texts = TINY_TEXT.splitlines() + ["  two  spaces", "\nnewline first", "tab\there", "Ünïcödé 東京 …"]
    got = llm.run([{"op": "tokenize", "text": text, "add_bos": add_bos, "special": False} for text in texts])
    for text, ids in zip(texts, got):
        assert ids == reference(text), repr(text)


@pytest.mark.parametrize("name", ["llama-gqa", "mpt"])
def test_gguf_v2_runs_like_v3(converted, tiny, name):
    require_llama_cpp()
    v3, v2 = open_llama(converted(name, "f16", "gguf-v3")), open_llama(converted(name, "f16", "gguf-v2"))
    tokens = _sequences(tiny(name), v3)
    for a, b in zip(llama_cpp_logits(v3, tokens), llama_cpp_logits(v2, tokens)):
        np.testing.assert_array_equal(a, b)


def test_gguf_v1_refused_by_llama_cpp_but_read_by_smolq(converted, tiny):
    require_llama_cpp()
    v1, v3 = converted("llama", "f16", "gguf-v1"), converted("llama", "f16", "gguf-v3")
    with open(v1, "rb") as f:
        assert f.read(8) == b"GGUF" + (1).to_bytes(4, "little")
    with pytest.raises(ReaderRefused):  # llama.cpp: "GGUFv1 is no longer supported" (a refusal, not a crash)
        open_llama(v1).tokenize(b"x")
    tokens = np.arange(12, dtype=np.int64)[None, :] + 5
    np.testing.assert_array_equal(logits_from_file(v1, tokens), logits_from_file(v3, tokens))


# ------------------------------------------------------------------------------------------ GPT4All 2.5.1

GPTJ_PROMPTS = ["The quick brown fox", " the dog sleeps", "Numbers: 0 1 2", "café, naïve — 東京"]
GPTJ_TOL = {"f32": 6e-2, "f16": 6e-2}  # GPT4All's GPT-J keeps its KV cache in F16 whatever the weights
N_PREDICT = 10


@pytest.mark.parametrize("name,outtype", [("gptj", "f32"), ("gptj", "f16"), ("gptj-50400", "f16")])
def test_gpt4all_gptj_gguf_greedy_matches_transformers(converted, tiny, name, outtype):
    g4a = require_gpt4all("2.5.1")
    from transformers import AutoTokenizer

    src = tiny(name)
    gens = run_gpt4all(g4a, converted(name, outtype), GPTJ_PROMPTS, N_PREDICT, threads=1)
    hf_tok = AutoTokenizer.from_pretrained(src)
    for gen in gens:
        # GPT4All does not use the merges: it matches the longest vocab string,
        # and (ggml's old gpt_tokenize) emits the next byte on its own after
        # every match ("There" -> T h er e, where BPE gives T he re). So its ids
        # differ from transformers', but they must spell the prompt through the
        # HF vocab: smolq's vocab strings are the right bytes.
        assert hf_tok.decode(gen.prompt_tokens) == gen.prompt, (gen.prompt, gen.prompt_tokens)
        assert len(gen.tokens) == N_PREDICT, gen
        want = hf_greedy(src, gen.prompt_tokens, N_PREDICT)
        if gen.tokens != want:  # only a near-tie on GPT4All's own path may explain a difference
            logits = hf_logits(src, np.asarray([gen.prompt_tokens + gen.tokens]))[0, len(gen.prompt_tokens) - 1:-1]
            check = check_choices(logits, gen.tokens)
            assert check.worst_gap <= GPTJ_TOL[outtype], (gen.prompt, gen.tokens, want, str(check))


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_gpt4all_gptj_gguf_quantized_matches_reference(converted, outtype):
    """GPT4All decodes smolq's blocks with its own ggml; the reference pass decodes
    them with smolq's kernel. Its greedy picks must be the reference's argmax
    (teacher-forced on GPT4All's own tokens), up to near-ties."""
    g4a = require_gpt4all("2.5.1")
    path = converted("gptj", outtype)
    for gen in run_gpt4all(g4a, path, GPTJ_PROMPTS, N_PREDICT, threads=1):
        assert len(gen.tokens) == N_PREDICT, gen
        seq = np.asarray([gen.prompt_tokens + gen.tokens])
        logits = logits_from_file(path, seq)[0, len(gen.prompt_tokens) - 1:-1]
        check = check_choices(logits, gen.tokens)
        assert check.worst_gap <= QUANT_TOL, (gen.prompt, gen.tokens, str(check))


def test_gpt4all_gptj_gguf_v2_generates_as_v3(converted):
    g4a = require_gpt4all("2.5.1")
    v3 = run_gpt4all(g4a, converted("gptj", "f16", "gguf-v3"), GPTJ_PROMPTS[:2], N_PREDICT)
    v2 = run_gpt4all(g4a, converted("gptj", "f16", "gguf-v2"), GPTJ_PROMPTS[:2], N_PREDICT)
    assert v2 == v3


def test_gpt4all_dir_lookup_reports_absence(monkeypatch, tmp_path):
    """The helper finds nothing in an empty override dir (so tests skip instead of erroring)."""
    monkeypatch.setenv("SMOLQ_GPT4ALL_9_9_9", str(tmp_path))
    assert gpt4all_dir("9.9.9") is None
