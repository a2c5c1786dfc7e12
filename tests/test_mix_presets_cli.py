"""The i-quant presets where a user meets them: --type, --dry-run, the imatrix refusal, legacy
refusals, the zoo manifest; and the rules no tiny llama-quantize run can reach (70B, 8 experts),
worked out by hand from llama-quant.cpp (0.3.36 tree).
"""
from __future__ import annotations

import json

import pytest

from smolq.errors import InputError
from smolq.ggml_types import GGMLType as T
from smolq.plan.mix import LLAMA_FTYPE, ModelInfo, PlanOptions, plan_tensor_types, requires_imatrix, resolve_preset
from tests.test_cli_support import ggjt_by_hand, llama_tensors, run_cli, write_gguf_with_gguf_py

NEW_PRESETS = {  # name: (LLAMA_FTYPE from llama.h, base type from llama_ftype_get_default_type)
    "IQ2_XXS": (19, T.IQ2_XXS), "IQ2_XS": (20, T.IQ2_XS), "Q2_K_S": (21, T.Q2_K), "IQ3_XS": (22, T.IQ3_S),
    "IQ3_XXS": (23, T.IQ3_XXS), "IQ1_S": (24, T.IQ1_S), "IQ4_NL": (25, T.IQ4_NL), "IQ3_S": (26, T.IQ3_S),
    "IQ3_M": (27, T.IQ3_S), "IQ2_S": (28, T.IQ2_XS), "IQ2_M": (29, T.IQ2_S), "IQ4_XS": (30, T.IQ4_XS),
    "IQ1_M": (31, T.IQ1_M), "MXFP4_MOE": (38, T.MXFP4),
}


@pytest.mark.parametrize("name", sorted(NEW_PRESETS))
def test_presets_by_any_case(name):
    for spelled in (name, name.lower(), name.lower().replace("_", "-")):
        p = resolve_preset(spelled)
        assert (p.name, p.ftype, p.default_type) == (name, *NEW_PRESETS[name])
    assert LLAMA_FTYPE[name] == NEW_PRESETS[name][0]


def test_plain_types_and_unknown_names():
    assert resolve_preset("mxfp4").default_type == T.MXFP4  # a plain type, not the MoE mix
    with pytest.raises(InputError, match="unknown type 'iq5_xs'"):
        resolve_preset("iq5_xs")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tensors = llama_tensors(n_layer=2, n_embd=256, n_ff=512, n_vocab=64)
    return write_gguf_with_gguf_py(tmp_path_factory.mktemp("iq") / "in-f32.gguf", tensors)


def test_missing_imatrix_is_one_line_exit_2_no_output(capsys, src, tmp_path):
    out = tmp_path / "out.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", src, out, "--type", "iq2_xxs", "-q")
    assert rc == 2 and not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "IQ2_XXS needs an importance matrix" in lines[0] and "--imatrix" in lines[0]
    assert str(src.name) in lines[0]


def test_dry_run_shows_the_plan_and_what_needs_an_imatrix(capsys, src, tmp_path):
    out = tmp_path / "out.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", src, out, "--type", "IQ2_M", "--dry-run", "--json")
    assert rc == 0 and not out.exists()
    summary = json.loads(stdout)
    rows = {r["name"]: r for r in summary["tensors"]}
    # IQ2_M: base IQ2_S; attn_v and the first n/8 ffn_down IQ3_S; token_embd IQ3_S; output Q5_K
    assert rows["blk.0.attn_q.weight"]["type"] == "IQ2_S" and rows["blk.0.attn_q.weight"]["needs_imatrix"]
    assert rows["blk.0.attn_v.weight"]["type"] == "IQ3_S" and "needs_imatrix" not in rows["blk.0.attn_v.weight"]
    assert rows["token_embd.weight"]["type"] == "IQ3_S" and rows["output.weight"]["type"] == "Q5_K"
    assert any("would need an importance matrix" in n for n in summary["notes"])
    rc, stdout, _ = run_cli(capsys, "quantize", src, out, "--type", "IQ2_M", "--dry-run")
    assert rc == 0 and "IQ2_S (imatrix)" in stdout


def test_legacy_containers_predate_the_i_quants(capsys, tmp_path):
    src = tmp_path / "ggml-model-f32.bin"
    ggjt_by_hand(src, version=3, n_embd=256)
    for preset, first in (("iq3_s", "IQ3_S"), ("iq4_nl", "IQ4_NL"), ("mxfp4_moe", "MXFP4")):
        out = tmp_path / f"out-{preset}.bin"
        rc, _, err = run_cli(capsys, "quantize", src, out, "--type", preset, "-q")
        assert rc == 2 and not out.exists(), err
        assert err.strip().splitlines() == [f"smolq: error: ggjt v3 predates {first}; use GGUF"]


def test_legacy_writer_refuses_them_too(tmp_path):
    from smolq.formats.base import TensorEntry
    from smolq.formats.legacy import write_legacy

    out = tmp_path / "x.bin"
    entry = TensorEntry("output.weight", T.IQ4_XS, (4, 256), load=lambda: bytes(4 * 136))
    hp = {"n_vocab": 1, "n_embd": 256, "n_mult": 256, "n_head": 2, "n_layer": 1, "n_rot": 128, "ftype": 1}
    with pytest.raises(InputError, match="ggjt v3 predates IQ4_XS; use GGUF"):
        write_legacy(out, "ggjt", 3, "llama", hp, [(b"a", 0.0)], [entry])
    assert not out.exists()


def test_zoo_manifest_takes_the_new_presets(tmp_path):
    from smolq.zoo.manifest import load_manifest

    text = ('[[models]]\nname = "m"\nsource = "model.gguf"\n'
            + "".join(f'  [[models.outputs]]\n  type = "{p.lower()}"\n' for p in NEW_PRESETS))
    (tmp_path / "zoo.toml").write_text(text)
    assert len(load_manifest(tmp_path / "zoo.toml").outputs) == len(NEW_PRESETS)
    (tmp_path / "zoo.toml").write_text(text + '  [[models.outputs]]\n  type = "iq5_xs"\n')
    with pytest.raises(InputError, match="iq5_xs"):
        load_manifest(tmp_path / "zoo.toml")


# --- rules out of reach of a tiny model, by hand ---------------------------------------------

def layers(n_layer, width=4096, kv=4096, experts=0):
    rows = [("token_embd.weight", T.F16, (32000, width)), ("output.weight", T.F16, (32000, width))]
    for i in range(n_layer):
        rows += [(f"blk.{i}.attn_q.weight", T.F16, (width, width)), (f"blk.{i}.attn_k.weight", T.F16, (kv, width)),
                 (f"blk.{i}.attn_v.weight", T.F16, (kv, width)), (f"blk.{i}.attn_output.weight", T.F16, (width, width))]
        ffn = (experts, width, width) if experts else (width, width)
        suffix = "_exps" if experts else ""
        rows += [(f"blk.{i}.ffn_{r}{suffix}.weight", T.F16, ffn) for r in ("gate", "down", "up")]
    return rows


def planned(rows, preset, info, **opts):
    return {t.name: t.dst_type for t in plan_tensor_types(rows, resolve_preset(preset), info, PlanOptions(**opts)).tensors}


def test_70b_bump_by_architecture():
    rows = layers(80, kv=1024)
    # LLaMA with 80 layers and GQA is llama.cpp's 70B: Q3_K_M's attn_v Q4_K -> Q5_K
    assert planned(rows, "Q3_K_M", ModelInfo("llama", 80, 64, 8))["blk.5.attn_v.weight"] == T.Q5_K
    # ... without GQA it is the 65B: no bump
    assert planned(rows, "Q3_K_M", ModelInfo("llama", 80, 64, 64))["blk.5.attn_v.weight"] == T.Q4_K
    # Qwen2 with 80 layers is 70B whatever its heads; Qwen3 has no 70B type
    assert planned(rows, "Q3_K_M", ModelInfo("qwen2", 80, 64, 64))["blk.5.attn_v.weight"] == T.Q5_K
    assert planned(rows, "Q3_K_M", ModelInfo("qwen3", 80, 64, 64))["blk.5.attn_v.weight"] == T.Q4_K


def test_moe_layer_from_the_name_and_experts_rules():
    """With experts, ffn_down's layer is parsed from its name, not counted (Mixtral's files mix the order)."""
    rows = layers(16, kv=1024, experts=8)
    shuffled = rows[:2] + list(reversed(rows[2:]))  # any file order: llama.cpp walks (layer, name)
    info = ModelInfo("llama", 16, 32, 8, 8)
    a, b = planned(rows, "Q4_K_M", info), planned(shuffled, "Q4_K_M", info)
    assert a == b
    # use_more_bits(i, 16): i in {0, 1, 4, 7, 10, 13, 14, 15}
    assert [a[f"blk.{i}.ffn_down_exps.weight"] == T.Q6_K for i in range(16)] == \
        [i in {0, 1, 4, 7, 10, 13, 14, 15} for i in range(16)]
    assert a["blk.3.attn_v.weight"] == T.Q8_0 and a["blk.3.attn_k.weight"] == T.Q8_0
    assert a["blk.3.attn_output.weight"] == T.Q5_K
    mx = planned(rows, "MXFP4_MOE", info)
    assert mx["blk.3.ffn_up_exps.weight"] == T.MXFP4 and mx["blk.3.attn_q.weight"] == T.Q8_0
    assert mx["output.weight"] == T.Q8_0 and mx["token_embd.weight"] == T.Q8_0


def test_imatrix_requirement_by_tensor():
    q2ks, q2k = resolve_preset("Q2_K_S"), resolve_preset("Q2_K")
    assert requires_imatrix("blk.0.attn_q.weight", T.Q2_K, q2ks) and not requires_imatrix("blk.0.attn_q.weight", T.Q2_K, q2k)
    assert not requires_imatrix("token_embd.weight", T.IQ2_XXS, q2k)  # embeddings and output are exempt
    assert not requires_imatrix("output.weight", T.IQ1_S, q2k)
    assert requires_imatrix("blk.0.ffn_up.weight", T.IQ3_XXS, q2k) and not requires_imatrix("blk.0.ffn_up.weight", T.IQ3_S, q2k)


def test_imatrix_changes_q4_0_and_iq4_xs_ffn_down():
    rows, info = layers(16), ModelInfo("llama", 16, 32, 32)
    assert planned(rows, "Q4_0", info)["blk.1.ffn_down.weight"] == T.Q4_0
    assert planned(rows, "Q4_0", info, has_imatrix=True)["blk.1.ffn_down.weight"] == T.Q4_1  # first n/8 = 2
    assert planned(rows, "Q4_0", info, has_imatrix=True)["blk.2.ffn_down.weight"] == T.Q4_0
    assert planned(rows, "IQ4_XS", info)["blk.1.ffn_down.weight"] == T.Q5_K
    assert planned(rows, "IQ4_XS", info, has_imatrix=True)["blk.1.ffn_down.weight"] == T.IQ4_XS


def test_convert_refuses_a_preset_that_needs_an_imatrix(capsys, tmp_path):
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=256, n_layers=2)
    out = tmp_path / "out.gguf"
    rc, _, err = run_cli(capsys, "convert", hf, out, "--outtype", "iq1_m", "-q")
    assert rc == 2 and not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "IQ1_M needs an importance matrix" in lines[0], err


def test_token_embedding_type_and_the_per_layer_table():
    """--token-embedding-type covers token_embd and per_layer_token_embd, unless a --tensor-type names the
    latter (llama_tensor_get_type); it wins over the mix, and over --tensor-type for token_embd."""
    rows = layers(2) + [("per_layer_token_embd.weight", T.F16, (32000, 4096))]
    info = ModelInfo("gemma3n", 2, 32, 32)
    got = planned(rows, "Q4_K_M", info, token_embedding_type=T.Q8_0)
    assert got["token_embd.weight"] == T.Q8_0 and got["per_layer_token_embd.weight"] == T.Q8_0
    overrides = [("per_layer_token_embd", T.Q4_0), ("token_embd", T.Q5_0)]
    got = planned(rows, "Q4_K_M", info, token_embedding_type=T.Q8_0, tensor_types=overrides)
    assert got["token_embd.weight"] == T.Q8_0 and got["per_layer_token_embd.weight"] == T.Q4_0
