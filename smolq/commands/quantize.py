"""`smolq quantize IN OUT --type T`: requantize a GGUF / legacy file (or convert an HF directory).

    source (formats.detect) -> plan (quantize.plan, llama.cpp's mixes)
    -> quantizer (quantize.rtn, the C kernel, one tensor at a time)
    -> sink (formats.gguf / formats.legacy, atomic)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import typer

from smolq import kernels
from smolq.errors import InputError
from smolq.formats.detect import open_model, sniff_container
from smolq.formats.gguf import Metadata, MetaValue, write_gguf
from smolq.formats.legacy import layout_for, storable_types, write_legacy
from smolq.formats.legacy_tables import find_spec
from smolq.ggml_types import GGMLType, block_size, is_quantized, tensor_nbytes
from smolq.pipeline.convert import convert
from smolq.plan.mix import (
    ModelInfo,
    PlanOptions,
    Preset,
    QuantPlan,
    TensorPlan,
    parse_tensor_type_overrides,
    parse_type,
    plan_tensor_types,
    resolve_preset,
)
from smolq.progress import WorkProgress, emit_json, event_progress, human_bytes, note
from smolq.transforms.rtn import quantize_entries

T = GGMLType
GGML_QNT_VERSION = 2  # general.quantization_version that llama.cpp's quantizer writes
GGUF_FORMATS = {"gguf": None, "gguf-v1": 1, "gguf-v2": 2, "gguf-v3": 3}
LEGACY_FORMATS = {"ggml": ("ggml", None), "ggmf": ("ggmf", 1), "ggjt-v1": ("ggjt", 1),
                  "ggjt-v2": ("ggjt", 2), "ggjt-v3": ("ggjt", 3), "ggjt": ("ggjt", 3), "ggmm": ("ggmm", None)}
# A quantizer writes the newest version of a versioned legacy container (llama.cpp's 2023
# quantizer wrote ggjt v3 whatever the converter had written).
NEWEST_VERSION = {"ggjt": 3, "ggmf": 1}
NEWEST_QNTVR = 2  # ggml examples: quantization version of the v3 block layout

EPILOG = (
    "Examples:\n\n"
    "  smolq quantize model-f16.gguf model-q4_k_m.gguf --type q4_k_m\n\n"
    "  smolq quantize model-f16.gguf model-q4_0.gguf --bits 4 --pure --dry-run\n\n"
    "  smolq quantize ggml-model-f16.bin ggml-model-q4_0.bin --type q4_0   (ggjt v3 out)\n\n"
    "  smolq quantize ./hf-model out.gguf --bits 4 --method gptq --calib text.txt\n\n"
    "  smolq quantize ./hf-model out-gptq --method gptq --format gptq --bits 3 --act-order --calib text.txt\n\n"
    "  smolq quantize ./hf-model out.gguf --type q3_k_m --method gptq --calib text.txt --resume   (after Ctrl-C)"
)


def register(app: typer.Typer) -> None:
    @app.command(epilog=EPILOG)
    def quantize(
        src: Path = typer.Argument(..., metavar="IN", help="GGUF / legacy ggml file, or a Hugging Face checkpoint directory."),
        out: Path = typer.Argument(..., metavar="OUT", help="Output file (written atomically)."),
        type_name: Optional[str] = typer.Option(None, "--type", "-t", help="Preset (q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k_s/m/l q4_k_s/m q5_k_s/m q6_k tq1_0 tq2_0 f16 bf16 f32) or a plain type.", rich_help_panel="Types and mix"),
        bits: Optional[int] = typer.Option(None, "--bits", "-b", help="2, 3, 4, 5, 6 or 8: the default preset for that width (4 -> q4_k_m).", rich_help_panel="Types and mix"),
        method: str = typer.Option("rtn", "--method", help="rtn (round to nearest, C kernel) or gptq (needs the HF checkpoint).", rich_help_panel="Types and mix"),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Output container: gguf, gguf-v1..v3, ggml, ggmf, ggjt-v1..v3, ggmm (default: the input's).", rich_help_panel="Input/output"),
        pure: bool = typer.Option(False, "--pure", help="No mixture: every quantizable tensor gets the base type.", rich_help_panel="Types and mix"),
        leave_output: bool = typer.Option(False, "--leave-output-tensor", help="Keep output.weight as it is.", rich_help_panel="Types and mix"),
        output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type for output.weight.", rich_help_panel="Types and mix"),
        token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Type for token_embd.weight.", rich_help_panel="Types and mix"),
        tensor_type: Optional[List[str]] = typer.Option(None, "--tensor-type", help="REGEX=TYPE for matching tensors (repeatable; wins over the mix).", rich_help_panel="Types and mix"),
        allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Allow quantizing tensors that are already quantized (loses quality).", rich_help_panel="Types and mix"),
        threads: int = typer.Option(0, "--threads", help="Kernel threads (0 = all cores).", rich_help_panel="Performance"),
        calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (file or .jsonl); default: sampled from the model.", rich_help_panel="GPTQ"),
        group_size: int = typer.Option(128, "--group-size", help="Columns per group (-1: one group per row).", rich_help_panel="GPTQ"),
        act_order: bool = typer.Option(False, "--act-order", help="Quantize columns in order of decreasing Hessian diagonal.", rich_help_panel="GPTQ"),
        asym: bool = typer.Option(False, "--asym", help="Asymmetric grid (zero point) instead of symmetric.", rich_help_panel="GPTQ"),
        damp: float = typer.Option(0.01, "--damp", help="Dampening, a fraction of the mean Hessian diagonal.", rich_help_panel="GPTQ"),
        nsamples: int = typer.Option(128, "--nsamples", help="Calibration sequences.", rich_help_panel="GPTQ"),
        seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per calibration sequence.", rich_help_panel="GPTQ"),
        device: str = typer.Option("cpu", "--device", help="GPTQ: torch device (cpu, cuda, auto).", rich_help_panel="Performance"),
        true_sequential: bool = typer.Option(True, "--true-sequential/--no-true-sequential", help="Quantize a block's linears in execution order, each on inputs from the already-quantized ones.", rich_help_panel="GPTQ"),
        static_groups: bool = typer.Option(False, "--static-groups", help="Choose every group's scale up front from the original weights (with --act-order).", rich_help_panel="GPTQ"),
        mse: float = typer.Option(0.0, "--mse", help="Int grid: clipping search with |err|^p, p = this value (2.4 in the reference); 0 = off.", rich_help_panel="GPTQ"),
        scale_rule: str = typer.Option("weighted", "--scale-rule", help="On ggml grids: how block scales are chosen (weighted, imatrix, plain).", rich_help_panel="GPTQ"),
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration sampling (same seed, same output).", rich_help_panel="GPTQ"),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its saved blocks (same settings).", rich_help_panel="GPTQ"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan and total size; write nothing.", rich_help_panel="Output control"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes.", rich_help_panel="Output control"),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", rich_help_panel="Output control"),
    ) -> None:
        """Quantize a model: requantize a GGUF/legacy file, or convert+quantize an HF checkpoint."""

        if method.lower() == "gptq" and type_name is None and bits is None and _is_gptq_dir(fmt, out):
            bits = 4  # AutoGPTQ's default width
        preset = resolve_preset(type_name, bits)
        opts = PlanOptions(
            pure=pure,
            leave_output_tensor=leave_output,
            output_tensor_type=parse_type(output_tensor_type, "output tensor type") if output_tensor_type else None,
            token_embedding_type=parse_type(token_embedding_type, "token embedding type") if token_embedding_type else None,
            tensor_types=parse_tensor_type_overrides(tensor_type or []),
        )
        gptq = {"group_size": group_size, "act_order": act_order, "sym": not asym, "damp": damp,
                "nsamples": nsamples, "seqlen": seqlen, "device": device, "true_sequential": true_sequential,
                "static_groups": static_groups, "mse": mse, "scale_rule": scale_rule, "seed": seed, "resume": resume}
        request = Request(src, out, preset, opts, method.lower(), fmt, allow_requantize, threads, calib,
                          dry_run, quiet or json_out, gptq)
        summary = run(request)
        for line in summary.get("notes", []):
            note(f"note: {line}", quiet or json_out)
        if json_out:
            emit_json(summary)
        elif dry_run:
            print_plan(summary)
        elif not quiet:

            what = (f"{summary['n_layers_quantized']} linears by GPTQ" if summary.get("method") == "gptq"
                    else f"{summary['n_tensors']} tensors")
            note(f"wrote {summary['output']}: {summary['format']}, {summary['preset']}, {what}, "
                 f"{human_bytes(summary['bytes'])} in {summary.get('seconds', 0)} s")


@dataclass
class Request:
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


# Defaults of the GPTQ-only options: anything else given with --method rtn is a mistake.
GPTQ_DEFAULTS = {"group_size": 128, "act_order": False, "sym": True, "damp": 0.01, "nsamples": 128,
                 "seqlen": 2048, "device": "cpu", "true_sequential": True, "static_groups": False, "mse": 0.0,
                 "scale_rule": "weighted", "seed": 0, "resume": False}


def run(req: Request) -> dict[str, Any]:
    if req.method not in ("rtn", "gptq"):
        raise InputError(None, f"unknown --method {req.method!r}; choose rtn or gptq")
    if not req.src.exists():
        raise InputError(req.src, "no such file or directory")
    if req.method == "rtn" and (req.calib is not None or _changed_gptq_options(req)):
        names = ", ".join(["--calib"] * (req.calib is not None) + [f"--{k.replace('_', '-')}" for k in _changed_gptq_options(req)])
        raise InputError(None, f"{names} apply to --method gptq only")
    _check_paths(req.src, req.out, out_is_dir=_writes_directory(req))
    if req.src.is_dir():
        return _from_hf(req)
    if req.method == "gptq":

        container = sniff_container(req.src)
        raise InputError(req.src, f"GPTQ needs the HF checkpoint (calibration runs the model); got a {container} file")
    return quantize_file(req)


def _changed_gptq_options(req: Request) -> list[str]:
    given = req.gptq or {}
    return [k for k, default in GPTQ_DEFAULTS.items() if k in given and given[k] != default]


def _writes_directory(req: Request) -> bool:
    return req.method == "gptq" and _is_gptq_dir(req.fmt, req.out)


def _is_gptq_dir(fmt: str | None, out: Path) -> bool:
    """GPTQ checkpoints are directories (--format gptq, or an OUT without a suffix)."""
    return (fmt or "").lower() == "gptq" or (fmt is None and out.suffix == "")


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

    with event_progress("quantize", quiet=req.quiet) as on_progress:
        summary = convert(req.src, req.out, format=req.fmt, outtype=req.preset.name, dry_run=req.dry_run,
                          quiet=req.quiet, on_progress=on_progress)
    summary.setdefault("preset", req.preset.name)
    summary.setdefault("method", "rtn")
    if req.dry_run:
        summary["dry_run"] = True
    return summary


def _gptq_from_hf(req: Request) -> dict[str, Any]:
    import importlib

    try:
        pipeline = importlib.import_module("smolq.pipeline.gptq")
    except ModuleNotFoundError as exc:
        if exc.name != "smolq.pipeline.gptq":
            raise
        raise InputError(req.src, "GPTQ is not available in this build (smolq.pipeline.gptq is missing)") from None
    entry = getattr(pipeline, "quantize_hf", None) or getattr(pipeline, "run", None)
    if entry is None:
        raise InputError(req.src, "GPTQ pipeline has no quantize_hf()/run() entry point")
    summary = entry(src=req.src, out=req.out, preset=req.preset.name, fmt=req.fmt, calib=req.calib,
                    threads=req.threads, dry_run=req.dry_run, quiet=req.quiet, **(req.gptq or {}))
    summary.setdefault("preset", req.preset.name if summary.get("format") != "gptq" else f"int{summary['bits']}")
    return summary


# --- GGUF / legacy files ---------------------------------------------------------------------

@dataclass
class Target:
    format: str  # "gguf-v3", "ggjt-v3", "ggml" ...
    container: str
    version: int | None
    layout: str = "v3"
    dialect: str | None = None
    qntvr: int | None = None
    allowed: frozenset | None = None  # types a legacy target can hold; None: any (GGUF)

    @property
    def is_gguf(self) -> bool:
        return self.container == "gguf"


def resolve_target(mf: Any, fmt: str | None, out: Path) -> Target:
    """The output container: --format, else the input's (newest version for legacy quantizers)."""
    key = fmt.lower().replace("_", "-") if fmt else None
    if key is None:
        key = "gguf" if mf.is_gguf else mf.container
    if key in GGUF_FORMATS:
        if not mf.is_gguf:
            raise InputError(out, f"{mf.format_name} -> GGUF changes tensor names and metadata: "
                                  f"run `smolq migrate {mf.path} OUT.gguf` first, then quantize")
        version = GGUF_FORMATS[key] or mf.version
        return Target(f"gguf-v{version}", "gguf", version)
    if key not in LEGACY_FORMATS:
        known = ", ".join(list(GGUF_FORMATS) + list(LEGACY_FORMATS))
        raise InputError(out, f"unknown format {fmt!r}; choose one of {known}")
    if mf.is_gguf:
        raise InputError(out, f"GGUF -> {key} changes tensor names and headers: use `smolq migrate` "
                              f"(or `smolq convert` from the HF checkpoint) with --outtype")
    return _legacy_target(mf, key, out)


def _legacy_target(mf: Any, key: str, out: Path) -> Target:

    container, version = LEGACY_FORMATS[key]
    if key == mf.container and container in NEWEST_VERSION:
        version = NEWEST_VERSION[container]
    family = mf.architecture
    dialect = mf.header.get("dialect") if container == mf.container else None
    spec = find_spec(family, container, dialect) or find_spec(family, container)
    if spec is None:
        raise InputError(out, f"a {family} model cannot be written as {key}")
    qntvr = NEWEST_QNTVR if spec.qntvr_in_ftype else None
    allowed = storable_types(container, version, family, spec.dialect, qntvr)
    name = container if version is None else f"{container}-v{version}"
    return Target(name, container, version, layout_for(container, version, qntvr), spec.dialect, qntvr, allowed)


def _fit_legacy(plan: QuantPlan, target: Target, notes: list[str]) -> None:
    """Legacy containers hold fewer types: K-quant bumps fall back to the preset's base type."""
    if target.allowed is None:
        return
    base = plan.preset.default_type
    bumped = 0
    for tp in plan.tensors:
        if target.container == "ggmm" and tp.name == "transformer.wte.weight":
            tp.dst_type = tp.src_type  # GPT4All's MPT loader reads wte as F32 (formats.md 4.4)
            continue
        if tp.dst_type in target.allowed:
            continue
        if base in target.allowed and tensor_fits(base, tp.shape):
            tp.dst_type = base
            bumped += 1
            continue
        holds = ", ".join(sorted(t.name for t in target.allowed))
        raise InputError(None, f"{target.format} cannot hold {tp.dst_type.name} (tensor {tp.name}); it holds {holds}")
    if bumped:
        notes.append(f"{bumped} tensors kept the base type {base.name}: {target.format} cannot hold the mix's types")


def tensor_fits(t: GGMLType, shape: tuple[int, ...]) -> bool:

    return bool(shape) and shape[-1] % block_size(t) == 0


def make_plan(mf: Any, req: Request) -> QuantPlan:

    rows = [(t.name, t.type, tuple(t.shape)) for t in mf.tensors]
    info = ModelInfo.from_metadata(mf.architecture, mf.metadata, [(name, shape) for name, _, shape in rows])
    return plan_tensor_types(rows, req.preset, info, req.opts)


def _check_requantize(plan: QuantPlan, req: Request) -> None:
    again = plan.requantized()
    if again and not req.allow_requantize:
        kinds = ", ".join(sorted({t.src_type.name for t in again}))
        raise InputError(req.src, f"{len(again)} tensors are already quantized ({kinds}); requantizing "
                                  f"loses quality: pass --allow-requantize to do it anyway")


def _check_kernel_types(plan: QuantPlan, mf: Any, target: Target) -> None:

    for tp, entry in zip(plan.tensors, mf.tensors):
        if not tp.converts:
            continue
        if (tp.src_type, entry.layout) not in kernels.DEQUANTIZE_TYPES:
            raise InputError(mf.path, f"tensor {tp.name}: cannot decode {tp.src_type.name} ({entry.layout} layout)")
        if (tp.dst_type, target.layout) not in kernels.QUANTIZE_TYPES:
            raise InputError(None, f"tensor {tp.name}: the kernel cannot write {tp.dst_type.name}")


def quantize_file(req: Request) -> dict[str, Any]:

    started = time.perf_counter()
    notes: list[str] = []
    with open_model(req.src) as mf:
        target = resolve_target(mf, req.fmt, req.out)
        plan = make_plan(mf, req)
        _fit_legacy(plan, target, notes)
        _check_requantize(plan, req)
        _check_kernel_types(plan, mf, target)
        if plan.n_fallback:
            notes.append(f"{plan.n_fallback} tensors used a fallback type (rows not a multiple of the block)")
        summary = _summary(mf, req, target, plan, notes)
        if req.dry_run:
            summary["dry_run"] = True
            return summary
        size = _write(mf, req, target, plan)
    summary.update(bytes=size, seconds=round(time.perf_counter() - started, 3))
    return summary


def _write(mf: Any, req: Request, target: Target, plan: QuantPlan) -> int:

    entries = quantize_entries(mf.tensors, [tp.dst_type for tp in plan.tensors], target.layout, req.threads)
    total = sum(e.nbytes for e in entries)
    with WorkProgress(len(entries), total, "quantize", quiet=req.quiet) as bar:
        def on_tensor(entry: Any, *_: Any) -> None:
            bar.start(entry.name)
            bar.done(entry.nbytes)

        if target.is_gguf:

            meta = gguf_metadata(mf, plan.preset)
            return write_gguf(req.out, meta, entries, version=target.version,
                              endian="<" if mf.endian == "little" else ">", on_tensor=on_tensor)
        return _write_legacy(mf, req, target, plan, entries, on_tensor)


def gguf_metadata(mf: Any, preset: Preset) -> Any:
    """The input's KVs, with file type and quantization version set as llama.cpp's quantizer does."""

    meta = Metadata(mf.raw.metadata.items())
    meta["general.quantization_version"] = MetaValue.u32(GGML_QNT_VERSION)
    if preset.ftype is not None:
        meta["general.file_type"] = MetaValue.u32(preset.ftype)
    elif "general.file_type" in meta:
        del meta["general.file_type"]  # a plain type without a LLAMA_FTYPE: do not keep a wrong one
    return meta


def _write_legacy(mf: Any, req: Request, target: Target, plan: QuantPlan, entries: list, on_tensor) -> int:

    lf = mf.raw
    # LLaMA headers store LLAMA_FTYPE (mixes have their own value); the writer infers the others.
    ftype = plan.preset.ftype if mf.architecture == "llama" else None
    hparams = {k: v for k, v in lf.hparams.items() if k != "ftype"}
    write_legacy(req.out, target.container, target.version, mf.architecture, hparams, lf.vocab, entries,
                 dialect=target.dialect, ftype=ftype, on_tensor=on_tensor, qntvr=target.qntvr,
                 special_tokens=getattr(lf, "special_tokens", ()))
    return req.out.stat().st_size


# --- reporting -----------------------------------------------------------------------------

def _row(tp: TensorPlan, layout: str) -> dict[str, Any]:
    row = {"name": tp.name, "shape": list(tp.shape), "source_type": tp.src_type.name,
           "type": tp.dst_type.name, "bytes": tensor_nbytes(tp.dst_type, tp.shape, layout)}
    if tp.fallback:
        row["fallback"] = True
    return row


def _summary(mf: Any, req: Request, target: Target, plan: QuantPlan, notes: list[str]) -> dict[str, Any]:
    rows = [_row(tp, target.layout) for tp in plan.tensors]
    return {
        "source": str(req.src), "output": str(req.out), "input_format": mf.format_name,
        "format": target.format, "method": "rtn", "preset": plan.preset.name, "file_type": plan.preset.ftype,
        "n_tensors": len(rows), "n_quantized": sum(is_quantized(tp.dst_type) for tp in plan.tensors),
        "n_converted": sum(tp.converts for tp in plan.tensors), "n_fallback": plan.n_fallback,
        "source_bytes": sum(t.nbytes for t in mf.tensors), "tensor_bytes": sum(r["bytes"] for r in rows),
        "notes": notes, "tensors": rows,
    }


def print_plan(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


    title = f"{summary.get('source')} -> {summary.get('output')} ({summary.get('format')}, {summary.get('preset')})"
    table = Table(title=title, title_justify="left")
    # Names, shapes and sizes never wrap; only "to" may break, at its space ("Q5_0 (fallback)").
    for col in ("tensor", "shape", "from", "to", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", no_wrap=col != "to",
                         overflow="ellipsis")
    for t in summary.get("tensors", []):
        src = t.get("source_type") or t.get("source_dtype", "")
        to = t["type"] + (" (fallback)" if t.get("fallback") else "")
        table.add_row(Text(t["name"]), "x".join(map(str, t["shape"])), src, to, f"{t['bytes']:,}")
    console = Console(highlight=False)
    console.print(table)
    total = summary.get("tensor_bytes", 0)
    line = f"{summary.get('n_tensors')} tensors, {human_bytes(total)} of tensor data"
    if summary.get("source_bytes"):
        line += f" (from {human_bytes(summary['source_bytes'])})"
    console.print(line, markup=False)
