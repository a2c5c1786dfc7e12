"""smolq's GGUF against llama.cpp's own converter (convert_hf_to_gguf.py), run on the same tiny models.

The converter comes from the llama.cpp tree vendored in the llama-cpp-python
0.3.36 sdist (scripts/fetch_llama_converter.py puts convert_hf_to_gguf.py,
conversion/ and gguf-py/ into .venv/real/llama.cpp-converter). It runs in a
child process, offline, with its own gguf-py first on PYTHONPATH (its code uses
constants the installed gguf release may lack), all conversions in one process
to pay the torch/transformers import once. Both files are then read with the
installed gguf package's GGUFReader, not with smolq's reader.

Compared, for tiny LLaMA (MHA and GQA, tied and untied, rope_theta nested in
rope_parameters and at the top level, f32/f16/bf16 sources, safetensors and
sharded .bin, HF added tokens) and MPT (with and without clip_qkv) at --outtype
f32, f16 and q8_0: tensor names, shapes, types and bytes; every metadata key
with its value type and value. What differs on purpose is listed below
(ALLOWED_METADATA, tensor order, and the MPT tests), each with why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType

from smolq.pipeline.convert import convert

REPO = Path(__file__).resolve().parents[1]
FETCH_HINT = "run: python scripts/fetch_llama_converter.py (or set SMOLQ_LLAMA_CONVERTER)"
CONVERTER_TIMEOUT_S = 600

# Keys whose values legitimately differ. Both files must still carry the key
# unless the entry says it is written by one side only.
ALLOWED_METADATA = {
    # Provenance: llama.cpp title-cases the directory name (e.g. "llama_mha" -> "Llama_Mha");
    # smolq writes config.json's _name_or_path or the directory name unchanged.
    "general.name": "value",
    # Provenance: llama.cpp's parameter-count label ("156K"); optional, smolq does not write it.
    "general.size_label": "llama.cpp only",
}

# tokenizer.ggml.token_type values
UNUSED, CONTROL = 5, 3
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
OUTTYPES = ("f32", "f16", "q8_0")
# transformers 5's GPTNeoXTokenizer (the tiny MPT's tokenizer_class) adds this pad token when the
# tokenizer has none; llama.cpp's converter reads the vocabulary through AutoTokenizer and so gets it.
TRANSFORMERS_DEFAULT_PAD = "<|padding|>"


# --------------------------------------------------------------------------- locating the converter


def converter_dir() -> Path | None:
    env = os.environ.get("SMOLQ_LLAMA_CONVERTER")
    candidates = [Path(env)] if env else [Path(sys.prefix) / "real" / "llama.cpp-converter",
                                          REPO / ".venv" / "real" / "llama.cpp-converter"]
    for path in candidates:
        if (path / "convert_hf_to_gguf.py").is_file() and (path / "conversion").is_dir() \
                and (path / "gguf-py" / "gguf").is_dir():
            return path
    return None


# The child process: import the converter as a module and call its main() once per job.
# The tiny MPT's made-up BPE tokenizer has a pre-tokenizer hash llama.cpp does not know (it
# raises NotImplementedError); for MPT the hook answers "mpt", the name llama.cpp's hash
# table gives mosaicml/mpt-7b's tokenizer, so the file is what llama.cpp writes for real MPT.
DRIVER = r"""
import json, sys
conv, jobs_path, result_path = sys.argv[1:4]
sys.path[:0] = [conv + "/gguf-py", conv]
import gguf
import convert_hf_to_gguf
from conversion.base import TextModel

_pre = TextModel.get_vocab_base_pre
def _pre_for_tiny_mpt(self, tokenizer):
    if self.model_arch == gguf.MODEL_ARCH.MPT:
        return "mpt"
    return _pre(self, tokenizer)
TextModel.get_vocab_base_pre = _pre_for_tiny_mpt

jobs = json.load(open(jobs_path))
result = {"gguf_py": gguf.__file__, "special_vocab": {}}
for argv in jobs["convert"]:
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()
for name, directory in jobs["special_vocab"].items():
    sv = gguf.SpecialVocab(directory, load_merges=False)
    result["special_vocab"][name] = dict(sv.add_special_token)
json.dump(result, open(result_path, "w"))
"""


def run_llama_converter(conv: Path, converts: list[list[str]], special_vocab: dict[str, str], work: Path,
                        driver: str = DRIVER, **extra) -> dict:
    """Run `driver` in a child process with jobs.json = {"convert": ..., "special_vocab": ..., **extra}."""
    jobs, result = work / "jobs.json", work / "result.json"
    jobs.write_text(json.dumps({"convert": converts, "special_vocab": special_vocab, **extra}))
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(conv / "gguf-py"), str(conv)]))
    proc = subprocess.run([sys.executable, "-c", driver, str(conv), str(jobs), str(result)], env=env,
                          capture_output=True, text=True, timeout=CONVERTER_TIMEOUT_S, cwd=work)
    if proc.returncode != 0:
        pytest.fail(f"llama.cpp's converter failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


# --------------------------------------------------------------------------- models and conversions

def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def _mpt_architecture_name(d: Path) -> None:
    # llama.cpp registers MPT under the name MosaicML's configs use, "MPTForCausalLM";
    # transformers' save_pretrained writes its own class name "MptForCausalLM".
    _edit_json(d / "config.json", architectures=["MPTForCausalLM"])


N_PIECES = 384  # SentencePiece pieces in the added-tokens variant; its model has 388 rows


def _llama_added_tokens(d: Path) -> None:
    """Added tokens as HF LLaMA repos carry them (GPT4All-13b-snoozy's <pad> in added_tokens.json;
    tokenizer_config's added_tokens_decoder re-listing <unk>/<s>/</s>, as transformers >= 4.34 saves
    it), one added token that only looks special, one with '▁', and one id nobody defines."""
    from smolq.tiny import build_sentencepiece_model

    (d / "tokenizer.model").write_bytes(build_sentencepiece_model(N_PIECES))
    (d / "added_tokens.json").write_text(json.dumps({"<pad>": N_PIECES}))
    decoder = {"0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
               "2": {"content": "</s>", "special": True}, str(N_PIECES): {"content": "<pad>", "special": True},
               str(N_PIECES + 1): {"content": "<|im_start|>", "special": False},
               str(N_PIECES + 2): {"content": "\u2581user", "special": False}}
    _edit_json(d / "tokenizer_config.json", added_tokens_decoder=decoder)


# name -> (family, make_tiny_model options, edit of the written directory)
MODELS = {
    "llama-mha": ("llama", {}, None),
    "llama-gqa-tied-top": ("llama", {"gqa": True, "tied": True, "rope_params_style": "top"}, None),
    "llama-gqa-bf16": ("llama", {"gqa": True, "dtype": "bfloat16"}, None),
    "llama-added-tokens": ("llama", {"vocab_size": N_PIECES + 4}, _llama_added_tokens),
    "llama-bin-shards": ("llama", {"weights": "bin", "shards": 2, "dtype": "float16"}, None),
    "mpt": ("mpt", {}, _mpt_architecture_name),
    "mpt-clip-f16": ("mpt", {"dtype": "float16", "config_overrides": {"attn_config": {"clip_qkv": 6.0, "alibi_bias_max": 4}}},
                     _mpt_architecture_name),
}
PAIRS = [(m, t) for m in MODELS for t in OUTTYPES]


# tokenizer.json / tokenizer_config.json pairs on which smolq's add_bos/eos/sep rule is
# checked against gguf-py's SpecialVocab (the code llama.cpp's converter calls).
def _special(tok):
    return {"SpecialToken": {"id": tok, "type_id": 0}}


def _seq(name):
    return {"Sequence": {"id": name, "type_id": 0}}


def _template(single, pair):
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": {}}


POST_PROCESSOR_CASES = {
    "bytelevel": ({"type": "ByteLevel", "trim_offsets": False}, {"bos_token": "<|endoftext|>"}),
    "bytelevel-config-says-bos": ({"type": "ByteLevel"}, {"bos_token": "<s>", "add_bos_token": True}),
    "llama3-sequence": ({"type": "Sequence", "processors": [
        {"type": "ByteLevel"},
        _template([_special("<|begin_of_text|>"), _seq("A")],
                  [_special("<|begin_of_text|>"), _seq("A"), _special("<|begin_of_text|>"), _seq("B")])]},
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    "bert-template": (_template([_special("[CLS]"), _seq("A"), _special("[SEP]")],
                                [_special("[CLS]"), _seq("A"), _special("[SEP]"), _seq("B"), _special("[SEP]")]),
                      {"cls_token": "[CLS]", "sep_token": "[SEP]"}),
    "bart-pair-two-separators": (_template([_special("<s>"), _seq("A")],
                                           [_special("<s>"), _seq("A"), _special("</s>"), _special("</s>"), _seq("B")]),
                                 {"bos_token": "<s>", "eos_token": "</s>"}),
    "unknown-leading-special": (_template([_special("<x>"), _seq("A")], []),
                                {"bos_token": "<s>", "cls_token": "<c>", "add_bos_token": True}),
    "leading-special-no-config": (_template([_special("<s>"), _seq("A"), _special("</s>")], []), {}),
    "trailing-special-not-eos": (_template([_special("<s>"), _seq("A"), _special("<eot>")], []),
                                 {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": False}),
    "roberta": ({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]},
                {"bos_token": "<s>", "eos_token": "</s>"}),
    "no-post-processor": (None, {"add_bos_token": True, "add_eos_token": False}),
}


def _write_tokenizer_case(directory: Path, post, config: dict) -> None:
    directory.mkdir(parents=True)
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
           "post_processor": post, "decoder": None, "model": {"type": "BPE", "vocab": {}, "merges": []}}
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{(model, outtype): (smolq file, llama.cpp file)}, plus the model dirs and the child's result."""
    conv = converter_dir()
    if conv is None:
        pytest.skip(f"llama.cpp's converter is not fetched; {FETCH_HINT}")
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("vs-llama-converter")
    dirs = {}
    for name, (family, options, edit) in MODELS.items():
        d = make_tiny_model(family, root / name, **options)
        if edit is not None:
            edit(d)
        dirs[name] = d
    cases = {}
    for name, (post, config) in POST_PROCESSOR_CASES.items():
        _write_tokenizer_case(root / "tok" / name, post, config)
        cases[name] = str(root / "tok" / name)

    files, jobs = {}, []
    for name, outtype in PAIRS:
        ours, theirs = root / f"{name}.{outtype}.smolq.gguf", root / f"{name}.{outtype}.llama.gguf"
        convert(dirs[name], ours, outtype=outtype)
        jobs.append([str(dirs[name]), "--outfile", str(theirs), "--outtype", outtype])
        files[(name, outtype)] = (ours, theirs)
    result = run_llama_converter(conv, jobs, cases, root)
    return {"files": files, "dirs": dirs, "result": result, "converter": conv}


def read(path: Path):
    return GGUFReader(str(path))


def fields(reader) -> dict[str, tuple[list[str], object]]:
    """key -> (value type names, incl. the array item type, value), as gguf-py decodes it."""
    return {name: ([GGUFValueType(t).name for t in f.types], f.contents())
            for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def tensors(reader) -> dict[str, tuple[int, list[int], bytes]]:
    out = {}
    for t in reader.tensors:
        assert t.name not in out, f"duplicate tensor {t.name}"
        out[t.name] = (int(t.tensor_type), [int(x) for x in t.shape], bytes(t.data.tobytes()))
    return out


def _config_rope_theta(model_dir: Path) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    return float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])


# --------------------------------------------------------------------------- the comparisons


def test_converter_is_the_vendored_one(converted):
    gguf_py = Path(converted["result"]["gguf_py"]).resolve()
    assert converted["converter"].resolve() / "gguf-py" in gguf_py.parents


@pytest.mark.parametrize("model,outtype", PAIRS)
def test_same_tensors(converted, model, outtype):
    """Names, shapes, ggml types and bytes; MPT's output.weight is the one deliberate extra."""
    ours_path, theirs_path = converted["files"][(model, outtype)]
    ours, theirs = tensors(read(ours_path)), tensors(read(theirs_path))
    if model.startswith("mpt"):
        ours = dict(ours)
        ours.pop("output.weight")  # checked in test_mpt_output_weight_is_the_tied_embedding
    # Order differs on purpose: llama.cpp writes tensors in the order the checkpoint stores
    # them (lm_head first, alphabetical within a block, blk.10 before blk.2 past ten layers);
    # smolq writes the architecture's order. GGUF readers look tensors up by name.
    assert sorted(ours) == sorted(theirs)
    for name, (t_ours, shape_ours, data_ours) in ours.items():
        t_theirs, shape_theirs, data_theirs = theirs[name]
        assert (t_ours, shape_ours) == (t_theirs, shape_theirs), name
        assert data_ours == data_theirs, f"{name}: tensor bytes differ"


@pytest.mark.parametrize("model,outtype", PAIRS)
def test_same_metadata(converted, model, outtype):
    ours_path, theirs_path = converted["files"][(model, outtype)]
    ours, theirs = fields(read(ours_path)), fields(read(theirs_path))
    allowed = dict(ALLOWED_METADATA)
    if model.startswith("mpt"):
        allowed["general.file_type"] = "smolq only"  # test_mpt_file_type
        allowed["tokenizer.ggml.tokens"] = allowed["tokenizer.ggml.token_type"] = "tokens"  # test_mpt_vocab
    for key, how in allowed.items():
        if how == "value":
            assert key in ours and key in theirs, key
        elif how == "llama.cpp only":
            assert key not in ours, key
    keys = (set(ours) | set(theirs)) - set(allowed)
    assert sorted(k for k in keys if k not in ours) == [], "keys llama.cpp writes and smolq does not"
    assert sorted(k for k in keys if k not in theirs) == [], "keys smolq writes and llama.cpp does not"
    differ = {k: (ours[k], theirs[k]) for k in sorted(keys) if ours[k] != theirs[k]}
    assert not differ, f"metadata differs (smolq, llama.cpp): {str(differ)[:2000]}"


@pytest.mark.parametrize("model", [m for m in MODELS if m.startswith("llama")])
def test_rope_base_comes_from_the_config(converted, model):
    """The DESIGN pitfall: a 2025 converter dropped rope_theta given inside rope_parameters.
    The pinned converter (llama-cpp-python 0.3.36's) keeps it, nested or top-level. Should a
    converter drop it, this and test_same_metadata fail, and the difference must become an
    explicit one here: smolq writes the config's value whatever llama.cpp does."""
    ours_path, theirs_path = converted["files"][(model, "f16")]
    theta = _config_rope_theta(converted["dirs"][model])
    assert theta != 10000.0  # the tiny models use 50000 so that a dropped value shows
    assert fields(read(ours_path))["llama.rope.freq_base"] == (["FLOAT32"], theta)
    assert fields(read(theirs_path))["llama.rope.freq_base"] == (["FLOAT32"], theta)


@pytest.mark.parametrize("model,outtype", [(m, t) for m, t in PAIRS if m.startswith("mpt")])
def test_mpt_output_weight_is_the_tied_embedding(converted, model, outtype):
    """MPT ties its head to wte. llama.cpp's current converter writes no output.weight (its
    loader falls back to token_embd); its 2023 MPT converter duplicated wte into output.weight,
    and the loaders of that time (GPT4All's GGUF MPT among them) require it, so smolq keeps
    writing it: the same type and bytes as token_embd.weight in llama.cpp's file."""
    ours_path, theirs_path = converted["files"][(model, outtype)]
    ours, theirs = tensors(read(ours_path)), tensors(read(theirs_path))
    assert "output.weight" not in theirs
    assert ours["output.weight"] == theirs["token_embd.weight"]


@pytest.mark.parametrize("model,outtype", [(m, t) for m, t in PAIRS if m.startswith("mpt")])
def test_mpt_file_type(converted, model, outtype):
    """llama.cpp's MPTModel.set_gguf_parameters does not call the base class, which is where
    general.file_type is written, so its MPT files lack the key (llama-quantize adds it later).
    smolq writes it for every family."""
    ours_path, theirs_path = converted["files"][(model, outtype)]
    assert "general.file_type" not in fields(read(theirs_path))
    assert fields(read(ours_path))["general.file_type"] == (["UINT32"], FILE_TYPE[outtype])


@pytest.mark.parametrize("model", [m for m in MODELS if m.startswith("mpt")])
def test_mpt_vocab(converted, model):
    """Same tokens and types, except ids the tokenizer files do not define: llama.cpp reads the
    vocabulary through transformers, whose GPTNeoXTokenizer invents a pad token there (MPT-7B's
    real tokenizer has <|padding|> at id 1, so this happens only with the tiny tokenizer);
    smolq reads the files and writes [PADn] / UNUSED, as llama.cpp does for other unset ids."""
    ours_path, theirs_path = converted["files"][(model, "f16")]
    ours, theirs = fields(read(ours_path)), fields(read(theirs_path))
    tok = json.loads((converted["dirs"][model] / "tokenizer.json").read_text())
    defined = set(tok["model"]["vocab"].values()) | {a["id"] for a in tok["added_tokens"]}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert ours[key][0] == theirs[key][0], key
        assert len(ours[key][1]) == len(theirs[key][1]), key
    ours_tokens, theirs_tokens = ours["tokenizer.ggml.tokens"][1], theirs["tokenizer.ggml.tokens"][1]
    ours_types, theirs_types = ours["tokenizer.ggml.token_type"][1], theirs["tokenizer.ggml.token_type"][1]
    differ = [i for i in range(len(ours_tokens))
              if (ours_tokens[i], ours_types[i]) != (theirs_tokens[i], theirs_types[i])]
    assert len(differ) <= 1, differ
    for i in differ:
        assert i not in defined
        assert (theirs_tokens[i], theirs_types[i]) == (TRANSFORMERS_DEFAULT_PAD, CONTROL)
        assert (ours_tokens[i], ours_types[i]) == (f"[PAD{i}]", UNUSED)


@pytest.mark.parametrize("case", sorted(POST_PROCESSOR_CASES))
def test_add_token_flags_follow_gguf_py(converted, case):
    """smolq's add_bos/add_eos/add_sep rule, on hand-made post-processors, against the
    SpecialVocab of the converter's own gguf-py."""
    from smolq.sources.vocab import add_token_flags

    post, config = POST_PROCESSOR_CASES[case]
    tokenizer_json = {"post_processor": post}
    theirs = {k: v for k, v in converted["result"]["special_vocab"][case].items() if k in ("bos", "eos", "sep")}
    assert add_token_flags(tokenizer_json, config) == theirs


def test_file_types_are_what_the_outtype_says(converted):
    """An independent anchor for the f16/q8_0 comparisons: llama.cpp's LLaMA files carry the
    ftype ids of the outtype, and its q8_0 matrices are Q8_0 (8), norms F32 (0)."""
    for outtype, ftype in FILE_TYPE.items():
        _, theirs_path = converted["files"][("llama-mha", outtype)]
        r = read(theirs_path)
        assert fields(r)["general.file_type"] == (["UINT32"], ftype)
        kinds = {t.name: int(t.tensor_type) for t in r.tensors}
        assert kinds["blk.0.attn_norm.weight"] == 0
        assert kinds["blk.0.attn_q.weight"] == {"f32": 0, "f16": 1, "q8_0": 8}[outtype]


def test_added_tokens_as_llama_cpp_types_them(converted):
    """The variant's vocabulary (compared whole in test_same_metadata), spelled out: the rules
    smolq follows there are llama.cpp's, not SentencePiece's."""
    ours_path, _ = converted["files"][("llama-added-tokens", "f32")]
    kv = fields(read(ours_path))
    tokens, types, scores = (kv[f"tokenizer.ggml.{k}"][1] for k in ("tokens", "token_type", "scores"))
    n = N_PIECES
    assert (tokens[0], types[0], scores[0]) == ("<unk>", CONTROL, -1000.0)  # re-listed as special
    assert (tokens[n], types[n]) == ("<pad>", CONTROL)  # <pad> looks special
    assert (tokens[n + 1], types[n + 1]) == ("<|im_start|>", CONTROL)  # so does <|...|>
    assert (tokens[n + 2], types[n + 2]) == (" user", 4)  # USER_DEFINED, '▁' pre-normalized
    assert (tokens[n + 3], types[n + 3], scores[n + 3]) == (f"[PAD{n + 3}]", UNUSED, -10000.0)


def test_legacy_vocab_keeps_the_sentencepiece_pieces(converted, tmp_path):
    """The re-typing is GGUF's: a ggjt file keeps tokenizer.model's <unk> (' \u2047 ') and scores."""
    import sentencepiece as spm

    from smolq.formats.legacy import read_legacy

    src = converted["dirs"]["llama-added-tokens"]
    out = tmp_path / "m.bin"
    convert(src, out, format="ggjt-v3", outtype="f32")
    vocab = read_legacy(out).vocab
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    assert vocab[0] == (" \u2047 ".encode(), sp.get_score(0))
    assert [score for _, score in vocab[1:3]] == [sp.get_score(1), sp.get_score(2)]
