"""The golden output matrix: sha256 of what smolq writes for a fixed set of commands.

    python tests/golden_matrix.py WORKDIR [--json FILE]

builds tiny models offline (`smolq.tiny.make_tiny_model`) under WORKDIR, runs
every case of the matrix through the CLI entry point in-process
(`smolq.cli.main([...])`, so the matrix keeps working when internal modules
move), and prints one JSON object {case name: hash} on stdout (and writes it
to FILE with --json). tests/test_golden_outputs.py compares it with
tests/golden/outputs.sha256.json.

Values:
  <64 hex digits>  sha256 of the output file; for a directory output, sha256
                   of the JSON list of sorted [relative path, file sha256]
  error:<N>        the command refused with exit code N (refusals are golden too)
  exception:<Cls>  an exception escaped smolq.cli.main (a bug; traceback on stderr)
  no-output        exit code 0 but nothing was written
  no-input         the case's input (an earlier case's output) does not exist

Keys starting with "input/" are fingerprints of the tiny models themselves
(their tensors, and their config/tokenizer files), so a machine that builds
different INPUTS (another CPU architecture, another torch/transformers) is
told so apart from a change in smolq's outputs.

Determinism: torch and MKL pick float kernels by CPU ISA and thread count, so
the matrix must run in a process whose environment pins them (ATEN_CPU_CAPABILITY,
MKL_CBWR, ONEDNN_MAX_CPU_ISA, OMP/MKL threads = 1; see DETERMINISTIC_ENV), to
branches that give the same bits on Intel and AMD CPUs alike. Run as a script, this
file re-executes itself with that environment when it is not already set;
`run_in_child()` starts such a child for the test. Commands that take
`--threads` get `--threads 1`.

Paths: every output is written as WORKDIR/out/<case dir>/model.<ext> (or
.../model/ for a directory) and the models live in WORKDIR/models/<name>/, so
names that end up in files (general.name from a model directory or a source
file's stem) are fixed and WORKDIR itself never matters.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---------------------------------------------------------------- the matrix's axes

FAMILIES = ("llama", "gptj", "mpt")
GGUF_FORMATS = ("gguf-v1", "gguf-v2", "gguf-v3")
LEGACY_FORMATS = ("ggml", "ggmf", "ggjt-v1", "ggjt-v2", "ggjt-v3", "ggmm")
ALL_FORMATS = GGUF_FORMATS + LEGACY_FORMATS
# Legacy containers each family can be written as (README's format table).
LEGACY_OF = {
    "llama": ("ggml", "ggmf", "ggjt-v1", "ggjt-v2", "ggjt-v3"),
    "gptj": ("ggml",),
    "mpt": ("ggml", "ggmm"),
}
CONVERT_OUTTYPES = ("f32", "f16", "q4_0", "q4_k_m")
CONVERT_MORE_OUTTYPES = ("bf16", "q4_1", "q5_0", "q5_1", "q8_0", "q6_k")
RTN_PRESETS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
               "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "tq1_0", "tq2_0")
PURE_PRESETS = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_s", "q6_k")
LEGACY_QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k_m")
MIGRATE_SOURCE_TYPES = ("f16", "q4_0", "q4_k_m")
# Legacy containers that hold K-quants (convert writes q4_k_m into them): the q4_k_m migrate sources.
KQUANT_LEGACY = {"llama": ("ggjt-v3",), "gptj": (), "mpt": ("ggml",)}

# The main models are 256 wide so that K-quants (256-value super-blocks) are really
# used; the variants are 64 wide, where K-quant mixes fall back to 32-blocks.
HIDDEN = 256
MODELS = {
    # name: (family, make_tiny_model kwargs)
    "llama": ("llama", dict(hidden_size=HIDDEN, seed=1)),
    "gptj": ("gptj", dict(hidden_size=HIDDEN, seed=2)),
    "mpt": ("mpt", dict(hidden_size=HIDDEN, seed=3)),
    "llama-gqa": ("llama", dict(hidden_size=64, gqa=True, seed=4)),
    "llama-tied": ("llama", dict(hidden_size=64, tied=True, seed=5)),
    "llama-bf16": ("llama", dict(hidden_size=64, dtype="bfloat16", seed=6)),
    "llama-bin2": ("llama", dict(hidden_size=64, weights="bin", shards=2, rope_params_style="top", seed=7)),
}
CALIB_TEXT = (
    "Calibration text for the golden matrix. It is short on purpose: the samples\n"
    "are a few dozen tokens each. Quantization rounds each weight to a grid;\n"
    "GPTQ spreads the rounding error over the columns not yet quantized.\n"
) * 6
# --hessian-reg 0 --no-attention-aware: the plain GPTQ these cases were recorded with (since 2026-12-06 the
# defaults onto ggml grids are 0.5 and attention-aware; tests/test_gptq_regularise.py and
# tests/test_gptq_attention_aware.py check those defaults).
GPTQ_COMMON = ["--method", "gptq", "--nsamples", "8", "--seqlen", "32", "--seed", "1", "--threads", "1",
               "--hessian-reg", "0", "--no-attention-aware", "--no-refit-scales"]

DETERMINISTIC_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "SMOLQ_GPTQ_FORWARD": "float32",  # not bf16 where the CPU has it (pipeline/gptq.py forward_dtype)
}
if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
    # Code paths that every x86-64 CPU with AVX2 runs alike: torch's AVX2 kernels (its own
    # machine code: the same bits on Intel and AMD), MKL's COMPATIBLE branch (Intel's mode for
    # equal results on Intel and non-Intel CPUs; its AVX2 branch gave GPTQ outputs in other bits
    # on an AMD EPYC than on a Xeon with AVX-512), oneDNN capped at SSE4.1.
    DETERMINISTIC_ENV.update({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
                              "ONEDNN_MAX_CPU_ISA": "SSE41"})


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    name: str  # "group/..." ; the group is the first path component
    argv: list[str]  # smolq CLI arguments; "{M:name}" = model dir, "{O:case}" = case output
    out: str  # output path relative to WORKDIR
    needs: list[str] = field(default_factory=list)  # cases whose output is this case's input

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]


def _case_dir(name: str) -> str:
    return name.replace("/", "__").replace(">", "").replace("=", "-")


def _ext(fmt: str) -> str:
    return ".gguf" if fmt.startswith("gguf") else ".bin"


class _Builder:
    def __init__(self) -> None:
        self.cases: list[Case] = []
        self.by_name: dict[str, Case] = {}

    def out(self, name: str, ext: str) -> str:
        return f"out/{_case_dir(name)}/model{ext}"

    def add(self, name: str, argv: list[str], ext: str, needs: list[str] | None = None) -> Case:
        assert name not in self.by_name, name
        case = Case(name, argv, self.out(name, ext), list(needs or []))
        self.cases.append(case)
        self.by_name[name] = case
        return case

    def path(self, name: str) -> str:
        return "{W}/" + self.by_name[name].out


def build_cases() -> list[Case]:
    b = _Builder()
    M = "{W}/models/"

    # convert: family x every container/version x outtype (invalid combos are refusals)
    for fam in FAMILIES:
        for fmt in ALL_FORMATS:
            for ot in CONVERT_OUTTYPES:
                name = f"convert/{fam}/{fmt}/{ot}"
                b.add(name, ["convert", M + fam, "{OUT}", "--format", fmt, "--outtype", ot, "-q"], _ext(fmt))
    # convert: more outtypes into every container the family has (GGUF v3 + its legacy ones)
    for fam in FAMILIES:
        for fmt in ("gguf-v3",) + LEGACY_OF[fam]:
            for ot in CONVERT_MORE_OUTTYPES:
                name = f"convert-types/{fam}/{fmt}/{ot}"
                b.add(name, ["convert", M + fam, "{OUT}", "--format", fmt, "--outtype", ot, "-q"], _ext(fmt))
    # convert: variants (GQA, tied, bf16 source, pytorch .bin shards + top-level rope_theta)
    for model in ("llama-gqa", "llama-tied", "llama-bf16", "llama-bin2"):
        for fmt, ot in (("gguf-v3", "f32"), ("gguf-v3", "f16"), ("gguf-v3", "q4_0"), ("gguf-v3", "q4_k_m"),
                        ("ggjt-v3", "f16"), ("ggjt-v3", "q4_0"), ("ggjt-v1", "q4_1"), ("ggml", "f16")):
            name = f"convert-variant/{model}/{fmt}/{ot}"
            b.add(name, ["convert", M + model, "{OUT}", "--format", fmt, "--outtype", ot, "-q"], _ext(fmt))
    # default format from the suffix, default outtype; --vocab-only
    for fam in FAMILIES:
        b.add(f"convert-default/{fam}/gguf", ["convert", M + fam, "{OUT}", "-q"], ".gguf")
        b.add(f"convert-default/{fam}/bin", ["convert", M + fam, "{OUT}", "-q"], ".bin")
        b.add(f"convert-default/{fam}/gguf/vocab-only", ["convert", M + fam, "{OUT}", "--vocab-only", "-q"], ".gguf")
        b.add(f"convert-default/{fam}/bin/vocab-only", ["convert", M + fam, "{OUT}", "--vocab-only", "-q"], ".bin")

    # quantize RTN from an f16 GGUF v3 of each family
    for fam in FAMILIES:
        src = f"convert/{fam}/gguf-v3/f16"
        for preset in RTN_PRESETS + ("f16", "bf16", "f32", "q4_k"):
            b.add(f"quantize/{fam}/{preset}", ["quantize", b.path(src), "{OUT}", "--type", preset,
                                               "--threads", "1", "-q"], ".gguf", [src])
        for bits in (2, 3, 4, 5, 6, 8):
            b.add(f"quantize/{fam}/bits{bits}", ["quantize", b.path(src), "{OUT}", "--bits", str(bits),
                                                 "--threads", "1", "-q"], ".gguf", [src])
        for preset in PURE_PRESETS:
            b.add(f"quantize-pure/{fam}/{preset}", ["quantize", b.path(src), "{OUT}", "--type", preset, "--pure",
                                                    "--threads", "1", "-q"], ".gguf", [src])
        overrides = {
            "attn-v-q8_0": ["--tensor-type", "attn_v=q8_0"],
            "ffn-q5_k+attn-q6_k": ["--tensor-type", r"ffn_(up|down)\.weight=q5_k",
                                   "--tensor-type", r"blk\.1\..*attn.*=q6_k"],
            "output-q8_0+embd-q4_0": ["--output-tensor-type", "q8_0", "--token-embedding-type", "q4_0"],
            "leave-output": ["--leave-output-tensor"],
            "bad-regex": ["--tensor-type", "attn_(=q8_0"],
            "bad-type": ["--tensor-type", "attn_v=q9_9"],
        }
        for tag, extra in overrides.items():
            b.add(f"quantize-tensor-type/{fam}/q4_k_m/{tag}",
                  ["quantize", b.path(src), "{OUT}", "--type", "q4_k_m", *extra, "--threads", "1", "-q"],
                  ".gguf", [src])
        # GGUF v1/v2 outputs
        for fmt in ("gguf-v1", "gguf-v2"):
            b.add(f"quantize-format/{fam}/{fmt}/q4_k_m",
                  ["quantize", b.path(src), "{OUT}", "--type", "q4_k_m", "--format", fmt, "--threads", "1", "-q"],
                  ".gguf", [src])
        # requantizing an already quantized file: refused, then allowed
        q = f"convert/{fam}/gguf-v3/q4_0"
        b.add(f"quantize-requant/{fam}/q4_0-to-q6_k",
              ["quantize", b.path(q), "{OUT}", "--type", "q6_k", "--threads", "1", "-q"], ".gguf", [q])
        b.add(f"quantize-requant/{fam}/q4_0-to-q6_k-allow",
              ["quantize", b.path(q), "{OUT}", "--type", "q6_k", "--allow-requantize", "--threads", "1", "-q"],
              ".gguf", [q])
    # quantize from an f32 GGUF (llama) and from the variants' f16 GGUF (K-quant fallbacks at width 64)
    src = "convert/llama/gguf-v3/f32"
    for preset in ("q4_0", "q8_0", "q3_k_m", "q4_k_m", "q6_k", "tq2_0", "f16"):
        b.add(f"quantize-f32src/llama/{preset}", ["quantize", b.path(src), "{OUT}", "--type", preset,
                                                  "--threads", "1", "-q"], ".gguf", [src])
    for model in ("llama-gqa", "llama-tied"):
        src = f"convert-variant/{model}/gguf-v3/f16"
        for preset in ("q4_0", "q2_k", "q4_k_m", "q6_k"):
            b.add(f"quantize-variant/{model}/{preset}", ["quantize", b.path(src), "{OUT}", "--type", preset,
                                                         "--threads", "1", "-q"], ".gguf", [src])
    # quantize into legacy containers: legacy f16 file -> its own container (each type) and -> the
    # family's other legacy containers; GGUF -> legacy and legacy -> GGUF are refusals (use migrate)
    for fam in FAMILIES:
        for fmt in LEGACY_OF[fam]:
            lsrc = f"convert/{fam}/{fmt}/f16"
            for qt in LEGACY_QUANT_TYPES:
                b.add(f"quantize-legacy/{fam}/{fmt}>same/{qt}",
                      ["quantize", b.path(lsrc), "{OUT}", "--type", qt, "--threads", "1", "-q"], ".bin", [lsrc])
            for z in LEGACY_OF[fam]:
                if z != fmt:
                    b.add(f"quantize-legacy/{fam}/{fmt}>{z}/q4_0",
                          ["quantize", b.path(lsrc), "{OUT}", "--type", "q4_0", "--format", z, "--threads", "1",
                           "-q"], ".bin", [lsrc])
            b.add(f"quantize-legacy/{fam}/{fmt}>gguf-v3/q4_0",
                  ["quantize", b.path(lsrc), "{OUT}", "--type", "q4_0", "--format", "gguf-v3", "--threads", "1",
                   "-q"], ".gguf", [lsrc])
        src = f"convert/{fam}/gguf-v3/f16"
        for fmt in LEGACY_OF[fam]:
            b.add(f"quantize-legacy/{fam}/gguf-v3>{fmt}/q4_0",
                  ["quantize", b.path(src), "{OUT}", "--type", "q4_0", "--format", fmt, "--threads", "1", "-q"],
                  ".bin", [src])
    # quantize straight from the HF checkpoint (RTN: convert + quantize in one command)
    for fam in FAMILIES:
        for preset, fmt in (("q4_k_m", "gguf"), ("q4_0", LEGACY_OF[fam][-1])):
            b.add(f"quantize-hf/{fam}/{fmt}/{preset}",
                  ["quantize", M + fam, "{OUT}", "--type", preset, "--format", fmt, "--threads", "1", "-q"],
                  _ext(fmt))

    # GPTQ on the tiny LLaMA
    calib = ["--calib", "{W}/calib.txt"]
    gptq_gguf = {
        "gguf-q4_0-datafree": ["--type", "q4_0"],
        "gguf-q4_0": ["--type", "q4_0", *calib],
        "gguf-q4_k_m": ["--type", "q4_k_m", *calib],
        "gguf-q3_k_m-plain": ["--type", "q3_k_m", "--scale-rule", "plain", *calib],
        "gguf-q4_0-imatrix": ["--type", "q4_0", "--scale-rule", "imatrix", *calib],
        "ggjt-v3-q4_0": ["--type", "q4_0", "--format", "ggjt-v3", *calib],
    }
    for tag, extra in gptq_gguf.items():
        ext = ".bin" if "ggjt" in tag else ".gguf"
        b.add(f"gptq/llama/{tag}", ["quantize", M + "llama", "{OUT}", *GPTQ_COMMON, *extra, "-q"], ext)
    gptq_dirs = {
        "gptq-b4": ["--bits", "4", "--group-size", "128"],
        "gptq-b3": ["--bits", "3", "--group-size", "64"],
        "gptq-b4-actorder-asym": ["--bits", "4", "--group-size", "64", "--act-order", "--asym"],
        "gptq-b8-perrow": ["--bits", "8", "--group-size", "-1", "--no-true-sequential"],
    }
    for tag, extra in gptq_dirs.items():
        b.add(f"gptq/llama/{tag}", ["quantize", M + "llama", "{OUT}", *GPTQ_COMMON, "--format", "gptq",
                                    *extra, *calib, "-q"], "")
    # GPTQ import: each GPTQ directory -> GGUF (default exact types, and a K-quant) and -> ggjt v3
    for tag in gptq_dirs:
        src = f"gptq/llama/{tag}"
        for target, extra, ext in (("gguf", ["--format", "gguf-v3"], ".gguf"),
                                   ("gguf-q4_k_m", ["--format", "gguf-v3", "--outtype", "q4_k_m"], ".gguf"),
                                   ("ggjt-v3", ["--format", "ggjt-v3"], ".bin")):
            b.add(f"gptq-import/llama/{tag}/{target}", ["convert", b.path(src), "{OUT}", *extra, "-q"], ext, [src])

    # migrate: between every pair of containers a family has, from f16 / q4_0 / q4_k_m files
    for fam in FAMILIES:
        containers = GGUF_FORMATS + LEGACY_OF[fam]
        for st in MIGRATE_SOURCE_TYPES:
            for a in containers:
                if st == "q4_k_m" and a not in GGUF_FORMATS + KQUANT_LEGACY[fam]:
                    continue  # convert refuses to write that source
                src = f"convert/{fam}/{a}/{st}"
                for z in containers:
                    if z == a:
                        continue
                    b.add(f"migrate/{fam}/{st}/{a}>{z}",
                          ["migrate", b.path(src), "{OUT}", "--format", z, "-q"], _ext(z), [src])
        # with the HF config (no guessed hyperparameters), and lossless --type f32
        for a in LEGACY_OF[fam]:
            src = f"convert/{fam}/{a}/q4_0"
            b.add(f"migrate-config/{fam}/q4_0/{a}>gguf-v3",
                  ["migrate", b.path(src), "{OUT}", "--format", "gguf-v3", "--config", M + fam, "-q"], ".gguf", [src])
        src = f"convert/{fam}/gguf-v3/q4_k_m"
        for z in LEGACY_OF[fam]:
            b.add(f"migrate-type/{fam}/q4_k_m/gguf-v3>{z}/f32",
                  ["migrate", b.path(src), "{OUT}", "--format", z, "--type", "f32", "-q"], ".bin", [src])
    for model in ("llama-gqa", "llama-tied"):
        src = f"convert-variant/{model}/ggjt-v3/f16"
        b.add(f"migrate-variant/{model}/ggjt-v3>gguf-v3",
              ["migrate", b.path(src), "{OUT}", "--format", "gguf-v3", "-q"], ".gguf", [src])
        b.add(f"migrate-variant/{model}/ggjt-v3>gguf-v3/config",
              ["migrate", b.path(src), "{OUT}", "--format", "gguf-v3", "--config", M + model, "-q"], ".gguf", [src])
        src = f"convert-variant/{model}/gguf-v3/q4_0"
        b.add(f"migrate-variant/{model}/gguf-v3>ggjt-v1",
              ["migrate", b.path(src), "{OUT}", "--format", "ggjt-v1", "-q"], ".bin", [src])
    # back to Hugging Face (a directory): LLaMA from GGUF and legacy files; GPT-J and MPT are refusals
    for fam in FAMILIES:
        src = f"convert/{fam}/gguf-v3/q4_0"
        b.add(f"export-hf/{fam}/gguf-v3/q4_0", ["convert", b.path(src), "{OUT}", "--format", "hf", "-q"], "", [src])
    for src, extra in (("convert/llama/gguf-v3/f32", ["--outtype", "bf16"]),
                       ("convert/llama/ggjt-v3/q4_0", []),
                       ("convert-variant/llama-gqa/gguf-v3/q4_0", ["--max-shard-size", "100KB"]),
                       ("convert-variant/llama-tied/gguf-v3/q4_0", ["--outtype", "f32"])):
        b.add(f"export-hf/{src.split('/', 1)[1]}{'/' + extra[1] if extra else ''}",
              ["convert", b.path(src), "{OUT}", "--format", "hf", *extra, "-q"], "", [src])
    return b.cases


# ---------------------------------------------------------------- hashing

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    entries = sorted([p.relative_to(root).as_posix(), sha256_file(p)] for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def hash_output(path: Path) -> str | None:
    if path.is_dir():
        return sha256_tree(path)
    if path.is_file():
        return sha256_file(path)
    return None


def _tensor_fingerprint(model_dir: Path) -> str:
    """sha256 over every tensor (sorted by name): name, dtype, shape, raw bytes."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    for f in sorted(model_dir.glob("*.bin")):
        tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _files_fingerprint(model_dir: Path) -> str:
    """sha256 over the non-weight files; JSON with transformers_version dropped."""
    entries = []
    for p in sorted(model_dir.iterdir()):
        if p.suffix in (".safetensors", ".bin") or not p.is_file():
            continue
        data = p.read_bytes()
        if p.suffix == ".json" and not p.name.endswith(".index.json"):
            obj = json.loads(data)
            if isinstance(obj, dict):
                obj.pop("transformers_version", None)
            data = json.dumps(obj, sort_keys=True).encode()
        elif p.name.endswith(".index.json"):
            obj = json.loads(data)
            obj.get("metadata", {}).pop("total_size", None)  # depends on nothing but keep it canonical
            data = json.dumps(obj, sort_keys=True).encode()
        entries.append([p.name, hashlib.sha256(data).hexdigest()])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


# ---------------------------------------------------------------- running

FLOAT_ENV_KEY = "float-env/blas-lapack"
FLOAT_ENV_GROUPS = ("gptq", "gptq-import")  # cases whose bytes follow BLAS/LAPACK sums (GPTQ's Hessian, Cholesky)


def float_env_fingerprint() -> str:
    """sha256 of the BLAS/LAPACK calls GPTQ makes (Hessian bands, matmul, Cholesky, its inverse),
    on fixed numpy data in this process's pinned environment. Two machines with the same value
    sum GPTQ's floats alike; where it differs from the recorded one, the FLOAT_ENV_GROUPS cases
    cannot be compared there (tests/test_golden_outputs.py says so)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(1234)
    x = torch.from_numpy(rng.standard_normal((96, 320), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((320, 200), dtype=np.float32))
    h = torch.zeros(320, 320)
    for i0 in range(0, 320, 256):
        h[i0:i0 + 256, i0:].addmm_(x[:, i0:i0 + 256].T, x[:, i0:])
    h = torch.triu(h) + torch.triu(h, 1).T + 320 * torch.eye(320)
    L = torch.linalg.cholesky(h)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    digest = hashlib.sha256()
    for t in (h, x @ w, L, U):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_inputs(workdir: Path) -> dict[str, str]:
    from smolq.tiny import make_tiny_model

    fingerprints = {}
    for name, (family, kwargs) in MODELS.items():
        d = make_tiny_model(family, workdir / "models" / name, **kwargs)
        fingerprints[f"input/{name}/tensors"] = _tensor_fingerprint(d)
        fingerprints[f"input/{name}/files"] = _files_fingerprint(d)
    (workdir / "calib.txt").write_text(CALIB_TEXT, encoding="utf-8")
    fingerprints["input/calib.txt"] = sha256_file(workdir / "calib.txt")
    return fingerprints


def _expand(arg: str, workdir: Path, out: Path) -> str:
    return arg.replace("{OUT}", str(out)).replace("{W}", str(workdir))


def run_case(case: Case, workdir: Path) -> str:
    from smolq.cli import main as smolq_main

    out = workdir / case.out
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [_expand(a, workdir, out) for a in case.argv]
    try:
        rc = smolq_main(argv)
    except Exception as exc:  # noqa: BLE001 - an escaped exception is recorded, not fatal
        print(f"[golden] {case.name}: exception escaped smolq.cli.main", file=sys.stderr)
        traceback.print_exc()
        return f"exception:{type(exc).__name__}"
    if rc != 0:
        return f"error:{rc}"
    digest = hash_output(out)
    return digest if digest is not None else "no-output"


def run_matrix(workdir: str | os.PathLike, only: set[str] | None = None, log=sys.stderr) -> dict[str, str]:
    """Build the inputs under workdir, run every case, return {name: hash} (inputs included)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import smolq
    import torch

    print(f"[golden] smolq from {Path(smolq.__file__).parent}; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)", file=log)
    results = build_inputs(workdir)
    results[FLOAT_ENV_KEY] = float_env_fingerprint()
    print(f"[golden] inputs built in {time.perf_counter() - t0:.1f} s", file=log)
    cases = build_cases()
    ok_outputs: dict[str, bool] = {}
    group_time: dict[str, float] = {}
    for case in cases:
        if only is not None and case.name not in only:
            continue
        t = time.perf_counter()
        if any(not ok_outputs.get(dep, False) for dep in case.needs):
            value = "no-input"
        else:
            value = run_case(case, workdir)
        dt = time.perf_counter() - t
        group_time[case.group] = group_time.get(case.group, 0.0) + dt
        ok_outputs[case.name] = not value.startswith(("error:", "exception:", "no-"))
        results[case.name] = value
        print(f"[golden] {dt:6.2f}s {case.name}: {value}", file=log)
    for g, s in group_time.items():
        print(f"[golden] group {g}: {s:.1f} s", file=log)
    print(f"[golden] total {time.perf_counter() - t0:.1f} s", file=log)
    return dict(sorted(results.items()))


def dumps(results: dict[str, str]) -> str:
    """Sorted keys, one per line: readable diffs."""
    return json.dumps(dict(sorted(results.items())), indent=0, sort_keys=True) + "\n"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DETERMINISTIC_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["SMOLQ_GOLDEN_CHILD"] = "1"
    return env


def run_in_child(workdir: str | os.PathLike, timeout: float = 1800) -> dict[str, str]:
    """Run the matrix in a child process with the deterministic environment."""
    workdir = Path(workdir)
    out_json = workdir / "golden.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(workdir), "--json", str(out_json)],
                          env=child_env(), cwd=str(workdir.parent), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)
    (workdir / "golden.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"golden matrix child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_json.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--only", action="append", help="run only these cases (repeatable; inputs of skipped cases are 'no-input')")
    args = ap.parse_args(argv)

    if any(os.environ.get(k) != v for k, v in DETERMINISTIC_ENV.items()):
        # torch reads these at import: re-execute with them set
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], child_env())

    # The commands print notes; keep stdout for the JSON.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        results = run_matrix(args.workdir, set(args.only) if args.only else None)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    text = dumps(results)
    if args.json:
        args.json.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
