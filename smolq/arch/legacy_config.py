"""Rebuilding an HF-style config from a model file, shared by every family.

A legacy header stores a few integers; GGUF stores `<arch>.*` keys. Each
family (Arch.config_from_legacy / config_from_gguf) knows which of them it
needs; what is common lives here: checking the file's values against
--config, filling what the file never stored from a listed default that is
recorded as a `Guess` (never silently), and reading required GGUF keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolq.arch.base import rope_theta
from smolq.errors import FormatError, InputError

# One default a legacy header lacks: (HF config key, default, GGUF key suffix, why that default).
Default = tuple[str, Any, str, str]


@dataclass
class Guess:
    """A value the source did not hold, filled from a default: the key it lands in and why."""

    key: str
    value: Any
    why: str

    def as_dict(self) -> dict[str, Any]:
        value = self.value
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} values]"
        return {"key": self.key, "value": value, "why": self.why}


class LegacyConfig:
    """Collects an HF-style config: values known from the file, checked against --config."""

    def __init__(self, user: dict[str, Any], user_path: Path | None, source: Path):
        self.user, self.user_path, self.source = user, user_path, source
        self.config: dict[str, Any] = {}
        self.guesses: list[Guess] = []
        self.notes: list[str] = []

    def known(self, key: str, value: Any, where: dict[str, Any] | None = None, strict: bool = True) -> None:
        """A value the file fixes. A contradicting --config is an error (strict) or a note."""
        given = (self.user if where is None else where).get(key)
        if given is not None and not _same_value(given, value):
            message = f"--config says {key} = {given}, but the file has {value}"
            if strict:
                raise InputError(self.user_path, f"{message}: it describes another model")
            self.notes.append(f"{message}; using the file's")
        (self.config if where is None else where)[key] = value

    def defaults(self, arch_key: str, table: tuple[Default, ...]) -> None:
        """Each value of `table` from --config, else its default, listed as a guess."""
        for key, default, gguf_suffix, why in table:
            value = rope_theta(self.user) if key == "rope_theta" else self.user.get(key)
            if value is None:
                value = default
                self.guesses.append(Guess(f"{arch_key}.{gguf_suffix}", default, why))
            self.config[key] = value

    def positive(self, hparams: dict[str, Any], names: tuple[str, ...]) -> None:
        """Header fields that must be positive integers (anything else is not a model we know)."""
        for n in names:
            v = hparams.get(n)
            if not isinstance(v, int) or v <= 0:
                raise FormatError(self.source, f"unknown hyperparameters: {n} = {v} (expected a positive integer)")

    def shape_of(self, tensors: dict[str, Any], name: str) -> tuple[int, ...]:
        """A tensor's shape, for the widths a header does not store (feed-forward, KV heads)."""
        t = tensors.get(name)
        if t is None:
            raise FormatError(self.source, f"no tensor {name}, which this family needs")
        return t.shape


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    return a == b


class GGUFKeys:
    """The `<arch>.*` keys of GGUF metadata; a missing required one is a FormatError."""

    def __init__(self, meta: dict[str, Any], arch: str, path: Path):
        self.meta, self.arch, self.path = meta, arch, path

    def need(self, key: str) -> Any:
        v = self.meta.get(f"{self.arch}.{key}")
        if v is None:
            raise FormatError(self.path, f"GGUF metadata has no {self.arch}.{key}")
        return v

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def n_vocab(self) -> int:
        """The token list's length where there is one (vocab_size is optional in GGUF)."""
        tokens = self.meta.get("tokenizer.ggml.tokens")
        return len(tokens) if isinstance(tokens, list) else self.need("vocab_size")
