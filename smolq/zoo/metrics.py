"""Quality numbers for a zoo row, from the library functions the commands use too.

- Per-tensor RMSE of a GGUF / legacy output against the reference file:
  smolq.pipeline.verify.verify_file, what `smolq verify` runs (one tensor
  pair decoded at a time; legacy names matched by role, so a ggjt output
  compares with a GGUF reference).
- Per-tensor RMSE of a GPTQ directory: its dequantized linears against the
  HF source's tensors of the same names (GPTQ keeps HF names and layout).
- Perplexity: smolq.pipeline.evaluate.evaluate (non-overlapping windows,
  exp of the mean NLL over every token after a window's first, the
  reference forward pass), with the HF source's tokenizer, so the zoo and
  `smolq eval --score all --backend reference` report the same number.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from smolq.errors import SmolqError
from smolq.formats.gptq_ckpt import read_gptq_dir
from smolq.kernels import error_stats
from smolq.pipeline.evaluate import evaluate
from smolq.pipeline.verify import verify_file
from smolq.sources.checkpoint import open_checkpoint


def tensor_errors(output: str | os.PathLike, reference: str | os.PathLike | None) -> dict[str, Any]:
    """Per-tensor RMSE of a model file against `reference`, plus decode / NaN problems.

    Returns {"tensors": {name: rmse}, "max_rmse", "max_rmse_tensor", "rmse_overall",
    "problems", "n_params", "tensor_bytes"}.
    """
    report = verify_file(Path(output), Path(reference) if reference is not None else None, threads=1)
    per_tensor = {r["name"]: r["rmse"] for r in report["tensors"] if r.get("rmse") is not None}
    problems = [f"{r['name']}: {p}" for r in report["tensors"] for p in r["problems"]]
    summary = report["summary"]
    return {"tensors": per_tensor, "max_rmse": summary.get("rmse_max"),
            "max_rmse_tensor": summary.get("rmse_max_tensor"), "rmse_overall": summary.get("rmse_overall"),
            "problems": problems, "n_params": sum(math.prod(r["shape"]) for r in report["tensors"]),
            "tensor_bytes": summary["n_bytes"]}


def gptq_tensor_errors(gptq_dir: Path, hf_dir: Path) -> dict[str, Any]:
    """Per-tensor RMSE of a GPTQ directory's dequantized weights against the HF checkpoint's."""
    import numpy as np

    _, loaders = read_gptq_dir(gptq_dir)
    per_tensor: dict[str, float] = {}
    problems: list[str] = []
    ckpt = open_checkpoint(hf_dir)
    try:
        for name in sorted(loaders):
            source = ckpt.tensors.get(name)
            values = np.asarray(loaders[name](), dtype=np.float32)
            if source is None or tuple(source.shape) != values.shape:
                problems.append(f"{name}: not in the source checkpoint with shape {list(values.shape)}")
                continue
            per_tensor[name] = float(error_stats(source.load(), values, threads=1)["rmse"])
    finally:
        ckpt.close()
    worst = max(per_tensor, key=per_tensor.__getitem__) if per_tensor else None
    return {"tensors": per_tensor, "max_rmse": per_tensor.get(worst) if worst else None, "max_rmse_tensor": worst,
            "rmse_overall": None, "problems": problems, "n_params": None, "tensor_bytes": None}


def perplexity(model: Path, hf_dir: Path | None, text_file: Path, ctx: int) -> tuple[float | None, str | None]:
    """(perplexity, None), or (None, why it could not be measured)."""
    if hf_dir is None:
        return None, "perplexity needs the HF tokenizer (the source is a model file)"
    try:
        return float(evaluate(model, text_file, ctx=ctx, tokenizer=hf_dir, backend="reference", score="all")["ppl"]), None
    except SmolqError as exc:
        return None, f"perplexity not measured: {exc.message}"
