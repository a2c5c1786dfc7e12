"""`smolq quantize` as a library: requantize a GGUF / legacy file (RTN), or
hand an HF checkpoint to convert (RTN) or to GPTQ.

    source (formats.detect) -> target (plan.targets) -> plan (plan.mix, llama.cpp's mixes,
    fitted to what the target stores) -> transform (transforms.rtn, the C kernel,
    one tensor at a time) -> sink (sinks.gguf / sinks.legacy, atomic)
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smolq import kernels
from smolq.errors import InputError
from smolq.formats.base import TensorEntry
from smolq.formats.detect import ModelFile, open_model, sniff_container
from smolq.formats.gguf import Metadata, MetaValue, Split, aligned, gguf_head_size
from smolq.formats.legacy import check_predates, infer_file_type
from smolq.ggml_types import GGMLType, block_size, is_quantized, tensor_nbytes
from smolq.pipeline.allocate import Chosen, allocation_metadata, choose_types
from smolq.pipeline.bnb import BNB_FORMATS, quantize_hf_bnb
from smolq.pipeline.convert import add_shards, check_split, convert
from smolq.pipeline.gptq import quantize_hf
from smolq.pipeline.imatrix import compute_imatrix
from smolq.pipeline.sensitivity import kl_sensitivities
from smolq.plan.budget import (DEFAULT_CANDIDATES, RECIPE_KEY, SizeTarget, checked_recipe_types, read_recipe,
                               write_recipe)
from smolq.plan.imatrix import ImatrixChoice, check_required, choose_imatrix, imatrix_metadata, record_use
from smolq.plan.mix import (
    ModelInfo,
    PlanOptions,
    Preset,
    QuantPlan,
    TensorPlan,
    canonical_name,
    is_quantizable,
    plan_tensor_types,
    requires_imatrix,
)
from smolq.plan.targets import Target, resolve_target, target_types
from smolq.progress import WorkProgress, event_progress
from smolq.sinks import gguf as gguf_sink
from smolq.sinks import legacy as legacy_sink
from smolq.transforms.calib import AUTO_MAX_SAMPLES, AUTO_SEQLEN
from smolq.transforms.gptq import HESSIAN_REG_DEFAULT
from smolq.transforms.rtn import quantize_entries

T = GGMLType
GGML_QNT_VERSION = 2  # general.quantization_version that llama.cpp's quantizer writes


@dataclass
class Request:
    """One quantize run: what `smolq quantize` was asked."""

    src: Path
    out: Path
    preset: Preset
    opts: PlanOptions
    method: str = "rtn"
    fmt: str | None = None
    allow_requantize: bool = False
    threads: int = 0
    calib: Path | None = None
    dry_run: bool = False
    quiet: bool = True
    gptq: dict[str, Any] | None = None  # GPTQ solver settings, passed through to the pipeline
    bnb: dict[str, Any] | None = None  # --format nf4/fp4: double_quant, blocksize
    split: Split | None = None  # shard a GGUF output (--split-max-size / --split-max-tensors)
    imatrix: Path | None = None  # --imatrix FILE (llama.cpp's GGUF or .dat importance matrix)
    include_weights: list[str] = field(default_factory=list)  # --include-weights (substrings)
    exclude_weights: list[str] = field(default_factory=list)  # --exclude-weights (substrings)
    target: SizeTarget | None = None  # --target-bpw / --target-size: the allocator chooses the types
    candidates: tuple[GGMLType, ...] = DEFAULT_CANDIDATES  # --candidates: the types it chooses from
    recipe: Path | None = None  # --recipe FILE: tensor -> type, applied without the loss pass
    save_recipe: Path | None = None  # --save-recipe FILE: the run's tensor -> type, as JSON
    sensitivity: dict[str, float] | None = None  # the allocator's per-tensor KL factors (GPTQ's loss pass)

    @property
    def chooses_types(self) -> bool:
        """The types come from a size budget or a recipe, not from a preset's mix."""
        return self.target is not None or self.recipe is not None


# Defaults of the GPTQ-only options: anything else given with --method rtn is a mistake.
GPTQ_DEFAULTS = {"group_size": 128, "act_order": False, "sym": True, "damp": 0.01, "nsamples": None,
                 "seqlen": None, "device": "cpu", "true_sequential": True, "static_groups": False, "mse": 0.0,
                 "scale_rule": "weighted", "seed": 0, "resume": False,
                 "hessian_reg": HESSIAN_REG_DEFAULT, "attention_aware": None,
                 "refit_scales": None}


def run(req: Request) -> dict[str, Any]:
    """Quantize as `req` says; returns the summary (dry run: the plan, nothing written)."""
    if req.method not in ("rtn", "gptq"):
        raise InputError(None, f"unknown --method {req.method!r}; choose rtn or gptq")
    if not req.src.exists():
        raise InputError(req.src, "no such file or directory")
    if req.method != "rtn" and (req.include_weights or req.exclude_weights
                                or (req.imatrix is not None and req.target is None)):
        raise InputError(None, "--imatrix applies to --method rtn, or to the loss pass of --target-* with GPTQ "
                               "(GPTQ computes its own Hessians)")
    if req.method == "rtn" and (req.calib is not None or _changed_gptq_options(req)):
        names = ", ".join(["--calib"] * (req.calib is not None) + [f"--{k.replace('_', '-')}" for k in _changed_gptq_options(req)])
        raise InputError(None, f"{names} apply to --method gptq only")
    _check_chooser(req)
    fmt = (req.fmt or "").lower()
    if fmt in BNB_FORMATS and req.imatrix is not None:
        raise InputError(None, f"--imatrix does not apply to --format {fmt} (bitsandbytes' own rounding)")
    if fmt in BNB_FORMATS:
        return _bnb_from_hf(req, fmt)
    if req.bnb and (req.bnb.get("double_quant", True) is not True or req.bnb.get("blocksize", 64) != 64):
        raise InputError(None, "--double-quant/--blocksize apply to --format nf4 or fp4 only")
    _check_paths(req.src, req.out, out_is_dir=_writes_directory(req))
    if req.split and req.method == "gptq":
        raise InputError(req.out, "--split-max-size / --split-max-tensors are not wired into GPTQ yet; "
                                  "quantize unsplit, then `smolq split` the output")
    if req.src.is_dir():
        return _from_hf(req)
    if req.method == "gptq":
        container = sniff_container(req.src)
        raise InputError(req.src, f"GPTQ needs the HF checkpoint (calibration runs the model); got a {container} file")
    return quantize_file(req)


def _check_chooser(req: Request) -> None:
    """--target-bpw / --target-size / --recipe: RTN of a GGUF file or GPTQ of a checkpoint, one GGUF file."""
    if not req.chooses_types:
        return
    what = req.target.what() if req.target is not None else "--recipe"
    if req.target is not None and req.recipe is not None:
        raise InputError(None, f"{what} and --recipe both choose the types; give one")
    if req.method == "gptq" and not req.src.is_dir():
        raise InputError(req.src, f"GPTQ needs the HF checkpoint (calibration runs the model); got a "
                                  f"{sniff_container(req.src)} file")
    if req.method == "gptq" and (_writes_directory(req) or not (req.fmt or "gguf").lower().startswith("gguf")):
        raise InputError(req.out, f"{what} writes GGUF")
    if req.split:
        raise InputError(None, f"{what} sizes one file: quantize unsplit, then `smolq split` the output")
    o = req.opts
    if o.pure or o.output_tensor_type or o.token_embedding_type or o.tensor_types:
        raise InputError(None, f"{what} chooses every tensor's type: drop --pure and --*-type")


def _changed_gptq_options(req: Request) -> list[str]:
    given = req.gptq or {}
    return [k for k, default in GPTQ_DEFAULTS.items() if k in given and given[k] != default]


def _writes_directory(req: Request) -> bool:
    return req.method == "gptq" and is_gptq_dir(req.fmt, req.out)


def is_gptq_dir(fmt: str | None, out: Path) -> bool:
    """GPTQ checkpoints are directories (--format gptq, or an OUT without a suffix)."""
    return (fmt or "").lower() == "gptq" or (fmt is None and out.suffix == "")


# --- MLC-LLM weights: from the HF checkpoint, MLC's quantization names --------------------

MLC_BITS = {4: "q4f16_1", 3: "q3f16_1", 16: "q0f16"}


def run_mlc(src: Path, out: Path, type_name: str | None, bits: int | None, *, method: str = "rtn",
            calib: Path | None = None, changed: list[str] = (), dry_run: bool = False,
            quiet: bool = True) -> dict[str, Any]:
    """`quantize IN OUT --format mlc --type q4f16_1`: convert the checkpoint IN with that MLC quantization.

    changed: the other quantize options the caller was given (mixes, overrides, GPTQ
    settings), which MLC-LLM's quantization has no use for."""
    if method != "rtn":
        raise InputError(None, "--format mlc quantizes with MLC-LLM's own group rounding; --method gptq does not apply")
    if calib is not None or changed:
        names = ", ".join(["--calib"] * (calib is not None) + [f"--{k.replace('_', '-')}" for k in changed])
        raise InputError(None, f"{names} do not apply to --format mlc")
    if not src.exists():
        raise InputError(src, "no such file or directory")
    if not src.is_dir():
        raise InputError(src, "MLC-LLM weights are made from the HF checkpoint directory, not from a model file")
    if (type_name is None) == (bits is None):
        raise InputError(None, "give exactly one of --type and --bits")
    if bits is not None and bits not in MLC_BITS:
        raise InputError(None, f"--bits {bits} has no MLC-LLM quantization; choose one of {sorted(MLC_BITS)}")
    name = type_name if type_name is not None else MLC_BITS[bits]
    with event_progress("quantize", quiet=quiet) as on_progress:
        summary = convert(src, out, format="mlc", outtype=name, dry_run=dry_run, on_progress=on_progress)
    summary.setdefault("preset", summary.get("quantization", name))
    summary.setdefault("method", "rtn")
    return summary


# --- paths ---------------------------------------------------------------------------------

def _check_paths(src: Path, out: Path, out_is_dir: bool = False) -> None:
    """IN == OUT and unwritable outputs are refused before any work."""
    same = out.exists() and os.path.samefile(src, out)
    if same or src.resolve() == out.resolve():
        raise InputError(out, "output is the input; choose another output path")
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir() and not out_is_dir:
        raise InputError(out, "output is a directory; give a file name")
    if not parent.is_dir():
        raise InputError(out, f"cannot write output: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(out, f"cannot write output: directory {parent} is not writable")


# --- HF checkpoints: delegate ----------------------------------------------------------------

def _from_hf(req: Request) -> dict[str, Any]:
    if req.method == "gptq":
        return _gptq_from_hf(req)
    o = req.opts
    if o.pure or o.leave_output_tensor or o.output_tensor_type or o.token_embedding_type or o.tensor_types:
        raise InputError(req.src, "--pure/--leave-output-tensor/--*-type apply to GGUF or legacy inputs; "
                                  "convert first (smolq convert) and quantize the file")
    if req.chooses_types:
        return _chosen_from_hf(req)
    with event_progress("quantize", quiet=req.quiet) as on_progress:
        summary = convert(req.src, req.out, format=req.fmt, outtype=req.preset.name, dry_run=req.dry_run,
                          on_progress=on_progress, split=req.split, imatrix=req.imatrix,
                          include_weights=req.include_weights, exclude_weights=req.exclude_weights)
    summary.setdefault("preset", req.preset.name)
    summary.setdefault("method", "rtn")
    if req.dry_run:
        summary["dry_run"] = True
    return summary


def _chosen_from_hf(req: Request) -> dict[str, Any]:
    """--target-*/--recipe from a checkpoint: convert to an F32 GGUF (lossless for f32/f16/bf16
    weights) in a temporary directory beside OUT, then quantize that file; the directory goes
    whatever happens. Streaming as both steps are; the disk holds the F32 copy meanwhile."""
    if req.fmt is not None and not req.fmt.lower().startswith("gguf"):
        raise InputError(req.out, "--target-*/--recipe write GGUF")
    parent = req.out.parent if str(req.out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=".smolq-", dir=parent) as tmp:
        mid = Path(tmp) / "f32.gguf"
        with event_progress("convert", quiet=req.quiet) as on_progress:
            convert(req.src, mid, format="gguf", outtype="f32", on_progress=on_progress)
        summary = quantize_file(replace(req, src=mid))
    summary["source"] = str(req.src)
    return summary


def _bnb_from_hf(req: Request, fmt: str) -> dict[str, Any]:
    """--format nf4/fp4: the bitsandbytes checkpoint transformers saves (an HF directory in, a directory out)."""
    if not req.src.is_dir():
        raise InputError(req.src, f"--format {fmt} needs a Hugging Face checkpoint directory (bitsandbytes "
                                  f"quantizes the float weights); got a {sniff_container(req.src)} file")
    if req.method != "rtn":
        raise InputError(None, f"--format {fmt} is bitsandbytes' own rounding; --method {req.method} does not apply")
    if req.out.suffix.lower() in (".gguf", ".bin", ".safetensors"):
        raise InputError(req.out, f"--format {fmt} writes a directory; give OUT without a file suffix")
    _check_paths(req.src, req.out, out_is_dir=True)
    if req.out.exists() and not req.out.is_dir():
        raise InputError(req.out, "output exists and is not a directory")
    opts = req.bnb or {}
    return quantize_hf_bnb(req.src, req.out, quant_type=fmt, double_quant=opts.get("double_quant", True),
                           blocksize=opts.get("blocksize", 64), threads=req.threads, dry_run=req.dry_run,
                           quiet=req.quiet)


def _gptq_from_hf(req: Request) -> dict[str, Any]:
    chosen = _gptq_types(req) if req.chooses_types else None
    if chosen is not None and req.dry_run:
        return chosen[1]
    summary = quantize_hf(src=req.src, out=req.out, preset=req.preset.name, fmt=req.fmt, calib=req.calib,
                          threads=req.threads, dry_run=req.dry_run, quiet=req.quiet, **(req.gptq or {}),
                          recipe=None if chosen is None else chosen[0])
    summary.setdefault("preset", req.preset.name if summary.get("format") != "gptq" else f"int{summary['bits']}")
    if chosen is not None:
        summary["allocation"] = chosen[1].get("allocation")
    return summary


def _kl_sensitivities(req: Request, f32: Path, imatrix: Path) -> dict[str, float] | None:
    """The KL probe's per-tensor factors (pipeline/sensitivity.py) on the calibration text; None
    without a text (an --imatrix given with data-free calibration)."""
    if req.calib is None or req.calib.suffix.lower() == ".jsonl":
        return None
    choice = choose_imatrix(imatrix, [], [])
    with open_model(f32) as mf:
        names = [t.name for t in mf.tensors if len(t.shape) == 2]
    return kl_sensitivities(req.src, req.calib, names, choice.vector,
                            ctx=(req.gptq or {}).get("seqlen") or AUTO_SEQLEN, threads=req.threads)


def _gptq_types(req: Request) -> tuple[tuple[dict[str, GGMLType], Path], dict[str, Any]]:
    """((recipe, its file), the plan's summary) for GPTQ with --recipe or --target-*.

    --target-*: the allocator's loss pass (RTN's imatrix-weighted error of each candidate type,
    the diagonal of GPTQ's layer error) on an F32 conversion in a temporary directory beside OUT,
    with --imatrix or one computed on the calibration text (the GPTQ windows' count and length);
    GPTQ then rounds each Linear onto the type chosen for it. Its file's header is the plan's
    less the imatrix keys, so it is never larger than the size the allocator fitted."""
    if req.recipe is not None:
        recipe = read_recipe(req.recipe)
        return (recipe, req.recipe), {"recipe": str(req.recipe)}
    gptq = req.gptq or {}
    if req.imatrix is None and (req.calib is None or req.calib.suffix.lower() == ".jsonl"):
        raise InputError(None, f"{req.target.what()} with GPTQ measures each candidate's loss with an importance "
                               f"matrix: give --calib TEXT (a plain text) or --imatrix FILE")
    parent = req.out.parent if str(req.out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=".smolq-", dir=parent) as tmp:
        mid, recipe_file = Path(tmp) / "f32.gguf", Path(tmp) / "recipe.json"
        with event_progress("convert", quiet=req.quiet) as on_progress:
            convert(req.src, mid, format="gguf", outtype="f32", on_progress=on_progress)
        imatrix = req.imatrix
        if imatrix is None:
            imatrix = Path(tmp) / "calib.imatrix"
            compute_imatrix(req.src, imatrix, req.calib, ctx=gptq.get("seqlen") or AUTO_SEQLEN,
                            chunks=gptq.get("nsamples") or AUTO_MAX_SAMPLES, threads=req.threads, quiet=True)
        sensitivity = _kl_sensitivities(req, mid, imatrix)
        plan = quantize_file(replace(req, src=mid, method="rtn", calib=None, gptq=None, imatrix=imatrix,
                                     dry_run=True, save_recipe=recipe_file, sensitivity=sensitivity))
        if imatrix != req.imatrix:
            plan.get("imatrix", {})["file"] = f"computed on {req.calib}"
        plan.setdefault("allocation", {})["sensitivity"] = sensitivity
        recipe = read_recipe(recipe_file)
    if req.save_recipe is not None:
        write_recipe(req.save_recipe, recipe)
    plan.update(source=str(req.src), method="gptq", dry_run=req.dry_run)
    return (recipe, req.save_recipe or Path("the allocation")), plan


# --- GGUF / legacy files ---------------------------------------------------------------------

def _fit_legacy(plan: QuantPlan, target: Target, allowed: frozenset | None, notes: list[str]) -> None:
    """Legacy containers hold fewer types: K-quant bumps fall back to the preset's base type."""
    if allowed is None:
        return
    base = plan.preset.default_type
    check_predates(None, target.container, target.version, base)
    bumped = 0
    for tp in plan.tensors:
        if target.container == "ggmm" and tp.name == "transformer.wte.weight":
            tp.dst_type = tp.src_type  # GPT4All's MPT loader reads wte as F32 (formats.md 4.4)
            continue
        if tp.dst_type in allowed:
            continue
        check_predates(None, target.container, target.version, tp.dst_type)
        if base in allowed and tensor_fits(base, tp.shape):
            tp.dst_type = base
            bumped += 1
            continue
        holds = ", ".join(sorted(t.name for t in allowed))
        raise InputError(None, f"{target.format} cannot hold {tp.dst_type.name} (tensor {tp.name}); it holds {holds}")
    if bumped:
        notes.append(f"{bumped} tensors kept the base type {base.name}: {target.format} cannot hold the mix's types")


def tensor_fits(t: GGMLType, shape: tuple[int, ...]) -> bool:
    return bool(shape) and shape[-1] % block_size(t) == 0


def make_plan(mf: ModelFile, req: Request, has_imatrix: bool | None = None) -> QuantPlan:
    """The plan for `mf`; has_imatrix (an --imatrix file was read) overrides req.opts' when given."""
    rows = [(t.name, t.type, tuple(t.shape)) for t in mf.tensors]
    info = ModelInfo.from_metadata(mf.architecture, mf.metadata, [(name, shape) for name, _, shape in rows])
    opts = req.opts
    if has_imatrix is not None and has_imatrix != opts.has_imatrix:
        opts = replace(opts, has_imatrix=has_imatrix)
    return plan_tensor_types(rows, req.preset, info, opts)


def importance_vectors(plan: QuantPlan, choice: ImatrixChoice | None, model: Path,
                       notes: list[str] | None = None) -> list:
    """Per planned tensor: the importance vector it is quantized with, or None.

    Only tensors that are quantized take one (llama-quantize); a very-low-bit
    type without one is refused here, before anything is written. Given
    `notes` (a dry run), that refusal becomes a note, as llama-quantize warns."""
    out, refused = [], []
    for tp in plan.tensors:
        vec = None
        if tp.converts and is_quantized(tp.dst_type):
            if choice is None:
                out.append(None)  # no imatrix at all: _check_imatrix has said what needs one
                continue
            vec = choice.vector(tp.name, tp.shape)
            try:
                check_required(choice, tp.name, tp.dst_type, plan.preset, vec, model)
            except InputError as exc:
                if notes is None:
                    raise
                refused.append(exc.message)
        out.append(vec)
    if refused:
        more = f" (and {len(refused) - 1} more tensors)" if len(refused) > 1 else ""
        notes.append(f"the real run would stop: {refused[0]}{more}")
    return out


def _check_imatrix(plan: QuantPlan, req: Request, notes: list[str]) -> None:
    """llama.cpp refuses the very-low-bit types without an importance matrix (the result is garbage);
    a dry run says which tensors would need one, as llama-quantize --dry-run does."""
    missing = plan.missing_imatrix()
    if not missing:
        return
    kinds = ", ".join(sorted({t.dst_type.name for t in missing}))
    if req.dry_run:
        notes.append(f"{len(missing)} tensors ({kinds}) would need an importance matrix (--imatrix)")
        return
    raise InputError(req.src, f"{plan.preset.name} needs an importance matrix for {len(missing)} tensors "
                              f"({kinds}, e.g. {missing[0].name}); pass --imatrix FILE")


def _check_requantize(plan: QuantPlan, req: Request) -> None:
    again = plan.requantized()
    if again and not req.allow_requantize:
        kinds = ", ".join(sorted({t.src_type.name for t in again}))
        raise InputError(req.src, f"{len(again)} tensors are already quantized ({kinds}); requantizing "
                                  f"loses quality: pass --allow-requantize to do it anyway")


def _check_kernel_types(plan: QuantPlan, mf: ModelFile, target: Target, dry_run: bool, notes: list[str]) -> None:
    """Every conversion the plan asks for must be one the kernel does; a dry run only says which are not."""
    unwritable = set()
    for tp, entry in zip(plan.tensors, mf.tensors):
        if not tp.converts:
            continue
        if (tp.src_type, entry.layout) not in kernels.DEQUANTIZE_TYPES:
            raise InputError(mf.path, f"tensor {tp.name}: cannot decode {tp.src_type.name} ({entry.layout} layout)")
        if (tp.dst_type, target.layout) not in kernels.QUANTIZE_TYPES:
            if not dry_run:
                raise InputError(None, f"tensor {tp.name}: the kernel cannot write {tp.dst_type.name}")
            unwritable.add(tp.dst_type.name)
    if unwritable:
        notes.append(f"the kernel cannot write {', '.join(sorted(unwritable))} yet: the plan is llama.cpp's, "
                     f"a real run would stop")


def quantize_file(req: Request) -> dict[str, Any]:
    """RTN-requantize one GGUF / legacy file into the same container family."""
    started = time.perf_counter()
    notes: list[str] = []
    choice = choose_imatrix(req.imatrix, req.include_weights, req.exclude_weights)
    with open_model(req.src) as mf:
        target = resolve_target(req.fmt, req.out, source=mf)
        check_split(req.split, target, req.out)
        plan = make_plan(mf, req, has_imatrix=choice is not None)
        if req.chooses_types and not target.is_gguf:
            raise InputError(req.out, f"--target-*/--recipe write GGUF; {target.format} cannot hold the types they choose")
        if req.chooses_types:
            _check_requantize(plan, req)  # before the loss pass: a quantized input needs --allow-requantize
        chosen = _choose(mf, req, target, plan, choice)
        _fit_legacy(plan, target, None if target.is_gguf else target_types(target, mf.architecture), notes)
        if not target.is_gguf and mf.architecture != "llama":  # the writer names the file type: can it?
            infer_file_type(req.out, target.container, mf.architecture, target.dialect,
                            [(tp.dst_type, tp.shape) for tp in plan.tensors])
        _check_requantize(plan, req)
        _check_imatrix(plan, req, notes)  # no imatrix at all, as llama-quantize: before the kernel check
        vectors = importance_vectors(plan, choice, req.src, notes if req.dry_run else None)
        _check_kernel_types(plan, mf, target, req.dry_run, notes)
        if plan.n_fallback:
            notes.append(f"{plan.n_fallback} tensors used a fallback type (rows not a multiple of the block)")
        summary = _summary(mf, req, target, plan, notes)
        record_use(summary, choice, vectors)
        recipe = _recipe_of(plan, mf, req) if req.chooses_types else None
        if req.chooses_types:
            _record_choice(summary, chosen, mf, req, plan, target, choice, recipe)
        if req.save_recipe is not None:
            write_recipe(req.save_recipe, {tp.name: tp.dst_type for tp in plan.tensors})
        if target.is_gguf:
            add_shards(summary, req.out, mf.raw.metadata,
                       [TensorEntry(tp.name, tp.dst_type, tuple(tp.shape)) for tp in plan.tensors], req.split)
        if req.dry_run:
            summary["dry_run"] = True
            return summary
        size = _write(mf, req, target, plan, vectors, choice, recipe)
    summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
    return summary


# --- types from a size budget or a recipe (pipeline/allocate.py, plan/budget.py) ----------------

def _choose(mf: ModelFile, req: Request, target: Target, plan: QuantPlan, choice: ImatrixChoice | None) -> Chosen | None:
    """Overwrite the plan's types from --recipe, or from the allocator for --target-*."""
    if req.recipe is not None:
        _apply_recipe(plan, req, mf.architecture)
        return None
    if req.target is None:
        return None
    return choose_types(mf.tensors, plan, mf.architecture, choice, req.target, req.candidates,
                        requantized_metadata(mf, plan.preset, choice), version=target.version,
                        leave_output=req.opts.leave_output_tensor, threads=req.threads, quiet=req.quiet,
                        sensitivity=req.sensitivity)


def _apply_recipe(plan: QuantPlan, req: Request, arch: str) -> None:
    rows = [(tp.name, tuple(tp.shape)) for tp in plan.tensors]
    types = checked_recipe_types(rows, read_recipe(req.recipe), req.recipe, arch, req.opts.leave_output_tensor)
    for tp, t in zip(plan.tensors, types):
        if t != tp.dst_type:
            tp.dst_type, tp.fallback = t, False
            tp.needs_imatrix = requires_imatrix(canonical_name(tp.name), t, plan.preset)


def _recipe_of(plan: QuantPlan, mf: ModelFile, req: Request) -> dict[str, GGMLType]:
    """What quantize.recipe records: the types of the tensors a budget or recipe chooses."""
    return {tp.name: tp.dst_type for tp in plan.tensors
            if is_quantizable(tp.name, tp.shape, req.opts.leave_output_tensor, mf.architecture)}


def _record_choice(summary: dict[str, Any], chosen: Chosen | None, mf: ModelFile, req: Request, plan: QuantPlan,
                   target: Target, choice: ImatrixChoice | None, recipe: dict[str, GGMLType]) -> None:
    """The file's exact size and bpw (what --dry-run prints), and with a budget each tensor's loss."""
    meta = requantized_metadata(mf, plan.preset, choice, recipe)
    entries = [TensorEntry(tp.name, tp.dst_type, tuple(tp.shape)) for tp in plan.tensors]
    head, alignment = gguf_head_size(meta, entries, target.version)
    file_bytes = head + sum(aligned(e.nbytes, alignment) for e in entries)
    n_elements = sum(e.n_elements for e in entries)
    info = {"file_bytes": file_bytes, "bpw": summary["tensor_bytes"] * 8 / max(n_elements, 1)}
    if chosen is not None:
        info.update(chosen.report())
        losses = info["losses"]
        for row in summary["tensors"]:
            if row["name"] in losses:
                row["loss"] = losses[row["name"]]
    else:
        info["recipe"] = str(req.recipe)
    summary["allocation"] = info


def _write(mf: ModelFile, req: Request, target: Target, plan: QuantPlan, vectors: list,
           choice: ImatrixChoice | None, recipe: dict[str, GGMLType] | None = None) -> int:
    entries = quantize_entries(mf.tensors, [tp.dst_type for tp in plan.tensors], target.layout, req.threads,
                               imatrices=vectors)
    total = sum(e.nbytes for e in entries)
    with WorkProgress(len(entries), total, "quantize", quiet=req.quiet) as bar:
        def on_tensor(entry: Any, *_: Any) -> None:
            bar.start(entry.name)
            bar.done(entry.nbytes)

        if target.is_gguf:
            return gguf_sink.write(req.out, target.version, requantized_metadata(mf, plan.preset, choice, recipe),
                                   entries,
                                   endian="<" if mf.endian == "little" else ">", on_tensor=on_tensor,
                                   split=req.split)
        lf = mf.raw
        # LLaMA headers store LLAMA_FTYPE (mixes have their own value); the writer infers the others.
        ftype = plan.preset.ftype if mf.architecture == "llama" else None
        hparams = {k: v for k, v in lf.hparams.items() if k != "ftype"}
        special = set(getattr(lf, "special_tokens", ()))
        tokens = [(text, score, i in special) for i, (text, score) in enumerate(lf.vocab)]
        return legacy_sink.write(req.out, target, mf.architecture, hparams, tokens, entries, ftype=ftype,
                                 on_tensor=on_tensor)


def requantized_metadata(mf: ModelFile, preset: Preset, choice: ImatrixChoice | None = None,
                         recipe: dict[str, GGMLType] | None = None) -> Metadata:
    """The input's KVs, with file type and quantization version set as llama.cpp's quantizer does,
    then the importance matrix's quantize.imatrix.* keys when one is used, then quantize.recipe
    when the types were chosen by --target-*/--recipe."""
    meta = Metadata(mf.raw.metadata.items())
    meta["general.quantization_version"] = MetaValue.u32(GGML_QNT_VERSION)
    if preset.ftype is not None:
        meta["general.file_type"] = MetaValue.u32(preset.ftype)
    elif "general.file_type" in meta:
        del meta["general.file_type"]  # a plain type without a LLAMA_FTYPE: do not keep a wrong one
    if choice is not None:
        for key, value in imatrix_metadata(choice):
            meta[key] = value
    meta.pop(RECIPE_KEY, None)  # a recipe the input was made with does not describe this output
    if recipe is not None:
        for key, value in allocation_metadata(recipe):
            meta[key] = value
    return meta



# --- reporting -----------------------------------------------------------------------------

def _row(tp: TensorPlan, layout: str) -> dict[str, Any]:
    row = {"name": tp.name, "shape": list(tp.shape), "source_type": tp.src_type.name,
           "type": tp.dst_type.name, "bytes": tensor_nbytes(tp.dst_type, tp.shape, layout)}
    if tp.fallback:
        row["fallback"] = True
    if tp.needs_imatrix:
        row["needs_imatrix"] = True
    return row


def _summary(mf: ModelFile, req: Request, target: Target, plan: QuantPlan, notes: list[str]) -> dict[str, Any]:
    rows = [_row(tp, target.layout) for tp in plan.tensors]
    return {
        "source": str(req.src), "output": str(req.out), "input_format": mf.format_name,
        "format": target.format, "method": "rtn", "preset": plan.preset.name, "file_type": plan.preset.ftype,
        "n_tensors": len(rows), "n_quantized": sum(is_quantized(tp.dst_type) for tp in plan.tensors),
        "n_converted": sum(tp.converts for tp in plan.tensors), "n_fallback": plan.n_fallback,
        "source_bytes": sum(t.nbytes for t in mf.tensors), "tensor_bytes": sum(r["bytes"] for r in rows),
        "notes": notes, "tensors": rows,
    }
