"""smolq's per-tensor type plan against llama-quantize itself: every preset, several model shapes.

For each model shape, llama.cpp's llama-quantize (built from the same 0.3.36 tree the
rules were read from, tests/real_loaders.llama_tool) quantizes the file with every preset;
the type of every tensor it wrote, read back with gguf-py's GGUFReader, must be the type
smolq's plan (pipeline.requantize.make_plan: the model facts from smolq's reader of the same
file) gives that tensor. llama-quantize quantizes the i-quants itself, so the plan is
checked whatever smolq's kernel can write.

Shapes (tiny LLaMA checkpoints from smolq.tiny, converted by smolq to F16 GGUF):
- `mha`: 16 layers (so n/8, n/16, 7n/8 and use_more_bits all differ), 4 heads = 4 KV heads,
  untied output, rows of 256;
- `gqa_tied`: 16 layers, 8 heads on 2 KV heads (GQA 4: the ">= 4" rules), tied embeddings
  (no output.weight: token_embd takes the output rule);
- `fallback`: 8 layers, rows of 320 (a multiple of 32, not of 256: K and IQ types fall back)
  and an FFN of 336 (not a multiple of 32 either: ffn_down falls back to F16);
- `mpt_qkv`: a tiny MPT (8 layers, rows of 256): the fused attn_qkv, which follows attn_v's rules.

and the new families, as llama.cpp's own converter writes them from tiny transformers
checkpoints: Llama 3 (GQA, llama3 RoPE), Mistral, Qwen2 (tied, GQA 2), Qwen3, Gemma 3 (tied)
and Mixtral (8 experts: the n_expert == 8 rules, and MXFP4_MOE's expert tensors).

The rules read a tensor's name, its row length and its expert count, never its number of
rows, so every file is quantized as a copy with each tensor cut to ROWS rows (`trim_rows`;
names, metadata, row lengths and expert counts unchanged): llama-quantize's i-quant
searches on the full tensors would take minutes. `test_trimmed_copy_plans_like_the_full_file`
shows the full file gets the same types for a sample of presets.

The presets whose rules look at the importance matrix (Q4_0/Q5_0's ffn_down, IQ3_XXS,
IQ4_NL/IQ4_XS) run with and without one; the presets llama.cpp refuses without one run
with one, and their refusal without one is checked against `QuantPlan.missing_imatrix`.
The imatrix is written here with gguf-py (llama.cpp's GGUF imatrix layout: general.type
"imatrix", `<tensor>.in_sum2` and `<tensor>.counts`, imatrix.* metadata; read by
common/imatrix-loader.cpp).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from smolq.formats.detect import open_model
from smolq.ggml_types import GGMLType
from smolq.pipeline.requantize import Request, make_plan
from smolq.plan.mix import PlanOptions, QuantPlan, parse_tensor_type_overrides, resolve_preset
from real_loaders import READERS_USED, llama_tool

gguf = pytest.importorskip("gguf")

TOOLS = "llama.cpp tools (llama-quantize, llama-imatrix, llama-perplexity)"
ROWS = 4  # rows kept per tensor (>= 2, so a matrix stays 2-D for ggml_n_dims)
THREADS = "1"  # one thread: one order of work, whatever the machine
TIMEOUT_S = 120
TIMINGS: dict[str, float] = {}

K_PRESETS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
             "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "TQ1_0", "TQ2_0")
IQ_PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
              "IQ3_M", "IQ4_NL", "IQ4_XS")
ALL_PRESETS = K_PRESETS + IQ_PRESETS + ("MXFP4_MOE",)  # MXFP4_MOE on a dense model: Q8_0 throughout
# llama.cpp refuses these without an imatrix: some tensor gets an IQ1/IQ2/IQ3_XXS type (IQ3_XS:
# attn_q/attn_k and the middle ffn_gate/ffn_up are IQ3_XXS), or Q2_K inside Q2_K_S
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S")
# llama-quantize spends seconds building the IQ1/IQ2 search tables before it writes a byte (ggml's
# iq2xs_init_impl): these run on the shape that has both the GQA and the tied branch only (`mha` keeps
# IQ2_XXS, IQ2_M and IQ3_XXS: each of their no-GQA attn_v rules once; `fallback` writes no IQ1/IQ2 type).
SLOW_PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XS", "IQ2_S")
# presets whose rules read whether an imatrix is given
IMATRIX_RULES = ("Q4_0", "Q5_0", "IQ3_XXS", "IQ4_NL", "IQ4_XS")


# llama-quantize runs per family: every preset but the IQ1/IQ2 ones whose tables take seconds to
# build (IQ2_XXS stays: the very-low-bit branch with each family's GQA / expert count).
FAMILY_PRESETS = tuple(p for p in ALL_PRESETS if p not in SLOW_PRESETS + ("IQ2_M", "IQ3_XXS"))


def family_runs() -> list[tuple[str, bool]]:
    out = [(p, p in NEEDS_IMATRIX) for p in FAMILY_PRESETS]
    return out + [(p, not imx) for p, imx in out if p in IMATRIX_RULES and p not in NEEDS_IMATRIX]


def runs(shape: str) -> list[tuple[str, bool]]:
    """(preset, with imatrix) for every llama-quantize run of one shape."""
    if shape == "mpt_qkv":
        return family_runs()
    presets = [p for p in ALL_PRESETS if shape != "mha" or p not in SLOW_PRESETS]
    out = [(p, p in NEEDS_IMATRIX) for p in presets]
    # the other way round where llama-quantize can (IQ3_XXS without one: see test_overrides_...)
    out += [(p, not imx) for p, imx in out if p in IMATRIX_RULES and p not in NEEDS_IMATRIX]
    return out


# --------------------------------------------------------------------------- files

def _copy_kv(reader, writer) -> None:
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue  # the header fields, and the key the writer writes itself
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)


def trim_rows(src: Path, dst: Path, rows: int = ROWS) -> Path:
    """A copy of the GGUF `src` with every matrix cut to its first `rows` rows (per expert)."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    _copy_kv(r, w)
    for t in r.tensors:
        data = np.asarray(t.data)
        if data.ndim >= 2:
            data = np.ascontiguousarray(data[..., :rows, :])
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def write_imatrix(model: Path, dst: Path, seed: int = 0) -> Path:
    """A GGUF imatrix for every matrix of `model`: positive mean squared activations, one count each."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(dst, "llama")  # general.architecture is not read by the imatrix loader
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["tests/test_mix_vs_llama_quantize.py"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    for t in gguf.GGUFReader(model).tensors:
        if len(t.shape) < 2:
            continue
        ne0, n_mat = int(t.shape[0]), int(t.shape[2]) if len(t.shape) > 2 else 1
        w.add_tensor(f"{t.name}.in_sum2", (rng.random((n_mat, ne0)) + 0.1).astype(np.float32))
        w.add_tensor(f"{t.name}.counts", np.ones((n_mat, 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@dataclass
class Quantized:
    """What llama-quantize did with one (preset, imatrix) run: tensor types written, or None and its log."""

    types: dict[str, GGMLType] | None
    log: str = ""


def llama_quantize(tool: Path, src: Path, dst: Path, preset: str, imatrix: Path | None = None,
                   extra: tuple[str, ...] = ()) -> Quantized:
    READERS_USED[TOOLS] += 1
    args = [str(tool), *extra, *(["--imatrix", str(imatrix)] if imatrix else []), str(src), str(dst), preset, THREADS]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    log = proc.stdout + proc.stderr
    TIMINGS[preset] = TIMINGS.get(preset, 0.0) + time.perf_counter() - started
    if proc.returncode < 0:
        pytest.fail(f"llama-quantize {preset} crashed (signal {-proc.returncode}):\n{log[-3000:]}")
    if proc.returncode != 0:
        return Quantized(None, log)
    types = {t.name: GGMLType(int(t.tensor_type)) for t in gguf.GGUFReader(dst).tensors}
    dst.unlink()
    return Quantized(types, log)


def smolq_plan(path: Path, preset: str, has_imatrix: bool = False, tensor_types: tuple[str, ...] = ()) -> QuantPlan:
    opts = PlanOptions(has_imatrix=has_imatrix, tensor_types=parse_tensor_type_overrides(tensor_types))
    req = Request(src=path, out=path.with_suffix(".out.gguf"), preset=resolve_preset(preset), opts=opts)
    with open_model(path) as mf:
        return make_plan(mf, req)


def mismatches(plan: QuantPlan, written: dict[str, GGMLType]) -> list[str]:
    planned = {t.name: t.dst_type for t in plan.tensors}
    assert set(planned) == set(written)
    return [f"{n}: smolq {planned[n].name}, llama-quantize {written[n].name}"
            for n in sorted(planned) if planned[n] != written[n]]


# --------------------------------------------------------------------------- model shapes

@dataclass
class Shape:
    name: str
    full: Path  # the converted F16 GGUF
    trimmed: Path  # the same with ROWS rows per matrix (what the runs quantize)
    imatrix: Path
    results: dict[tuple[str, bool], Quantized] = field(default_factory=dict)


SHAPES = {
    # name: (family, make_tiny_model arguments)
    "mha": ("llama", dict(n_layers=16, hidden_size=256, config_overrides={"intermediate_size": 256})),
    "gqa_tied": ("llama", dict(n_layers=16, hidden_size=256, gqa=True, tied=True,
                               config_overrides={"intermediate_size": 256})),
    "fallback": ("llama", dict(n_layers=8, hidden_size=320, config_overrides={"intermediate_size": 336})),
    # attn_qkv: one fused tensor that takes attn_v's rules and counter
    "mpt_qkv": ("mpt", dict(n_layers=8, hidden_size=256)),
}


def _tool() -> Path:
    tool = llama_tool("llama-quantize")
    if tool is None:
        pytest.skip("llama.cpp's llama-quantize is not built (make setup runs scripts/build_llama_tools.py "
                    "into .venv/real/llama.cpp-tools)")
    return tool


def _make_shape(name: str, root: Path) -> Shape:
    from smolq.pipeline.convert import convert
    from smolq.tiny import make_tiny_model

    family, kwargs = SHAPES[name]
    hf = make_tiny_model(family, root / f"{name}-hf", vocab_size=512, **kwargs)
    full = root / f"{name}-f16.gguf"
    convert(hf, full, outtype="f16")
    trimmed = trim_rows(full, root / f"{name}-trimmed.gguf")
    return Shape(name, full, trimmed, write_imatrix(trimmed, root / f"{name}.imatrix"))


def _run_all(shape: Shape, tool: Path, root: Path) -> Shape:
    for preset, imx in runs(shape.name):
        out = root / f"{shape.name}-{preset}-{int(imx)}.gguf"
        shape.results[(preset, imx)] = llama_quantize(tool, shape.trimmed, out, preset, shape.imatrix if imx else None)
    return shape


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Shape]:
    """Every shape, each quantized by llama-quantize with every run (the expensive part, once)."""
    tool = _tool()
    root = tmp_path_factory.mktemp("mixes")
    started = time.perf_counter()
    out = {name: _run_all(_make_shape(name, root), tool, root) for name in SHAPES}
    print(f"\nfixture {time.perf_counter() - started:.1f} s; llama-quantize by preset:",
          {k: round(v, 1) for k, v in sorted(TIMINGS.items(), key=lambda kv: -kv[1])})
    return out


# --------------------------------------------------------------------------- the comparisons

ALL_RUNS = [(shape, p, imx) for shape in SHAPES for p, imx in runs(shape)]


@pytest.mark.parametrize("shape,preset,imx", ALL_RUNS,
                         ids=[f"{s}-{p}-{'imatrix' if i else 'plain'}" for s, p, i in ALL_RUNS])
def test_plan_matches_llama_quantize(shapes, shape, preset, imx):
    s = shapes[shape]
    done = s.results[(preset, imx)]
    assert done.types is not None, f"llama-quantize {preset} failed:\n{done.log[-3000:]}"
    plan = smolq_plan(s.trimmed, preset, has_imatrix=imx)
    assert mismatches(plan, done.types) == []
    assert not plan.missing_imatrix()


@pytest.mark.parametrize("preset", NEEDS_IMATRIX + ("IQ3_XS", "IQ4_XS", "Q2_K", "Q4_K_M"))
def test_imatrix_refusal_matches_llama_quantize(shapes, tmp_path, preset):
    """Without an imatrix llama-quantize refuses exactly where smolq's plan has tensors that need one."""
    s = shapes["mha"]
    done = llama_quantize(_tool(), s.trimmed, tmp_path / "out.gguf", preset)
    missing = smolq_plan(s.trimmed, preset).missing_imatrix()
    assert (done.types is None) == bool(missing), done.log[-2000:]
    if missing:
        assert "requires an importance matrix" in done.log
        assert not (tmp_path / "out.gguf").exists() or (tmp_path / "out.gguf").stat().st_size == 0
    else:
        assert mismatches(smolq_plan(s.trimmed, preset), done.types) == []


def test_overrides_skip_the_mix_and_its_counter(shapes, tmp_path):
    """--tensor-type wins over the mix, and an overridden tensor is not counted by the mix's layer
    counters. IQ3_XXS without an imatrix, with every tensor that would need one overridden,
    shows its no-imatrix rules (attn_v IQ3_S, ffn_down Q4_K/Q3_K) in a file llama-quantize writes."""
    s = shapes["mha"]
    overrides = (r"attn_q=q4_k", r"attn_k=q4_k", r"ffn_gate=q4_k", r"ffn_up=q4_k", r"blk\.1\.ffn_down=q8_0",
                 r"blk\.3\.attn_v=q8_0")
    extra = tuple(a for o in overrides for a in ("--tensor-type", o))
    written = {}
    for preset in ("IQ3_XXS", "Q4_K_M", "Q3_K_M"):
        done = llama_quantize(_tool(), s.trimmed, tmp_path / "out.gguf", preset, extra=extra)
        assert done.types is not None, done.log[-3000:]
        assert mismatches(smolq_plan(s.trimmed, preset, tensor_types=overrides), done.types) == [], preset
        written[preset] = done.types
    # By hand, Q4_K_M with 16 layers: use_more_bits(i) for i in {0, 1, 4, 7, 10, 13, 14, 15}. With
    # blk.1's ffn_down not counted, blk.2's is i = 1 (Q6_K); with blk.3's attn_v not counted, blk.4's is i = 3.
    assert written["Q4_K_M"]["blk.2.ffn_down.weight"] == GGMLType.Q6_K
    assert written["Q4_K_M"]["blk.4.attn_v.weight"] == GGMLType.Q4_K
    assert written["IQ3_XXS"]["blk.5.attn_v.weight"] == GGMLType.IQ3_S  # no imatrix: IQ3_S, not IQ3_XXS


@pytest.mark.parametrize("preset", ["Q3_K_M", "Q4_K_M", "IQ4_XS", "MXFP4_MOE"])
def test_trimmed_copy_plans_like_the_full_file(shapes, preset):
    """The plan of the full file equals the plan of its trimmed copy, which llama-quantize checked."""
    for s in shapes.values():
        full = {t.name: t.dst_type for t in smolq_plan(s.full, preset).tensors}
        trimmed = {t.name: t.dst_type for t in smolq_plan(s.trimmed, preset).tensors}
        assert full == trimmed, s.name


FALLBACK_LINE = re.compile(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback quantization")


def test_fallback_counts_by_hand(shapes):
    """Rows of 320 and an FFN of 336, counted by hand: with Q4_K_M every quantized matrix but
    output.weight (Q8_0 by the output rule: 320 is not a multiple of Q4_K's 256) falls back, and
    ffn_down (336 = 10.5 blocks of 32) ends in F16; with Q4_0, ffn_down falls back, and so does
    output.weight (the output rule gives Q6_K, which falls back to Q8_0)."""
    s = shapes["fallback"]
    n_layer = 8
    expected = {"Q4_K_M": 7 * n_layer + 1, "Q4_0": n_layer + 1}  # Q4_K_M: 7 matrices a layer + token_embd
    for preset, count in expected.items():
        plan = smolq_plan(s.trimmed, preset)
        assert plan.n_fallback == count, preset
        logged = FALLBACK_LINE.search(s.results[(preset, False)].log)
        if logged:  # llama.cpp's logger can lose its last lines at exit (DESIGN.md, pitfalls)
            assert int(logged.group(1)) == count, preset
    types = s.results[("Q4_K_M", False)].types
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(n_layer)} == {GGMLType.F16}
    assert types["output.weight"] == GGMLType.Q8_0
    assert s.results[("Q4_0", False)].types["output.weight"] == GGMLType.Q8_0


# --------------------------------------------------------------------------- the new families

# Tiny checkpoints of the families llama.cpp's converter writes as their own GGUF architectures
# (or as "llama" with experts): transformers config class, config fields. 8 layers, rows of 256.
_COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=8,
               max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64)),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                        tie_word_embeddings=True, sliding_window=64)),
    # 8 experts: the n_expert == 8 rules, and MXFP4_MOE's expert tensors
    "mixtral": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=1, num_local_experts=8,
                                      num_experts_per_tok=2)),
}


def _write_family(name: str, directory: Path, tokenizer_from: Path) -> Path:
    import torch
    import transformers

    cls_name, fields = FAMILIES[name]
    config = getattr(transformers, cls_name)(**{**_COMMON, **fields})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / f).exists():
            shutil.copy(tokenizer_from / f, directory / f)
    return directory


def make_family_ggufs(root: Path) -> dict[str, Path]:
    """F16 GGUFs of FAMILIES written by llama.cpp's converter (one child process for all)."""
    from smolq.tiny import make_tiny_model
    from test_vs_llama_converter import converter_dir, run_llama_converter

    conv = converter_dir()
    if conv is None:
        pytest.skip("llama.cpp's converter is not fetched (scripts/fetch_llama_converter.py)")
    tokenizer = make_tiny_model("llama", root / "tokenizer-source", vocab_size=512, hidden_size=64)
    jobs, out = [], {}
    for name in FAMILIES:
        d = _write_family(name, root / f"{name}-hf", tokenizer)
        out[name] = root / f"{name}-f16.gguf"
        jobs.append([str(d), "--outfile", str(out[name]), "--outtype", "f16"])
    run_llama_converter(conv, jobs, {}, root)
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Shape]:
    """Each family's GGUF from llama.cpp's converter, trimmed, quantized by llama-quantize with every run."""
    tool = _tool()
    root = tmp_path_factory.mktemp("mix-families")
    out = {}
    for name, full in make_family_ggufs(root).items():
        trimmed = trim_rows(full, root / f"{name}-trimmed.gguf")
        shape = Shape(name, full, trimmed, write_imatrix(trimmed, root / f"{name}.imatrix"))
        for preset, imx in family_runs():
            shape.results[(preset, imx)] = llama_quantize(tool, trimmed, root / f"{name}-{preset}.gguf", preset,
                                                          shape.imatrix if imx else None)
        out[name] = shape
    return out


FAMILY_RUNS = [(f, p, imx) for f in FAMILIES for p, imx in family_runs()]


@pytest.mark.parametrize("family,preset,imx", FAMILY_RUNS,
                         ids=[f"{f}-{p}-{'imatrix' if i else 'plain'}" for f, p, i in FAMILY_RUNS])
def test_family_plan_matches_llama_quantize(families, family, preset, imx):
    s = families[family]
    done = s.results[(preset, imx)]
    assert done.types is not None, f"llama-quantize {preset} failed:\n{done.log[-3000:]}"
    assert mismatches(smolq_plan(s.trimmed, preset, has_imatrix=imx), done.types) == []


def test_family_facts_the_rules_read(families):
    """The converted files have what the comparisons are meant to exercise (read with gguf-py)."""
    facts = {}
    for name, s in families.items():
        r = gguf.GGUFReader(s.trimmed)
        arch = r.fields["general.architecture"].contents()
        names = {t.name for t in r.tensors}
        experts = r.fields.get(f"{arch}.expert_count")
        facts[name] = (arch, "output.weight" in names, experts.contents() if experts else 0)
    assert facts == {"llama3": ("llama", True, 0), "mistral": ("llama", True, 0), "qwen2": ("qwen2", False, 0),
                     "qwen3": ("qwen3", True, 0), "gemma3": ("gemma3", False, 0), "mixtral": ("llama", True, 8)}
    mixtral = families["mixtral"].results[("MXFP4_MOE", False)].types
    assert mixtral["blk.0.ffn_down_exps.weight"] == GGMLType.MXFP4  # where MXFP4_MOE applies
    assert mixtral["blk.0.attn_v.weight"] == GGMLType.Q8_0
    assert families["gemma3"].results[("Q4_K_M", False)].types["token_embd.weight"] == GGMLType.Q6_K  # tied
