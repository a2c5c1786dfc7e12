#!/usr/bin/env python3
"""RTN quantization throughput: the smolq C kernel vs gguf.quants (numpy), and
optionally llama.cpp's llama-quantize, on the same random weights.

    .venv/bin/python scripts/bench_rtn.py                       # 4096 x 4096 f32
    .venv/bin/python scripts/bench_rtn.py --rows 1024 --types q4_0 q8_0
    LLAMA_QUANTIZE=/path/to/llama-quantize .venv/bin/python scripts/bench_rtn.py
    .venv/bin/python scripts/bench_rtn.py --profile --types q4_0 q4_k   # + whole-file quantize, time per phase

Throughput is MB/s of f32 input (rows * cols * 4 bytes) over the best of
--repeat runs. smolq runs at 1 thread and at --threads (default: all cores),
its scalar reference path at 1 thread; gguf.quants is single-threaded numpy.
The "same" column says whether smolq's bytes equal gguf.quants' bytes.
llama-quantize gets an f16 GGUF of the same values (written with
gguf.GGUFWriter) and is timed with `--pure` at 1 and N threads; its time is
the "quantize time" it prints (excluding model load), else wall time.
Results: a table on stdout and JSON in bench-results/bench_rtn.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import cpu_name, measure  # noqa: E402

import smolq.kernels as K  # noqa: E402
from smolq.ggml_types import GGMLType  # noqa: E402

DEFAULT_TYPES = ["f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                 "tq1_0", "tq2_0"]
GGUF_NUMPY_TYPES = {"F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"}


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def gguf_numpy_quantize(x: np.ndarray, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    with np.errstate(all="ignore"):
        return gq.quantize(x, GGMLQuantizationType[name])


# --------------------------------------------------------------------------- llama-quantize

def write_f16_gguf(path: Path, x: np.ndarray) -> None:
    """A minimal one-layer LLaMA GGUF holding x as two f16 weight tensors."""
    import gguf

    rows, cols = x.shape
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(cols)
    w.add_block_count(1)
    w.add_feed_forward_length(rows // 2)
    w.add_head_count(max(1, cols // 128))
    w.add_head_count_kv(max(1, cols // 128))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    half = rows // 2
    w.add_tensor("blk.0.attn_v.weight", x[:half].astype(np.float16))
    w.add_tensor("blk.0.ffn_up.weight", x[half:].astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def time_llama_quantize(exe: str, src: Path, name: str, threads: int, repeat: int) -> float | None:
    best = None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "out.gguf"
            t0 = time.perf_counter()
            proc = subprocess.run([exe, "--pure", str(src), str(dst), name, str(threads)],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"  llama-quantize {name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return None
        m = re.search(r"quantize time\s*=\s*([\d.]+)\s*ms", proc.stdout + proc.stderr)
        t = float(m.group(1)) / 1000 if m else wall
        best = t if best is None else min(best, t)
    return best


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--no-gguf", action="store_true", help="skip the (slow) gguf.quants numpy runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench_rtn.json")
    ap.add_argument("--profile", action="store_true",
                    help="also run `smolq quantize --pure --threads 1` on the matrix as an f16 GGUF; time per phase")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    nt = args.threads
    llama_exe = os.environ.get("LLAMA_QUANTIZE")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench-f16.gguf"
        if llama_exe or args.profile:
            write_f16_gguf(src, x)
        for tname in args.types:
            name = GGMLType.from_name(tname).name
            row: dict[str, object] = {"type": name}
            t1, q = best_time(lambda: K.quantize(x, name, threads=1), args.repeat)
            tn, _ = best_time(lambda: K.quantize(x, name, threads=nt), args.repeat)
            tr, qr = best_time(lambda: K.quantize(x, name, threads=1, impl="ref"), 1)
            row.update(smolq_1t=mb / t1, smolq_nt=mb / tn, smolq_ref_1t=mb / tr, ref_equals_fast=bool(np.array_equal(q, qr)))
            if name in GGUF_NUMPY_TYPES and not args.no_gguf:
                tg, g = best_time(lambda: gguf_numpy_quantize(x, name), 1)
                row.update(gguf_numpy=mb / tg, same_as_gguf=bool(np.array_equal(q.reshape(-1), g.view(np.uint8).reshape(-1))))
            if llama_exe:
                for key, th in (("llama_quantize_1t", 1), ("llama_quantize_nt", nt)):
                    t = time_llama_quantize(llama_exe, src, name, th, max(1, args.repeat - 1))
                    row[key] = mb / t if t else None
            if args.profile:
                row["phases"] = profile_quantize(src, Path(tmp) / f"out-{name}.gguf", name)
            results.append(row)
            print_row(row, first=len(results) == 1, nt=nt, llama=bool(llama_exe))
    for row in results:
        for k, v in row.get("phases", {}).items():
            print(f"  {row['type']:6} {k:16} {v['calls']:5d} calls  wall {v['wall_s']:7.3f}  user {v['user_s']:7.3f}  "
                  f"sys {v['sys_s']:7.3f}")

    report = {
        "shape": [args.rows, args.cols], "input_mb_f32": mb, "threads": nt, "repeat": args.repeat,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": cpu_name()},
        "llama_quantize": llama_exe, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nMB/s of f32 input ({args.rows} x {args.cols} = {mb:.1f} MB); JSON: {args.out}")
    return 0


def profile_quantize(src: Path, out: Path, name: str) -> dict:
    """Phases of one whole-file `smolq quantize` (smolq.fileio.PROFILE via SMOLQ_PROFILE), plus the process."""
    prof = out.with_suffix(".profile.json")
    total = measure([sys.executable, "-m", "smolq", "quantize", str(src), str(out), "--type", name, "--pure",
                     "--threads", "1"], {"SMOLQ_PROFILE": str(prof)})
    phases = json.loads(prof.read_text())
    phases["(whole process)"] = {"calls": 1, **{k: round(total[k], 3) for k in ("wall_s", "user_s", "sys_s")}}
    out.unlink(missing_ok=True)
    return phases


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return f"{v:,.0f}" if isinstance(v, float) else str(v)


def print_row(row: dict, first: bool, nt: int, llama: bool) -> None:
    cols = [("type", "type"), ("smolq_1t", "smolq 1t"), ("smolq_nt", f"smolq {nt}t"), ("smolq_ref_1t", "ref 1t"),
            ("gguf_numpy", "gguf numpy"), ("same_as_gguf", "same")]
    if llama:
        cols += [("llama_quantize_1t", "llama-q 1t"), ("llama_quantize_nt", f"llama-q {nt}t")]
    if first:
        print(" ".join(f"{h:>11}" for _, h in cols))
    print(" ".join(f"{fmt(row.get(k)):>11}" for k, _ in cols), flush=True)


if __name__ == "__main__":
    sys.exit(main())
