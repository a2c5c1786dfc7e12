"""Gemma 3 (Gemma3ForCausalLM): smolq's GGUF against llama.cpp's converter, llama.cpp against transformers.

Tiny random models built offline (smolq.tiny, 6 layers: five sliding-window layers and one
global, as Gemma 3 lays them out), with a Gemma-shaped SentencePiece tokenizer trained in the
test (<pad>/<eos>/<bos>/<unk> at 0-3, control and user-defined specials, no dummy prefix):

- the converter (convert_hf_to_gguf.py of the llama-cpp-python 0.3.36 sdist, run as
  tests/test_vs_llama_converter.py runs it) and smolq write the same tensors (name, type,
  shape, bytes) and the same keys (type and value) at f32, f16, bf16 and q8_0, from f32, f16
  and bf16 checkpoints in both config layouts (transformers 5's rope_parameters/layer_types
  and transformers 4's rope_theta/rope_local_base_freq/sliding_window_pattern), tied and not,
  with linear RoPE scaling and final logit soft-capping;
- llama-cpp-python loads smolq's file and its logits match transformers' on the checkpoint:
  sandwich norms (+1 convention), local/global attention with their own RoPE bases, the
  scaled embedding, soft-capping;
- a model whose layers are not llama.cpp's default pattern gets the pattern written, and
  llama.cpp then computes what transformers computes (the converter's file would not);
- smolq's own reference pass (what `smolq verify` runs) computes transformers' logits.

The Gemma-3 270M Q4_K_M GGUF from PyPI exports to a transformers checkpoint that computes what
llama.cpp and smolq's reference compute on the file, tokenizes as llama.cpp does, and converts
back to the same tensors, keys and (requantized) types.

GPTQ: the block-by-block pass is transformers' forward (global and sliding layers each with
their own arguments); GPTQ results beat RTN in llama.cpp (GGUF) and transformers (GPTQ dir).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from real_loaders import open_llama, probe_sequences

from smolq.api import quantize
from smolq.formats.gguf import Split, read_gguf
from smolq.pipeline.convert import convert
from smolq.sources.reference import compare_logits, logit_stats, logits_from_file
from smolq.tiny import make_tiny_model
from tests.test_hf_export import TEXTS, _assert_same_ids, _dequantized
from tests.test_vs_llama_converter import (
    ALLOWED_METADATA,
    FETCH_HINT,
    converter_dir,
    fields,
    read,
    run_llama_converter,
    tensors,
)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
N_LAYERS = 6
# name -> make_tiny_model options
MODELS = {
    "gemma3-tied": {"tied": True},
    "gemma3-t4-untied-bf16": {"rope_params_style": "top", "dtype": "bfloat16", "config_overrides": {
        "final_logit_softcapping": 15.0,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 60000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}}}},
    "gemma3-tied-f16": {"tied": True, "dtype": "float16"},
}
PAIRS = [(m, t) for m in MODELS for t in OUTTYPES]
# llama.cpp (f32 weights, f32 KV) vs transformers in f32, in logit units (logits here: std ~4, up
# to ~18). ggml's CPU GELU reads an f16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), which leaves
# ~1e-2 after six layers, spread evenly over positions; a wrong RoPE base, window or norm gives O(1).
FLOAT_TOL = 5e-2


def _make(name: str, root: Path) -> Path:
    return make_tiny_model("gemma3", root / name, n_layers=N_LAYERS, seed=3, **MODELS[name])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    conv = converter_dir()
    if conv is None:
        pytest.skip(f"llama.cpp's converter is not fetched; {FETCH_HINT}")
    root = tmp_path_factory.mktemp("gemma3-vs-converter")
    dirs = {name: _make(name, root) for name in MODELS}
    files, jobs = {}, []
    for name, outtype in PAIRS:
        ours, theirs = root / f"{name}.{outtype}.smolq.gguf", root / f"{name}.{outtype}.llama.gguf"
        convert(dirs[name], ours, outtype=outtype)
        jobs.append([str(dirs[name]), "--outfile", str(theirs), "--outtype", outtype])
        files[(name, outtype)] = (ours, theirs)
    run_llama_converter(conv, jobs, {}, root)
    return {"files": files, "dirs": dirs}


@pytest.mark.parametrize("model,outtype", PAIRS)
def test_same_tensors_as_llama_cpp_converter(converted, model, outtype):
    ours_path, theirs_path = converted["files"][(model, outtype)]
    ours, theirs = tensors(read(ours_path)), tensors(read(theirs_path))
    assert sorted(ours) == sorted(theirs)  # order: smolq the architecture's, llama.cpp the checkpoint's
    for name, (t_ours, shape_ours, data_ours) in ours.items():
        t_theirs, shape_theirs, data_theirs = theirs[name]
        assert (t_ours, shape_ours) == (t_theirs, shape_theirs), name
        assert data_ours == data_theirs, f"{name}: tensor bytes differ"


@pytest.mark.parametrize("model,outtype", PAIRS)
def test_same_metadata_as_llama_cpp_converter(converted, model, outtype):
    ours_path, theirs_path = converted["files"][(model, outtype)]
    ours, theirs = fields(read(ours_path)), fields(read(theirs_path))
    for key, how in ALLOWED_METADATA.items():
        if how == "llama.cpp only":
            assert key not in ours, key
    keys = (set(ours) | set(theirs)) - set(ALLOWED_METADATA)
    assert sorted(k for k in keys if k not in ours) == [], "keys llama.cpp writes and smolq does not"
    assert sorted(k for k in keys if k not in theirs) == [], "keys smolq writes and llama.cpp does not"
    differ = {k: (ours[k], theirs[k]) for k in sorted(keys) if ours[k] != theirs[k]}
    assert not differ, f"metadata differs (smolq, llama.cpp): {str(differ)[:2000]}"


def test_the_comparison_sees_gemma_specifics(converted):
    """An anchor independent of smolq: llama.cpp's own file carries the +1 norms, both RoPE bases,
    the window, soft-capping, the linear scaling, the untied head and no dummy prefix."""
    import torch
    from safetensors.torch import load_file

    _, theirs_path = converted["files"][("gemma3-t4-untied-bf16", "f32")]
    kv = fields(read(theirs_path))
    assert kv["gemma3.rope.freq_base"][1] == 60000.0 and kv["gemma3.rope.freq_base_swa"][1] == 5000.0
    assert kv["gemma3.attention.sliding_window"][1] == 5
    assert kv["gemma3.final_logit_softcapping"][1] == 15.0
    assert kv["gemma3.rope.scaling.type"][1] == "linear" and kv["gemma3.rope.scaling.factor"][1] == 2.0
    assert kv["tokenizer.ggml.add_space_prefix"][1] is False
    stored = {t.name: np.asarray(t.data) for t in read(theirs_path).tensors}
    assert "output.weight" in stored
    hf = load_file(str(converted["dirs"]["gemma3-t4-untied-bf16"] / "model.safetensors"))
    norm = hf["model.layers.0.self_attn.q_norm.weight"].to(torch.float32).numpy()
    np.testing.assert_array_equal(stored["blk.0.attn_q_norm.weight"], norm + np.float32(1))


def test_vocabulary_as_llama_cpp_types_it(converted):
    """Gemma's specials: listed in added_tokens_decoder as special, so CONTROL with score -1000
    (the converter's rule, also for <unk> and the user-defined turn markers)."""
    ours_path, _ = converted["files"][("gemma3-tied", "f32")]
    kv = fields(read(ours_path))
    tokens, types, scores = (kv[f"tokenizer.ggml.{k}"][1] for k in ("tokens", "token_type", "scores"))
    assert tokens[:8] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>",
                          "<end_of_turn>"]
    assert set(types[:8]) == {3} and set(scores[:8]) == {-1000.0}
    assert types[8] == 6 and tokens[8] == "<0x00>"  # byte pieces
    assert (kv["tokenizer.ggml.bos_token_id"][1], kv["tokenizer.ggml.eos_token_id"][1]) == (2, 1)
    assert kv["tokenizer.ggml.add_bos_token"][1] is True and kv["tokenizer.ggml.add_eos_token"][1] is False
    assert "<start_of_turn>" in kv["tokenizer.chat_template"][1]


# ------------------------------------------------------------------------------------------ llama.cpp runs it


def _hf_logits(hf_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """transformers' logits in f32 (eager attention: sliding windows masked as written)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def _assert_llama_cpp_matches_transformers(gguf: Path, hf_dir: Path) -> None:
    llm = open_llama(gguf)
    n_vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    tokens = probe_sequences(llm, n_vocab, 24)
    ours = np.stack(llm.logits(tokens))
    theirs = _hf_logits(hf_dir, tokens)
    stats = logit_stats(theirs.reshape(-1, n_vocab), ours.reshape(-1, n_vocab))
    assert stats["max_abs_diff"] <= FLOAT_TOL, stats
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


# The f16 checkpoint is left out of the logit comparisons: its norms are stored as f16(1 + w),
# rounded in f16 as the converter's torch rounds them (byte-identical above), which moves logits
# by ~0.1 against transformers' exact 1 + w; that is the converter's rule, not a conversion error.
EXACT_NORM_MODELS = ["gemma3-tied", "gemma3-t4-untied-bf16"]


@pytest.mark.parametrize("model", EXACT_NORM_MODELS)
def test_llama_cpp_runs_smolqs_file_like_transformers(converted, model):
    ours_path, _ = converted["files"][(model, "f32")]
    _assert_llama_cpp_matches_transformers(ours_path, converted["dirs"][model])


@pytest.mark.parametrize("model", EXACT_NORM_MODELS)
def test_reference_pass_over_smolqs_file_matches_transformers(converted, model):
    """smolq's numpy pass (sources/reference.py, what `smolq verify` runs) over the f32 file, in
    float64, against transformers on the checkpoint: only transformers' f32 rounding is left."""
    ours_path, _ = converted["files"][(model, "f32")]
    stats = compare_logits(ours_path, converted["dirs"][model], np.random.default_rng(0).integers(0, 384, (2, 20)))
    assert stats["max_abs_diff"] <= 1e-3 and stats["top1_agreement"] == 1.0, stats


def test_a_layer_pattern_llama_cpp_would_not_assume_is_written(tmp_path):
    """Global layers at 1 and 4 of 6: llama.cpp's default (every 6th) would be wrong, so smolq writes
    gemma3.attention.sliding_window_pattern and llama.cpp computes transformers' logits."""
    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
             "sliding_attention"]
    src = make_tiny_model("gemma3", tmp_path / "m", n_layers=N_LAYERS, seed=4, tied=True,
                          config_overrides={"layer_types": types})
    out = tmp_path / "m.gguf"
    convert(src, out, outtype="f32")
    kv = fields(read(out))
    assert kv["gemma3.attention.sliding_window_pattern"] == (["ARRAY", "BOOL"],
                                                             [t == "sliding_attention" for t in types])
    _assert_llama_cpp_matches_transformers(out, src)
    assert compare_logits(out, src)["max_abs_diff"] <= 1e-3


def test_tokenizer_json_alone_is_refused(cli, tmp_path):
    """Gemma 3 repositories ship tokenizer.model; llama.cpp's converter reads the vocabulary from
    it and has no pre-tokenizer for Gemma's tokenizer.json alone (it raises), so neither guesses."""
    src = make_tiny_model("gemma3", tmp_path / "m", n_layers=N_LAYERS, seed=4, tied=True)
    (src / "tokenizer.model").unlink()
    out = tmp_path / "m.gguf"
    r = cli("convert", src, out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "tokenizer.model" in r.stderr, r
    assert not out.exists()


def test_legacy_containers_refuse_gemma3(cli, tmp_path):
    src = make_tiny_model("gemma3", tmp_path / "m", n_layers=N_LAYERS, seed=4, tied=True)
    for args in (["--format", "ggjt-v3"], []):
        out = tmp_path / "m.bin"
        r = cli("convert", src, out, *args)
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "gemma3" in lines[0] and "no legacy container" in lines[0], r.stderr
        assert "Traceback" not in r.stderr and not out.exists()


# ------------------------------------------------------------------------------------------ the PyPI file

# Keys that differ after the Gemma-3 270M Q4_K_M GGUF -> HF -> f32 GGUF, with why.
PYPI_KEY_CHANGES = {
    "general.name": "the HF directory's name, not the original model's",
    "general.file_type": "the f32 round trip is ALL_F32 whatever the original's type",
    **{k: "llama.cpp's converter read it from the original repo's model card (README.md), which the export "
          "has not" for k in ("general.basename", "general.license", "general.size_label", "general.tags")},
    "gemma3.rope.freq_base_swa": "absent in the file (an older converter); the export states llama.cpp's default "
                                 "10000 as rope_parameters.sliding_attention, which the pinned converter writes",
}
REAL_TOL = 0.5  # llama.cpp vs transformers, logit units; logits of this model reach ~170 (std ~24)
REFERENCE_TOL = 2e-3  # smolq's f32 pass vs transformers on the same weights (18 layers, other summation order)


@pytest.fixture(scope="module")
def pypi_export(gemma_gguf, tmp_path_factory):
    """The PyPI file exported at f32, and that export converted back to an f32 GGUF."""
    root = tmp_path_factory.mktemp("gemma3-pypi")
    out, back = root / "hf", root / "back-f32.gguf"
    summary = convert(gemma_gguf, out, format="hf", outtype="f32")
    convert(out, back, format="gguf", outtype="f32")
    return {"hf": out, "back": back, "summary": summary, "root": root}


def test_pypi_gemma3_exports_and_runs_like_llama_cpp(gemma_gguf, pypi_export):
    """transformers loads the export; its logits are smolq's f32 pass over the Q4_K_M file and
    llama.cpp's on the same dequantized weights (f32), and as close to llama.cpp on the Q4_K_M
    file itself (which rounds activations to Q8_K) as llama.cpp's own f32 pass is; its
    tokenizer gives llama.cpp's ids."""
    from transformers import AutoTokenizer

    out = pypi_export["hf"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["sliding_window"] == 512
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6

    llm = open_llama(gemma_gguf)
    tokens = probe_sequences(llm, cfg["vocab_size"], 24)
    theirs = _hf_logits(out, tokens)
    n = cfg["vocab_size"]
    reference = logits_from_file(gemma_gguf, tokens, dtype=np.float32)
    stats = logit_stats(reference.reshape(-1, n), theirs.reshape(-1, n))
    assert stats["max_abs_diff"] <= REFERENCE_TOL and stats["top1_agreement"] == 1.0, stats
    f32 = np.stack(open_llama(pypi_export["back"]).logits(tokens))
    stats = logit_stats(f32.reshape(-1, n), theirs.reshape(-1, n))
    assert stats["max_abs_diff"] <= REAL_TOL and stats["top1_agreement"] == 1.0, stats
    q4 = np.stack(llm.logits(tokens))
    stats, ref = logit_stats(q4.reshape(-1, n), theirs.reshape(-1, n)), logit_stats(q4.reshape(-1, n), f32.reshape(-1, n))
    assert stats["kl_div"] <= 1.05 * ref["kl_div"] + 1e-4, (stats, ref)
    assert stats["top1_agreement"] >= ref["top1_agreement"] - 0.05, (stats, ref)

    tok = AutoTokenizer.from_pretrained(out)
    _assert_same_ids(tok, llm, TEXTS + ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"])


def test_pypi_gemma3_export_then_back_gives_the_same_tensors_and_keys(gemma_gguf, pypi_export):
    """Back to GGUF: every tensor's dequantized values and every key (but the listed ones); and
    quantized again as Q4_K_M, every tensor gets the type it had in the original."""
    want, got = _dequantized(gemma_gguf), _dequantized(pypi_export["back"])
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    with read_gguf(gemma_gguf) as a, read_gguf(pypi_export["back"]) as b:
        ka = {k: v.to_python() for k, v in a.metadata.items()}
        kb = {k: v.to_python() for k, v in b.metadata.items()}
    changed = {k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)}
    assert changed <= set(PYPI_KEY_CHANGES), {k: (str(ka.get(k))[:80], str(kb.get(k))[:80])
                                              for k in changed if k not in PYPI_KEY_CHANGES}

    requantized = pypi_export["root"] / "back-q4_k_m.gguf"
    quantize(pypi_export["back"], requantized, type="q4_k_m")
    with read_gguf(gemma_gguf) as a, read_gguf(requantized) as b:
        assert {t.name: t.type for t in b.tensors} == {t.name: t.type for t in a.tensors}


# ------------------------------------------------------------------------------------------ GPTQ

GPTQ_FAST = dict(nsamples=4, seqlen=32, quiet=True)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def gptq_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-gptq")
    hf = make_tiny_model("gemma3", root / "hf", n_layers=N_LAYERS, seed=3, tied=True)
    text = " ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(["cat", "dog", "bird"] * 150))
    (root / "calib.txt").write_text(text)
    return root, hf


def test_gptq_block_pass_is_transformers_forward(gptq_tiny):
    """GPTQ runs the model block by block on captured arguments; for Gemma 3 the global layer
    needs its own (global RoPE table, causal mask instead of the window): block by block, the
    last block's outputs are transformers' own, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from smolq.pipeline import gptq as gp
    from smolq.sources.checkpoint import open_checkpoint
    from smolq.transforms.calib import load_calibration

    root, hf = gptq_tiny
    model, tok, family = gp._load_model(hf)
    kinds = gp._block_kinds(model, family)
    assert set(kinds) == {"sliding_attention", "full_attention"}
    with open_checkpoint(hf) as ckpt:
        weights = gp._Weights(ckpt, model)
        cal = load_calibration(model, tok, root / "calib.txt", nsamples=2, seqlen=32, seed=0)
        assert cal.samples[0].shape[-1] > 5  # longer than the sliding window
        acts = gp._capture_block_inputs(model, family, cal, weights, root, True)
        for i, block in enumerate(gp._blocks(model, family)):
            weights.materialize(block, f"model.layers.{i}.")
            gp._run_block(block, acts, torch.device("cpu"), replace=True, kind=kinds[i])
            weights.release(block)
        ours = [gp._hidden_of(*acts.call(i, kinds[0])) for i in range(len(acts))]
        acts.close()
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    theirs = []
    hook = ref.model.layers[-1].register_forward_hook(lambda m, a, out: theirs.append(out))
    with torch.no_grad():
        for i, ids in enumerate(cal.samples):
            ref(input_ids=ids, attention_mask=cal.attention_mask(i), use_cache=False)
    hook.remove()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_gptq_gguf_runs_in_llama_cpp_and_beats_rtn(gptq_tiny):
    """GPTQ onto Q4_0 for Gemma 3: llama.cpp runs the file, and on calibration-domain text it is
    clearly closer to transformers' logits than plain RTN (GPTQ fed the wrong block arguments,
    e.g. the local layers' for the global one, solves for the wrong activations and loses that)."""
    from transformers import AutoTokenizer

    from smolq.pipeline.gptq import quantize_hf_gptq

    root, hf = gptq_tiny
    out, rtn = root / "gptq-q4_0.gguf", root / "rtn-q4_0.gguf"
    summary = quantize_hf_gptq(hf, out, format="gguf", qtype="q4_0", calib=root / "calib.txt", **GPTQ_FAST)
    assert summary["n_layers_quantized"] == N_LAYERS * len(LINEARS) and summary["family"] == "gemma3"
    convert(hf, rtn, outtype="q4_0")
    kv = fields(read(out))
    assert kv["general.architecture"][1] == "gemma3" and "gemma3.attention.sliding_window" in kv
    text = (root / "calib.txt").read_text()
    tokens = np.array(AutoTokenizer.from_pretrained(hf)(text)["input_ids"][100:140])
    ref = _hf_logits(hf, tokens[None])[0]
    kl = {}
    for path in (out, rtn):
        got = np.stack(open_llama(path).logits([tokens.tolist()]))[0]
        kl[path.name] = _kl(ref, got)
    # This random 6-layer model is fragile (RTN Q4_0 costs ~1.4 nats, Q8_0 ~0.04); GPTQ about halves it.
    assert kl[out.name] < 0.7 * kl[rtn.name], kl


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    import torch

    lp, lq = (torch.log_softmax(torch.as_tensor(x, dtype=torch.float64), -1) for x in (ref, got))
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _with_linears(hf: Path, weights: dict[str, np.ndarray]):
    """transformers' model of `hf` with the Linear weights replaced (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for name, w in weights.items():
        model.get_parameter(name).data = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return model


def test_gptq_directory_runs_in_transformers_and_converts(gptq_tiny):
    """A 4-bit group-32 GPTQ directory of Gemma 3, read back by tests/gptq_spec.py's dequantizer:
    in transformers it is clearly closer to the model on calibration-domain text than the same
    model with RTN Q4_0 weights (dequantized by gguf-py); its other tensors are the source in
    fp16, in transformers' convention (norms without llama.cpp's +1); `smolq convert` imports
    it to a GGUF that llama.cpp runs as transformers runs the directory."""
    import gguf
    import torch
    from transformers import AutoTokenizer

    from smolq.arch.gemma3 import LAYER_TENSORS
    from smolq.pipeline.gptq import quantize_hf_gptq
    from tests.gptq_spec import dequantize, load_dir

    root, hf = gptq_tiny
    out = root / "int4-g32"
    quantize_hf_gptq(hf, out, format="gptq", bits=4, group_size=32, calib=root / "calib.txt", **GPTQ_FAST)
    t = load_dir(out)
    linears = [f"model.layers.{i}.{lin}" for i in range(N_LAYERS) for lin in LINEARS]
    gptq_model = _with_linears(hf, {f"{p}.weight": dequantize(t, p, 4) for p in linears})
    for name, p in gptq_model.named_parameters():
        if name[:-len(".weight")] not in linears:
            assert t[name].dtype == np.float16, name
            np.testing.assert_array_equal(p.detach().numpy().astype(np.float16), t[name], err_msg=name)

    rtn = root / "rtn-q4_0-for-dir.gguf"
    convert(hf, rtn, outtype="q4_0")
    hf_name = {f"blk.{i}.{gg}": f"model.layers.{i}.{name}" for i in range(N_LAYERS) for name, gg in LAYER_TENSORS}
    rtn_weights = {hf_name[x.name]: gguf.quants.dequantize(x.data, x.tensor_type).reshape(
        [int(d) for d in reversed(x.shape)]) for x in read(rtn).tensors if x.tensor_type.name == "Q4_0"}
    assert len(rtn_weights) == len(linears)
    rtn_model = _with_linears(hf, rtn_weights)

    tokens = np.array(AutoTokenizer.from_pretrained(hf)((root / "calib.txt").read_text())["input_ids"][100:140])[None]
    ref = _hf_logits(hf, tokens)[0]
    with torch.no_grad():
        got = {m: model(torch.as_tensor(tokens)).logits[0].numpy() for m, model in
               (("gptq", gptq_model), ("rtn", rtn_model))}
    kl = {m: _kl(ref, x) for m, x in got.items()}
    assert kl["gptq"] < 0.7 * kl["rtn"], kl

    imported = root / "from-gptq.gguf"
    convert(out, imported)
    assert fields(read(imported))["general.architecture"][1] == "gemma3"
    ours = np.stack(open_llama(imported).logits(tokens.tolist()))[0]
    assert _kl(got["gptq"], ours) < 0.05, _kl(got["gptq"], ours)  # llama.cpp's Q8 activations, fp16 rest


def test_split_output_is_the_unsplit_file(tmp_path):
    """--split-max-tensors for Gemma 3: the shards, read as one set, hold the unsplit file's
    tensors and keys; llama.cpp loads the set from its first shard."""
    src = make_tiny_model("gemma3", tmp_path / "m", n_layers=N_LAYERS, seed=4, tied=True)
    whole, split = tmp_path / "whole.gguf", tmp_path / "split.gguf"
    convert(src, whole, outtype="q8_0")
    summary = convert(src, split, outtype="q8_0", split=Split.of(max_tensors=20))
    shards = [Path(p) for p in summary["shards"]]
    assert len(shards) > 1
    with read_gguf(whole) as a, read_gguf(shards[0]) as b:
        assert [(t.name, t.type, t.shape) for t in b.tensors] == [(t.name, t.type, t.shape) for t in a.tensors]
        for ta, tb in zip(a.tensors, b.tensors):
            assert np.array_equal(np.asarray(ta.load()), np.asarray(tb.load())), ta.name
        ka = {k: v.to_python() for k, v in a.metadata.items()}
        kb = {k: v.to_python() for k, v in b.metadata.items() if not k.startswith("split.")}
        assert ka == kb
    tokens = [[2, 10, 20, 30, 40, 50]]
    np.testing.assert_array_equal(np.stack(open_llama(shards[0]).logits(tokens)),
                                  np.stack(open_llama(whole).logits(tokens)))
