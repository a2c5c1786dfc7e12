"""Shared pieces of the whole-process benchmarks (bench_io.py, bench_convert.py, bench_rtn.py).

`measure` runs one command as a child and reads that child's own resource
usage (os.wait4), so wall time, user/system time and peak RSS are the whole
process's, imports included, the same way for smolq and for its peers.
`disk_floor` is the physical floor of a job in the same run: reading its
input once (cat to /dev/null) plus writing its output's size durably (dd from
/dev/zero with conv=fdatasync).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence


def measure(cmd: Sequence[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run cmd; {wall_s, user_s, sys_s, peak_rss_MiB}. Raises SystemExit with its stderr on failure."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **(env or {})}, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "peak_rss_MiB": usage.ru_maxrss / 1024}


def median_runs(runs: list[dict]) -> dict:
    """Per-field median over runs, plus the runs themselves."""
    keys = runs[0].keys()
    out = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["runs"] = [{k: round(v, 3) for k, v in r.items()} for r in runs]
    return out


def drop(paths: Sequence[Path]) -> None:
    for p in paths:
        for q in Path(p).parent.glob(Path(p).name + "*"):
            if q.is_file():
                q.unlink()


def disk_floor(inputs: Sequence[Path], out_bytes: int, workdir: Path) -> dict:
    """Seconds to read the inputs once and to write out_bytes durably, on this machine now."""
    read = measure(["cat", *inputs], env=None) if inputs else {"wall_s": 0.0}
    target = workdir / "floor.bin"
    block = 16 << 20
    write = measure(["dd", "if=/dev/zero", f"of={target}", f"bs={block}",
                     f"count={max(1, -(-out_bytes // block))}", "conv=fdatasync", "status=none"])
    target.unlink(missing_ok=True)
    return {"read_s": round(read["wall_s"], 3), "write_s": round(write["wall_s"], 3),
            "floor_s": round(read["wall_s"] + write["wall_s"], 3)}


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path
