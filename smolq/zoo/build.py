"""The work of one zoo job, run inside a worker process.

Two kinds of job, each a plain function of a JSON-able request dict (so it
crosses a process boundary) returning a JSON-able result dict:

- `prepare_model`: make the source exist (build a tiny model offline),
  fingerprint it, build its reference (an f32/f16 GGUF of an HF source) and
  measure the reference's perplexity. Every step is skipped when its cached
  result is still valid, and with `dry=True` the function only answers
  whether anything is left to do (so the parent runs it in-process when the
  answer is no, without starting a worker).
- `build_output`: build one output with smolq's API (smolq.convert /
  smolq.quantize, RTN or GPTQ) and measure it (verify's per-tensor RMSE, perplexity).

`emit(event)` reports progress: {"event": "start"|"tensor"|"phase", ...}.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from smolq import api
from smolq.atomic import atomic_directory
from smolq.errors import InputError
from smolq.tiny import make_tiny_model
from smolq.zoo import keys, metrics
from smolq.zoo.metrics import perplexity

Emit = Callable[[dict[str, Any]], None]


class NeedsWork(Exception):
    """Raised in dry mode at the first step that is not cached."""


# --------------------------------------------------------------------------- sources

def tiny_dir(cache_dir: Path, model: str, params: dict[str, Any]) -> Path:
    """Where a tiny model is built: named by its parameters, so a changed parameter is a new model."""
    return cache_dir / "tiny" / f"{model}-{keys.digest({'tiny': params, 'v': keys.versions()})[:12]}"


def materialize_tiny(path: Path, params: dict[str, Any], dry: bool) -> None:
    """Build the tiny checkpoint into `path` atomically (an interrupted build leaves nothing)."""
    if path.is_dir():
        return
    if dry:
        raise NeedsWork("tiny model")

    args = dict(params)
    family = args.pop("family")
    with atomic_directory(path) as tmp:
        make_tiny_model(family, tmp, **args)


def reference_path(cache_dir: Path, model: str, ref_digest: str) -> Path:
    return cache_dir / "ref" / f"{model}-{ref_digest[:16]}.gguf"


def prepare_model(req: dict[str, Any], emit: Emit | None = None, dry: bool = False) -> dict[str, Any]:
    """Source path, fingerprint, reference file and reference perplexity of one model.

    req: model, source (path or None), tiny (params or None), cache_dir, reference ("f32"|"f16"|"none"),
    eval ({text, ctx, digest} or None), stat_cache ({path: entry}), previous (last run's result or {}).
    """
    emit = emit or (lambda event: None)
    cache_dir = Path(req["cache_dir"])
    if req["tiny"] is not None:
        src = tiny_dir(cache_dir, req["model"], req["tiny"])
        emit({"event": "phase", "phase": "tiny model"})
        materialize_tiny(src, req["tiny"], dry)
    else:
        src = Path(req["source"])
        if not src.exists():
            raise InputError(src, f"model {req['model']!r}: source does not exist")
    stat_cache = dict(req.get("stat_cache") or {})
    if dry and stat_cache.get(str(src), {}).get("stat") != keys.stat_signature(src):
        raise NeedsWork("fingerprint")
    emit({"event": "phase", "phase": "fingerprint"})
    fp = keys.source_fingerprint(src, stat_cache)
    result: dict[str, Any] = {"model": req["model"], "source_path": str(src), "source_kind": fp["kind"],
                              "fingerprint": fp, "stat_entry": stat_cache.get(str(src))}
    result["reference"] = _reference(req, src, fp, cache_dir, dry, emit)
    return result


def _reference(req: dict[str, Any], src: Path, fp: dict[str, Any], cache_dir: Path, dry: bool,
               emit: Emit) -> dict[str, Any] | None:
    kind = req["reference"]
    if kind == "none":
        return None
    if fp["kind"] == "file":
        ref = {"path": str(src), "digest": fp["digest"]}  # a file source is its own reference
    else:
        ref_digest = keys.digest({"source": fp["digest"], "type": kind, "v": keys.versions()})
        path = reference_path(cache_dir, req["model"], ref_digest)
        if not path.is_file():
            if dry:
                raise NeedsWork("reference")

            emit({"event": "phase", "phase": f"reference {kind}"})
            path.parent.mkdir(parents=True, exist_ok=True)
            api.convert(src, path, format="gguf", outtype=kind, on_progress=_tensor_events(emit))
        ref = {"path": str(path), "digest": ref_digest}
    ref.update(_reference_perplexity(req, src, fp, ref, dry, emit))
    return ref


def _reference_perplexity(req: dict[str, Any], src: Path, fp: dict[str, Any], ref: dict[str, Any], dry: bool,
                          emit: Emit) -> dict[str, Any]:
    ev = req.get("eval")
    if ev is None:
        return {}
    ppl_key = keys.metrics_key(ref["digest"], None, ev["digest"])
    previous = (req.get("previous") or {}).get("reference") or {}
    if previous.get("ppl_key") == ppl_key:
        return {"ppl_key": ppl_key, "ppl": previous.get("ppl"), "ppl_note": previous.get("ppl_note")}
    if dry:
        raise NeedsWork("reference perplexity")

    emit({"event": "phase", "phase": "reference perplexity"})
    ppl, note = perplexity(Path(ref["path"]), src if fp["kind"] == "hf" else None, Path(ev["path"]), int(ev["ctx"]))
    return {"ppl_key": ppl_key, "ppl": ppl, "ppl_note": note}


# --------------------------------------------------------------------------- outputs

def build_output(req: dict[str, Any], emit: Emit | None = None) -> dict[str, Any]:
    """Build (unless req["metrics_only"]) and measure one output.

    req: id, output (OutputSpec.options() plus calibration), source_path, source_kind, out_path,
    metrics_only, reference ({path, ...} or None), eval (or None).
    """
    emit = emit or (lambda event: None)
    out = Path(req["out_path"])
    result: dict[str, Any] = {"id": req["id"]}
    if not req.get("metrics_only"):
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        summary = _build(req, out, emit)
        result["build_s"] = round(time.perf_counter() - started, 3)
        result["notes"] = [str(n) for n in summary.get("notes", []) or []]
    emit({"event": "phase", "phase": "checksum"})
    result["bytes"] = keys.tree_bytes(out)
    result["files"] = keys.tree_checksum(out)
    started = time.perf_counter()
    result["metrics"] = _measure(req, out, emit)
    result["metrics_s"] = round(time.perf_counter() - started, 3)
    return result


def _build(req: dict[str, Any], out: Path, emit: Emit) -> dict[str, Any]:
    opts = req["output"]
    src = Path(req["source_path"])
    emit({"event": "phase", "phase": "build"})
    if opts["method"] == "gptq":
        return _build_gptq(req, src, out, emit)
    if req["source_kind"] == "hf":
        return api.convert(src, out, format=opts["container"], outtype=opts["type"], on_progress=_tensor_events(emit))
    return api.quantize(src, out, type=opts["type"], format=opts["container"],
                        allow_requantize=opts["allow_requantize"], threads=1)


def _build_gptq(req: dict[str, Any], src: Path, out: Path, emit: Emit) -> dict[str, Any]:
    """GPTQ through smolq.quantize(method="gptq")."""
    if req["source_kind"] != "hf":
        raise InputError(src, "GPTQ needs an HF checkpoint (calibration runs the model)")

    opts = req["output"]
    gptq = dict(opts.get("gptq") or {})
    container = opts["container"]
    if container == "gptq":
        gptq.setdefault("bits", int(opts["type"].removeprefix("int")))
    bits = gptq.pop("bits", None)
    calib = Path(req["calibration"]) if req.get("calibration") else None
    return api.quantize(src, out, method="gptq", format=container, type=None if container == "gptq" else opts["type"],
                        bits=bits if container == "gptq" else None, calib=calib, **gptq)


def _measure(req: dict[str, Any], out: Path, emit: Emit) -> dict[str, Any]:
    """RMSE against the reference and perplexity; a metric that cannot be had says why."""

    m: dict[str, Any] = {"notes": []}
    hf_dir = Path(req["source_path"]) if req["source_kind"] == "hf" else None
    ref = req.get("reference")
    emit({"event": "phase", "phase": "verify"})
    if out.is_dir():
        errors = metrics.gptq_tensor_errors(out, hf_dir) if hf_dir else None
    else:
        errors = metrics.tensor_errors(out, ref["path"] if ref else None)
    if errors is not None:
        m.update({k: errors[k] for k in ("max_rmse", "max_rmse_tensor", "rmse_overall", "problems", "n_params",
                                         "tensor_bytes")})
        m["tensor_rmse"] = errors["tensors"]
    ev = req.get("eval")
    if ev is not None:
        emit({"event": "phase", "phase": "perplexity"})
        m["ppl"], note = metrics.perplexity(out, hf_dir, Path(ev["path"]), int(ev["ctx"]))
        if note:
            m["notes"].append(note)
    return m


def _tensor_events(emit: Emit) -> Callable[[dict[str, Any]], None]:
    """convert()'s on_progress events, forwarded as they are."""
    return lambda event: emit(dict(event))
