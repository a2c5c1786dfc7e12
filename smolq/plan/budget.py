"""Per-tensor types chosen to fit a size budget (--target-bpw / --target-size), and recipes.

    targets (--target-bpw B | --target-size SIZE) -> candidate types per tensor (--candidates,
    shape fallbacks, imatrix-only types) -> [the pipeline measures each candidate's loss]
    -> allocate(): the least total predicted loss whose bytes fit -> a recipe (tensor -> type)

A recipe is JSON, {tensor name: type name}; --save-recipe and `smolq inspect --recipe`
write one, --recipe applies one to another checkpoint of the same shapes (a finetune of
the same base) without the loss pass, and the output GGUF keeps the chosen part of it
under quantize.recipe.

Pure: sizes and losses in, a choice out. What a loss is and how it is measured lives
in pipeline/allocate.py; nothing here reads tensor data.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

from smolq.atomic import atomic_output
from smolq.errors import InputError
from smolq.ggml_types import GGMLType, block_size, is_quantized
from smolq.lazy import lazy_module
from smolq.plan.mix import (NEEDS_IMATRIX, PLAN_TYPES, Preset, canonical_name, is_quantizable, parse_type,
                            with_shape_fallback)
from smolq.kernels import NEEDS_IMATRIX as KERNEL_NEEDS_IMATRIX

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

T = GGMLType

# The preset of a run whose types a budget or recipe chooses: no llama.cpp file type (its loader
# then names the file by its most common type), and no mix rules (every quantizable type is set).
MIXED = Preset("MIXED", T.Q8_0, None)

RECIPE_KEY = "quantize.recipe"  # GGUF metadata: JSON {tensor: type} of the tensors the allocator chose

# The default candidates: the K-quants and Q8_0, and every i-quant (those that need an importance
# matrix only for tensors that have an importance vector; see candidate_types).
DEFAULT_CANDIDATES: tuple[GGMLType, ...] = (
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0,
    T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS,
)
# Types that cannot be quantized sensibly (llama.cpp's rule) or at all (its kernels) without one.
NEEDS_VECTOR = NEEDS_IMATRIX | KERNEL_NEEDS_IMATRIX

# Size suffixes: K, M, G, T decimal (as --split-max-size), Ki, Mi, Gi, Ti binary; a trailing B optional.
SIZE_UNITS: Mapping[str, int] = {
    "": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?)?B?\s*", re.IGNORECASE)

# The DP works in units of bytes; this many units (at most, per the size range the
# candidates span) keeps its table small while the rounding stays far below one tensor.
MIN_UNITS, MAX_UNITS, UNITS_PER_TENSOR = 1 << 16, 1 << 18, 256


# --- the target ------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """Bytes from "80MiB", "1.2G", "500M", "123456" (decimal K/M/G, binary Ki/Mi/Gi)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE.fullmatch(str(text))
        if m is None:
            raise InputError(None, f"--target-size {text!r}: give bytes with an optional suffix "
                                   f"(K, M, G decimal; KiB, MiB, GiB binary), e.g. 80MiB or 1.2G")
        n = math.floor(Fraction(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise InputError(None, f"--target-size {text!r}: the size must be positive")
    return n


@dataclass(frozen=True)
class SizeTarget:
    """--target-bpw B (bits per weight of the tensor data, llama.cpp's "BPW") or --target-size SIZE
    (bytes of the whole file: header, metadata and padded tensor data)."""

    bpw: float | None = None
    size: int | None = None

    @classmethod
    def of(cls, bpw: float | None, size: str | int | None) -> "SizeTarget | None":
        if bpw is not None and size is not None:
            raise InputError(None, "give one of --target-bpw and --target-size, not both")
        if bpw is not None:
            if not (math.isfinite(bpw) and bpw > 0):
                raise InputError(None, f"--target-bpw {bpw}: give a positive number of bits per weight")
            return cls(bpw=float(bpw))
        return cls(size=parse_size(size)) if size is not None else None

    def data_budget(self, n_elements: int, head_bytes: int) -> int:
        """Bytes the (padded) tensor data may take, given the file's header size."""
        if self.size is not None:
            return self.size - head_bytes
        return math.floor(Fraction(self.bpw) * n_elements / 8)

    def describe(self) -> str:
        return f"{self.bpw:g} bpw" if self.bpw is not None else f"{self.size:,} bytes"

    def what(self) -> str:
        return "--target-bpw" if self.bpw is not None else "--target-size"


# --- candidates --------------------------------------------------------------------------------

def parse_candidates(spec: str | Sequence[str] | None) -> tuple[GGMLType, ...]:
    """--candidates q4_k,q6_k,... -> types (default: DEFAULT_CANDIDATES); only quantized types."""
    if spec is None:
        return DEFAULT_CANDIDATES
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    types = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        t = parse_type(name, "--candidates type")
        if not is_quantized(t):
            raise InputError(None, f"--candidates {name}: only quantized types are candidates")
        if t not in types:
            types.append(t)
    if not types:
        raise InputError(None, "--candidates names no type")
    return tuple(types)


def candidate_types(shape: Sequence[int], candidates: Sequence[GGMLType], has_vector: bool,
                    writable: frozenset | None = None) -> list[GGMLType]:
    """The types a tensor may take: each candidate after the plan's shape fallback (a row that does not
    fit Q4_K's 256 takes Q5_0, as llama-quantize does), without the imatrix-only types when the tensor
    has no importance vector, and (given `writable`) only types the kernel writes."""
    out: list[GGMLType] = []
    for t in candidates:
        if t in NEEDS_VECTOR and not has_vector:
            continue
        t, _ = with_shape_fallback(t, tuple(shape))  # fallbacks (IQ4_NL, Q4_0 ...) need no vector
        if (writable is None or t in writable) and t not in out:
            out.append(t)
    return out


# --- the allocator -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One candidate type of one tensor: its (padded) bytes in the file and its predicted loss."""

    type: GGMLType
    nbytes: int
    loss: float


@dataclass
class Choices:
    name: str
    options: list[Option]


@dataclass
class Allocation:
    types: list[GGMLType]  # per Choices, in their order
    losses: list[float]
    nbytes: int  # bytes of the chosen options
    loss: float  # total predicted loss (the sum of `losses`, left to right)
    budget: int


class BudgetTooSmall(InputError):
    """The smallest choice of every tensor does not fit."""

    def __init__(self, need: int, budget: int):
        super().__init__(None, f"the budget leaves {budget:,} bytes for the tensors, but their smallest "
                               f"candidates take {need:,}")
        self.need, self.budget = need, budget


def allocate(choices: Sequence[Choices], budget: int) -> Allocation:
    """The option per tensor with the least total loss whose bytes sum to at most `budget`.

    A multiple-choice knapsack solved exactly by dynamic programming over bytes above each
    tensor's cheapest option, counted in units rounded up: the result never exceeds the
    budget, leaves less than one unit per tensor of rounding (a unit is at most 1/65536 of
    the bytes the candidates span), and its loss never grows with the budget (the unit does
    not depend on it, so a larger budget only adds choices)."""
    for c in choices:
        if not c.options:
            raise ValueError(f"tensor {c.name} has no candidate type")
    floor_bytes = sum(min(o.nbytes for o in c.options) for c in choices)
    if floor_bytes > budget:
        raise BudgetTooSmall(floor_bytes, budget)
    unit = _unit(choices)
    span = sum(_units(max(o.nbytes for o in c.options) - min(o.nbytes for o in c.options), unit) for c in choices)
    cap = min((budget - floor_bytes) // unit, span)
    picks = _knapsack(choices, unit, cap)
    chosen = [c.options[i] for c, i in zip(choices, picks)]
    losses = [o.loss for o in chosen]
    return Allocation([o.type for o in chosen], losses, sum(o.nbytes for o in chosen), _sum(losses), budget)


def _sum(values: Sequence[float]) -> float:
    total = 0.0
    for v in values:  # left to right, as the DP adds them: the same float
        total += v
    return total


def _unit(choices: Sequence[Choices]) -> int:
    spread = sum(max(o.nbytes for o in c.options) - min(o.nbytes for o in c.options) for c in choices)
    units = min(MAX_UNITS, max(MIN_UNITS, UNITS_PER_TENSOR * len(choices)))
    return max(1, -(-spread // units))


def _units(nbytes: int, unit: int) -> int:
    return -(-nbytes // unit)


def _knapsack(choices: Sequence[Choices], unit: int, cap: int) -> list[int]:
    """Index of the chosen option per tensor. best[b]: least loss of the tensors so far within b units
    (non-increasing in b at every step, exactly, since each step is a min over shifted copies)."""
    best = np.zeros(cap + 1)
    picks = np.zeros((len(choices), cap + 1), dtype=np.uint8)
    for k, c in enumerate(choices):
        base = min(o.nbytes for o in c.options)
        nxt = np.full(cap + 1, np.inf)
        for i, o in enumerate(c.options):
            u = _units(o.nbytes - base, unit)
            if u > cap:
                continue
            cand = best[: cap + 1 - u] + o.loss
            better = cand < nxt[u:]
            nxt[u:][better] = cand[better]
            picks[k, u:][better] = i
        best = nxt
    out, b = [0] * len(choices), cap
    for k in range(len(choices) - 1, -1, -1):
        i = int(picks[k, b])
        out[k] = i
        o = choices[k].options
        b -= _units(o[i].nbytes - min(x.nbytes for x in o), unit)
    return out


# --- recipes -----------------------------------------------------------------------------------

def recipe_json(recipe: Mapping[str, GGMLType]) -> str:
    """The compact JSON form (no spaces) stored under quantize.recipe and in recipe files."""
    return json.dumps({name: t.name for name, t in recipe.items()}, separators=(",", ":"))


def write_recipe(path: str | os.PathLike, recipe: Mapping[str, GGMLType]) -> None:
    """A recipe file: one "name": "TYPE" line per tensor, so that a diff of two reads well."""
    body = json.dumps({name: t.name for name, t in recipe.items()}, indent=1) + "\n"
    with atomic_output(Path(path)) as fh:
        fh.write(body.encode("utf-8"))


def read_recipe(path: str | os.PathLike) -> dict[str, GGMLType]:
    """A recipe file -> {tensor name: type}; anything else is a one-line error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such recipe file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not a recipe (JSON {{tensor: type}}): {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InputError(path, "not a recipe: expected a JSON object of tensor name -> type name")
    out = {}
    for name, type_name in data.items():
        try:
            t = GGMLType.from_name(type_name.strip().upper())
        except ValueError:
            t = None
        if t is None or t not in PLAN_TYPES:
            raise InputError(path, f"tensor {name}: unknown type {type_name!r}")
        out[name] = t
    return out


def recipe_for(names: Sequence[str], recipe: Mapping[str, GGMLType], path: str | os.PathLike) -> list[GGMLType]:
    """The recipe's type for each tensor (by its name or its GGUF name); a recipe of another
    model (a tensor missing, or one the model does not have) is a one-line error."""
    by_gguf = {canonical_name(k): v for k, v in recipe.items()}
    out, seen = [], set()
    for name in names:
        key = name if name in recipe else canonical_name(name)
        t = recipe.get(key, by_gguf.get(key))
        if t is None:
            raise InputError(Path(path), f"has no type for tensor {name}: a recipe of another model?")
        out.append(t)
        seen.add(canonical_name(name))
    extra = [k for k in recipe if canonical_name(k) not in seen]
    if extra:
        raise InputError(Path(path), f"names {len(extra)} tensors the model does not have (e.g. {extra[0]}): "
                                     f"a recipe of another model?")
    return out


def checked_recipe_types(rows: Sequence[tuple[str, tuple[int, ...]]], recipe: Mapping[str, GGMLType],
                         path: str | os.PathLike, arch: str, leave_output: bool = False) -> list[GGMLType]:
    """recipe_for on (name, shape) rows, each type checked against its tensor: it must fit the
    row length, and only tensors llama.cpp quantizes may get a quantized type. One piece for
    the RTN path (a GGUF in) and the GPTQ path (a checkpoint in)."""
    types = recipe_for([name for name, _ in rows], recipe, path)
    for (name, shape), t in zip(rows, types):
        if not shape or shape[-1] % block_size(t):
            raise InputError(Path(path), f"tensor {name}: {t.name} does not fit its rows of "
                                         f"{shape[-1] if shape else 0}: a recipe of another model?")
        if is_quantized(t) and not is_quantizable(name, tuple(shape), leave_output, arch):
            raise InputError(Path(path), f"tensor {name}: {t.name}, but llama.cpp never quantizes this tensor")
    return types
