"""Llama 3.x, Mistral, Qwen2 and Qwen3: smolq's GGUF against llama.cpp's own converter, and run by llama.cpp.

The converter is the one tests/test_vs_llama_converter.py runs (the llama-cpp-python
0.3.36 sdist's convert_hf_to_gguf.py), in a child process, on the same tiny
checkpoints: Llama 3.1 (byte-level BPE with Llama 3's pre-tokenizer, llama3 RoPE
scaling -> rope_freqs, GQA with head_dim 128, both config layouts), Mistral
(SentencePiece and byte-level BPE), Qwen2 (q/k/v biases, unused embedding rows,
both config layouts) and Qwen3 (q/k norms, head_dim != hidden / heads, chat template
in chat_template.jinja), at f32, f16, bf16 and q8_0. Compared, with gguf-py's
reader: every tensor (name, type, shape, bytes) and every key (type and value).

The pre-tokenizer. A tiny tokenizer's check-text hash is in no table: llama.cpp's
converter stops on it. So the driver tells the converter, for each tiny model, that
the hash smolq computes for its tokenizer is a known one (it wraps the converter's
sha256 so that this one digest reads as the known name's entry), and smolq's table
gets the same entry: the conversion goes through both tables' lookup, and both
files can only agree if both sides hash the same token ids (the child also reports
the digests the converter computed, compared with smolq's below). The table itself
is checked against the converter's function in tests/test_bpe_pre.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from real_loaders import check_choices, llama_cpp_logits, open_llama, probe_sequences

from smolq.errors import InputError
from smolq.pipeline.convert import convert
from smolq.sources import bpe_pre
from tests.test_vs_llama_converter import ALLOWED_METADATA, FETCH_HINT, converter_dir, fields, read, \
    run_llama_converter, tensors

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
HEAD_DIM_128 = {"head_dim": 128}  # Llama 3's head size: rope_freqs then has Llama 3.1's 64 factors

# name -> (family, make_tiny_model options, the tokenizer.ggml.pre llama.cpp knows this tokenizer style as)
MODELS = {
    "llama3-rope": ("llama", {"bpe": "llama3", "llama3_rope": True, "gqa": True, "config_overrides": HEAD_DIM_128},
                    "llama-bpe"),
    "llama3-rope-top-tied": ("llama", {"bpe": "llama3", "llama3_rope": True, "tied": True, "rope_params_style": "top"},
                             "llama-bpe"),
    "mistral": ("mistral", {}, None),
    "mistral-bpe-bf16": ("mistral", {"bpe": "llama3", "dtype": "bfloat16"}, "llama-bpe"),
    "qwen2": ("qwen2", {}, "qwen2"),
    "qwen2-tied-top": ("qwen2", {"tied": True, "rope_params_style": "top"}, "qwen2"),
    "qwen3-tied": ("qwen3", {"tied": True}, "qwen2"),
    "qwen3-bf16": ("qwen3", {"dtype": "bfloat16"}, "qwen2"),
}
PAIRS = [(m, t) for m in MODELS for t in OUTTYPES]
UNKNOWN = "llama3-unknown-pre"  # a pre-tokenizer neither table nor form knows

# The child: the converter with a sha256 that reads each aliased digest as its known entry's, and
# records every digest it computed; jobs listed in "expect_failure" report their exception's type.
DRIVER = r"""
import hashlib, json, sys, traceback
conv, jobs_path, result_path = sys.argv[1:4]
sys.path[:0] = [conv + "/gguf-py", conv]
import gguf
import convert_hf_to_gguf
import conversion.base as base

jobs = json.load(open(jobs_path))
aliases, seen = jobs["aliases"], []

class _Digest:
    def __init__(self, data=b""):
        self.real = hashlib.sha256(data).hexdigest()
        seen.append(self.real)
    def hexdigest(self):
        return aliases.get(self.real, self.real)

base.sha256 = _Digest
result = {"gguf_py": gguf.__file__, "digests": {}, "failures": {}}
for name, argv in jobs["convert"]:
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    start = len(seen)
    try:
        convert_hf_to_gguf.main()
    except Exception as exc:
        if name not in jobs["expect_failure"]:
            raise
        result["failures"][name] = type(exc).__name__
    result["digests"].setdefault(name, []).extend(seen[start:])
json.dump(result, open(result_path, "w"))
"""


def _unknown_pre_tokenizer(d: Path) -> None:
    """Llama 3's tokenizer with its Split regex changed to one llama.cpp has no name for."""
    path = d / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+"
    path.write_text(json.dumps(tok))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    conv = converter_dir()
    if conv is None:
        pytest.skip(f"llama.cpp's converter is not fetched; {FETCH_HINT}")
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("vs-converter-families")
    dirs = {name: make_tiny_model(family, root / name, **options) for name, (family, options, _) in MODELS.items()}
    dirs[UNKNOWN] = make_tiny_model("llama", root / UNKNOWN, bpe="llama3")
    _unknown_pre_tokenizer(dirs[UNKNOWN])
    digests = {name: bpe_pre.check_hash(d / "tokenizer.json") for name, d in dirs.items()
               if name == UNKNOWN or MODELS[name][2] is not None}
    aliases = {digests[name]: _known_digest(MODELS[name][2]) for name in digests if name != UNKNOWN}

    files, jobs = {}, []
    with pytest.MonkeyPatch.context() as mp:
        for name, digest in digests.items():
            if name != UNKNOWN:
                mp.setitem(bpe_pre.KNOWN_PRE, digest, MODELS[name][2])
        for name, outtype in PAIRS:
            ours, theirs = root / f"{name}.{outtype}.smolq.gguf", root / f"{name}.{outtype}.llama.gguf"
            summary = convert(dirs[name], ours, outtype=outtype)
            jobs.append([name, [str(dirs[name]), "--outfile", str(theirs), "--outtype", outtype]])
            files[(name, outtype)] = (ours, theirs, summary)
    jobs.append([UNKNOWN, [str(dirs[UNKNOWN]), "--outfile", str(root / "unknown.gguf"), "--outtype", "f32"]])
    result = run_llama_converter(conv, jobs, {}, root, driver=DRIVER, aliases=aliases, expect_failure=[UNKNOWN])
    return {"files": files, "dirs": dirs, "result": result, "digests": digests, "converter": conv}


def _known_digest(name: str) -> str:
    """A digest llama.cpp's table maps to `name` (the tiny tokenizer stands in for that tokenizer)."""
    return next(h for h, n in bpe_pre.KNOWN_PRE.items() if n == name)


def test_converter_is_the_vendored_one(families):
    gguf_py = Path(families["result"]["gguf_py"]).resolve()
    assert families["converter"].resolve() / "gguf-py" in gguf_py.parents


@pytest.mark.parametrize("model,outtype", PAIRS)
def test_same_tensors(families, model, outtype):
    ours_path, theirs_path, _ = families["files"][(model, outtype)]
    ours, theirs = tensors(read(ours_path)), tensors(read(theirs_path))
    assert sorted(ours) == sorted(theirs)  # order differs on purpose (see test_vs_llama_converter.py)
    for name, (t_ours, shape_ours, data_ours) in ours.items():
        t_theirs, shape_theirs, data_theirs = theirs[name]
        assert (t_ours, shape_ours) == (t_theirs, shape_theirs), name
        if name == "rope_freqs.weight" and data_ours != data_theirs:
            # Llama 3 RoPE factors: the converter takes a float32 power with torch (Sleef, not
            # correctly rounded), smolq the correctly rounded one (the same on every machine):
            # 1 ULP apart on some frequencies, and only there.
            a, b = np.frombuffer(data_ours, np.float32), np.frombuffer(data_theirs, np.float32)
            np.testing.assert_array_max_ulp(a, b, maxulp=1)
            continue
        assert data_ours == data_theirs, f"{name}: tensor bytes differ"


@pytest.mark.parametrize("model,outtype", PAIRS)
def test_same_metadata(families, model, outtype):
    ours_path, theirs_path, _ = families["files"][(model, outtype)]
    ours, theirs = fields(read(ours_path)), fields(read(theirs_path))
    keys = (set(ours) | set(theirs)) - set(ALLOWED_METADATA)
    assert "general.size_label" not in ours
    assert sorted(k for k in keys if k not in ours) == [], "keys llama.cpp writes and smolq does not"
    assert sorted(k for k in keys if k not in theirs) == [], "keys smolq writes and llama.cpp does not"
    differ = {k: (ours[k], theirs[k]) for k in sorted(keys) if ours[k] != theirs[k]}
    assert not differ, f"metadata differs (smolq, llama.cpp): {str(differ)[:2000]}"


def test_the_converter_hashed_what_smolq_hashed(families):
    """The check-text digest of each tokenizer, as the converter computed it, is smolq's
    (without the alias the converter would have stopped; this says why it did not)."""
    seen = families["result"]["digests"]
    for name, digest in families["digests"].items():
        assert digest in seen[name], name
    assert families["digests"][UNKNOWN] in seen[UNKNOWN]


@pytest.mark.parametrize("model", [m for m in MODELS if MODELS[m][2]])
def test_pre_tokenizer_is_the_known_name(families, model):
    ours_path, _, summary = families["files"][(model, "f16")]
    assert fields(read(ours_path))["tokenizer.ggml.pre"][1] == MODELS[model][2]
    assert not any("not in llama.cpp's table" in n for n in summary["notes"])  # found by the hash


def test_unknown_pre_tokenizer_is_refused_like_the_converter(families, tmp_path):
    """llama.cpp's converter stops (NotImplementedError); smolq says so in one line naming the hash."""
    assert families["result"]["failures"][UNKNOWN] == "NotImplementedError"
    out = tmp_path / "m.gguf"
    with pytest.raises(InputError) as err:
        convert(families["dirs"][UNKNOWN], out)
    digest = bpe_pre.check_hash(families["dirs"][UNKNOWN] / "tokenizer.json")
    assert digest in err.value.message and "unknown BPE pre-tokenizer" in err.value.message
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["llama3-rope", "llama3-rope-top-tied"])
def test_rope_freqs_is_llama31_scaling(families, model):
    """An anchor independent of both converters: every factor is 1, the scaling factor 8, or
    between them, and the longest wavelengths get 8 (Llama 3.1's rule)."""
    theirs = tensors(read(families["files"][(model, "f32")][1]))
    t, shape, data = theirs["rope_freqs.weight"]
    factors = np.frombuffer(data, dtype="<f4")
    assert t == 0 and factors[0] == 1.0 and factors[-1] == 8.0
    assert {1.0, 8.0} < set(factors.tolist()) and np.all((factors >= 1.0) & (factors <= 8.0))
    assert "llama.rope.scaling.type" not in fields(read(families["files"][(model, "f32")][0]))


@pytest.mark.parametrize("model", ["qwen2", "qwen3-tied"])
def test_chat_tokens_are_typed_as_llama_cpp_types_them(families, model):
    """Spelled out (the whole vocabulary is compared in test_same_metadata)."""
    kv = fields(read(families["files"][(model, "f32")][0]))
    tokens, types = kv["tokenizer.ggml.tokens"][1], kv["tokenizer.ggml.token_type"][1]
    kind = dict(zip(tokens, types))
    assert kind["<|im_start|>"] == 3 and kind["<|endoftext|>"] == 3  # CONTROL
    assert kind["<think>"] == 4  # USER_DEFINED: not flagged special, does not look special
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == 5  # Qwen's unused embedding rows
    assert kv["tokenizer.chat_template"][1].startswith("{% for m in messages %}")


# --------------------------------------------------------------------------- llama.cpp runs them

FLOAT_TOL = 1e-3  # f32 file, f32 KV cache: what is left is float32 rounding in both engines


@pytest.mark.parametrize("model", list(MODELS))
def test_llama_cpp_logits_match_transformers(families, model):
    from smolq.sources.reference import hf_logits, logit_stats

    path = families["files"][(model, "f32")][0]
    src = families["dirs"][model]
    llm = open_llama(path)
    tokens = probe_sequences(llm, json.loads((src / "config.json").read_text())["vocab_size"], 24)
    ours = np.stack(llama_cpp_logits(llm, tokens))
    ref = hf_logits(src, tokens)
    stats = logit_stats(ref.reshape(-1, ref.shape[-1]), ours.reshape(-1, ours.shape[-1]))
    assert stats["max_abs_diff"] <= FLOAT_TOL, stats
    assert check_choices(ref.reshape(-1, ref.shape[-1]), ours.reshape(-1, ours.shape[-1]).argmax(-1)).worst_gap <= FLOAT_TOL
