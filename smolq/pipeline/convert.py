"""HF checkpoint -> GGUF or legacy ggml file, one tensor at a time.

    source (checkpoint.py) -> arch (names, shapes, transforms) -> plan (types)
    -> quantizer (numpy for f32/f16, the C kernel for bf16 and block types)
    -> sink (formats.gguf / formats.legacy, which call each entry's load()).

Peak memory is a few copies of the largest tensor: each output entry's
load() maps its source tensor, transforms and converts it, and the writer
drops the result before asking for the next.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from smolq.arch import Arch, TensorMap, arch_for_config
from smolq.errors import InputError
from smolq.formats.base import TensorEntry
from smolq.formats.gguf import Split
from smolq.formats.legacy import check_predates, infer_file_type
from smolq.ggml_types import GGMLType, is_quantized, tensor_nbytes
from smolq.kernels import QUANTIZE_TYPES, quantize, relayout
from smolq.lazy import lazy_module
from smolq.pipeline.hf_export import export_gptq_hf, export_hf
from smolq.pipeline.mlc import convert_mlc
from smolq.plan.budget import MIXED, checked_recipe_types
from smolq.plan.imatrix import ImatrixChoice, check_required, choose_imatrix, imatrix_metadata, record_use
from smolq.plan.mix import ModelInfo, PlanOptions, Preset, plan_tensor_types, resolve_preset
from smolq.plan.targets import (
    ALL_FORMATS,
    FORMAT_ALIASES,
    GGUF_FORMATS,
    LEGACY_FORMATS,
    Target,
    is_hf_format,
    resolve_target,
    target_types,
)
from smolq.sinks import gguf as gguf_sink
from smolq.sinks import legacy as legacy_sink
from smolq.sinks.gguf import gguf_metadata
from smolq.sources.checkpoint import Checkpoint, SourceTensor, open_checkpoint
from smolq.sources.gptq import GPTQSourceTensor, default_type, looks_like_gptq, open_gptq_checkpoint, summarize
from smolq.sources.vocab import Vocab, load_vocab

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

T = GGMLType

__all__ = ["ALL_FORMATS", "FORMAT_ALIASES", "GGUF_FORMATS", "LEGACY_FORMATS", "Target", "resolve_target",
           "gguf_metadata", "convert", "check_split", "add_shards", "build_steps", "convert_tensor", "place_blocks", "open_source"]
SOURCE_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "F64": T.F32}


@dataclass
class Step:
    """One output tensor: where it comes from and what it becomes."""

    name: str
    map: TensorMap
    source: SourceTensor
    type: GGMLType
    fallback: bool = False
    layout: str = "v3"
    exact: bool = False  # GPTQ source whose grid is copied into `type` unchanged (gptq_import.py)
    imatrix: Any = None  # importance vector (llama.cpp's quant_weights) for the quantizer, or None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type, self.map.shape, self.layout)


# ------------------------------------------------------------------ planning types

def _gguf_name(arch: Arch, m: TensorMap) -> str:
    return m.gguf or arch.names.to_gguf(m.legacy or "") or m.source


def plan_types(arch: Arch, maps: list[TensorMap], target: Target, outtype: str, path: Path,
               has_imatrix: bool = False) -> tuple[list[tuple[GGMLType, bool]], Any]:
    """Per-tensor (type, fell back) with llama.cpp's rules: 1-D and norms stay F32 (plan.py)."""

    preset = resolve_preset(type_name=outtype)
    info = ModelInfo(arch=arch.gguf_arch, n_layer=getattr(arch, "n_layer", 0),
                     n_head=getattr(arch, "n_head", 0), n_head_kv=getattr(arch, "n_head_kv", 0))
    rows = [(_gguf_name(arch, m), T.F32, m.shape) for m in maps]
    opts = PlanOptions(pure=_predates_k_quants(arch, target), has_imatrix=has_imatrix)
    plan = plan_tensor_types(rows, preset, info, opts)
    missing = plan.missing_imatrix()
    if missing:
        raise InputError(path, f"{preset.name} needs an importance matrix for {len(missing)} tensors (e.g. "
                               f"{missing[0].name}: {missing[0].dst_type.name}); pass --imatrix FILE")
    out = []
    for m, tp in zip(maps, plan.tensors):
        t = tp.dst_type
        if m.keep_f32 or (target.legacy and target.legacy.container == "ggmm" and m.legacy_f32):
            t = T.F32
        out.append((t, tp.fallback))
    return out, preset


def _predates_k_quants(arch: Arch, target: Target) -> bool:
    """Containers from before June 2023: their quantizers gave every matrix the
    file's type. The mix rules (output.weight -> Q6_K, ...) came with K-quants,
    so applying them would ask for types these files cannot hold."""
    return target.legacy is not None and T.Q6_K not in target_types(target, arch.family)


def _check_storable(arch: Arch, target: Target, steps: list[Step], path: Path) -> None:
    if target.legacy is None:
        if any(s.type in (T.Q4_2, T.Q4_3) for s in steps):
            raise InputError(path, "GGUF cannot hold Q4_2/Q4_3")
        _check_kernel_writes(steps, path)
        return
    lt = target.legacy
    allowed = target_types(target, arch.family)
    for s in steps:
        check_predates(path, lt.container, lt.version, s.type)
        if s.type not in allowed:
            holds = ", ".join(sorted(t.name for t in allowed))
            raise InputError(path, f"{target.format} ({arch.family}, {lt.dialect}) cannot hold {s.type.name} "
                                   f"for {s.name}; it holds {holds}")


def _check_kernel_writes(steps: list[Step], path: Path) -> None:
    """A type the plan may name (an i-quant, MXFP4) that the C kernel cannot write yet: one line, before any work."""
    unwritable = sorted({s.type.name for s in steps
                         if not getattr(s, "exact", False) and (s.type, "v3") not in QUANTIZE_TYPES})
    if unwritable:
        raise InputError(path, f"the kernel cannot write {', '.join(unwritable)} yet")


# ------------------------------------------------------------------ tensor data

def _to_bf16(x: np.ndarray) -> np.ndarray:

    return quantize(x.reshape(-1, x.shape[-1]), T.BF16)


def convert_tensor(x: np.ndarray, dst: GGMLType, layout: str = "v3", imatrix: np.ndarray | None = None) -> np.ndarray:
    """Float data (HF-layout already transformed) -> the bytes of `dst` in `layout`
    (block types weighted by the importance vector `imatrix` when given)."""
    if dst == T.F32:
        return np.ascontiguousarray(x, dtype="<f4")
    if dst == T.F16:
        return np.ascontiguousarray(x, dtype="<f2")

    n = x.shape[-1] if x.ndim else 1
    return quantize(np.asarray(x, dtype=np.float32).reshape(-1, n), dst, layout=layout, imatrix=imatrix)


def place_blocks(data: np.ndarray, m: TensorMap, t: GGMLType, layout: str, path: Path | None = None) -> np.ndarray:
    """Quantized rows [out, row_bytes] in v3 layout -> the output tensor's bytes:
    rows moved by the arch's row transform, blocks relaid for older layouts."""
    perm = m.row_permutation(path)
    if perm is not None:
        data = data[perm]
    if layout != "v3":

        data, _ = relayout(data, t, "v3", layout)
    return np.ascontiguousarray(data)


def _loader(step: Step, layout: str) -> Callable[[], Any]:
    src, m, dst = step.source, step.map, step.type
    if step.exact:
        return lambda: place_blocks(src.exact_blocks(dst), m, dst, layout, src.file)

    if m.transform is None and SOURCE_TYPES.get(src.dtype) == dst and src.dtype != "F64":
        return src.raw_loader()  # same type, no transform: the stored bytes as they are

    def load():
        x = src.load()
        if m.transform is not None:
            x = m.transform(x)
        return convert_tensor(x, dst, layout, step.imatrix)

    return load


def _entries(steps: list[Step], layout: str) -> list[TensorEntry]:
    return [TensorEntry(s.name, s.type, tuple(s.map.shape), _loader(s, layout), layout) for s in steps]


# ------------------------------------------------------------------ the command

def _progress_event(on_progress, **event) -> None:
    if on_progress is not None:
        on_progress(event)


def _legacy_ftype(arch: Arch, preset) -> int | None:
    """LLaMA headers hold LLAMA_FTYPE (a mix has its own value); other dialects: the writer infers it."""
    return preset.ftype if arch.family == "llama" and preset.ftype is not None else None


def build_steps(arch: Arch, ckpt: Checkpoint, target: Target, outtype: str | None, out_path: Path,
                choice: ImatrixChoice | None = None,
                calibrated: Callable[[str, GGMLType], bool] | None = None,
                recipe: tuple[Mapping[str, GGMLType], Path] | None = None):
    """outtype None: f16 for an HF checkpoint; for a GPTQ one, each Linear's exact type (else by bits).
    choice: the importance matrix the block types are quantized with (--imatrix).
    calibrated(source name, type): True for the tensors whose blocks the caller makes itself from
    calibration data (GPTQ's Hessian is their importance): the plan then counts as having an
    importance matrix (llama.cpp's imatrix presets), and those tensors need no --imatrix.
    recipe: ({GGUF tensor name: type}, the file it came from) sets every tensor's type instead of
    outtype's mix (GGUF targets; the preset is then MIXED)."""
    maps = arch.tensor_maps(set(ckpt.tensors))
    if getattr(ckpt, "linears", None):
        ckpt.drop_zero_biases({m.source for m in maps})
    arch.check_tensors(maps, ckpt.tensors, ckpt.file_of)
    maps = [m for m in maps if (m.gguf if target.is_gguf else m.legacy) is not None]
    types, preset = plan_types(arch, maps, target, "f16" if recipe else outtype or "f16", out_path,
                               has_imatrix=choice is not None or calibrated is not None)
    if recipe is not None:
        types, preset = _recipe_types(arch, maps, target, recipe, out_path), MIXED
    steps = [Step(m.gguf if target.is_gguf else m.legacy, m, _source_of(m, ckpt, arch), t, fb, target.layout)
             for m, (t, fb) in zip(maps, types)]
    if getattr(ckpt, "linears", None):
        preset = _gptq_types(steps, outtype, preset)
    _check_storable(arch, target, steps, out_path)
    _give_importance(arch, [s for s in steps if not (calibrated and calibrated(s.map.source, s.type))],
                     choice, preset, ckpt.path)
    if target.legacy and _legacy_ftype(arch, preset) is None:  # the writer will name the file type itself
        lt = target.legacy
        infer_file_type(out_path, lt.container, arch.family, lt.dialect, [(s.type, s.map.shape) for s in steps])
    return steps, preset


def _recipe_types(arch: Arch, maps: list[TensorMap], target: Target, recipe: tuple[Mapping[str, GGMLType], Path],
                  out_path: Path) -> list[tuple[GGMLType, bool]]:
    """(type, fell back) of each tensor from a recipe; only a GGUF file holds the types one chooses."""
    if not target.is_gguf:
        raise InputError(out_path, "--target-*/--recipe write GGUF")
    table, path = recipe
    rows = [(m.gguf, tuple(m.shape)) for m in maps]
    return [(t, False) for t in checked_recipe_types(rows, table, path, arch.gguf_arch)]


def _source_of(m: TensorMap, ckpt: Checkpoint, arch: Arch) -> SourceTensor:
    """The checkpoint tensor a map reads, or for one the config defines (rope_freqs) its computed values."""
    if m.make is None:
        return ckpt.tensors[m.source]
    return SourceTensor(m.source, "F32", tuple(m.shape), arch.config_path, m.make)


def _give_importance(arch: Arch, steps: list[Step], choice: ImatrixChoice | None, preset: Preset,
                     model: Path) -> None:
    """Each block-type step's importance vector, by its GGUF name (plan/imatrix.py's rules)."""
    for s in steps:
        if not is_quantized(s.type) or s.exact:
            continue
        name = _gguf_name(arch, s.map)
        s.imatrix = choice.vector(name, s.map.shape) if choice is not None else None
        check_required(choice, name, s.type, preset, s.imatrix, model)


def _gptq_types(steps: list[Step], outtype: str | None, preset):
    """GPTQ Linears: the default type when none was asked for; exact wherever the type allows."""

    linears = [s for s in steps if isinstance(s.source, GPTQSourceTensor)]
    for s in linears:
        if outtype is None:
            s.type, s.fallback = default_type(s.source, s.map.shape)
        s.exact = s.type in s.source.exactness().types
    if outtype is None and linears:  # the file type of the most common Linear type
        preset = resolve_preset(type_name=Counter(s.type.name for s in linears).most_common(1)[0][0])
    return preset


def convert(
    src_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    format: str | None = None,
    outtype: str | None = None,
    vocab_only: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    split: Split | None = None,
    max_shard_size: int | str | None = None,
    imatrix: str | os.PathLike | None = None,
    include_weights: list[str] | tuple[str, ...] = (),
    exclude_weights: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint directory; returns a summary dict.
    With format "hf" the source is a GGUF or legacy model file instead, written back as a
    Hugging Face checkpoint directory (pipeline/hf_export.py; outtype f32, f16 or bf16,
    max_shard_size its safetensors shard limit).

    format: "gguf" / "gguf-v1|v2|v3" / "ggml" / "ggmf" / "ggjt-v1|v2|v3" / "ggmm",
    "mlc" (MLC-LLM weights, a directory; outtype q4f16_1, q4f16_0, q3f16_1 or q0f16, the default), or None to pick from the suffix (.gguf -> GGUF v3; .bin -> the newest
    legacy format GPT4All's legacy backend loads for the family). outtype:
    f32, f16, bf16, q8_0, any RTN type or a llama.cpp mix (q4_k_m ...); None:
    f16, or for a GPTQ directory each Linear's exact type where its grid maps
    onto one, else Q2_K/Q3_K/Q4_K/Q8_0 by bits (gptq_import.py).
    on_progress(event) gets {"event": "start"|"tensor"|"done", ...}.
    split: shard a GGUF output as llama.cpp's gguf-split does (sinks.gguf).
    imatrix: an importance matrix file (llama.cpp GGUF or .dat) for the block types, with
    llama-quantize's include_weights / exclude_weights substring filters.
    """
    started = time.perf_counter()
    out = Path(out_path)
    if imatrix is not None and (is_hf_format(format) or (format or "").lower() == "mlc"):
        raise InputError(out, f"--imatrix applies to GGUF and legacy outputs, not --format {format}")
    choice = choose_imatrix(imatrix, include_weights, exclude_weights)
    if is_hf_format(format):
        if split or vocab_only:
            raise InputError(out, "--format hf takes --max-shard-size, not --split-max-size/-tensors or --vocab-only")
        export = export_gptq_hf if looks_like_gptq(src_dir) else export_hf
        return export(src_dir, out, outtype, max_shard_size=max_shard_size, dry_run=dry_run,
                      on_progress=on_progress)
    if max_shard_size is not None:
        raise InputError(out, "--max-shard-size applies to --format hf; GGUF output is split with --split-max-size")
    ckpt = open_source(src_dir)
    try:
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        target = resolve_target(format, out, arch)
        if target.is_mlc:
            return convert_mlc(ckpt, arch, out, outtype, vocab_only=vocab_only, dry_run=dry_run,
                               on_progress=on_progress)
        check_split(split, target, out)
        steps, preset = build_steps(arch, ckpt, target, outtype, out, choice)
        hparams = arch.legacy_hparams(target.legacy) if target.legacy else None  # refuses early
        if vocab_only:
            steps = []
        vocab = load_vocab(ckpt.path, arch.n_vocab, arch.family, ckpt.config)
        if target.legacy:
            vocab.check_legacy(arch.family, out)
        summary = _summary(ckpt, arch, target, outtype, steps, vocab, out)
        file_type = preset.ftype
        md = gguf_metadata(arch, vocab, ckpt, file_type) if target.is_gguf else {}
        _add_imatrix(summary, md, choice, steps)
        add_shards(summary, out, md, _entries(steps, "v3") if target.is_gguf else [], split)
        if dry_run:
            summary["dry_run"] = True
            return summary
        _progress_event(on_progress, event="start", n_tensors=len(steps), n_bytes=summary["tensor_bytes"])

        def on_tensor(entry: TensorEntry, *_: Any) -> None:
            _progress_event(on_progress, event="tensor", name=entry.name, nbytes=entry.nbytes)

        if target.is_gguf:
            size = gguf_sink.write(out, target.version, md, _entries(steps, "v3"), on_tensor=on_tensor, split=split)
        else:
            size = _write_legacy_file(out, arch, target, hparams, vocab, steps, preset, on_tensor)
        summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
        _progress_event(on_progress, event="done", bytes=size)
        return summary
    finally:
        ckpt.close()


def _add_imatrix(summary: dict[str, Any], md: dict, choice: ImatrixChoice | None, steps: list[Step]) -> None:
    """Record the importance matrix as llama-quantize does (GGUF keys) and in the summary."""
    if choice is None:
        return
    md.update(imatrix_metadata(choice))
    record_use(summary, choice, [s.imatrix for s in steps])


def check_split(split: Split | None, target: Target, out: Path) -> None:
    """--split-max-size / --split-max-tensors shard GGUF outputs only."""
    if split and not target.is_gguf:
        raise InputError(out, f"--split-max-size / --split-max-tensors apply to GGUF outputs, not {target.format}")


def add_shards(summary: dict[str, Any], out: Path, metadata: Any, entries: list[TensorEntry],
               split: Split | None) -> None:
    """Name the shards in the summary when the output is split (output: the first shard)."""
    if not split:
        return
    paths = gguf_sink.output_paths(out, metadata, entries, split)
    if len(paths) > 1:
        summary["output"] = str(paths[0])
        summary["shards"] = [str(p) for p in paths]


def open_source(src_dir: str | os.PathLike) -> Checkpoint:
    """An HF checkpoint, or a GPTQ one with its Linears presented as float weights."""

    if looks_like_gptq(src_dir):
        return open_gptq_checkpoint(src_dir)
    return open_checkpoint(src_dir)


def _write_legacy_file(out: Path, arch: Arch, target: Target, hparams: dict, vocab: Vocab, steps: list[Step], preset, on_tensor) -> int:
    lt = target.legacy
    tokens = vocab.legacy_tokens(arch.family, lt.container, lt.dialect)
    ftype = _legacy_ftype(arch, preset)
    return legacy_sink.write(out, target, arch.family, hparams, tokens, _entries(steps, lt.layout),
                             ftype=ftype, on_tensor=on_tensor)


def _summary(ckpt: Checkpoint, arch: Arch, target: Target, outtype: str | None, steps: list[Step], vocab: Vocab, out: Path) -> dict[str, Any]:
    gptq = getattr(ckpt, "linears", None) or {}
    tensors = [{
        "name": s.name, "source": s.map.source,
        "source_dtype": f"GPTQ-{s.source.bits}bit" if s.map.source in gptq else s.source.dtype,
        "shape": list(s.map.shape), "type": s.type.name, "bytes": s.nbytes,
        **({"fallback": True} if s.fallback else {}),
        **({"exact": s.exact} if s.map.source in gptq else {}),
    } for s in steps]
    notes = list(arch.notes) + list(vocab.notes)
    warnings: list[str] = []
    if gptq:

        gnotes, warning = summarize(steps)
        notes += ckpt.notes + gnotes
        warnings += [warning] if warning else []
    if target.legacy and arch.family == "llama" and not 32000 <= arch.n_vocab <= 32100:
        notes.append(f"n_vocab {arch.n_vocab} is outside [32000, 32100]: GPT4All will not recognise this as LLaMA")
    if target.legacy and arch.family == "gptj" and not 50300 <= arch.n_vocab <= 50400:
        notes.append(f"n_vocab {arch.n_vocab} is outside [50300, 50400]: GPT4All will not recognise this as GPT-J")
    return {
        "source": str(ckpt.path), "output": str(out), "format": target.format,
        "architecture": arch.family, "hf_architecture": (ckpt.config.get("architectures") or [None])[0],
        "checkpoint": ckpt.kind, "outtype": outtype or ("auto" if gptq else "f16"), "n_tensors": len(steps),
        "tensor_bytes": sum(s.nbytes for s in steps), "n_vocab": len(vocab),
        "guesses": list(arch.guesses), "notes": notes, "warnings": warnings, "tensors": tensors,
        "n_quantized": sum(is_quantized(s.type) for s in steps),
    }
