"""--target-bpw / --target-size / --recipe: each tensor's type chosen for a size budget, inside the
quantize pipeline (a step between its plan and its transform, not a pipeline of its own).

    QuantPlan (plan.mix) -> candidates per quantizable tensor (plan.budget) -> the loss pass:
    each candidate's predicted loss, measured on the tensor's weights with the C kernel, one tensor
    at a time -> plan.budget.allocate (least total loss within the budget) -> the QuantPlan's types

The predicted loss of tensor W (rows: outputs, columns: inputs) at type q is

    err(q)  = sum_j imp_j * ||W[:, j] - deq(quant_q(W))[:, j]||^2

the diagonal-Hessian form of GPTQ's layer error ||(W - Q) X||^2 (imp_j = E[x_j^2] is the importance
matrix entry when --imatrix is given, else 1), divided by the same weighted energy of W itself,
sum_j imp_j * ||W[:, j]||^2. That ratio is the noise-to-signal power of the layer's output, which is
what makes tensors comparable: the raw error is in units of each tensor's own activations (an
embedding row is a lookup with no imatrix, ffn_down sees activations an order of magnitude
larger than attn_q), while the ratio is what each layer adds, relative to what it carries, to the
residual stream, the first-order picture in which those contributions add up. A tied token
embedding (no output.weight) counts twice: it is the input lookup and the output projection.
The quantization with the importance vector is the one the file gets, so the loss is that of the
bytes written. A loss source with the same signature (e.g. GPTQ's own per-layer error) can be
passed instead of rtn_loss.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from smolq import kernels
from smolq.errors import InputError
from smolq.formats.base import TensorEntry
from smolq.formats.detect import open_model
from smolq.formats.gguf import Metadata, MetaValue, aligned, gguf_head_size
from smolq.ggml_types import GGMLType, tensor_nbytes
from smolq.lazy import lazy_module
from smolq.plan.budget import (
    RECIPE_KEY,
    Allocation,
    Choices,
    Option,
    SizeTarget,
    allocate,
    candidate_types,
    recipe_json,
    write_recipe,
)
from smolq.plan.imatrix import ImatrixChoice
from smolq.plan.mix import QuantPlan, canonical_name, is_quantizable, requires_imatrix
from smolq.progress import WorkProgress
from smolq.transforms.rtn import to_float32

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# (float32 weights, type, importance vector or None, threads) -> predicted loss
LossFn = Callable[[Any, GGMLType, Any, int], float]


def weighted_error(x: Any, y: Any, imp: Any | None) -> float:
    """sum_j imp_j * sum_i (x[i, j] - y[i, j])^2 over the rows of x (the last axis is j)."""
    n = x.shape[-1]
    d = np.asarray(x, dtype=np.float32).reshape(-1, n) - np.asarray(y, dtype=np.float32).reshape(-1, n)
    per_column = np.square(d).sum(axis=0, dtype=np.float64)
    return float(per_column.sum() if imp is None else per_column @ np.asarray(imp, dtype=np.float64))


def rtn_loss(x: Any, t: GGMLType, imp: Any | None, threads: int = 0) -> float:
    """The weighted error of x quantized to `t` by the kernel (with `imp` as llama.cpp's quant_weights,
    as the file is written), relative to x's weighted energy (0 for an all-zero tensor)."""
    q = kernels.quantize(x, t, imatrix=imp, threads=threads)
    y = kernels.dequantize(q, t, x.shape, threads=threads)
    energy = weighted_error(x, np.zeros((1, x.shape[-1]), dtype=np.float32), imp)
    return weighted_error(x, y, imp) / energy if energy > 0 else 0.0


@dataclass
class Chosen:
    """What the allocation did, for the summary and the output's metadata."""

    target: SizeTarget
    budget: int  # bytes the chosen tensors' (padded) data could take
    allocation: Allocation
    names: list[str]
    candidates: list[str]
    recipe: dict[str, GGMLType] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        a = self.allocation
        return {"target": self.target.describe(), "candidates": self.candidates, "n_tensors": len(self.names),
                "budget_bytes": self.budget, "chosen_bytes": a.nbytes, "predicted_loss": a.loss,
                "losses": dict(zip(self.names, a.losses))}


def save_file_recipe(model: str | os.PathLike, out: str | os.PathLike) -> dict[str, GGMLType]:
    """`smolq inspect FILE --recipe OUT`: any model file's tensor -> type, as a recipe --recipe applies."""
    with open_model(model) as mf:
        recipe = {t.name: t.type for t in mf.tensors}
    write_recipe(out, recipe)
    return recipe


def allocation_metadata(recipe: dict[str, GGMLType]) -> list[tuple[str, MetaValue]]:
    """quantize.recipe: the chosen tensors' types as compact JSON (the rest of the file's types are
    the plan's own; `smolq inspect --recipe` writes the whole recipe from any file)."""
    return [(RECIPE_KEY, MetaValue.string(recipe_json(recipe)))]


def choose_types(tensors: Sequence[TensorEntry], plan: QuantPlan, arch: str, choice: ImatrixChoice | None,
                 target: SizeTarget, candidates: Sequence[GGMLType], metadata: Metadata, *, version: int = 3,
                 leave_output: bool = False, loss: LossFn = rtn_loss, threads: int = 0,
                 quiet: bool = True, sensitivity: Mapping[str, float] | None = None) -> Chosen:
    """Set the type of every quantizable tensor of `plan` for the least predicted loss within `target`.

    `metadata` is the output's metadata without quantize.recipe: its header (with the longest recipe
    the candidates allow) is counted against a --target-size, so the file never exceeds it.
    `sensitivity` ({name: KL per unit of loss}, pipeline/sensitivity.py) scales each tensor's
    losses (the median where a tensor has none); without it a tied embedding counts twice."""
    chosen = [i for i, tp in enumerate(plan.tensors) if is_quantizable(tp.name, tp.shape, leave_output, arch)]
    vectors = [choice.vector(plan.tensors[i].name, plan.tensors[i].shape) if choice else None for i in chosen]
    writable = frozenset(t for t, layout in kernels.QUANTIZE_TYPES if layout == "v3")
    types = [candidate_types(plan.tensors[i].shape, candidates, v is not None, writable)
             for i, v in zip(chosen, vectors)]
    head, alignment = _head_bound(metadata, plan, chosen, types, version)
    kept = set(range(len(plan.tensors))) - set(chosen)
    fixed = sum(aligned(tensor_nbytes(plan.tensors[i].dst_type, plan.tensors[i].shape), alignment) for i in kept)
    n_elements = sum(int(np.prod(tp.shape)) for tp in plan.tensors)
    budget = target.data_budget(n_elements, head) - fixed
    _check_floor(target, plan, chosen, types, budget, head, fixed, alignment)
    choices = _measure(tensors, plan, chosen, types, vectors, alignment, loss, threads, quiet, sensitivity)
    result = allocate(choices, budget)
    for i, t in zip(chosen, result.types):
        tp = plan.tensors[i]
        tp.dst_type, tp.fallback = t, False
        tp.needs_imatrix = requires_imatrix(canonical_name(tp.name), t, plan.preset)
    names = [plan.tensors[i].name for i in chosen]
    return Chosen(target, budget, result, names, [t.name for t in candidates], dict(zip(names, result.types)))


def _head_bound(metadata: Metadata, plan: QuantPlan, chosen: list[int], types: list[list[GGMLType]],
                version: int) -> tuple[int, int]:
    """The header's size with quantize.recipe at its longest (every chosen tensor at the candidate with
    the longest name): the real recipe is never longer, so the real header never larger."""
    longest = max((t for ts in types for t in ts), key=lambda t: len(t.name), default=None)
    meta = Metadata(metadata.items())
    if longest is not None:
        for key, value in allocation_metadata({plan.tensors[i].name: longest for i in chosen}):
            meta[key] = value
    entries = [TensorEntry(tp.name, tp.dst_type, tuple(tp.shape)) for tp in plan.tensors]
    return gguf_head_size(meta, entries, version)


def _check_floor(target: SizeTarget, plan: QuantPlan, chosen: list[int], types: list[list[GGMLType]],
                 budget: int, head: int, fixed: int, alignment: int) -> None:
    """A budget below the smallest file the candidates make stops here, before the loss pass."""
    need = sum(min(aligned(tensor_nbytes(t, plan.tensors[i].shape), alignment) for t in ts)
               for i, ts in zip(chosen, types))
    if need <= budget:
        return
    if target.size is not None:
        raise InputError(None, f"--target-size {target.size:,} bytes is too small: the smallest file these "
                               f"candidates make is {head + fixed + need:,} bytes")
    smallest = (fixed + need) * 8 / sum(int(np.prod(tp.shape)) for tp in plan.tensors)
    raise InputError(None, f"--target-bpw {target.bpw:g} is too small: the smallest these candidates make "
                           f"is {smallest:.4f} bpw")


def _measure(tensors: Sequence[TensorEntry], plan: QuantPlan, chosen: list[int], types: list[list[GGMLType]],
             vectors: list, alignment: int, loss: LossFn, threads: int, quiet: bool,
             sensitivity: Mapping[str, float] | None = None) -> list[Choices]:
    """The loss pass: one tensor decoded at a time, each candidate quantized, decoded and compared."""
    tied = not any(canonical_name(tp.name) == "output.weight" for tp in plan.tensors)
    measured = sorted(sensitivity.values()) if sensitivity else []
    median = measured[len(measured) // 2] if measured else 1.0
    out = []
    total = sum(tensor_nbytes(plan.tensors[i].src_type, plan.tensors[i].shape) for i in chosen)
    with WorkProgress(len(chosen), total, "measure", quiet=quiet) as bar:
        for i, ts, vec in zip(chosen, types, vectors):
            tp = plan.tensors[i]
            bar.start(tp.name)
            x = to_float32(tensors[i], threads)
            if sensitivity is not None:  # measured: a tied embedding's two roles are both in its KL
                weight = sensitivity.get(canonical_name(tp.name), median)
            else:
                weight = 2.0 if tied and canonical_name(tp.name) == "token_embd.weight" else 1.0
            options = []
            for t in ts:
                try:
                    value = loss(x, t, vec, threads)
                except ValueError:  # a row this type's search cannot take (llama.cpp aborts there)
                    continue
                options.append(Option(t, aligned(tensor_nbytes(t, tp.shape), alignment), weight * value))
            if not options:
                raise InputError(None, f"tensor {tp.name}: no candidate type can be written")
            out.append(Choices(tp.name, options))
            del x
            bar.done(tensor_nbytes(tp.src_type, tp.shape))
    return out
