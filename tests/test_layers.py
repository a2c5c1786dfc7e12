"""The package's layers import downward only, and at module top.

The layer order is written here, bottom to top; a module may import from its
own layer and the layers below it, never from a layer above. Internal
imports stand at module top (a function-local `smolq` import hides a real
dependency, usually an upward one). Heavy third-party modules stay lazy
through smolq.lazy, not through local imports of smolq modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smolq"

LAYERS = [
    # 0: the ground everything stands on: errors, atomic output, progress, the ggml type table
    ("base", ["smolq.errors", "smolq.fileio", "smolq.atomic", "smolq.progress", "smolq.lazy", "smolq.threads", "smolq.ggml_types", "smolq.tiny"]),
    # 1: bytes and blocks: containers (readers, writers) and the C kernel
    ("formats and kernels", ["smolq.formats", "smolq.kernels"]),
    # 2: what each model family is: names, hyperparameters, tensor transforms
    ("families", ["smolq.arch"]),
    # 3: the four parts of every pipeline
    ("sources, plan, transforms, sinks", ["smolq.sources", "smolq.plan", "smolq.transforms", "smolq.sinks"]),
    # 4: the pipelines composed from the parts, and the public API
    ("pipelines and API", ["smolq.pipeline", "smolq.api", "smolq"]),
    # 5: applications built on the API
    ("applications", ["smolq.zoo"]),
    # 6: the command line
    ("CLI", ["smolq.commands", "smolq.cli", "smolq.__main__"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_of(module: str) -> int:
    """The layer whose longest prefix matches `module`."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def _smolq_imports(tree: ast.AST, module: str):
    """(line, imported module, at module top?) for every import of a smolq module."""
    top = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                names = [".".join(base + ([node.module] if node.module else []))]
            elif node.module == "smolq":  # `from smolq import kernels`: the submodules
                names = [f"smolq.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "smolq" or name.startswith("smolq."):
                yield node.lineno, name, id(node) in top


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _resolve(name: str) -> str:
    """`from smolq import api` names the module smolq.api; `from smolq.errors import X` names smolq.errors."""
    return name


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_go_downward_and_stand_at_module_top(path):
    module = _module_name(path)
    own = _layer_of(module)
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for line, name, at_top in _smolq_imports(tree, module):
        if not at_top:
            problems.append(f"line {line}: function-local import of {name} (import it at module top)")
        target = _layer_of(name)
        if target > own:
            problems.append(f"line {line}: {module} ({LAYERS[own][0]}) imports {name} ({LAYERS[target][0]}), "
                            f"a higher layer")
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer():
    for path in _modules():
        _layer_of(_module_name(path))


def test_the_checker_sees_an_upward_and_a_local_import(tmp_path):
    """The check itself can fail: an upward import and a local one are both found."""
    tree = ast.parse("from smolq.cli import main\n\ndef f():\n    from smolq.errors import InputError\n")
    found = list(_smolq_imports(tree, "smolq.formats.gguf"))
    assert [(n, top) for _, n, top in found] == [("smolq.cli", True), ("smolq.errors", False)]
    assert _layer_of("smolq.cli") > _layer_of("smolq.formats.gguf")
