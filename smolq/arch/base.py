"""What every architecture module provides: names, hyperparameters, transforms.

An architecture never writes bytes. It tells the pipeline, for one config:
- which checkpoint tensor becomes which GGUF / legacy tensor, with which
  expected shape and which row transform (TensorMap);
- the GGUF `<arch>.*` metadata and the legacy header fields;
- the fixed legacy-name <-> GGUF-name table (NameTable), which needs no config
  and is what the reference forward pass and `migrate` use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from smolq.errors import FormatError, InputError
from smolq.formats.gguf import MetaValue
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast


@dataclass(frozen=True)
class TensorMap:
    """One output tensor and where it comes from.

    `shape` is the PyTorch-order shape the checkpoint tensor `source` must
    have; `transform` (HF layout -> ggml layout, same shape) is applied to its
    float data. `gguf`/`legacy` are the output names, None where that
    container does not carry the tensor. `keep_f32` marks tensors that stay
    F32 whatever the out-type (1-D, norms); `legacy_f32` adds tensors that
    a legacy loader insists on reading as F32 (GPT4All MPT's wte).
    """

    source: str
    shape: tuple[int, ...]
    gguf: str | None
    legacy: str | None
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    keep_f32: bool = False
    legacy_f32: bool = False
    inverse: Callable[[np.ndarray], np.ndarray] | None = None  # undoes `transform` (ggml layout -> HF)
    # A tensor computed from the config, not read from the checkpoint (Llama 3.1's rope_freqs):
    # `source` is then only its label, and `make()` gives its float32 values.
    make: Callable[[], np.ndarray] | None = None

    def row_permutation(self, path: Path | None = None) -> np.ndarray | None:
        """`transform` as an index array over rows (None: no transform), so rows
        of quantized blocks (which run along the input dimension) can follow it."""
        if self.transform is None:
            return None
        rows = self.shape[0]
        perm = self.transform(np.arange(rows, dtype=np.float64)[:, None] * np.ones((1, 2)))[:, 0].astype(np.int64)
        if not np.array_equal(np.sort(perm), np.arange(rows)):
            raise InputError(path, f"{self.source}: the architecture's transform is not a row permutation, "
                                   "so quantized blocks cannot follow it")
        return perm


class NameTable:
    """Legacy <-> GGUF tensor names, from (gguf pattern, legacy pattern) pairs with `{i}` for the block."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._to_legacy = [(_pattern(g), l) for g, l in pairs]
        self._to_gguf = [(_pattern(l), g) for g, l in pairs]

    def to_legacy(self, gguf_name: str) -> str | None:
        return _translate(self._to_legacy, gguf_name)

    def to_gguf(self, legacy_name: str) -> str | None:
        return _translate(self._to_gguf, legacy_name)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _translate(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
    return None


@dataclass(frozen=True)
class MLCParam:
    """One parameter of an MLC-LLM model before quantization: MLC's name (without the
    .weight / .q_weight suffix), what it is, and the checkpoint tensors its loader
    concatenates along the rows (fused q/k/v, gate/up) into `shape` = [rows, columns]
    (a norm: [columns])."""

    name: str
    kind: str  # "embedding" | "linear" | "norm"
    sources: tuple[str, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LegacyTarget:
    """A legacy container an architecture can be written to."""

    container: str  # "ggml" | "ggmf" | "ggjt" | "ggmm"
    version: int | None
    dialect: str  # "llama.cpp" | "ggml-examples" | "gpt4all"
    layout: str  # block layout of Q4_0/Q4_1/Q5_x/Q8_0 in this file: "v1" | "v2" | "v3"


class Arch:
    """Base class; one subclass per family, bound to one config."""

    family: ClassVar[str]
    gguf_arch: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]
    names: ClassVar[NameTable]
    # Legacy formats this family exists in, by --format name; the first is the default for .bin.
    legacy_targets: ClassVar[dict[str, LegacyTarget]]
    default_legacy: ClassVar[str]
    # Checkpoint tensors that are buffers, not weights (rotary caches, causal masks).
    skip_suffixes: ClassVar[tuple[str, ...]] = ()
    # What legacy headers never stored, filled from these defaults as listed guesses (legacy_config.Default).
    legacy_defaults: ClassVar[tuple[tuple[str, Any, str, str], ...]] = ()
    # MLC-LLM's model_type for this family (mlc-chat-config.json), None where smolq writes no MLC weights.
    mlc_model_type: ClassVar[str | None] = None
    # Whether a model file of this family can be written back as a transformers checkpoint (hf_config).
    hf_export: ClassVar[bool] = False
    # tokenizer.ggml.add_space_prefix as llama.cpp's converter writes it for the family (None: not written).
    add_space_prefix: ClassVar[bool | None] = None

    def __init__(self, config: dict[str, Any], config_path: Path):
        self.config = config
        self.config_path = Path(config_path)
        self.guesses: list[str] = []  # hyperparameters not in config.json, filled with a default
        self.notes: list[str] = []  # other things a user should know
        self.read_hparams()

    # -- config helpers
    def need(self, key: str, where: dict[str, Any] | None = None) -> Any:
        source = self.config if where is None else where
        value = source.get(key)
        if value is None:
            raise FormatError(self.config_path, f"missing {key} (needed for {self.family})")
        return value

    def default(self, key: str, value: Any, why: str = "", where: dict[str, Any] | None = None) -> Any:
        """config[key], or `value` recorded as a guess (never silently)."""
        source = self.config if where is None else where
        if source.get(key) is not None:
            return source[key]
        self.guesses.append(f"{key} not in config.json; using {value}{' (' + why + ')' if why else ''}")
        return value

    # -- to implement
    def read_hparams(self) -> None:
        raise NotImplementedError

    def tensor_maps(self, available: set[str]) -> list[TensorMap]:
        """Output tensors in write order, given the names the checkpoint holds."""
        raise NotImplementedError

    def hparam_keys(self) -> dict[str, Any]:
        """`<arch>.*` keys as name -> MetaValue."""
        raise NotImplementedError

    def legacy_hparams(self, target: LegacyTarget) -> dict[str, int | float]:
        """Header fields (formats.md 2) other than ftype."""
        raise NotImplementedError

    @property
    def n_vocab(self) -> int:
        raise NotImplementedError

    # -- to implement for MLC-LLM output (families with an mlc_model_type)
    def mlc_params(self) -> list[MLCParam]:
        """MLC-LLM's parameters in its model's order."""
        raise NotImplementedError

    def mlc_model_config(self) -> dict[str, Any]:
        """The "model_config" of mlc-chat-config.json (MLC's config dataclass, as asdict() gives it)."""
        raise NotImplementedError

    # -- to implement for `convert --format hf` (families with hf_export)
    def hf_config(self) -> dict[str, Any]:
        """config.json for transformers from this family's hyperparameters (no tokenizer ids)."""
        raise NotImplementedError

    @classmethod
    def output_tied(cls, tensors: dict[str, Any], same: Callable[[Any, Any], bool]) -> bool:
        """Whether a model file's output head is its embedding (by GGUF name; `same` compares
        two entries' stored bytes). Families whose HF checkpoints never tie: False."""
        return False

    # -- to implement for `migrate`: the config a model file implies (smolq.arch.legacy_config)
    @classmethod
    def config_from_legacy(cls, d: Any, header: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Fill the LegacyConfig `d` from a legacy header and the tensors by GGUF name."""
        raise NotImplementedError

    @classmethod
    def config_from_gguf(cls, meta: dict[str, Any], path: Path) -> dict[str, Any]:
        """An HF-style config from GGUF `<arch>.*` keys, for writing legacy headers."""
        raise NotImplementedError

    # -- shared
    def skip(self, name: str) -> bool:
        return name.endswith(self.skip_suffixes)

    @classmethod
    def legacy_target_for(cls, fmt: str, path: Path) -> LegacyTarget:
        """The family's legacy container `fmt`, or a one-line refusal (the class's own rule)."""
        target = cls.legacy_targets.get(fmt)
        if target is None and not cls.legacy_targets:
            raise InputError(path, f"{cls.family} cannot be written as {fmt}: no legacy container holds it "
                                   "(no 2023 reader knows it; ggml, ggmf and ggjt predate it); write GGUF")
        if target is None:
            known = ", ".join(cls.legacy_targets)
            raise InputError(path, f"{cls.family} cannot be written as {fmt}; legacy formats for it: {known}")
        return target

    def legacy_target(self, fmt: str, path: Path) -> LegacyTarget:
        """legacy_target_for, plus what this model's hyperparameters rule out (MPT with GQA)."""
        return self.legacy_target_for(fmt, path)

    def check_tensors(self, maps: list[TensorMap], tensors: dict[str, Any], file_of: Callable[[str], Path]) -> None:
        """Every mapped source present with its expected shape; nothing unaccounted for."""
        used: set[str] = set()
        for m in maps:
            if m.make is not None:
                continue
            t = tensors.get(m.source)
            if t is None:
                raise FormatError(self.config_path.parent, f"checkpoint has no tensor {m.source} ({self.family} needs it)")
            if tuple(t.shape) != tuple(m.shape):
                raise FormatError(file_of(m.source), f"tensor {m.source} has shape {list(t.shape)}, config.json implies {list(m.shape)}")
            used.add(m.source)
        for name in tensors:
            if name not in used and not self.skip(name):
                raise FormatError(file_of(name), f"unexpected tensor {name} for {self.family} (not part of the architecture)")


def f32_short(x: float) -> float:
    """A float GGUF stored as f32, written back short: 9.999999747378752e-06 as 1e-05."""
    return float(str(np.float32(x)))


def meta(kind: str, value: Any, item: str | None = None):
    """A GGUF MetaValue, imported lazily so arch modules load without the format module."""

    return MetaValue(kind, value, item)


# ------------------------------------------------------------------ config readers shared by families

def rope_theta(config: dict[str, Any]) -> float | None:
    """The RoPE base from either place transformers has kept it, or None when absent.

    Older configs: top-level `rope_theta`. transformers 5: `rope_parameters`
    = {"rope_theta": ..., "rope_type": ...} (possibly per layer type, as a dict
    of such dicts). Dropping the second form silently gives a wrong model.
    """
    top = config.get("rope_theta")
    if top is not None:
        return float(top)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
        for sub in params.values():  # {"full_attention": {...}, ...}
            if isinstance(sub, dict) and sub.get("rope_theta") is not None:
                return float(sub["rope_theta"])
    return None


def rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """RoPE scaling settings from `rope_scaling` (old) or `rope_parameters` (transformers 5)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type")) not in (None, "default"):
            return value
    return None
