"""The zoo report: report.json and report.md, gates, and the merge of shard reports.

A report is built from rows, one per output, each carrying everything it
shows (metrics, gate results). A run's report and `smolq zoo report`'s merge
of shard reports go through the same `build_report`, so merging the shards
of a CI matrix gives the report an unsharded run would have written (up to
timings).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from smolq.atomic import atomic_output
from smolq.errors import InputError
from smolq.progress import human_bytes, note
from smolq.zoo.keys import digest
from smolq.zoo.lock import load_json, save_json
from smolq.zoo.manifest import GATE_KEYS, Gates, Manifest, ModelSpec, OutputSpec

REPORT_SCHEMA = 1
TIMING_FIELDS = ("build_s", "metrics_s")


# --------------------------------------------------------------------------- rows and gates

def plan_of(manifest: Manifest) -> dict[str, Any]:
    """What a report needs from the manifest to order rows and to notice missing shards."""
    return {"manifest": manifest.path.name, "digest": manifest.digest,
            "models": [m.name for m in manifest.models], "outputs": [o.id for o in manifest.outputs]}


def model_info(model: ModelSpec, prepared: dict[str, Any] | None) -> dict[str, Any]:
    if model.tiny is not None:
        extra = ", ".join(f"{k}={v}" for k, v in model.tiny.items() if k != "family")
        source = f"tiny {model.tiny['family']}" + (f" ({extra})" if extra else "")
    else:
        source = model.source.name
    info: dict[str, Any] = {"name": model.name, "source": source, "n_params": None, "reference_ppl": None,
                            "reference_note": None}
    if prepared:
        info["n_params"] = prepared["fingerprint"]["f32_bytes"] // 4
        ref = prepared.get("reference") or {}
        info["reference_ppl"] = ref.get("ppl")
        info["reference_note"] = ref.get("ppl_note")
    return info


def make_row(spec: OutputSpec, entry: dict[str, Any] | None, status: dict[str, Any],
             prepared: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": spec.id, "model": spec.model, "output": spec.name, "container": spec.container, "type": spec.type,
        "method": spec.method, "path": spec.relpath, "status": status.get("status", "skipped" if entry else "missing"),
        "error": status.get("error"),
    }
    if status.get("traceback"):
        row["traceback"] = status["traceback"]
    if entry is None:
        row["gates"] = []
        row["ok"] = False
        return row
    m = entry.get("metrics") or {}
    ref_ppl = ((prepared or {}).get("reference") or {}).get("ppl")
    row.update({
        "bytes": entry["bytes"], "bpw": _bits_per_weight(entry, prepared),
        "checksum": _combined_checksum(entry["files"]),
        "build_s": (entry.get("timing") or {}).get("build_s"), "metrics_s": (entry.get("timing") or {}).get("metrics_s"),
        "max_rmse": m.get("max_rmse"), "max_rmse_tensor": m.get("max_rmse_tensor"),
        "ppl": m.get("ppl"), "reference_ppl": ref_ppl,
        "ppl_delta": m["ppl"] - ref_ppl if m.get("ppl") is not None and ref_ppl is not None else None,
        "problems": m.get("problems") or [], "notes": list(entry.get("notes") or []) + list(m.get("notes") or []),
    })
    row["ppl_delta_pct"] = 100.0 * row["ppl_delta"] / ref_ppl if row["ppl_delta"] is not None and ref_ppl else None
    row["gates"] = evaluate_gates(spec.gates, row)
    row["ok"] = row["status"] not in ("failed", "missing", "not run") and all(g["ok"] for g in row["gates"])
    return row


def _bits_per_weight(entry: dict[str, Any], prepared: dict[str, Any] | None) -> float | None:
    m = entry.get("metrics") or {}
    if m.get("n_params"):
        return 8.0 * m["tensor_bytes"] / m["n_params"]
    n_params = ((prepared or {}).get("fingerprint") or {}).get("f32_bytes", 0) // 4
    return 8.0 * entry["bytes"] / n_params if n_params else None


def _combined_checksum(files: dict[str, str]) -> str:
    if len(files) == 1:
        return next(iter(files.values()))

    return digest(files)[:16]


def evaluate_gates(gates: Gates, row: dict[str, Any]) -> list[dict[str, Any]]:
    """One result per configured gate (and the always-on decode check): value, limit, ok."""
    values = {"max_rmse": row.get("max_rmse"), "max_ppl_increase": row.get("ppl_delta"),
              "max_ppl_increase_pct": row.get("ppl_delta_pct"), "max_size": row.get("bytes")}
    results = []
    if row.get("problems"):
        results.append({"gate": "decode", "limit": None, "value": len(row["problems"]), "ok": False,
                        "why": f"{len(row['problems'])} problems, first: {row['problems'][0]}"})
    for key in GATE_KEYS:
        limit = getattr(gates, key)
        if limit is None:
            continue
        value = values[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            results.append({"gate": key, "limit": limit, "value": None, "ok": False, "why": "not measured"})
            continue
        ok = value <= limit
        results.append({"gate": key, "limit": limit, "value": value, "ok": ok,
                        "why": None if ok else f"{_fmt_gate(key, value)} > {key} {_fmt_gate(key, limit)}"})
    return results


def _fmt_gate(key: str, value: float) -> str:
    if key == "max_size":

        return human_bytes(value)
    return f"{value:.6g}" + ("%" if key.endswith("_pct") else "")


def failed_gates(spec: OutputSpec, entry: dict[str, Any], prepared: dict[str, Any] | None) -> list[dict[str, Any]]:
    row = make_row(spec, entry, {"status": "built"}, prepared)
    return [g for g in row["gates"] if not g["ok"]]


# --------------------------------------------------------------------------- the report

def build_report(plan: dict[str, Any], rows: list[dict[str, Any]], models: list[dict[str, Any]],
                 shard: str | None) -> dict[str, Any]:
    order = {oid: i for i, oid in enumerate(plan["outputs"])}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    by_model = {m["name"]: m for m in models}
    groups = []
    for name in plan["models"]:
        mine = [r for r in rows if r["model"] == name]
        if mine:
            groups.append({**by_model.get(name, {"name": name}), "outputs": mine})
    problems = [f"{r['id']}: {g['why']}" for r in rows for g in r["gates"] if not g["ok"]]
    errors = [f"{r['id']}: {r['status']}: {r['error'] or 'no result'}" for r in rows
              if r["status"] in ("failed", "missing", "not run")]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("built", "measured", "skipped", "failed", "not run", "missing")}
    return {
        "schema": REPORT_SCHEMA, "manifest": plan["manifest"], "shard": shard, "plan": plan,
        "summary": {"outputs": len(rows), **counts, "gate_failures": problems, "errors": errors},
        "ok": not problems and not errors, "models": groups,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    save_json(out / "report.json", report)

    with atomic_output(out / "report.md") as fh:
        fh.write(render_markdown(report).encode("utf-8"))


def rows_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for m in report["models"] for r in m["outputs"]]


def without_timings(report: dict[str, Any]) -> dict[str, Any]:
    """A copy without the fields that differ between two identical builds (for comparisons)."""
    import copy

    r = copy.deepcopy(report)
    for row in rows_of(r):
        for k in TIMING_FIELDS:
            row.pop(k, None)
    return r


# --------------------------------------------------------------------------- merge

def merge_reports(shard_dirs: list[Path], out: Path) -> dict[str, Any]:
    """One report from the report.json of each shard's output directory."""
    if not shard_dirs:
        raise InputError(None, "zoo report: give the output directories of the shards")
    reports = []
    for d in shard_dirs:
        path = d / "report.json" if d.is_dir() else d
        rep = load_json(path, None)
        if rep is None:
            raise InputError(path, "no report.json here (did this shard run?)")
        if rep.get("schema") != REPORT_SCHEMA or "plan" not in rep:
            raise InputError(path, "not a smolq zoo report")
        reports.append((path, rep))
    plan = reports[0][1]["plan"]
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    for path, rep in reports:
        if rep["plan"]["digest"] != plan["digest"]:
            raise InputError(path, f"made from a different manifest than {reports[0][0]}")
        for group in rep["models"]:
            models.setdefault(group["name"], {k: v for k, v in group.items() if k != "outputs"})
            for row in group["outputs"]:
                if row["id"] in rows:
                    raise InputError(path, f"{row['id']} is in two shard reports (overlapping shards?)")
                rows[row["id"]] = row
    for oid in plan["outputs"]:
        if oid not in rows:
            model, name = oid.split("/", 1)
            rows[oid] = {"id": oid, "model": model, "output": name, "status": "missing",
                         "error": "in no shard's report", "gates": [], "ok": False}
    merged = build_report(plan, list(rows.values()), [models[n] for n in plan["models"] if n in models], shard=None)
    out.mkdir(parents=True, exist_ok=True)
    write_report(merged, out)
    return merged


# --------------------------------------------------------------------------- markdown

def _num(v: Any, spec: str = ".4g") -> str:
    return "–" if v is None else format(v, spec)


def _size(v: Any) -> str:

    return "–" if v is None else human_bytes(v)


def _gate_cell(row: dict[str, Any]) -> str:
    if row["status"] in ("failed", "missing", "not run"):
        return f"**{row['status'].upper()}**"
    failed = [g for g in row["gates"] if not g["ok"]]
    if failed:
        return "**FAIL** " + "; ".join(_md(g["why"]) for g in failed)
    return "pass" if row["gates"] else "–"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _delta(row: dict[str, Any]) -> str:
    if row.get("ppl_delta") is None:
        return "–"
    pct = f" ({row['ppl_delta_pct']:+.2f}%)" if row.get("ppl_delta_pct") is not None else ""
    return f"{row['ppl_delta']:+.4g}{pct}"


def render_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    verdict = "PASS" if report["ok"] else "FAIL"
    shard = f" (shard {report['shard']})" if report.get("shard") else ""
    lines = [f"# smolq zoo report: {report['manifest']}{shard}", "",
             f"**{verdict}** · {s['outputs']} outputs · {s['built']} built · {s['measured']} re-measured · "
             f"{s['skipped']} up to date · {s['failed']} failed"
             + (f" · {s['missing']} missing" if s["missing"] else "")
             + (f" · {s['not run']} not run" if s["not run"] else ""), ""]
    for group in report["models"]:
        lines += [f"## {group['name']}", ""]
        ref = group.get("reference_ppl")
        desc = f"source: {group.get('source', '?')}"
        if group.get("n_params"):
            desc += f" · {group['n_params']:,} parameters"
        desc += f" · reference perplexity: {_num(ref)}" if ref is not None else ""
        if group.get("reference_note"):
            desc += f" ({group['reference_note']})"
        lines += [_md(desc), "",
                  "| output | container | type | method | size | bpw | time (s) | max RMSE | worst tensor | ppl | Δ ppl | gates |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in group["outputs"]:
            lines.append("| " + " | ".join([
                _md(r["output"]), r.get("container", "–"), r.get("type", "–"), r.get("method", "–"),
                _size(r.get("bytes")), _num(r.get("bpw"), ".2f"), _num(r.get("build_s"), ".2f"),
                _num(r.get("max_rmse")), _md(r.get("max_rmse_tensor") or "–"), _num(r.get("ppl")), _delta(r),
                _gate_cell(r)]) + " |")
        lines.append("")
    if s["gate_failures"] or s["errors"]:
        lines += ["## Failures", ""] + [f"- {_md(x)}" for x in s["errors"] + s["gate_failures"]] + [""]
    return "\n".join(lines)


def print_summary(report: dict[str, Any], quiet: bool) -> None:
    """The failing rows on stderr (always), and a one-line verdict unless quiet."""

    s = report["summary"]
    for line in s["errors"]:
        note(f"error: {line}")
    for line in s["gate_failures"]:
        note(f"gate failed: {line}")
    verdict = "ok" if report["ok"] else "FAILED"
    note(f"zoo {verdict}: {s['outputs']} outputs, {s['built']} built, {s['measured']} re-measured, "
         f"{s['skipped']} up to date, {s['failed']} failed", quiet)

