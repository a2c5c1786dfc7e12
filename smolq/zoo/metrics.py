"""Quality numbers for a zoo row: per-tensor RMSE against the reference, and perplexity.

RMSE is `smolq verify`'s: one tensor of the output and its counterpart in
the reference are decoded and compared, then dropped (legacy names are
matched by role, so a ggjt output compares with a GGUF reference).

Perplexity runs the reference numpy forward pass (smolq.convert.reference)
over non-overlapping windows of the evaluation text: exp of the mean
next-token negative log-likelihood. When `smolq eval` (smolq.commands.eval)
provides a perplexity function, it is used instead, so the zoo and `smolq
eval` report the same number.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np


# --------------------------------------------------------------------------- RMSE

def tensor_errors(output: str | os.PathLike, reference: str | os.PathLike | None) -> dict[str, Any]:
    """Per-tensor RMSE of `output` against `reference` through `smolq verify` (so the two agree).

    Returns {"tensors": {name: rmse}, "max_rmse", "max_rmse_tensor", "problems": [...]};
    with no reference only the decode / NaN checks run.
    """
    from smolq.commands.verify import verify_file

    report = verify_file(Path(output), Path(reference) if reference is not None else None, threads=1)
    per_tensor = {r["name"]: r["rmse"] for r in report["tensors"] if r.get("rmse") is not None}
    problems = [f"{r['name']}: {p}" for r in report["tensors"] for p in r["problems"]]
    summary = report["summary"]
    n_params = sum(math.prod(r["shape"]) for r in report["tensors"])
    return {"tensors": per_tensor, "n_params": n_params, "tensor_bytes": summary["n_bytes"], "max_rmse": summary.get("rmse_max"),
            "max_rmse_tensor": summary.get("rmse_max_tensor"), "rmse_overall": summary.get("rmse_overall"),
            "problems": problems}


# --------------------------------------------------------------------------- perplexity

def tokenize(hf_dir: Path, text: str) -> np.ndarray | None:
    """Token ids of `text` with the checkpoint's own tokenizer; None when it has none we can run."""
    tokenizer_json = hf_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        return np.asarray(Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids,
                          dtype=np.int64)
    sp_model = hf_dir / "tokenizer.model"
    if sp_model.is_file():
        import sentencepiece

        return np.asarray(sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).encode(text),
                          dtype=np.int64)
    return None


def windows(tokens: np.ndarray, ctx: int) -> Iterator[np.ndarray]:
    """Non-overlapping windows of `ctx` tokens (a shorter last window if it has two or more)."""
    for start in range(0, len(tokens), ctx):
        w = tokens[start:start + ctx]
        if len(w) >= 2:
            yield w


def mean_nll(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(token[t+1] | ..token[t]) over one window, and the count of predictions."""
    x = np.asarray(logits, dtype=np.float64)[:-1]
    m = x.max(axis=-1, keepdims=True)
    log_z = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    picked = x[np.arange(len(x)), tokens[1:]]
    return float(np.sum(log_z - picked)), len(x)


def perplexity(model: str | os.PathLike, tokens: np.ndarray, ctx: int,
               hparams_override: dict[str, Any] | None = None) -> float:
    """Perplexity of a GGUF / legacy file on `tokens` (windows of `ctx`)."""
    external = _eval_perplexity()
    if external is not None:
        return float(external(model, tokens, ctx=ctx, hparams_override=hparams_override))
    from smolq.convert.reference import forward, read_model

    arch, tensors, hparams = read_model(model)
    merged = {**dict(hparams_override or {}), **hparams}
    total, count = 0.0, 0
    for w in windows(tokens, ctx):
        logits = forward(arch, tensors, merged, w[None, :], dtype=np.float32)[0]
        nll, n = mean_nll(logits, w)
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError("the evaluation text has fewer than two tokens")
    return math.exp(total / count)


def _eval_perplexity():
    """`smolq eval`'s token-level perplexity function, once it exists (same number as the command)."""
    try:
        from smolq.commands import eval as eval_cmd  # noqa: A004
    except ImportError:
        return None
    return getattr(eval_cmd, "perplexity_of_tokens", None)
