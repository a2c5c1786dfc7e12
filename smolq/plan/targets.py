"""What an output will be: format names, the one target resolution, storable types.

Every command picks its output container here:

- convert: --format, else OUT's suffix (.gguf -> GGUF v3; .bin -> the family's
  default legacy format); the family's own refusals (MPT with GQA ...);
- quantize (RTN on a file): --format, else the input's container; plain `gguf`
  keeps the input's GGUF version, a legacy container gets its newest version
  (llama.cpp's 2023 quantizer wrote ggjt v3 whatever the converter wrote) and
  keeps the input's dialect; GGUF <-> legacy is refused (that is migrate's job);
- migrate: --format, else GGUF v3; a legacy target needs a family it exists for;
- MLC-LLM weights (`mlc`, a directory): from an HF checkpoint of a family with an
  MLC model (convert, or quantize of a checkpoint directory), never from a file;
- a Hugging Face checkpoint (`hf`, a directory): from a GGUF or legacy model file
  of a family that can be written back (Arch.hf_export), never from a checkpoint.

`target_types(target, family)` is the one answer to "which tensor types can
this container version hold".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolq.arch import ARCHES, Arch, LegacyTarget, family_arch
from smolq.errors import InputError
from smolq.formats.gguf import GGUF_TENSOR_TYPES
from smolq.formats.legacy import LAYOUT_OF_QNTVR, layout_for
from smolq.formats.legacy import storable_types as _container_types
from smolq.formats.legacy_tables import find_spec
from smolq.formats.mlc import QUANTS as MLC_QUANTS
from smolq.formats.mlc import MLCQuant
from smolq.ggml_types import GGMLType

# --format names. "gguf" alone: v3 (convert, migrate) or the input's version (quantize).
GGUF_FORMATS: dict[str, int | None] = {"gguf": None, "gguf-v1": 1, "gguf-v2": 2, "gguf-v3": 3}
LEGACY_FORMATS: dict[str, tuple[str, int | None]] = {
    "ggml": ("ggml", None), "ggmf": ("ggmf", 1), "ggjt-v1": ("ggjt", 1), "ggjt-v2": ("ggjt", 2),
    "ggjt-v3": ("ggjt", 3), "ggmm": ("ggmm", None)}
# A bare container name is its newest version ("ggjt": v3), so a quantizer that keeps the
# input's container writes the newest version of it, as llama.cpp's 2023 quantizer did.
FORMAT_ALIASES = {"ggjt": "ggjt-v3", "gguf3": "gguf-v3", "gguf2": "gguf-v2", "gguf1": "gguf-v1"}
MLC_FORMAT = "mlc"  # MLC-LLM weights: a directory of params_shard_*.bin + tensor-cache.json
HF_FORMAT = "hf"  # a Hugging Face checkpoint directory: safetensors + config.json + tokenizer
HF_OUTTYPES = ("f32", "f16", "bf16")
HF_DEFAULT_SHARD = "5GB"  # transformers' save_pretrained default max_shard_size
ALL_FORMATS = tuple(GGUF_FORMATS) + tuple(LEGACY_FORMATS) + (MLC_FORMAT, HF_FORMAT)
NEWEST_GGUF = 3
NEWEST_QNTVR = 2  # ggml examples: quantization version of the v3 block layout
# The list quantize's "unknown format" message has always named.
_QUANTIZE_NAMES = "gguf, gguf-v1, gguf-v2, gguf-v3, ggml, ggmf, ggjt-v1, ggjt-v2, ggjt-v3, ggjt, ggmm"


@dataclass(frozen=True)
class Target:
    """An output container version: GGUF vN, or a legacy container/version/dialect."""

    format: str  # canonical name: "gguf-v3", "ggjt-v3", "ggml" ...
    container: str  # "gguf" | "ggml" | "ggmf" | "ggjt" | "ggmm"
    version: int | None
    legacy: LegacyTarget | None = None  # container, version, dialect, block layout (legacy only)
    qntvr: int | None = None  # ggml-examples files: the quantization version written in the ftype

    @property
    def is_gguf(self) -> bool:
        return self.container == "gguf"

    @property
    def is_mlc(self) -> bool:
        return self.container == MLC_FORMAT

    @property
    def is_hf(self) -> bool:
        return self.container == HF_FORMAT

    @property
    def gguf_version(self) -> int | None:
        return self.version if self.is_gguf else None

    @property
    def layout(self) -> str:
        """Block layout of Q4_0/Q4_1/Q5_x/Q8_0 in this target ("v1" | "v2" | "v3")."""
        return self.legacy.layout if self.legacy else "v3"

    @property
    def dialect(self) -> str | None:
        return self.legacy.dialect if self.legacy else None


def gguf_target(version: int) -> Target:
    return Target(f"gguf-v{version}", "gguf", version)


def legacy_target(fmt: str, lt: LegacyTarget, qntvr: int | None = None) -> Target:
    return Target(fmt, lt.container, lt.version, lt, qntvr)


def format_key(fmt: str) -> str:
    """A --format name as the tables spell it (case, '_' for '-', aliases)."""
    key = fmt.lower().replace("_", "-")
    return FORMAT_ALIASES.get(key, key)


def resolve_target(fmt: str | None, out: str | Path, arch: Arch | None = None, *,
                   family: str | None = None, source: Any = None) -> Target:
    """The output target of a command.

    convert: pass `arch` (the family bound to the checkpoint's config).
    quantize: pass `source` (the opened input file, formats.detect.ModelFile).
    migrate: pass `family` ("llama" | "gptj" | "mpt", or None for another GGUF architecture).
    """
    out = Path(out)
    if fmt is None:
        fmt = _default_format(out, arch, source)
    key = format_key(fmt)
    if key == MLC_FORMAT:
        return _mlc_target(out, arch, source)
    if key == HF_FORMAT:
        return _hf_target(out, arch, family, source)
    if key in GGUF_FORMATS:
        if source is not None and not source.is_gguf:
            raise InputError(out, f"{source.format_name} -> GGUF changes tensor names and metadata: "
                                  f"run `smolq migrate {source.path} OUT.gguf` first, then quantize")
        default = source.version if source is not None else NEWEST_GGUF
        return gguf_target(GGUF_FORMATS[key] or default)
    if key not in LEGACY_FORMATS:
        if source is not None:
            raise InputError(out, f"unknown format {fmt!r}; choose one of {_QUANTIZE_NAMES}")
        raise InputError(out, f"unknown format {fmt!r} (choose one of {', '.join(ALL_FORMATS)})")
    if source is not None:
        if source.is_gguf:
            raise InputError(out, f"GGUF -> {key} changes tensor names and headers: use `smolq migrate` "
                                  f"(or `smolq convert` from the HF checkpoint) with --outtype")
        return _requantize_target(source, key, out)
    if arch is not None:
        return legacy_target(key, arch.legacy_target(key, out))
    if family is None:
        raise InputError(out, f"{key} holds only LLaMA, GPT-J and MPT models; the source is none of them")
    return legacy_target(key, family_arch(family).legacy_target_for(key, out))


def is_mlc_format(fmt: str | None) -> bool:
    return fmt is not None and format_key(fmt) == MLC_FORMAT


def _mlc_target(out: Path, arch: Arch | None, source: Any) -> Target:
    if arch is None:
        what = f"a {source.format_name} file" if source is not None else "a model file"
        raise InputError(out, f"MLC-LLM weights are made from the HF checkpoint, not from {what}")
    if arch.mlc_model_type is None:
        raise InputError(out, f"--format mlc: MLC-LLM weights are written for LLaMA only, not {arch.family}")
    return Target(MLC_FORMAT, MLC_FORMAT, None)


def is_hf_format(fmt: str | None) -> bool:
    return fmt is not None and format_key(fmt) == HF_FORMAT


def _hf_target(out: Path, arch: Arch | None, family: str | None, source: Any) -> Target:
    """A checkpoint directory from a model file (family: the file's, None for one smolq has no module for)."""
    if arch is not None or source is not None:
        raise InputError(out, "--format hf writes a Hugging Face checkpoint from a GGUF or legacy model file; "
                              "the input is not one")
    if family is None or not family_arch(family).hf_export:
        what = family or "this architecture"
        raise InputError(out, f"--format hf: {what} cannot be written as a transformers checkpoint "
                              f"(families that can: {', '.join(HF_EXPORT_FAMILIES)})")
    return Target(HF_FORMAT, HF_FORMAT, None)


HF_EXPORT_FAMILIES = tuple(a.family for a in ARCHES if a.hf_export)


def hf_outtype(name: str | None, source_types: Any, out: Path | None = None) -> str:
    """--outtype for --format hf: f32, f16 or bf16; None: the source's float type when every
    matrix has the same one (F32/F16/BF16), else f16."""
    if name is not None:
        key = name.lower()
        if key not in HF_OUTTYPES:
            raise InputError(out, f"--format hf stores {', '.join(HF_OUTTYPES)}, not {name!r}")
        return key
    floats = {GGMLType.F32: "f32", GGMLType.F16: "f16", GGMLType.BF16: "bf16"}
    kinds = {floats.get(t) for t in source_types}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else "f16"


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(spec: int | str | None, out: Path | None = None) -> int:
    """--max-shard-size as bytes: an int, or "5GB" / "500MB" / "2GiB" (decimal units as transformers reads them)."""
    if spec is None:
        spec = HF_DEFAULT_SHARD
    if isinstance(spec, int):
        value = spec
    else:
        text = str(spec).strip().upper()
        digits = text.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        unit = text[len(digits):]
        try:
            value = int(float(digits) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            value = 0
    if value <= 0:
        raise InputError(out, f"--max-shard-size {spec!r}: give bytes or a size like 5GB, 500MB, 2GiB")
    return value


def mlc_quant(name: str | None, out: Path | None = None) -> MLCQuant:
    """An MLC-LLM quantization name (--outtype / --type with --format mlc); None: q0f16."""
    key = (name or "q0f16").lower()
    if key not in MLC_QUANTS:
        raise InputError(out, f"unknown MLC-LLM quantization {name!r} (choose one of {', '.join(MLC_QUANTS)})")
    return MLC_QUANTS[key]


def _default_format(out: Path, arch: Arch | None, source: Any) -> str:
    if source is not None:  # quantize: the input's container
        return "gguf" if source.is_gguf else source.container
    if arch is None:  # migrate
        return "gguf"
    suffix = out.suffix.lower()  # convert
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".bin":
        return arch.default_legacy
    raise InputError(out, "cannot tell the format from the suffix (.gguf or .bin); pass --format")


def _requantize_target(source: Any, key: str, out: Path) -> Target:
    """A legacy file requantized into `key`, in the input's dialect when the container is the input's."""
    container, version = LEGACY_FORMATS[key]
    family = source.architecture
    dialect = source.header.get("dialect") if container == source.container else None
    spec = find_spec(family, container, dialect) or find_spec(family, container)
    if spec is None:
        raise InputError(out, f"a {family} model cannot be written as {key}")
    _check_same_header(source, spec, key, out)
    qntvr = NEWEST_QNTVR if spec.qntvr_in_ftype else None
    name = container if version is None else f"{container}-v{version}"
    lt = LegacyTarget(container, version, spec.dialect, layout_for(container, version, qntvr))
    return legacy_target(name, lt, qntvr)


def _check_same_header(source: Any, spec: Any, key: str, out: Path) -> None:
    """quantize carries the input's header fields and vocabulary over as they are; a target that
    needs fields or token scores the input lacks (MPT ggml <-> ggmm, LLaMA ggml -> ggmf/ggjt) is
    migrate's work: it recovers or guesses what the other layout needs, and says so."""
    mine = find_spec(source.architecture, source.container, source.header.get("dialect"))
    if mine is None:
        return
    needs_fields = set(spec.hparam_names) - set(mine.hparam_names)
    if needs_fields or (spec.vocab.scores and not mine.vocab.scores):
        raise InputError(out, f"{source.format_name} -> {key} changes the header and vocabulary layout: run "
                              f"`smolq migrate {source.path} OUT --format {key}` first, then quantize")


def target_types(target: Target, family: str | None) -> frozenset[GGMLType]:
    """The tensor types `target` can hold for a model of `family` (None: any family the container takes)."""
    if target.is_gguf:
        return frozenset(GGUF_TENSOR_TYPES)
    lt = target.legacy
    qntvr = target.qntvr
    if qntvr is None and lt.dialect == "ggml-examples":
        qntvr = LAYOUT_OF_QNTVR[lt.layout]
    return frozenset(_container_types(lt.container, lt.version, family, lt.dialect, qntvr))
