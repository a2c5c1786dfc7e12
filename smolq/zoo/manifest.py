"""The zoo manifest: which models, which outputs of each, which quality gates.

A manifest is TOML (read with tomllib). Every table is checked here, once,
so that a typo ("contaner", "max_rmse = 'x'") is a one-line InputError naming
the manifest and the field, before any work starts. Paths in the manifest
are relative to the manifest's own directory.

    [zoo]
    out = "zoo-out"                  # output directory (--out overrides)
    reference = "f32"                # what outputs are compared with: f32, f16 or none
    eval = { inline = "...", ctx = 64 }   # or { text = "eval.txt" }: perplexity text

    [gates]                          # defaults; a model's or output's `gates` table overrides
    max_rmse = 0.05                  # largest per-tensor RMSE vs the reference
    max_ppl_increase = 1.0           # perplexity minus the reference's (absolute)
    max_ppl_increase_pct = 10        # ... or relative, in percent
    max_size = "4 GiB"               # file (or directory) size

    [[models]]
    name = "tiny-llama"
    tiny = { family = "llama", seed = 0 }     # or: source = "path/to/hf-dir-or-file"
      [[models.outputs]]
      container = "gguf"             # gguf, gguf-v1..v3, ggml, ggmf, ggjt (+ version = 1..3), ggmm, gptq
      type = "q4_k_m"                # preset / plain type; `mix` is a synonym
      method = "rtn"                 # rtn or gptq
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from smolq.errors import InputError
from smolq.plan.mix import resolve_preset
from smolq.tiny import FAMILIES

CONTAINERS = ("gguf", "gguf-v1", "gguf-v2", "gguf-v3", "ggml", "ggmf", "ggjt", "ggjt-v1", "ggjt-v2",
              "ggjt-v3", "ggmm", "gptq")
METHODS = ("rtn", "gptq")
REFERENCE_TYPES = ("f32", "f16", "none")
GATE_KEYS = ("max_rmse", "max_ppl_increase", "max_ppl_increase_pct", "max_size")
# quantize_hf_gptq's options, passed through as they are
GPTQ_KEYS = ("bits", "group_size", "act_order", "sym", "damp", "nsamples", "seqlen", "seed", "true_sequential",
             "static_groups", "scale_rule", "device", "hessian_reg")
OUTPUT_KEYS = ("name", "container", "format", "version", "type", "mix", "method", "calibration", "gates",
               "allow_requantize") + GPTQ_KEYS
MODEL_KEYS = ("name", "source", "tiny", "outputs", "gates")
TINY_KEYS = ("family", "seed", "gqa", "tied", "dtype", "shards", "weights", "vocab_size", "hidden_size",
             "n_layers", "rope_params_style")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Gates:
    max_rmse: float | None = None
    max_ppl_increase: float | None = None
    max_ppl_increase_pct: float | None = None
    max_size: int | None = None

    def merged(self, override: "Gates") -> "Gates":
        """`override`'s set values win over ours."""
        return Gates(**{k: getattr(override, k) if getattr(override, k) is not None else getattr(self, k)
                        for k in GATE_KEYS})

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GATE_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class EvalSpec:
    """Perplexity text: a file, or inline text in the manifest."""

    text: str
    origin: str  # the file it came from, or "inline"
    ctx: int = 128

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.text, self.ctx]).encode()).hexdigest()


@dataclass(frozen=True)
class OutputSpec:
    model: str
    name: str
    container: str  # canonical: gguf-v3, ggjt-v3, ggml, gptq ...
    type: str  # preset or plain type name (lower case); for gptq: "int<bits>"
    method: str
    calibration: Path | None = None
    gptq: Mapping[str, Any] = field(default_factory=dict)
    allow_requantize: bool = False
    gates: Gates = Gates()

    @property
    def id(self) -> str:
        """Stable identity "model/output": the lock file's key and the shard hash's input."""
        return f"{self.model}/{self.name}"

    @property
    def is_directory(self) -> bool:
        return self.container == "gptq"

    @property
    def relpath(self) -> str:
        """Where the output lives under the zoo's output directory."""
        if self.is_directory:
            return f"{self.model}/{self.name}"
        suffix = ".gguf" if self.container.startswith("gguf") else ".bin"
        return f"{self.model}/{self.name}{suffix}"

    def options(self) -> dict[str, Any]:
        """Everything that decides the output's bytes (not its name, not its gates)."""
        return {"container": self.container, "type": self.type, "method": self.method,
                "gptq": dict(sorted(self.gptq.items())), "allow_requantize": self.allow_requantize}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: Path | None  # an HF directory or a GGUF / legacy file
    tiny: Mapping[str, Any] | None  # make_tiny_model arguments, built offline
    outputs: tuple[OutputSpec, ...]


@dataclass(frozen=True)
class Manifest:
    path: Path
    out: Path
    reference: str
    eval: EvalSpec | None
    models: tuple[ModelSpec, ...]
    digest: str  # of the manifest's bytes, so a merge can tell shards of different manifests apart

    @property
    def outputs(self) -> list[OutputSpec]:
        return [o for m in self.models for o in m.outputs]

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)


# --------------------------------------------------------------------------- parsing

def load_manifest(path: str | Path, out: str | Path | None = None) -> Manifest:
    """Read and check a manifest; `out` (the --out option) overrides [zoo].out."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(p, "no such manifest") from None
    except OSError as exc:
        raise InputError(p, f"cannot read manifest: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(p, f"not valid TOML: {exc}") from None
    return _parse(p, doc, out, hashlib.sha256(raw).hexdigest())


def _parse(path: Path, doc: dict[str, Any], out: str | Path | None, digest: str) -> Manifest:
    ctx = _Ctx(path)
    ctx.only_keys(doc, ("zoo", "gates", "models"), "the top level")
    zoo = ctx.table(doc.get("zoo", {}), "[zoo]")
    ctx.only_keys(zoo, ("out", "reference", "eval"), "[zoo]")
    base = path.parent
    out_dir = Path(out) if out is not None else base / ctx.string(zoo.get("out", "zoo-out"), "[zoo].out")
    reference = ctx.choice(zoo.get("reference", "f32"), REFERENCE_TYPES, "[zoo].reference")
    eval_spec = _eval_spec(ctx, zoo.get("eval"), base)
    default_gates = _gates(ctx, doc.get("gates", {}), "[gates]")
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise InputError(path, "no [[models]]: a manifest lists at least one model")
    models = tuple(_model(ctx, m, i, base, default_gates) for i, m in enumerate(models_raw))
    ctx.unique([m.name for m in models], "model name")
    return Manifest(path, out_dir, reference, eval_spec, models, digest)


class _Ctx:
    """Checks that name the manifest and the field in their one-line errors."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> InputError:
        return InputError(self.path, message)

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be a table")
        return value

    def only_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise self.fail(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"{where} must be a non-empty string")
        return value

    def choice(self, value: Any, choices: tuple[str, ...], where: str) -> str:
        text = self.string(value, where).lower()
        if text not in choices:
            raise self.fail(f"{where} = {value!r}: choose one of {', '.join(choices)}")
        return text

    def number(self, value: Any, where: str, integer: bool = False, signed: bool = False) -> float:
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (value < 0 and not signed):
            kind = "integer" if integer else "number"
            raise self.fail(f"{where} must be a {kind if signed else 'non-negative ' + kind}, not {value!r}")
        return value

    def name(self, value: Any, where: str) -> str:
        text = self.string(value, where)
        if not NAME_RE.match(text):
            raise self.fail(f"{where} = {text!r}: use letters, digits, '.', '_', '+', '-' (it names files)")
        return text

    def unique(self, names: list[str], what: str) -> None:
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise self.fail(f"duplicate {what} {n!r}")
            seen.add(n)


def _eval_spec(ctx: _Ctx, value: Any, base: Path) -> EvalSpec | None:
    if value is None:
        return None
    table = ctx.table(value, "[zoo].eval")
    ctx.only_keys(table, ("text", "inline", "ctx"), "[zoo].eval")
    size = int(ctx.number(table.get("ctx", 128), "[zoo].eval.ctx", integer=True))
    if size < 2:
        raise ctx.fail("[zoo].eval.ctx must be at least 2")
    if ("text" in table) == ("inline" in table):
        raise ctx.fail("[zoo].eval needs exactly one of text (a file) or inline (the text itself)")
    if "inline" in table:
        return EvalSpec(ctx.string(table["inline"], "[zoo].eval.inline"), "inline", size)
    file = base / ctx.string(table["text"], "[zoo].eval.text")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(file, f"cannot read the evaluation text: {getattr(exc, 'strerror', None) or exc}") from None
    return EvalSpec(text, str(file), size)


def parse_size(value: Any, where: str = "max_size", path: Path | None = None) -> int:
    """An int (bytes) or "1.5 GiB" / "300MB" / "12345"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in SIZE_UNITS:
            return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    raise InputError(path, f"{where} = {value!r}: a byte count or a size like '1.5 GiB'")


def _gates(ctx: _Ctx, value: Any, where: str) -> Gates:
    table = ctx.table(value, where)
    ctx.only_keys(table, GATE_KEYS, where)
    args: dict[str, Any] = {}
    for key in ("max_rmse", "max_ppl_increase", "max_ppl_increase_pct"):
        if key in table:  # a perplexity limit may be negative: "must improve by at least"
            args[key] = float(ctx.number(table[key], f"{where}.{key}", signed=key != "max_rmse"))
    if "max_size" in table:
        args["max_size"] = parse_size(table["max_size"], f"{where}.max_size", ctx.path)
    return Gates(**args)


def _model(ctx: _Ctx, raw: Any, index: int, base: Path, default_gates: Gates) -> ModelSpec:
    where = f"models[{index}]"
    table = ctx.table(raw, where)
    ctx.only_keys(table, MODEL_KEYS, where)
    name = ctx.name(table.get("name"), f"{where}.name")
    where = f"model {name!r}"
    if ("source" in table) == ("tiny" in table):
        raise ctx.fail(f"{where}: give exactly one of source (a path) or tiny (a tiny model to build)")
    source = base / ctx.string(table["source"], f"{where}.source") if "source" in table else None
    tiny = _tiny(ctx, table["tiny"], where) if "tiny" in table else None
    gates = default_gates.merged(_gates(ctx, table.get("gates", {}), f"{where}.gates"))
    outputs_raw = table.get("outputs")
    if not isinstance(outputs_raw, list) or not outputs_raw:
        raise ctx.fail(f"{where}: no [[models.outputs]]")
    outputs = tuple(_output(ctx, o, name, i, base, gates) for i, o in enumerate(outputs_raw))
    ctx.unique([o.name for o in outputs], f"output name in {where}")
    return ModelSpec(name, source, tiny, outputs)


def _tiny(ctx: _Ctx, raw: Any, where: str) -> dict[str, Any]:

    table = ctx.table(raw, f"{where}.tiny")
    ctx.only_keys(table, TINY_KEYS, f"{where}.tiny")
    ctx.choice(table.get("family", ""), FAMILIES, f"{where}.tiny.family")
    return dict(sorted(table.items()))


def _container(ctx: _Ctx, table: Mapping[str, Any], where: str) -> str:
    if "container" in table and "format" in table:
        raise ctx.fail(f"{where}: give container or format, not both")
    name = ctx.choice(table.get("container", table.get("format", "gguf")), CONTAINERS, f"{where}.container")
    if "version" not in table:
        return {"gguf": "gguf-v3", "ggjt": "ggjt-v3"}.get(name, name)
    version = int(ctx.number(table["version"], f"{where}.version", integer=True))
    family = name.split("-v")[0]
    allowed = {"gguf": (1, 2, 3), "ggjt": (1, 2, 3), "ggmf": (1,)}.get(family, ())
    if version not in allowed or ("-v" in name and name != f"{family}-v{version}"):
        raise ctx.fail(f"{where}: {name} has no version {version}")
    return name if family == "ggmf" else f"{family}-v{version}"


def _output(ctx: _Ctx, raw: Any, model: str, index: int, base: Path, model_gates: Gates) -> OutputSpec:
    where = f"model {model!r} outputs[{index}]"
    table = ctx.table(raw, where)
    ctx.only_keys(table, OUTPUT_KEYS, where)
    container = _container(ctx, table, where)
    method = ctx.choice(table.get("method", "gptq" if container == "gptq" else "rtn"), METHODS, f"{where}.method")
    gptq = {k: table[k] for k in GPTQ_KEYS if k in table}
    if gptq and method != "gptq":
        raise ctx.fail(f"{where}: {', '.join(gptq)} apply to method = \"gptq\" only")
    if container == "gptq" and method != "gptq":
        raise ctx.fail(f"{where}: a gptq container needs method = \"gptq\"")
    if "type" in table and "mix" in table:
        raise ctx.fail(f"{where}: give type or mix, not both")
    type_name = table.get("type", table.get("mix"))
    if container == "gptq":
        if type_name is not None:
            raise ctx.fail(f"{where}: a gptq container takes bits (and group_size), not type")
        bits = int(ctx.number(gptq.setdefault("bits", 4), f"{where}.bits", integer=True))
        if bits not in (2, 3, 4, 8):
            raise ctx.fail(f"{where}.bits = {bits}: GPTQ checkpoints hold 2, 3, 4 or 8 bits")
        type_name = f"int{bits}"
    else:
        type_name = _plan_type(ctx, type_name, f"{where}.type")
    calibration = base / ctx.string(table["calibration"], f"{where}.calibration") if "calibration" in table else None
    if calibration is not None and method != "gptq":
        raise ctx.fail(f"{where}: calibration applies to method = \"gptq\" only")
    default_name = type_name if container == "gguf-v3" else f"{container}-{type_name}"
    if method == "gptq" and container != "gptq":
        default_name += "-gptq"
    name = ctx.name(table.get("name", default_name), f"{where}.name")
    gates = model_gates.merged(_gates(ctx, table.get("gates", {}), f"{where}.gates"))
    allow = table.get("allow_requantize", False)
    if not isinstance(allow, bool):
        raise ctx.fail(f"{where}.allow_requantize must be true or false")
    return OutputSpec(model, name, container, type_name, method, calibration, gptq, allow, gates)


def _plan_type(ctx: _Ctx, value: Any, where: str) -> str:
    """A preset (q4_k_m ...) or plain type, checked against the quantization plan's table."""

    text = ctx.string(value, where).lower()
    try:
        resolve_preset(type_name=text)
    except InputError as exc:
        raise ctx.fail(f"{where}: {exc.message}") from None
    return text
