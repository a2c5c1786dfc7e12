"""How much each tensor's quantization error costs the model's output, measured: the KL probe
that calibrates the size allocator's predicted losses (--target-* with GPTQ).

The allocator's loss of a tensor is its imatrix-weighted relative error (pipeline/allocate.py):
comparable between tensors only in a first-order picture in which every layer's relative noise
costs the output alike. Measured on SmolLM2-135M it does not: one tensor at a time put at Q4_0
costs from 0.04 to 0.5 nats of KL per unit of that loss (the value and down projections of the
first blocks most, the tied token embedding ten times more again). So each tensor's losses are
scaled by its own measured sensitivity:

    s_t = KL(model || model with only t at PROBE_TYPE) / loss_t(PROBE_TYPE)

KL over the first `windows` x `ctx` tokens of the calibration text, the model in float32 through
transformers' forward (the whole model in memory: 4 bytes per parameter). The predicted loss of
t at type q is then s_t · loss_t(q), in nats: second order, KL grows with the square of the
weight error as loss_t does. One forward per tensor, each from the full model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from smolq import kernels
from smolq.arch import arch_for_config
from smolq.errors import InputError
from smolq.ggml_types import GGMLType, block_size
from smolq.pipeline.allocate import rtn_loss
from smolq.pipeline.imatrix import read_text
from smolq.sources.checkpoint import open_checkpoint

PROBE_TYPE = GGMLType.Q4_0  # the probe's quantization: fits any row of a multiple of 32


def kl_sensitivities(src: Path, calib: Path, names: Sequence[str],
                     importance: Callable[[str, tuple[int, ...]], object | None], *, ctx: int = 512,
                     windows: int = 1, threads: int = 0) -> dict[str, float]:
    """{GGUF tensor name: s_t} for the `names` whose rows the probe type fits; `importance(name,
    shape)` gives the imatrix vector the allocator uses (None: ones)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads and threads > 0:
        torch.set_num_threads(threads)
    with open_checkpoint(src) as ckpt:
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        source_of = {m.gguf: m.source for m in arch.tensor_maps(set(ckpt.tensors)) if m.gguf}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = _windows(AutoTokenizer.from_pretrained(src), calib, ctx, windows)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), -1)
        out = {}
        for name in names:
            p = params.get(source_of.get(name, ""))
            if p is None or p.dim() != 2 or p.shape[-1] % block_size(PROBE_TYPE):
                continue
            kept = p.data.clone()
            x = kept.numpy()
            imp = importance(name, tuple(x.shape))
            loss = rtn_loss(x, PROBE_TYPE, imp, threads)
            q = kernels.quantize(x, PROBE_TYPE, imatrix=imp, threads=threads)
            p.data.copy_(torch.from_numpy(np.asarray(kernels.dequantize(q, PROBE_TYPE, x.shape, threads=threads))
                                          .reshape(x.shape)))
            got = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), -1)
            p.data.copy_(kept)
            kl = float((ref.exp() * (ref - got)).sum(-1).mean())
            out[name] = max(kl, 0.0) / loss if loss > 0 else 0.0
    return out


def _windows(tokenizer, calib: Path, ctx: int, windows: int):
    """The first windows x ctx tokens of the text, [windows, ctx] (fewer windows for a short text)."""
    import torch

    ids = tokenizer(read_text(calib)[: 16 * ctx * windows], add_special_tokens=True)["input_ids"]
    n = min(windows, len(ids) // ctx)
    if n < 1:
        raise InputError(calib, f"too short for one window of {ctx} tokens (the allocator's KL probe)")
    return torch.tensor(ids[: n * ctx]).reshape(n, ctx)
