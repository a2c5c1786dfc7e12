#!/usr/bin/env python3
"""CLI start-up time: whole processes, the way a shell runs them.

    .venv/bin/python scripts/bench_startup.py              # 10 runs each
    .venv/bin/python scripts/bench_startup.py --runs 30

Each case is a fresh interpreter (after one unmeasured warm-up run, so the
page cache and .pyc files are warm); the table gives min / median / max
wall time over --runs. `python -c pass` is the interpreter's own floor;
`import smolq.cli` is what every command pays before it parses anything.
smolq has no --version; `smolq --help` is its cheapest no-op, and the
console script (next to this interpreter, when installed) is timed too.
The target (issue #13) is `smolq --help` under 0.5 s, median.

Then one `python -X importtime -c "import smolq.cli"` lists the imports
that cost most (cumulative, top-level packages and smolq modules).
Results: a table on stdout and JSON in bench-results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.5


def cases() -> list[tuple[str, list[str]]]:
    py = sys.executable
    out = [
        ("python -c pass", [py, "-c", "pass"]),
        ("import smolq.cli", [py, "-c", "import smolq.cli"]),
        ("python -m smolq --help", [py, "-m", "smolq", "--help"]),
        ("python -m smolq quantize --help", [py, "-m", "smolq", "quantize", "--help"]),
    ]
    script = Path(py).parent / "smolq"
    if script.exists():
        out.append(("smolq --help (console script)", [str(script), "--help"]))
    return out


def env() -> dict[str, str]:
    e = dict(os.environ, COLUMNS="80")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))  # this checkout's smolq
    return e


def time_runs(argv: list[str], runs: int) -> list[float]:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), check=True)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), check=True)
        times.append(time.perf_counter() - t0)
    return times


def import_costs(top: int) -> list[dict]:
    """The heaviest imports under `import smolq.cli`: top-level packages and smolq's own modules."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import smolq.cli"],
                          capture_output=True, text=True, env=env(), check=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, self_us, cum_us, name = (part.strip() for part in line.replace("import time:", "|", 1).split("|"))
        if not self_us.isdigit():
            continue  # the header line
        if "." not in name or name.startswith("smolq."):
            rows.append({"module": name, "self_ms": int(self_us) / 1000, "cumulative_ms": int(cum_us) / 1000})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=15, help="imports listed from -X importtime")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "startup.json")
    args = ap.parse_args()

    results = []
    print(f"{'case':<34} {'min s':>7} {'median s':>9} {'max s':>7}")
    for name, argv in cases():
        times = time_runs(argv, args.runs)
        row = {"case": name, "argv": argv[1:] if argv[0] == sys.executable else argv, "runs": args.runs,
               "min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
               "max_s": round(max(times), 4)}
        results.append(row)
        print(f"{name:<34} {row['min_s']:>7.3f} {row['median_s']:>9.3f} {row['max_s']:>7.3f}", flush=True)

    help_case = next(r for r in results if r["case"] == "python -m smolq --help")
    ok = help_case["median_s"] < TARGET_S
    print(f"\nsmolq --help median {help_case['median_s']:.3f} s: "
          f"{'under' if ok else 'OVER'} the {TARGET_S} s target")

    imports = import_costs(args.top)
    print("\nheaviest imports under `import smolq.cli` (one run, -X importtime):")
    print(f"{'module':<34} {'cumulative ms':>13} {'self ms':>8}")
    for r in imports:
        print(f"{r['module']:<34} {r['cumulative_ms']:>13.1f} {r['self_ms']:>8.1f}")

    report = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "target_s": TARGET_S, "help_under_target": ok, "cases": results, "imports": imports,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
