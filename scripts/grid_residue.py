#!/usr/bin/env python3
"""Do a model's weights already lie on a ggml grid? Round-to-nearest of each block Linear at each
type, and its relative error: a checkpoint dequantized from a quantized file comes back exactly
(or nearly) at its own types, which makes any comparison of quantizers at those types moot.

    .venv/bin/python scripts/grid_residue.py MODEL_DIR_OR_GGUF [--types q4_0,q4_k,...] [--json OUT]

For every 2-D tensor whose name matches --match (default: the transformer blocks' weights) and
each type whose block fits its rows, the weights are quantized by smolq's kernel (llama.cpp's
RTN, byte for byte) twice, without an importance matrix and with an all-ones one (its weighted
scale search), decoded, and compared; the smaller of the two is kept:
relerr = ||W - deq(q(W))||^2 / ||W||^2. The table gives, per type, how many tensors come back
within ON_GRID of exact, the median relerr, and the median of relerr over the same tensor's relerr
at Q4_0 (on continuous weights, e.g. normal random ones, Q4_1 is about 0.74 of Q4_0, Q5_0 0.25,
Q4_K 0.75, Q5_K 0.19, Q6_K 0.045; a ratio far below that says the weights sit on that type's
grid, or on one it nearly contains).

Why it exists: the benchmark models of issue #15 are rebuilt from quantized GGUF files
(SmolLM2-135M from a Q4_1 file, Gemma 3 270M from a Q4_K_M file); README, Benchmarks.
Bad input is one line naming the file, exit 2.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smolq import kernels  # noqa: E402
from smolq.atomic import atomic_output  # noqa: E402
from smolq.errors import SmolqError  # noqa: E402
from smolq.ggml_types import GGMLType, block_size, is_quantized  # noqa: E402
from smolq.pipeline.allocate import rtn_loss  # noqa: E402

DEFAULT_TYPES = "q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k,iq4_nl"
BLOCK_WEIGHTS = r"(^|\.)(layers|h|blocks|blk)\.\d+\..*weight$"
ON_GRID = 1e-6  # relerr at or below this counts as "comes back exactly" (fp16 scales re-derived)
REFERENCE = GGMLType.Q4_0


def relative_error(x: np.ndarray, t: GGMLType, search: bool = False) -> float:
    """||x - deq(quant_t(x))||^2 / ||x||^2 (0 for an all-zero tensor): the allocator's rtn_loss
    with equal weights. search: quantized with an all-ones importance vector, which takes
    llama.cpp's weighted scale search (the path an imatrix file takes) instead of the plain
    formula: it finds some grids the formula misses (Q5_1 holding Q4_1 weights)."""
    return rtn_loss(x, t, np.ones(x.shape[-1], dtype=np.float32) if search else None)


def best_relative_error(x: np.ndarray, t: GGMLType) -> float:
    """The smaller of the plain and the searched RTN's relative error (searched only for the types
    llama.cpp refuses to quantize without an importance matrix)."""
    searched = relative_error(x, t, search=True)
    return searched if t in kernels.NEEDS_IMATRIX else min(relative_error(x, t), searched)


def float_tensors(path: Path, match: re.Pattern):
    """(name, float32 2-D array) of the matching tensors, one at a time: an HF checkpoint
    directory or any model file smolq reads."""
    if path.is_dir():
        from smolq.sources.checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt:
            for name, st in ckpt.tensors.items():
                if len(st.shape) == 2 and match.search(name):
                    yield name, np.ascontiguousarray(st.load(), dtype=np.float32)
        return
    from smolq.formats.detect import open_model
    from smolq.transforms.rtn import to_float32

    with open_model(path) as mf:
        for entry in mf.tensors:
            if len(entry.shape) == 2 and match.search(entry.name):
                yield entry.name, np.ascontiguousarray(to_float32(entry), dtype=np.float32)


def measure(path: Path, types: list[GGMLType], match: re.Pattern) -> dict:
    """{type name: {"tensors", "on_grid", "median_relerr", "median_ratio_to_q4_0"}} and the
    per-tensor relerrs under "per_tensor"."""
    per_tensor: dict[str, dict[str, float]] = {}
    for name, x in float_tensors(path, match):
        fits = [t for t in dict.fromkeys(types + [REFERENCE]) if x.shape[-1] % block_size(t) == 0]
        per_tensor[name] = {t.name: best_relative_error(x, t) for t in fits}
    if not per_tensor:
        raise SmolqError(path, f"no 2-D tensor matches {match.pattern!r}")
    summary = {}
    for t in types:
        errs = [(e[t.name], e.get(REFERENCE.name)) for e in per_tensor.values() if t.name in e]
        ratios = [a / b for a, b in errs if b]
        summary[t.name] = {
            "tensors": len(errs),
            "on_grid": sum(a <= ON_GRID for a, _ in errs),
            "median_relerr": statistics.median(a for a, _ in errs) if errs else None,
            "median_ratio_to_q4_0": statistics.median(ratios) if ratios else None,
        }
    return {"model": str(path), "on_grid_below": ON_GRID, "types": summary, "per_tensor": per_tensor}


def parse_types(text: str) -> list[GGMLType]:
    out = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        try:
            t = GGMLType[word.upper()]
        except KeyError:
            raise SmolqError(None, f"--types: unknown ggml type {word!r}") from None
        if (t, "v3") not in kernels.QUANTIZE_TYPES or not is_quantized(t):
            raise SmolqError(None, f"--types: {t.name} is not a quantized type smolq writes")
        out.append(t)
    return out


def print_table(result: dict) -> None:
    print(f"{result['model']}: RTN of each matching weight (plain or searched, the better), "
          f"relerr = |W - deq(q(W))|^2 / |W|^2")
    print(f"| type | tensors | back within {ON_GRID:g} | median relerr | median relerr / Q4_0's |")
    print("|---|---:|---:|---:|---:|")
    for name, s in result["types"].items():
        if not s["tensors"]:
            print(f"| {name} | 0 (rows do not fit its block) | | | |")
            continue
        ratio = "" if s["median_ratio_to_q4_0"] is None else f"{s['median_ratio_to_q4_0']:.3f}"
        print(f"| {name} | {s['tensors']} | {s['on_grid']} | {s['median_relerr']:.2e} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an HF checkpoint directory or a model file (GGUF, legacy)")
    p.add_argument("--types", default=DEFAULT_TYPES, help=f"ggml types, comma-separated (default {DEFAULT_TYPES})")
    p.add_argument("--match", default=BLOCK_WEIGHTS, help="regex on tensor names (default: the blocks' weights)")
    p.add_argument("--json", type=Path, help="also write the result (per tensor too) as JSON here")
    args = p.parse_args(argv)
    try:
        if not args.model.exists():
            raise SmolqError(args.model, "no such file or directory")
        try:
            match = re.compile(args.match)
        except re.error as e:
            raise SmolqError(None, f"--match {args.match!r}: {e}") from None
        result = measure(args.model, parse_types(args.types), match)
        print_table(result)
        if args.json:
            with atomic_output(args.json) as fh:
                fh.write((json.dumps(result, indent=1) + "\n").encode())
    except (SmolqError, OSError, ValueError) as e:
        print(f"grid_residue: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
