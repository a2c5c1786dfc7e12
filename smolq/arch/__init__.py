"""Architecture registry: HF `architectures` name or `model_type` -> Arch subclass.

    arch = arch_for_config(config, config_path)     # bound to one config
    family_arch("llama").names.to_gguf("layers.0.attention.wq.weight")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from smolq.arch.base import Arch, LegacyTarget, MLCParam, NameTable, TensorMap
from smolq.arch.gemma3 import Gemma3
from smolq.arch.gptj import GPTJ
from smolq.arch.llama import Llama
from smolq.arch.mistral import Mistral
from smolq.arch.mpt import MPT
from smolq.arch.qwen2 import Qwen2
from smolq.arch.qwen3 import Qwen3
from smolq.errors import InputError

ARCHES: tuple[type[Arch], ...] = (Llama, GPTJ, MPT, Mistral, Qwen2, Qwen3, Gemma3)

BY_ARCHITECTURE: dict[str, type[Arch]] = {name: a for a in ARCHES for name in a.hf_architectures}
BY_MODEL_TYPE: dict[str, type[Arch]] = {name: a for a in ARCHES for name in a.model_types}
BY_FAMILY: dict[str, type[Arch]] = {a.family: a for a in ARCHES}


def find_arch_class(config: dict[str, Any], config_path: Path) -> type[Arch]:
    """The first listed HF architecture we know, else the model_type; InputError if neither."""
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures:
        if name in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[name]
    model_type = config.get("model_type")
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    what = ", ".join(map(str, architectures)) or f"model_type {model_type!r}"
    known = ", ".join(sorted(BY_ARCHITECTURE))
    raise InputError(config_path, f"unknown architecture {what} (smolq converts {known})")


def arch_for_config(config: dict[str, Any], config_path: Path) -> Arch:
    return find_arch_class(config, config_path)(config, config_path)


def family_arch(family: str) -> type[Arch]:
    """The Arch class of a family name ("llama", "gptj", "mpt", "qwen2" ...) or GGUF architecture."""
    try:
        return BY_FAMILY[family]
    except KeyError:
        raise InputError(None, f"unknown model family {family!r} (known: {', '.join(BY_FAMILY)})") from None


__all__ = [
    "ARCHES", "Arch", "LegacyTarget", "MLCParam", "NameTable", "TensorMap",
    "arch_for_config", "family_arch", "find_arch_class", "Llama", "GPTJ", "MPT", "Mistral", "Qwen2", "Qwen3", "Gemma3",
]
