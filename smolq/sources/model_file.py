"""A GGUF or legacy model file, opened as a source description.

formats.detect.open_model reads the container; this module says what model
it holds: the family, an HF-style config recovered from the header or the
GGUF metadata (checked against --config, gaps filled by listed guesses), the
family bound to that config, and the tensors under their GGUF names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolq.arch import ARCHES, Arch, family_arch
from smolq.arch.legacy_config import Guess, LegacyConfig
from smolq.errors import FormatError, InputError
from smolq.formats.base import TensorEntry
from smolq.lazy import lazy_module
from smolq.sources.checkpoint import read_json_object

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# GGUF architectures that are a family of their own (Mistral's files are `llama`).
FAMILIES = tuple(a.family for a in ARCHES if a.family == a.gguf_arch)


@dataclass
class ModelFile:
    """What an opened model file holds, for a family smolq knows."""

    model: Any  # the opened container; whoever opened it closes it
    arch: Arch  # the family bound to the recovered config
    tensors: dict[str, TensorEntry]  # by GGUF name
    tied: bool  # LLaMA: output.weight is the embedding (MPT always ties; see the plan)
    guesses: list[Guess] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def format_of(model) -> str:
    """The --format name of an opened file's container and version."""
    if model.container == "gguf":
        return f"gguf-v{model.version}"
    if model.container == "ggjt":
        return f"ggjt-v{model.version}"
    return model.container


def family_of(model) -> str | None:
    """The family of an opened file; None for a GGUF architecture smolq has no module for."""
    if model.container != "gguf":
        return model.architecture
    arch = model.metadata.get("general.architecture")
    return arch if arch in FAMILIES else None


def read_user_config(spec: str | os.PathLike | None) -> tuple[dict[str, Any], Path | None, Path | None]:
    """(config dict, its path, the directory holding a tokenizer or None) from --config."""
    if spec is None:
        return {}, None, None
    p = Path(spec)
    if p.is_dir():
        path, directory = p / "config.json", p
    elif p.is_file():
        path, directory = p, p.parent
    else:
        raise InputError(p, "--config: no such file or directory")
    if not path.is_file():
        raise InputError(p, "--config directory has no config.json")

    config = read_json_object(path, InputError, "--config")
    has_tokenizer = any((directory / n).is_file() for n in ("tokenizer.model", "tokenizer.json", "vocab.json"))
    return config, path, directory if has_tokenizer else None


def describe(model, user: dict[str, Any], user_path: Path | None) -> ModelFile:
    """The model an opened file of a known family holds; `user` is --config ({} without one)."""
    family = family_of(model)
    arch_cls = family_arch(family)
    tensors = canonical_tensors(model, arch_cls)
    guesses: list[Guess] = []
    notes: list[str] = []
    cfg = _config(model, arch_cls, tensors, user, user_path, guesses, notes)
    if family == "llama":
        tied = _llama_tied(model, tensors, user, user_path, notes)
    else:
        tied = arch_cls.output_tied(tensors, same_bytes)
    cfg["tie_word_embeddings"] = tied
    return ModelFile(model, arch_cls(cfg, user_path or model.path), tensors, tied, guesses, notes)


def _config(model, arch_cls: type[Arch], tensors: dict[str, TensorEntry], user: dict[str, Any],
            user_path: Path | None, guesses: list[Guess], notes: list[str]) -> dict[str, Any]:
    if model.container == "gguf":
        return arch_cls.config_from_gguf(model.metadata, model.path)
    d = LegacyConfig(user, user_path, model.path)
    arch_cls.config_from_legacy(d, dict(model.metadata), tensors)
    guesses += d.guesses
    notes += d.notes
    return d.config


def canonical_tensors(model, arch_cls: type[Arch]) -> dict[str, TensorEntry]:
    """Source tensors by GGUF name (legacy names translated by the family's table)."""
    if model.container == "gguf":
        return {t.name: t for t in model.tensors}
    out = {}
    for t in model.tensors:
        name = arch_cls.names.to_gguf(t.name)
        if name is None:
            raise FormatError(model.path, f"tensor {t.name} is not part of a legacy {model.architecture} model")
        out[name] = t
    return out


def same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    """Same type, shape, layout and stored bytes (a tied output.weight is a copy of the embedding)."""
    if a.type != b.type or a.shape != b.shape or a.layout != b.layout:
        return False
    return bool(np.array_equal(np.asarray(a.load()).view(np.uint8), np.asarray(b.load()).view(np.uint8)))


def _llama_tied(model, src: dict[str, TensorEntry], user: dict[str, Any], user_path, notes: list[str]) -> bool:
    """Legacy LLaMA files always store output.weight; it is tied when it equals the embedding
    (or --config says so). A GGUF file that stores it is untied by definition."""
    if "output.weight" not in src:
        return True
    if model.container == "gguf":
        return False
    same = same_bytes(src["output.weight"], src["token_embd.weight"])
    if "tie_word_embeddings" in user:
        tied = bool(user["tie_word_embeddings"])
        if tied and not same:
            notes.append(f"{user_path}: tie_word_embeddings is true, but output.weight differs from "
                         "tok_embeddings.weight; both kept")
            return False
        return tied
    return same
