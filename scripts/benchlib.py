"""Shared pieces of the whole-process benchmarks (bench_io.py, bench_convert.py, bench_rtn.py).

`measure` runs one command as a child (through a small launcher, see
LAUNCHER) and reads that child's own resource usage (os.wait4), so wall time, user/system time and peak RSS are the whole
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
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence


# Linux keeps a process's memory high-water mark across exec, and a spawned child starts as (or
# shares) its parent's memory: a child's ru_maxrss is at least its parent's peak at the spawn. A
# benchmark that holds a model (bench_gptq.py --peers: 845 MiB) then reported 845 MiB for every
# smaller child. So the command is started by this small launcher, whose own child starts from a
# few MiB; it hands back that child's wait4 usage.
LAUNCHER = r"""
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "maxrss_KiB": ru.ru_maxrss}, fh)
"""


def measure(cmd: Sequence[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run cmd; {wall_s, user_s, sys_s, peak_rss_MiB}. Raises SystemExit with its stderr on failure."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage.json"
        t0 = time.perf_counter()
        launcher = subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_file), *map(str, cmd)],
                                  stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})}, cwd=cwd)
        wall = time.perf_counter() - t0
        usage = json.loads(usage_file.read_text()) if usage_file.is_file() else {"rc": launcher.returncode}
        if usage["rc"] != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(map(str, cmd))} failed ({usage['rc']}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "user_s": usage["user_s"], "sys_s": usage["sys_s"],
            "peak_rss_MiB": usage["maxrss_KiB"] / 1024}


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
