"""smolq's public Python API: convert, quantize, migrate, open.

    import smolq

    smolq.convert("hf-model", "model-f16.gguf")                       # HF -> GGUF v3, f16
    smolq.quantize("model-f16.gguf", "model-q4_k_m.gguf", type="q4_k_m")   # RTN, C kernel
    smolq.quantize("hf-model", "model-gptq.gguf", type="q4_0", method="gptq", calib="text.txt")
    smolq.migrate("old-ggjt-v1.bin", "new.gguf")                     # any container -> any other
    smolq.convert("hf-model", "big.gguf", split_max_size="2G")        # big-00001-of-0000N.gguf ...
    smolq.split("big.gguf", "big", split_max_tensors=128)             # re-shard (llama-gguf-split)
    smolq.merge("big-00001-of-00003.gguf", "big.gguf")                # and back, byte for byte
    src = smolq.open("model-q4_k_m.gguf")                             # family, format, tensors ...

Every function returns the same summary shape (smolq.pipeline.summary):
source, output, format, n_tensors, tensor_bytes, bytes, seconds, notes and
tensors (rows with name, shape, type, bytes), plus what is particular to it.
Errors are smolq.InputError / smolq.FormatError with a one-line message.
Nothing here imports torch until GPTQ runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

from smolq.arch import arch_for_config
from smolq.errors import InputError
from smolq.formats.detect import open_model
from smolq.formats.gguf import Split
from smolq.formats.imatrix import Imatrix
from smolq.formats.imatrix import read_imatrix as _read_imatrix
from smolq.lazy import lazy_module
from smolq.pipeline.summary import common_summary
from smolq.plan.budget import MIXED, SizeTarget, parse_candidates
from smolq.plan.mix import PlanOptions, parse_tensor_type_overrides, parse_type, resolve_preset
from smolq.plan.targets import is_mlc_format
from smolq.sources.gptq import looks_like_gptq
from smolq.transforms.gptq import HESSIAN_REG_DEFAULT

# Each pipeline is imported when its function is first called, so a command loads the modules
# it runs and not every pipeline's (a third of a second of `smolq quantize`'s startup).
_convert = lazy_module("smolq.pipeline.convert")
_imatrix = lazy_module("smolq.pipeline.imatrix")
_migrate = lazy_module("smolq.pipeline.migrate")
_requantize = lazy_module("smolq.pipeline.requantize")
_split = lazy_module("smolq.pipeline.split")

PathLike = str | os.PathLike
Progress = Callable[[dict[str, Any]], None]

__all__ = ["convert", "quantize", "imatrix", "read_imatrix", "migrate", "split", "merge", "open", "Source",
           "TensorInfo"]


def convert(src: PathLike, out: PathLike, *, format: str | None = None, outtype: str | None = None,
            vocab_only: bool = False, dry_run: bool = False,
            split_max_size: int | str | None = None, split_max_tensors: int | None = None,
            max_shard_size: int | str | None = None,
            imatrix: PathLike | None = None, include_weights: Iterable[str] = (),
            exclude_weights: Iterable[str] = (),
            on_progress: Progress | None = None) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint directory (plain or GPTQ) into GGUF or a legacy ggml file,
    or (format "hf") a GGUF or legacy model file back into a Hugging Face checkpoint directory.

    format: "gguf" (v3), "gguf-v1" | "gguf-v2" | "gguf-v3", "ggml", "ggmf",
    "ggjt-v1" | "ggjt-v2" | "ggjt-v3", "ggmm"; None: from OUT's suffix (.gguf ->
    GGUF v3, .bin -> the family's GPT4All legacy format); "mlc": MLC-LLM weights
    (LLaMA), a directory.
    outtype: "f32", "f16", "bf16", any RTN type ("q4_0", "q6_k" ...) or a llama.cpp
    mix ("q4_k_m" ...); None: f16 (a GPTQ directory: each Linear's exact type).
    With format "mlc": "q4f16_1", "q4f16_0", "q3f16_1" or "q0f16" (the default).
    on_progress(event) gets {"event": "start"|"tensor"|"done", ...}.
    split_max_size ("2G", "500M": decimal units, or bytes) / split_max_tensors:
    GGUF output in shards OUT-00001-of-0000N.gguf as llama.cpp's gguf-split writes
    them (summary["shards"] names them; a model that fits one shard stays OUT).
    format "hf": src is a GGUF or legacy file (LLaMA); outtype "f32", "f16" or "bf16" (None:
    the file's float type, else f16); max_shard_size ("5GB", the default, or bytes):
    safetensors shards above it, with model.safetensors.index.json.
    imatrix: an importance matrix (llama.cpp's GGUF or .dat file, e.g. from smolq.imatrix) that
    the block types are quantized with, as llama-quantize --imatrix; include_weights /
    exclude_weights: substrings of entry names to keep / drop (not both).
    Returns the summary; with dry_run=True nothing is written.
    """
    return common_summary(_convert.convert(src, out, format=format, outtype=outtype, vocab_only=vocab_only,
                                           dry_run=dry_run, on_progress=on_progress,
                                           split=Split.of(split_max_size, split_max_tensors),
                                           max_shard_size=max_shard_size, imatrix=imatrix,
                                           include_weights=list(include_weights),
                                           exclude_weights=list(exclude_weights)))


def quantize(src: PathLike, out: PathLike, *, type: str | None = None, bits: int | None = None,
             method: Literal["rtn", "gptq"] | None = None, format: str | None = None,
             pure: bool = False, leave_output_tensor: bool = False, output_tensor_type: str | None = None,
             token_embedding_type: str | None = None, tensor_types: Iterable[str] | Mapping[str, str] = (),
             allow_requantize: bool = False, threads: int = 0,
             calib: PathLike | None = None, group_size: int = 128, act_order: bool = False, sym: bool = True,
             damp: float = 0.01, nsamples: int | None = None, seqlen: int | None = None, device: str = "cpu",
             true_sequential: bool = True, static_groups: bool = False, mse: float = 0.0,
             scale_rule: str = "weighted", seed: int = 0, resume: bool = False,
             hessian_reg: str | float = HESSIAN_REG_DEFAULT, attention_aware: bool | None = None,
             refit_scales: bool | None = None,
             double_quant: bool = True, blocksize: int = 64,
             split_max_size: int | str | None = None, split_max_tensors: int | None = None,
             imatrix: PathLike | None = None, include_weights: Iterable[str] = (),
             exclude_weights: Iterable[str] = (),
             target_bpw: float | None = None, target_size: int | str | None = None,
             candidates: str | Iterable[str] | None = None, recipe: PathLike | None = None,
             save_recipe: PathLike | None = None,
             dry_run: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Quantize a model, as `smolq quantize` does.

    src: a GGUF / legacy file (requantized with RTN, container kept unless
    `format` says otherwise), or an HF checkpoint directory (RTN: converted;
    GPTQ: calibrated and solved, block by block).
    type: a preset as llama-quantize names it ("q4_0", "q4_k_m", "q2_k_s", "iq4_xs", "iq2_m", "mxfp4_moe",
    "tq2_0", "f16" ...; IQ1/IQ2 mixes, iq3_xxs, iq3_xs and q2_k_s need an importance matrix) or a plain
    type; bits: 2, 3, 4, 5, 6 or 8 for that width's default preset.
    method: "rtn" or "gptq" (needs an HF checkpoint; the GPTQ options below
    apply to it only); None: "gptq" when `calib` is given, else "rtn". format "gptq" (or an OUT without suffix) with method
    "gptq" writes an HF GPTQ directory (bits 2/3/4/8). format "mlc" writes
    MLC-LLM weights from an HF checkpoint, type q4f16_1, q4f16_0, q3f16_1 or
    q0f16 (bits 4 -> q4f16_1, 3 -> q3f16_1).
    format "nf4" / "fp4" (HF checkpoint in): the directory transformers saves for
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=format,
    bnb_4bit_use_double_quant=double_quant); blocksize: values per absmax (64).
    tensor_types: "REGEX=TYPE" strings, or a {regex: type} mapping (wins over the mix).
    quiet=False shows progress bars on stderr (the CLI's default).
    split_max_size / split_max_tensors: a GGUF output in shards, as in convert().
    hessian_reg / attention_aware (GPTQ): by default 0.75 and on when rounding onto ggml types,
    0 and off for format "gptq" (the reference GPTQ); README: GPTQ, the measurements.
    refit_scales (GPTQ): after rounding, each row's free fp16 scales (legacy 32-blocks, IQ4_NL) re-fitted
    to the layer error with the codes fixed; None: the default (README).
    imatrix: an importance matrix file (llama.cpp's GGUF or .dat; smolq.imatrix writes both)
    used as llama-quantize --imatrix uses it (method "rtn"); include_weights /
    exclude_weights: substrings of entry names to keep / drop (not both).
    target_bpw (bits per weight of the tensor data) / target_size (file bytes: 80_000_000, "80MiB",
    "1.2G"): instead of a type, choose each tensor's type from `candidates` ("q4_k,q6_k,...";
    default: Q2_K..Q8_0 and the i-quants) for the least predicted loss that fits (a GGUF file in, or
    an HF checkpoint: with calib, GPTQ onto the chosen types, the losses scaled by a KL probe;
    summary["allocation"] says what was chosen); recipe: a JSON {tensor: type} file applied
    instead (save_recipe writes the run's one).
    Returns the summary; with dry_run=True nothing is written (but save_recipe).
    """
    src, out = Path(src), Path(out)
    method = ("gptq" if calib is not None else "rtn") if method is None else method.lower()
    if is_mlc_format(format):
        given = {"pure": pure, "leave_output_tensor": leave_output_tensor, "output_tensor_type": output_tensor_type,
                 "token_embedding_type": token_embedding_type, "tensor_type": list(tensor_types),
                 "allow_requantize": allow_requantize, "group_size": group_size != 128, "act_order": act_order,
                 "asym": not sym, "damp": damp != 0.01, "nsamples": nsamples is not None, "seqlen": seqlen is not None,
                 "static_groups": static_groups, "mse": mse != 0.0, "resume": resume, "device": device != "cpu",
                 "true_sequential": not true_sequential, "scale_rule": scale_rule != "weighted", "seed": seed != 0,
                 "hessian_reg": str(hessian_reg) != HESSIAN_REG_DEFAULT, "attention_aware": attention_aware is not None,
                 "refit_scales": refit_scales is not None}
        return common_summary(_requantize.run_mlc(src, out, type, bits, method=method, calib=calib and Path(calib),
                                                  changed=[k for k, v in given.items() if v], dry_run=dry_run,
                                                  quiet=quiet))
    choosing = target_bpw is not None or target_size is not None or recipe is not None
    if method == "gptq" and type is None and bits is None and not choosing and _requantize.is_gptq_dir(format, out):
        bits = 4  # AutoGPTQ's default width
    if isinstance(tensor_types, Mapping):
        tensor_types = [f"{k}={v}" for k, v in tensor_types.items()]
    opts = PlanOptions(
        pure=pure,
        leave_output_tensor=leave_output_tensor,
        output_tensor_type=parse_type(output_tensor_type, "output tensor type") if output_tensor_type else None,
        token_embedding_type=parse_type(token_embedding_type, "token embedding type") if token_embedding_type else None,
        tensor_types=parse_tensor_type_overrides(list(tensor_types)),
    )
    gptq = {"group_size": group_size, "act_order": act_order, "sym": sym, "damp": damp, "nsamples": nsamples,
            "seqlen": seqlen, "device": device, "true_sequential": true_sequential, "static_groups": static_groups,
            "mse": mse, "scale_rule": scale_rule, "seed": seed, "resume": resume, "hessian_reg": hessian_reg,
            "attention_aware": attention_aware, "refit_scales": refit_scales}
    if (format or "").lower() in _requantize.BNB_FORMATS:  # bitsandbytes: its own type, no ggml preset
        if type is not None or bits is not None:
            raise InputError(None, f"--type/--bits do not apply to --format {format.lower()} (4-bit by definition)")
        type = "f16"  # carried, unused
    size_target = SizeTarget.of(target_bpw, target_size)
    chooses = size_target is not None or recipe is not None
    if chooses and (type is not None or bits is not None):
        raise InputError(None, "--target-bpw/--target-size/--recipe choose every tensor's type: drop --type/--bits")
    if candidates is not None and size_target is None:
        raise InputError(None, "--candidates applies to --target-bpw / --target-size")
    preset = MIXED if chooses else resolve_preset(type, bits)
    request = _requantize.Request(src, out, preset, opts, method, format, allow_requantize,
                                  threads, Path(calib) if calib is not None else None, dry_run, quiet, gptq,
                                  {"double_quant": double_quant, "blocksize": blocksize},
                                  Split.of(split_max_size, split_max_tensors),
                                  Path(imatrix) if imatrix is not None else None,
                                  list(include_weights), list(exclude_weights), size_target,
                                  parse_candidates(candidates), Path(recipe) if recipe is not None else None,
                                  Path(save_recipe) if save_recipe is not None else None)
    return common_summary(_requantize.run(request))


def imatrix(src: PathLike, out: PathLike, *, calib: PathLike, ctx: int = 512, chunks: int = -1,
            process_output: bool = False, format: str | None = None, threads: int = 0, resume: bool = False,
            quiet: bool = True, on_progress: Progress | None = None) -> dict[str, Any]:
    """The importance matrix of the HF checkpoint `src` on the text `calib`, as llama-imatrix computes it.

    Written to `out` in llama.cpp's GGUF imatrix format, or the legacy .dat one (format "dat",
    or an OUT ending in .dat); llama-quantize --imatrix and smolq.quantize(imatrix=...) read both.
    ctx: tokens per chunk; chunks: how many (-1: all the text gives); process_output: also
    output.weight. Block by block, bounded memory; resume=True continues an interrupted run.
    Returns a summary (output, format, chunks, tokens, n_entries, bytes, seconds).
    """
    return _imatrix.compute_imatrix(src, out, calib, ctx=ctx, chunks=chunks, process_output=process_output,
                                    format=format, threads=threads, resume=resume, quiet=quiet,
                                    on_progress=on_progress)


def read_imatrix(path: PathLike) -> Imatrix:
    """An imatrix file (llama.cpp's GGUF or legacy .dat): entries, chunk_count, datasets, importance(name)."""
    return _read_imatrix(path)


def migrate(src: PathLike, out: PathLike, *, format: str | None = None, config: PathLike | None = None,
            type: str | None = None, dry_run: bool = False,
            split_max_size: int | str | None = None, split_max_tensors: int | None = None,
            on_progress: Progress | None = None) -> dict[str, Any]:
    """Carry a GGUF or legacy model file into another container/version.

    format: "gguf" (v3, the default), "gguf-v1" | "gguf-v2" | "gguf-v3", "ggml",
    "ggmf", "ggjt-v1" | "ggjt-v2" | "ggjt-v3", "ggmm".
    config: an HF checkpoint directory or config.json for what a legacy header
    lacks (and its tokenizer); without it those values are guessed and listed
    in the summary's "guesses".
    type: where tensors go that the target cannot hold exactly ("f32": lossless).
    split_max_size / split_max_tensors: a GGUF output in shards, as in convert().
    Returns the summary, with a per-tensor report (action, lossless, stats).
    """
    return common_summary(_migrate.migrate(src, out, format=format, config=config, type=type, dry_run=dry_run,
                                           on_progress=on_progress,
                                           split=Split.of(split_max_size, split_max_tensors)))


def split(src: PathLike, prefix: PathLike, *, split_max_size: int | str | None = None,
          split_max_tensors: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Re-shard a GGUF file (or split set) as PREFIX-00001-of-0000N.gguf ..., as llama-gguf-split does.

    Tensor bytes are copied, not decoded; summary["shards"] lists each shard.
    """
    return common_summary(_split.split_file(src, prefix, Split.of(split_max_size, split_max_tensors),
                                            dry_run=dry_run))


def merge(first: PathLike, out: PathLike, *, dry_run: bool = False) -> dict[str, Any]:
    """Join a split GGUF, given its first shard, into one file (byte-identical to the unsplit original)."""
    return common_summary(_split.merge_file(first, out, dry_run=dry_run))


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its name in the source, shape (numpy order: the row length last), type, bytes."""

    name: str
    shape: tuple[int, ...]
    type: str  # ggml type name ("F16", "Q4_K" ...) or checkpoint dtype ("BF16" ...)
    nbytes: int | None = None


@dataclass(frozen=True)
class Source:
    """What `smolq.open` finds in a model: read from headers only, no tensor data is loaded."""

    path: Path
    kind: str  # "hf" | "gptq" (checkpoint directories) | "file"
    container: str  # "hf", "gptq", "gguf", "ggml", "ggmf", "ggjt", "ggmm"
    version: int | None
    format: str  # "hf", "gptq", "gguf-v3", "ggjt-v3", "ggml" ...
    architecture: str  # family: "llama", "gptj", "mpt" (a GGUF's general.architecture otherwise)
    vocab_size: int | None
    metadata: dict[str, Any] = field(repr=False)  # HF config, GGUF KVs or legacy header fields
    tensors: list[TensorInfo] = field(repr=False)
    dialect: str | None = None  # legacy files: "llama.cpp" | "ggml-examples" | "gpt4all"

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.tensors)


def open(path: PathLike) -> Source:
    """Describe a model: an HF or GPTQ checkpoint directory, a GGUF v1-v3 file (a split GGUF: its
    first shard, for the whole set) or any legacy ggml file."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if p.is_dir():
        return _open_checkpoint(p)
    with open_model(p) as mf:
        fmt = mf.container if mf.version is None else f"{mf.container}-v{mf.version}"
        tensors = [TensorInfo(t.name, tuple(t.shape), t.type.name, t.nbytes) for t in mf.tensors]
        return Source(p, "file", mf.container, mf.version, fmt, mf.architecture, mf.vocab_size,
                      dict(mf.metadata), tensors, mf.header.get("dialect"))


def _open_checkpoint(p: Path) -> Source:
    kind = "gptq" if looks_like_gptq(p) else "hf"
    with _convert.open_source(p) as ckpt:
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        tensors = [TensorInfo(name, tuple(t.shape), t.dtype, _dtype_bytes(t.dtype, t.shape))
                   for name, t in ckpt.tensors.items()]
        return Source(p, kind, kind, None, kind, arch.family, arch.n_vocab, dict(ckpt.config), tensors)


_DTYPE_SIZE = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "I64": 8}


def _dtype_bytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    size = _DTYPE_SIZE.get(dtype)
    if size is None:
        return None
    n = 1
    for d in shape:
        n *= d
    return n * size
