"""Carry a model file of any container/version forward (or back) to another.

    source (formats.detect: GGUF v1-v3, 'ggml', 'ggmf', 'ggjt' v1-v3, 'ggmm')
    -> description (sources.model_file: the family bound to an HF-style config
       rebuilt from the header, the tensor shapes, --config and listed
       per-family defaults (Arch.config_from_legacy / config_from_gguf);
       sources.vocab_recovery: the vocabulary)
    -> plan (here: per tensor, copy, relayout, convert or requantize)
    -> sink (formats.gguf / formats.legacy, one tensor's load() at a time).

What a legacy header never stored (context length, norm epsilon, RoPE base,
tokenizer kind, special token ids ...) comes from --config or from a default
that is recorded as a `Guess` naming the GGUF key it fills: never silently.

Tensor data (formats.md 5, 6.8):
- a block type whose layout changed between ggjt versions (Q4_0/Q4_1/Q5_x/
  Q8_0) is re-laid out by the kernel; the result is lossless unless an f32
  scale has no exact f16 (v1/v2 -> v3), in which case the scale is rounded,
  the nearest the new layout allows;
- a type the target cannot hold (Q4_2/Q4_3 anywhere after May 2023, Q5_x in
  'ggmf', K-quants before ggjt v3, ...) is decoded and requantized into the
  nearest type the target holds (NEAREST), or into --type;
- with --type, every tensor that cannot be carried exactly goes to --type
  (--type f32 makes a migration lossless);
- every non-copy step reports whether decoded values are bit-equal to the
  decoded source, with the kernel's error_stats.

LLaMA Q/K rows need no work: legacy files and GGUF both hold Meta's
interleaved order (formats.md 6.7), so the bytes carry over unchanged.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from smolq.arch import Arch, TensorMap
from smolq.arch.legacy_config import Guess
from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.formats.detect import open_model
from smolq.formats.gguf import VERSIONS, MetaValue, Split
from smolq.formats.gguf import GGUFValueType as V
from smolq.formats.legacy import write_legacy
from smolq.ggml_types import (
    VERSIONED_TYPES,
    GGMLType,
    block_size,
    is_quantized,
    tensor_nbytes,
)
from smolq.kernels import DEQUANTIZE_TYPES, dequantize, error_stats, relayout
from smolq.lazy import lazy_module
from smolq.pipeline.convert import add_shards, check_split, convert_tensor
from smolq.plan.mix import PLAIN_FTYPE, parse_type
from smolq.plan.targets import Target, resolve_target, target_types
from smolq.sinks import gguf as gguf_sink
from smolq.sinks.gguf import gguf_metadata
from smolq.sources.model_file import ModelFile, describe, family_of, format_of, read_user_config, same_bytes
from smolq.sources.vocab import Vocab
from smolq.sources.vocab_recovery import legacy_tokens, recover_vocab

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

__all__ = ["Guess", "Plan", "Step", "build_plan", "migrate", "read_user_config", "summary"]

T = GGMLType

# Where a type goes when the target cannot hold it: first storable candidate wins
# (same kind of grid first, then more bits, F32 last so nothing is ever refused).
NEAREST: dict[GGMLType, tuple[GGMLType, ...]] = {
    T.Q4_2: (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.F16, T.F32),
    T.Q4_3: (T.Q4_1, T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q4_0: (T.Q4_1, T.Q5_0, T.Q8_0, T.F16, T.F32),
    T.Q4_1: (T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q5_0: (T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q5_1: (T.Q8_0, T.F16, T.F32),
    T.Q8_0: (T.F16, T.F32),
    T.Q2_K: (T.Q3_K, T.Q4_K, T.Q4_1, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.Q3_K: (T.Q4_K, T.Q4_1, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.Q4_K: (T.Q5_K, T.Q4_1, T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q5_K: (T.Q6_K, T.Q5_1, T.Q8_0, T.F16, T.F32),
    T.Q6_K: (T.Q8_0, T.F16, T.F32),
    T.TQ1_0: (T.TQ2_0, T.Q2_K, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.TQ2_0: (T.Q2_K, T.Q4_0, T.Q8_0, T.F16, T.F32),
    T.BF16: (T.F32,),  # exact
    T.F16: (T.F32,),  # exact
    T.F32: (T.F16,),
}

# File-type word of a legacy header -> LLAMA_FTYPE (general.file_type), by dialect.
# llama.cpp LLaMA headers and GPT4All files use LLAMA_FTYPE numbers already (formats.md 7);
# ggml-examples files use ggml_ftype, which agrees up to 10 (formats.md 2.4).
GGML_FTYPE_TO_LLAMA = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 7: 7, 8: 8, 9: 9, 10: 10, 11: 12, 12: 15, 13: 17, 14: 18}


# LLAMA_FTYPE values that name a mix or a removed type -> their main weight type (formats.md 7).
FTYPE_MIXES = {4: T.Q4_1, 5: T.Q4_2, 6: T.Q4_3, 11: T.Q3_K, 12: T.Q3_K, 13: T.Q3_K, 14: T.Q4_K, 15: T.Q4_K,
               16: T.Q5_K, 17: T.Q5_K}


# ====================================================================== report types

@dataclass
class Step:
    """One output tensor and how it is made from one source tensor."""

    name: str
    source: TensorEntry
    shape: tuple[int, ...]
    type: GGMLType
    layout: str
    action: str  # "copy" | "relayout" | "convert" | "requantize"
    why: str = ""
    lossless: bool | None = None  # known once the data has been produced (copy: True up front)
    stats: dict[str, float | None] | None = None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.shape, self.layout)

    def as_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name, "source": self.source.name, "shape": list(self.shape),
            "source_type": self.source.type.name, "source_layout": self.source.layout,
            "type": self.type.name, "layout": self.layout, "action": self.action,
            "lossless": self.lossless, "bytes": self.nbytes,
        }
        if self.why:
            d["why"] = self.why
        if self.stats is not None:
            d["stats"] = self.stats
        return d


@dataclass
class Plan:
    """Everything decided before a byte is written."""

    source_path: Path
    source_format: str
    family: str | None  # None: a GGUF architecture smolq has no module for (GGUF -> GGUF only)
    target: Target
    steps: list[Step]
    guesses: list[Guess] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None  # GGUF target: key -> MetaValue
    legacy_hparams: dict[str, Any] | None = None
    legacy_vocab: list[tuple[bytes, float | None, bool]] | None = None
    legacy_ftype: int | None = None


# ====================================================================== small helpers



def _decode(entry_or_bytes, t: GGMLType, shape, layout: str) -> np.ndarray:

    data = entry_or_bytes.load() if isinstance(entry_or_bytes, TensorEntry) else entry_or_bytes
    return dequantize(data, t, shape, layout)


def _decodable(t: GGMLType, layout: str) -> bool:

    return (t, layout) in DEQUANTIZE_TYPES


def _row_fits(t: GGMLType, shape: tuple[int, ...]) -> bool:
    return (shape[-1] if shape else 1) % block_size(t) == 0


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _compare(ref: np.ndarray, test: np.ndarray) -> tuple[bool, dict[str, float | None]]:

    lossless = bool(np.array_equal(ref, test, equal_nan=True))
    stats = error_stats(ref, test)
    return lossless, {k: _finite(float(v)) for k, v in stats.items()}


# ====================================================================== tensor planning

def _choose(src: TensorEntry, shape: tuple[int, ...], target: Target, storable: frozenset[GGMLType],
            force: GGMLType | None) -> tuple[GGMLType, str, str]:
    """(type, action, why) for one tensor."""
    t, layout = src.type, src.layout
    if t in storable and _row_fits(t, shape):
        if t in VERSIONED_TYPES and layout != target.layout:
            if force is not None and force != t and _relayout_lossy(src, target.layout):
                return force, "requantize", f"--type: {t.name} {layout}->{target.layout} would round scales"
            return t, "relayout", f"{t.name} blocks {layout} -> {target.layout}"
        return t, "copy", ""
    if force is not None:
        return force, _verb(t, force), f"{target.format} cannot hold {t.name}; --type"
    for cand in NEAREST.get(t, (T.F16, T.F32)):
        if cand in storable and _row_fits(cand, shape):
            return cand, _verb(t, cand), f"{target.format} cannot hold {t.name}; nearest it holds"
    raise InputError(None, f"tensor {src.name}: {target.format} holds no type {t.name} can go to")


def _verb(src: GGMLType, dst: GGMLType) -> str:
    return "requantize" if is_quantized(dst) else "convert"


def _relayout_lossy(src: TensorEntry, dst_layout: str) -> bool:

    _, lossless = relayout(src.load(), src.type, src.layout, dst_layout)
    return not lossless


def _main_type(tensors) -> GGMLType | None:
    counts = Counter(t.type for t in tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0] if counts else None


def _plan_gguf_copy(model, target: Target, force: GGMLType | None) -> list[Step]:
    storable = target_types(target, None)
    steps = []
    for t in model.tensors:
        if t.extra.get("be_blocks_as_stored"):
            raise InputError(model.path, f"tensor {t.name}: block-quantized data in a big-endian GGUF has no "
                                         "defined byte order for its scales; smolq will not guess")
        dst, action, why = _choose(t, t.shape, target, storable, force)
        steps.append(Step(t.name, t, t.shape, dst, target.layout, action, why))
    return steps


def _plan_family(source: ModelFile, target: Target, force: GGMLType | None, notes: list[str]) -> list[Step]:
    """Steps in the order `smolq convert` writes the family's tensors, with its names."""
    model, arch, src, tied = source.model, source.arch, source.tensors, source.tied
    # MPT is always tied (its output.weight copies wte); LLaMA as the source description decided.
    available = set() if tied or arch.family == "mpt" else {"lm_head.weight"}
    maps = arch.tensor_maps(available)
    first_gguf = {}
    for m in maps:
        if m.gguf is not None:
            first_gguf.setdefault(m.source, m.gguf)
    storable = target_types(target, arch.family)
    ggmm = not target.is_gguf and target.legacy.container == "ggmm"
    src_ggmm = model.container == "ggmm"
    main = _main_type(model.tensors)
    steps, used = [], set()
    for m in maps:
        out_name = m.gguf if target.is_gguf else m.legacy
        if out_name is None:
            continue
        key = m.gguf if m.gguf in src else first_gguf.get(m.source)
        entry = src.get(key) if key else None
        if entry is None:
            raise FormatError(model.path, f"no tensor for {out_name} ({m.gguf or m.legacy}) in this {arch.family} file")
        if tuple(entry.shape) != tuple(m.shape):
            raise FormatError(model.path, f"tensor {entry.name} has shape {list(entry.shape)}; the header implies {list(m.shape)}")
        used.add(key)
        steps.append(_step_for(entry, out_name, m, target, storable, force, ggmm, src_ggmm, main))
    _check_unused(model, src, used, arch, target, notes)
    return steps


_GGMM_F32 = frozenset({"transformer.wte.weight"})  # what GPT4All's 'ggmm' loader reads as F32 (formats.md 4.4)


def _step_for(entry: TensorEntry, out_name: str, m: TensorMap, target: Target, storable, force,
              ggmm: bool, src_ggmm: bool, main: GGMLType | None) -> Step:
    shape = tuple(m.shape)
    if ggmm and m.legacy_f32:  # GPT4All's 'ggmm' loader reads wte as F32 (formats.md 4.4)
        if entry.type == T.F32:
            return Step(out_name, entry, shape, T.F32, target.layout, "copy")
        return Step(out_name, entry, shape, T.F32, target.layout, "convert", "'ggmm' keeps wte in F32")
    if src_ggmm and entry.name in _GGMM_F32 and entry.type == T.F32 and main == T.F16 and force is None:
        # 'ggmm' forced wte to F32 whatever the file type; an F16 file's other targets hold it as F16,
        # which is what `smolq convert` writes (the report says whether that rounded anything).
        return Step(out_name, entry, shape, T.F16, target.layout, "convert", "'ggmm' forces wte to F32; the file is F16")
    dst, action, why = _choose(entry, shape, target, storable, force)
    return Step(out_name, entry, shape, dst, target.layout, action, why)


def _check_unused(model, src: dict[str, TensorEntry], used: set[str], arch: Arch, target: Target,
                  notes: list[str]) -> None:
    for name, entry in src.items():
        if name in used:
            continue
        if name == "output.weight" and "token_embd.weight" in src:
            same = same_bytes(entry, src["token_embd.weight"])
            if not same:
                raise InputError(model.path, f"{target.format} has no separate output.weight for {arch.family}, "
                                             "and this one differs from token_embd.weight")
            notes.append("output.weight equals token_embd.weight (tied); the target stores it once")
            continue
        if name == "rope_freqs.weight" or name.endswith(".attn_rot_embd.weight"):
            notes.append(f"{name} dropped (llama.cpp recomputes it)")
            continue
        raise FormatError(model.path, f"tensor {entry.name} has no place in {arch.family} ({target.format})")


# ====================================================================== the plan

def _model_name(user: dict[str, Any], user_path: Path | None, source: Path, guesses: list[Guess]) -> str:
    name = user.get("_name_or_path")
    if isinstance(name, str) and name.strip():
        return Path(name.rstrip("/")).name
    if user_path is not None:
        return user_path.parent.resolve().name
    guesses.append(Guess("general.name", source.stem, "the source file's name"))
    return source.stem


def _file_type(model, steps: list[Step]) -> int | None:
    """general.file_type / the LLaMA header ftype: the source's, unless the main type changed."""

    if model.container == "gguf":
        ftype = model.metadata.get("general.file_type")
    elif model.architecture == "llama" or model.header.get("dialect") == "gpt4all":
        ftype = model.ftype
    else:
        ftype = GGML_FTYPE_TO_LLAMA.get(model.ftype)
    # A file type whose weight type no longer occurs (MOSTLY_Q4_2 after requantizing) is recomputed.
    named = {v: k for k, v in PLAIN_FTYPE.items()} | FTYPE_MIXES
    out_types = {s.type for s in steps}
    if ftype is not None and named.get(ftype) not in out_types:
        after = _main_type(_as_out(s) for s in steps)
        ftype = PLAIN_FTYPE.get(after) if after is not None else ftype
    return ftype


def _as_out(step: Step) -> TensorEntry:
    return TensorEntry(step.name, step.type, step.shape)


def build_plan(src_path, out_path, format: str | None = None, config: str | os.PathLike | None = None,
               type: str | None = None) -> tuple[Plan, Any]:
    """Read the source and decide everything; returns (plan, opened source) — close the source after."""

    src_path, out_path = Path(src_path), Path(out_path)
    force = None
    if type is not None:

        force = parse_type(type, "--type")
    user, user_path, tok_dir = read_user_config(config)
    model = open_model(src_path)
    try:
        family = family_of(model)
        target = resolve_target(format, out_path, family=family)
        plan = Plan(src_path, format_of(model), family, target, [])
        if model.container == "gguf" and target.is_gguf:
            plan.steps = _plan_gguf_copy(model, target, force)
            plan.metadata = _gguf_metadata_for_version(model, target, plan)
        else:
            _plan_with_arch(plan, model, user, user_path, tok_dir, force)
        return plan, model
    except BaseException:
        model.close()
        raise


def _plan_with_arch(plan: Plan, model, user, user_path, tok_dir, force) -> None:
    family, target = plan.family, plan.target
    if family is None:
        raise InputError(model.path, f"architecture {model.architecture!r} has no legacy format")
    source = describe(model, user, user_path)
    arch = source.arch
    plan.guesses += source.guesses
    plan.notes += source.notes
    if target.legacy is not None:
        arch.legacy_target(target.format, plan.source_path)  # the family's own refusals (MPT with GQA)
    plan.guesses += [Guess("?", None, g) for g in arch.guesses]  # none expected: every key is filled above
    plan.steps = _plan_family(source, target, force, plan.notes)
    vocab = recover_vocab(model, arch, user, tok_dir, plan.guesses, plan.notes)
    file_type = _file_type(model, plan.steps)
    if target.is_gguf:
        plan.metadata = _gguf_metadata(arch, vocab, user, user_path, model.path, file_type, plan.guesses)
    else:
        plan.legacy_hparams = arch.legacy_hparams(target.legacy)
        plan.notes += arch.notes
        plan.legacy_vocab = legacy_tokens(model, vocab, family, target.legacy)
        plan.legacy_ftype = file_type if family == "llama" else None


def _gguf_metadata(arch: Arch, vocab: Vocab, user, user_path, source: Path, file_type, guesses) -> dict[str, Any]:
    """The keys `smolq convert` writes, in its order; the name comes from --config or the file."""

    return gguf_metadata(arch, vocab, None, file_type, name=_model_name(user, user_path, source, guesses))


def _gguf_metadata_for_version(model, target: Target, plan: Plan) -> dict[str, Any]:
    """GGUF -> GGUF: the same KVs; 64-bit values narrowed for v1 where they fit (formats.md 6.2)."""

    allowed = VERSIONS[target.gguf_version].value_types
    narrow = {V.UINT64: V.UINT32, V.INT64: V.INT32, V.FLOAT64: V.FLOAT32}
    out: dict[str, Any] = {}
    for key, mv in model.raw.metadata.items():
        t = mv.item_type if mv.type == V.ARRAY else mv.type
        if t in allowed:
            out[key] = mv
            continue
        try:
            out[key] = MetaValue.of(mv.value, narrow[t]) if mv.type != V.ARRAY else MetaValue.array(mv.value, narrow[t])
        except (ValueError, KeyError, OverflowError):
            raise InputError(plan.target.format, f"metadata {key} ({t.name}) does not fit GGUF v{target.gguf_version}") from None
        plan.notes.append(f"{key}: {t.name} narrowed to {narrow[t].name} for GGUF v{target.gguf_version}")
    ftype = _file_type(model, plan.steps)
    if ftype is not None and "general.file_type" in out and out["general.file_type"].value != ftype:
        out["general.file_type"] = MetaValue.u32(ftype)
    return out


# ====================================================================== tensor data

def _produce(step: Step) -> np.ndarray:
    """The output bytes of one step; fills step.lossless and step.stats."""
    src = step.source
    if step.action == "copy":
        step.lossless = True
        return src.load()
    if step.action == "relayout":

        data, _ = relayout(src.load(), src.type, src.layout, step.layout)
    else:
        if not _decodable(src.type, src.layout):
            raise InputError(None, f"tensor {src.name}: smolq cannot decode {src.type.name} to convert it")

        data = convert_tensor(_decode(src, src.type, src.shape, src.layout), step.type, step.layout)
    ref = _decode(src, src.type, src.shape, src.layout)
    test = _decode(data, step.type, step.shape, step.layout)
    step.lossless, step.stats = _compare(ref, test)
    return data


def _produce_or_explain(step: Step, path: Path) -> np.ndarray:
    try:
        return _produce(step)
    except ValueError as exc:  # the kernel's refusals (a NaN to quantize, a type it cannot decode)
        raise InputError(path, f"tensor {step.source.name}: {exc}") from None


def _entries(plan: Plan) -> list[TensorEntry]:
    return [TensorEntry(s.name, s.type, s.shape, (lambda s=s: _produce_or_explain(s, plan.source_path)), s.layout)
            for s in plan.steps]


# ====================================================================== the command

def summary(plan: Plan, out: Path) -> dict[str, Any]:
    steps = plan.steps
    return {
        "source": str(plan.source_path), "output": str(out), "source_format": plan.source_format,
        "format": plan.target.format, "architecture": plan.family, "n_tensors": len(steps),
        "tensor_bytes": sum(s.nbytes for s in steps),
        "guesses": [g.as_dict() for g in plan.guesses], "notes": list(plan.notes),
        "tensors": [s.as_dict() for s in steps],
        "n_copied": sum(s.action == "copy" for s in steps),
        "n_lossless": sum(s.lossless is True for s in steps),
        "n_lossy": sum(s.lossless is False for s in steps),
    }


def migrate(src_path, out_path, format: str | None = None, config: str | os.PathLike | None = None,
            type: str | None = None, dry_run: bool = False,
            on_progress: Callable[[dict[str, Any]], None] | None = None,
            split: Split | None = None) -> dict[str, Any]:
    """Migrate one model file; returns the summary (the per-tensor report filled in).

    format: gguf (v3, default), gguf-v1|v2|v3, ggml, ggmf, ggjt-v1|v2|v3, ggmm.
    config: an HF checkpoint directory or config.json for the values a legacy
    header lacks (and its tokenizer); without it they are guessed and listed.
    type: where tensors go that cannot be carried exactly (f32: lossless).
    split: shard a GGUF output as llama.cpp's gguf-split does.
    """
    started = time.perf_counter()
    out = Path(out_path)
    plan, model = build_plan(src_path, out, format, config, type)
    try:
        if out.resolve() == Path(src_path).resolve():
            raise InputError(out, "output would overwrite the input")
        check_split(split, plan.target, out)
        result = summary(plan, out)
        if plan.target.is_gguf:
            add_shards(result, out, plan.metadata, [_as_out(s) for s in plan.steps], split)
        if dry_run:
            result["dry_run"] = True
            return result
        _emit(on_progress, event="start", n_tensors=len(plan.steps), n_bytes=result["tensor_bytes"])

        def on_tensor(entry: TensorEntry, *_: Any) -> None:
            _emit(on_progress, event="tensor", name=entry.name, nbytes=entry.nbytes)

        size = _write(plan, out, on_tensor, split)
        shards = {k: result[k] for k in ("output", "shards") if "shards" in result}
        result = summary(plan, out)
        result.update(shards)
        result.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
        _emit(on_progress, event="done", bytes=size)
        return result
    finally:
        model.close()


def _emit(on_progress, **event) -> None:
    if on_progress is not None:
        on_progress(event)


def _write(plan: Plan, out: Path, on_tensor, split: Split | None = None) -> int:
    entries = _entries(plan)
    if plan.target.is_gguf:
        return gguf_sink.write(out, plan.target.gguf_version, plan.metadata, entries, on_tensor=on_tensor,
                               split=split)

    lt = plan.target.legacy
    vocab = plan.legacy_vocab
    write_legacy(out, lt.container, lt.version, plan.family, plan.legacy_hparams,
                 [(text, score) for text, score, _ in vocab], entries, dialect=lt.dialect,
                 ftype=plan.legacy_ftype, on_tensor=on_tensor,
                 special_tokens=[i for i, (_, _, special) in enumerate(vocab) if special])
    return out.stat().st_size
