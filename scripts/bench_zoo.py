"""Zoo throughput: models x outputs built per minute at --jobs 1 and --jobs 2.

    .venv/bin/python scripts/bench_zoo.py                       # 3 small models x 4-5 outputs
    .venv/bin/python scripts/bench_zoo.py --hidden 512 --layers 8 --eval

The source checkpoints (LLaMA, GPT-J, MPT from smolq.tiny, sized by
--hidden/--layers) are made once, before any timing. Each timed run starts
from an empty output directory, so it includes preparing every model
(fingerprint, f32 reference) as well as building and measuring every output;
a second, no-op run of the same zoo is timed too (everything up to date).
Results: a table on stdout and JSON in bench-results/bench_zoo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUTPUT_TYPES = ("q4_0", "q4_k_m", "q5_k_m", "q8_0")
EVAL_TEXT = ("A model zoo is rebuilt whenever a file format changes or a quantizer improves. " * 12).strip()


def make_sources(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    from smolq.tiny import make_tiny_model

    out = {}
    for i, family in enumerate(("llama", "gptj", "mpt")):
        out[family] = make_tiny_model(family, root / family, seed=i, hidden_size=hidden, n_layers=layers)
    return out


def write_manifest(path: Path, sources: dict[str, Path], with_eval: bool) -> int:
    lines = ["[zoo]", 'reference = "f32"']
    if with_eval:
        lines.append(f'eval = {{ ctx = 64, inline = "{EVAL_TEXT}" }}')
    n = 0
    for family, src in sources.items():
        lines += ["[[models]]", f'name = "{family}"', f'source = "{src}"']
        for t in OUTPUT_TYPES:
            lines += ["  [[models.outputs]]", f'  type = "{t}"']
            n += 1
        if family == "llama":
            lines += ["  [[models.outputs]]", '  container = "ggjt"', "  version = 3", '  type = "q4_0"']
            n += 1
    path.write_text("\n".join(lines) + "\n")
    return n


def timed_run(manifest: Path, out: Path, jobs: int) -> tuple[float, dict]:
    from smolq.zoo.manifest import load_manifest
    from smolq.zoo.runner import RunOptions, run_zoo

    started = time.perf_counter()
    rep = run_zoo(load_manifest(manifest, out), RunOptions(jobs=jobs, quiet=True))
    return time.perf_counter() - started, rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the source models (default 256)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the source models (default 4)")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="job counts to time (default 1 2)")
    ap.add_argument("--eval", action="store_true", help="also measure perplexity (imports torch in every job)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-zoo-"))
    try:
        sources = make_sources(work / "src", args.hidden, args.layers)
        manifest = work / "zoo.toml"
        n_outputs = write_manifest(manifest, sources, args.eval)
        source_bytes = sum(p.stat().st_size for s in sources.values() for p in s.rglob("*") if p.is_file())
        rows = []
        for jobs in args.jobs:
            out = work / f"out-j{jobs}"
            seconds, rep = timed_run(manifest, out, jobs)
            if not rep["ok"]:
                print(f"jobs {jobs}: the zoo did not pass: {rep['summary']}", file=sys.stderr)
                return 1
            noop, rep2 = timed_run(manifest, out, jobs)
            assert rep2["summary"]["skipped"] == n_outputs
            rows.append({"jobs": jobs, "outputs": n_outputs, "seconds": round(seconds, 3),
                         "outputs_per_minute": round(60 * n_outputs / seconds, 2), "noop_seconds": round(noop, 3)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"zoo: 3 models (hidden {args.hidden}, {args.layers} layers, {source_bytes / 2**20:.1f} MiB of sources) "
          f"x {len(OUTPUT_TYPES)} outputs (+1 ggjt for LLaMA) = {n_outputs}; eval: {args.eval}; "
          f"{os.cpu_count()} cores")
    print(f"{'jobs':>4} {'outputs':>7} {'seconds':>8} {'outputs/min':>11} {'no-op s':>8}")
    for r in rows:
        print(f"{r['jobs']:>4} {r['outputs']:>7} {r['seconds']:>8.2f} {r['outputs_per_minute']:>11.1f} "
              f"{r['noop_seconds']:>8.2f}")
    args.results.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "zoo", "hidden": args.hidden, "layers": args.layers, "eval": args.eval,
              "source_bytes": source_bytes, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), "load_average": os.getloadavg(), "runs": rows,
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (args.results / "bench_zoo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results / 'bench_zoo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
