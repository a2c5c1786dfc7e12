"""The README's tables of the i-quant types and presets, made from smolq's own tables.

Bits per weight come from the type table (smolq.ggml_types: bytes per block x 8 / block
size); a preset's base type from plan.mix.PRESET_DEFAULTS; whether it needs an importance
matrix and the mix's bits per weight from the plan itself, on a reference 32-layer LLaMA
(no GQA, rows of 4096, untied output). Run it to print
the markdown; tests/test_plan_mix.py holds the README equal to it.
"""
from __future__ import annotations

from smolq.ggml_types import TYPE_INFO, GGMLType, tensor_nbytes
from smolq.plan.mix import IQ_TYPES, LLAMA_FTYPE, PRESET_DEFAULTS, ModelInfo, plan_tensor_types, resolve_preset

T = GGMLType
NEW_PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
               "IQ4_NL", "IQ4_XS", "Q2_K_S", "MXFP4_MOE")


def bits_per_weight(t: GGMLType) -> str:
    info = TYPE_INFO[t]
    return f"{info.type_size * 8 / info.block_size:g}"


def _reference_model(n_layer: int = 32, width: int = 4096):
    rows = [("token_embd.weight", T.F16, (32000, width)), ("output.weight", T.F16, (32000, width))]
    for i in range(n_layer):
        rows += [(f"blk.{i}.{role}.weight", T.F16, (width, width))
                 for role in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    return rows, ModelInfo("llama", n_layer, 32, 32)


def _reference_plan(preset: str):
    rows, info = _reference_model()
    return plan_tensor_types(rows, resolve_preset(preset), info)


def mix_bits_per_weight(preset: str) -> str:
    """The whole reference model's bits per weight under the preset's mix (the mix raises some tensors)."""
    plan = _reference_plan(preset)
    n_weights = sum(t.shape[0] * t.shape[1] for t in plan.tensors)
    return f"{sum(tensor_nbytes(t.dst_type, t.shape) for t in plan.tensors) * 8 / n_weights:.2f}"


def needs_imatrix(preset: str) -> bool:
    return bool(_reference_plan(preset).missing_imatrix())


def markdown() -> str:
    types = sorted(IQ_TYPES | {T.MXFP4}, key=lambda t: TYPE_INFO[t].type_size * 8 / TYPE_INFO[t].block_size)
    lines = ["| type | block | bytes per block | bits per weight |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {TYPE_INFO[t].block_size} | {TYPE_INFO[t].type_size} | {bits_per_weight(t)} |"
              for t in types]
    lines += ["", "| `--type` | file type | base type | bits per weight: base / whole mix | needs an imatrix |",
              "|---|---|---|---|---|"]
    for p in NEW_PRESETS:
        base = PRESET_DEFAULTS[p]
        lines.append(f"| `{p.lower()}` | {LLAMA_FTYPE[p]} | {base.name} | {bits_per_weight(base)} / "
                     f"{mix_bits_per_weight(p)} | {'yes' if needs_imatrix(p) else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
