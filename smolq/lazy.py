"""Heavy third-party modules, imported on first use.

torch takes about two seconds to import; the GPTQ transforms need it, but
`smolq --help`, convert and RTN quantize do not. A module that uses torch
binds `torch = lazy_module("torch")` at its top, so its imports stay at module
level and the real import happens at the first attribute access.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> Any:
    """A stand-in for module `name` that imports it when first used."""
    return _LazyModule(name)
