#!/usr/bin/env python3
"""The I/O path side by side with llama.cpp: whole processes, same files, same run.

    .venv/bin/python scripts/bench_io.py                   # 1.1B LLaMA (TinyLlama shapes), 3 runs each
    .venv/bin/python scripts/bench_io.py --size small      # ~110M, quick
    .venv/bin/python scripts/bench_io.py --profile         # + smolq's time per phase
    .venv/bin/python scripts/bench_io.py --rss-13b         # + LLaMA-13B shapes (sparse shards), peak RSS

Jobs (each a fresh process; the output is deleted before every run):
  convert   HF f16 safetensors (5 shards for 1b) -> GGUF f16:
            `smolq convert` vs llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36 sdist,
            .venv/real/llama.cpp-converter).
  quantize  that GGUF f16 -> Q4_0 and -> Q4_K (or --types), --pure, one thread:
            `smolq quantize --threads 1` vs `llama-quantize --pure IN OUT TYPE 1`
            (.venv/real/llama.cpp-tools, scripts/build_llama_tools.py). The i-quants
            (--types iq4_nl iq4_xs iq3_s iq3_xxs iq2_xxs iq2_xs iq2_s iq1_s iq1_m mxfp4)
            take an importance matrix, as users run them (IQ3_XXS/IQ2/IQ1 refuse to go
            without one): one synthetic imatrix file for every 2-D tensor of the model,
            written once by smolq.formats.imatrix and given to both tools (--imatrix);
            mxfp4 is llama-quantize's MXFP4_MOE file type (with --pure: every tensor MXFP4).
  floor     reading the job's input once (cat > /dev/null) + writing its output's size with
            dd conv=fdatasync: what the disk allows, measured in the same run.
Each command runs once to warm the page cache, then --repeat times alternating with its peer;
the table shows medians: wall, ratio to the peer, peak RSS, system time. smolq fsyncs its
output before the rename (durable); the peers do not. JSON goes to bench-results/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_convert  # noqa: E402
from benchlib import disk_floor, drop, measure, median_runs, write_json  # noqa: E402

from smolq.tiny import write_llama_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / ".venv" / "real" / "llama.cpp-converter"
TOOLS = REPO / ".venv" / "real" / "llama.cpp-tools" / "bin"
SHAPES_13B = (5120, 40, 40, 40, 13824, 32000)
# The quantize job's types that get the importance matrix (the i-quants; MXFP4 takes none).
IMATRIX_TYPES = frozenset({"iq4_nl", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"})
# smolq --type name -> llama-quantize's name where they differ.
PEER_TYPE_NAMES = {"mxfp4": "MXFP4_MOE"}


def make_model(directory: Path, size: str) -> Path:
    """The random checkpoint of bench_convert, with a SentencePiece tokenizer llama.cpp's converter reads."""
    ckpt = directory / f"ckpt-{size}"
    if not (ckpt / "DONE").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
        bench_convert.make_checkpoint(ckpt, size)
        for f in ("tokenizer.json",):
            (ckpt / f).unlink(missing_ok=True)
        write_llama_tokenizer(ckpt, bench_convert.SIZES[size][5])
        (ckpt / "DONE").write_text("")
    return ckpt


def synthetic_imatrix(f16: Path, out: Path) -> Path:
    """An importance matrix for every 2-D tensor of the GGUF `f16`, with llama-imatrix-like
    spread (gamma-distributed per column), seeded: the same file for smolq and llama-quantize.
    token_embd.weight is included although llama-imatrix never records it: with --pure it
    is quantized to the IQ2/IQ1 type too, and ggml's quantizer asserts on a missing imatrix."""
    import numpy as np
    from gguf import GGUFReader

    from smolq.formats.imatrix import from_sums, write_imatrix

    rng = np.random.default_rng(0)
    chunks, ctx = 10, 512
    sums, counts = {}, {}
    for t in GGUFReader(f16).tensors:
        if len(t.shape) == 2:
            sums[t.name] = (rng.gamma(0.7, 1.0, int(t.shape[0])) * chunks * ctx).astype(np.float32)  # shape[0]: ne0
            counts[t.name] = chunks * ctx
    write_imatrix(out, from_sums(sums, counts, datasets=["synthetic (bench_io.py)"], chunk_count=chunks,
                                 chunk_size=ctx), "gguf")
    return out


def quantize_cmds(f16: Path, qtype: str, out: Path, out_peer: Path, imatrix: Path | None) -> tuple[list, list]:
    """(smolq's, llama-quantize's) command for one quantize job, --pure, one thread."""
    im = ["--imatrix", str(imatrix)] if imatrix else []
    ours = smolq_cmd("quantize", str(f16), str(out), "--type", qtype, "--pure", *im, "--threads", "1")
    peer = [str(TOOLS / "llama-quantize"), "--pure", *im, str(f16), str(out_peer),
            PEER_TYPE_NAMES.get(qtype, qtype.upper()), "1"]
    return ours, peer


def smolq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "smolq", *args]


def converter_cmd(ckpt: Path, out: Path) -> tuple[list[str], dict]:
    env = {"PYTHONPATH": str(CONVERTER / "gguf-py"), "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": ""}
    return [sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(out),
            "--outtype", "f16"], env


def pair(name: str, ours: tuple[list[str], dict], peer: tuple[list[str], dict] | None, outs: list[Path],
         repeat: int, warmup: int = 1) -> dict:
    """Warm each `warmup` times, then alternate `repeat` times; medians of each side and the ratio.

    Each side deletes only its own output before it runs, so smolq's last output (outs[0]) is
    still there afterwards for the floor measurement."""
    sides = {"smolq": ours, **({"peer": peer} if peer else {})}
    side_out = {"smolq": outs[:1], "peer": outs[1:]}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(warmup):
        for k, (cmd, env) in sides.items():
            drop(side_out[k])
            measure(cmd, env)
    for _ in range(repeat):
        for k, (cmd, env) in sides.items():
            drop(side_out[k])
            runs[k].append(measure(cmd, env))
    row = {"job": name, **{k: median_runs(v) for k, v in runs.items()}}
    if peer:
        ratios = sorted(a["wall_s"] / b["wall_s"] for a, b in zip(runs["smolq"], runs["peer"]))
        row["wall_ratio_median"] = round(ratios[len(ratios) // 2], 3)
        row["rss_ratio"] = round(row["smolq"]["peak_rss_MiB"] / row["peer"]["peak_rss_MiB"], 3)
    return row


def profile(cmd: list[str], outs: list[Path], work: Path) -> dict:
    drop(outs)
    path = work / "profile.json"
    total = measure(cmd, {"SMOLQ_PROFILE": str(path)})
    phases = json.loads(path.read_text())
    phases["(whole process)"] = {"calls": 1, "wall_s": round(total["wall_s"], 3),
                                 "user_s": round(total["user_s"], 3), "sys_s": round(total["sys_s"], 3)}
    return phases


def rss_13b(work: Path) -> list[dict]:
    """LLaMA-13B shapes as sparse shards (zeros, no disk used): peak RSS of converting to ggjt v3 q4_0 and GGUF f16."""
    ckpt = work / "ckpt-13b-sparse"
    if not (ckpt / "DONE").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
        bench_convert.SIZES["13b"] = SHAPES_13B
        bench_convert.make_checkpoint(ckpt, "13b", sparse=True)
        (ckpt / "tokenizer.json").unlink(missing_ok=True)
        write_llama_tokenizer(ckpt, SHAPES_13B[5])
        (ckpt / "DONE").write_text("")
    rows = []
    for fmt, outtype, name in (("ggjt-v3", "q4_0", "13b.bin"), ("gguf", "f16", "13b.gguf")):
        out = work / name
        drop([out])
        r = measure(smolq_cmd("convert", str(ckpt), str(out), "--format", fmt, "--outtype", outtype))
        rows.append({"job": f"13B-shaped -> {fmt} {outtype}", "out_GiB": round(out.stat().st_size / 2**30, 2),
                     **{k: round(v, 2) for k, v in r.items()}})
        drop([out])
    return rows


def print_table(rows: list[dict]) -> None:
    nan = float("nan")
    print(f"{'job':16} {'smolq s':>8} {'peer s':>8} {'ratio':>6} {'floor s':>8} {'x floor':>7} "
          f"{'smolq RSS':>10} {'peer RSS':>9} {'smolq sys':>9} {'peer sys':>8}")
    for r in rows:
        s, p, fl = r["smolq"], r.get("peer", {}), r["floor"]["floor_s"]
        print(f"{r['job']:16} {s['wall_s']:8.2f} {p.get('wall_s', nan):8.2f} {r.get('wall_ratio_median', nan):6.2f} "
              f"{fl:8.2f} {s['wall_s'] / fl:7.2f} {s['peak_rss_MiB']:9.0f}M {p.get('peak_rss_MiB', nan):8.0f}M "
              f"{s['sys_s']:9.2f} {p.get('sys_s', nan):8.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("1b", "small"), default="1b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_k"])
    ap.add_argument("--warmup", type=int, default=1,
                    help="runs of each command before the timed ones (0 for long compute-bound jobs: "
                         "the f16 input is read into the page cache first either way)")
    ap.add_argument("--no-convert", action="store_true",
                    help="skip the convert pair; reuse the f16 GGUF already in --workdir")
    ap.add_argument("--workdir", type=Path, help="keep the model here between runs (default: a temp dir)")
    ap.add_argument("--profile", action="store_true", help="also print smolq's time per phase")
    ap.add_argument("--rss-13b", action="store_true", help="also convert LLaMA-13B shapes and report peak RSS")
    ap.add_argument("--results", type=Path, default=REPO / "bench-results")
    args = ap.parse_args()

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="smolq-bench-io-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_model(work, args.size)
    shards = sorted(ckpt.glob("*.safetensors"))
    f16, f16_peer = work / "smolq-f16.gguf", work / "llama-f16.gguf"
    have_conv = (CONVERTER / "convert_hf_to_gguf.py").is_file()
    have_quant = (TOOLS / "llama-quantize").is_file()
    print(f"model: {args.size}, {sum(s.stat().st_size for s in shards) / 2**30:.2f} GiB in {len(shards)} shards; "
          f"peers: converter {'yes' if have_conv else 'MISSING'}, llama-quantize {'yes' if have_quant else 'MISSING'}",
          file=sys.stderr)

    rows, profiles = [], {}
    ours = (smolq_cmd("convert", str(ckpt), str(f16), "--outtype", "f16"), {})
    if args.no_convert and f16.is_file():
        measure(["cat", str(f16)])  # into the page cache, as the warm-up of convert would
    else:
        peer = converter_cmd(ckpt, f16_peer) if have_conv else None
        rows.append(pair("convert f16", ours, peer, [f16, f16_peer], args.repeat, args.warmup))
        if args.profile:
            profiles["convert f16"] = profile(ours[0], [f16], work)
        rows[-1]["floor"] = disk_floor(shards, f16.stat().st_size, work)  # smolq's f16 GGUF is kept
    synthetic = None  # written once, at the first type that takes it
    for qtype in (t.lower() for t in args.types):
        out, out_peer = work / f"smolq-{qtype}.gguf", work / f"llama-{qtype}.gguf"
        if qtype in IMATRIX_TYPES and synthetic is None:
            synthetic = synthetic_imatrix(f16, work / "synthetic.imatrix")
        imatrix = synthetic if qtype in IMATRIX_TYPES else None
        cmd, peer_cmd = quantize_cmds(f16, qtype, out, out_peer, imatrix)
        ours, peer = (cmd, {}), ((peer_cmd, {}) if have_quant else None)
        rows.append(pair(f"quantize {qtype}", ours, peer, [out, out_peer], args.repeat, args.warmup))
        if args.profile:
            profiles[f"quantize {qtype}"] = profile(ours[0], [out], work)
        rows[-1]["floor"] = disk_floor([f16], out.stat().st_size, work)
        drop([out, out_peer])
    print_table(rows)
    for name, phases in profiles.items():
        print(f"\nsmolq {name}: time per phase (per thread; produce runs beside write/copy)")
        print(f"  {'phase':18} {'calls':>6} {'wall s':>8} {'user s':>8} {'sys s':>8}")
        for k, v in phases.items():
            print(f"  {k:18} {v['calls']:6d} {v['wall_s']:8.3f} {v['user_s']:8.3f} {v['sys_s']:8.3f}")
    big = rss_13b(work) if args.rss_13b else []
    for r in big:
        print(f"{r['job']:32} wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_MiB']:.0f} MiB, "
              f"output {r['out_GiB']} GiB")
    record = {"bench": "io", "size": args.size, "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "repeat": args.repeat, "warmup": args.warmup, "rows": rows, "profiles": profiles, "rss_13b": big}
    path = write_json(args.results / f"io-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json", record)
    print(f"wrote {path}", file=sys.stderr)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
