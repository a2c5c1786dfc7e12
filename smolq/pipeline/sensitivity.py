"""How much each tensor's quantization error costs the model's output, measured: the KL probe
that calibrates the size allocator's predicted losses (--target-* with GPTQ).

The allocator's loss of a tensor is its imatrix-weighted relative error (pipeline/allocate.py):
comparable between tensors only in a first-order picture in which every layer's relative noise
costs the output alike. Measured on SmolLM2-135M it does not: one tensor at a time put at Q4_0
costs from 0.04 to 0.5 nats of KL per unit of that loss (the value and down projections of the
first blocks most, the tied token embedding ten times more again). So each tensor's losses are
scaled by its own measured sensitivity:

    s_t = KL(model || model with only t at PROBE_TYPE) / loss_t(PROBE_TYPE)

KL over the first `windows` x `ctx` tokens of the calibration text, through transformers' own
blocks in float32. The model is streamed block by block (gptq.py's weightless skeleton and
checkpoint reads): memory holds one block, the embedding or the head while they run, and one
hidden state per probed tensor. A tensor of block j changes nothing before block j, so its
perturbed stream starts there from the reference's input and runs through the later blocks
with the others; each block is read from the checkpoint once. The predicted loss of t at type
q is then s_t · loss_t(q), in nats: second order, KL grows with the square of the weight error
as loss_t does.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

from smolq import kernels
from smolq.arch import arch_for_config
from smolq.errors import InputError
from smolq.ggml_types import GGMLType, block_size
from smolq.pipeline.allocate import rtn_loss
from smolq.pipeline.gptq import (FAMILIES, _block_kinds, _blocks, _capture_block_inputs, _load_model, _Weights,
                                 _with_hidden, block_kwargs)
from smolq.pipeline.imatrix import FINAL_NORM, read_text
from smolq.sources.checkpoint import open_checkpoint
from smolq.transforms.calib import Calibration

PROBE_TYPE = GGMLType.Q4_0  # the probe's quantization: fits any row of a multiple of 32


def kl_sensitivities(src: Path, calib: Path, names: Sequence[str],
                     importance: Callable[[str, tuple[int, ...]], object | None], *, ctx: int = 512,
                     windows: int = 1, threads: int = 0) -> dict[str, float]:
    """{GGUF tensor name: s_t} for the `names` whose rows the probe type fits; `importance(name,
    shape)` gives the imatrix vector the allocator uses (None: ones)."""
    import torch

    if threads and threads > 0:
        torch.set_num_threads(threads)
    model, tokenizer, family = _load_model(src)
    tokens = _windows(tokenizer, calib, ctx, windows)
    cal = Calibration([tokens[i:i + 1] for i in range(tokens.shape[0])], f"file:{calib}", tokens.shape[1])
    with open_checkpoint(src) as ckpt, tempfile.TemporaryDirectory(prefix="smolq-kl-") as work, torch.no_grad():
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        source_of = {m.gguf: m.source for m in arch.tensor_maps(set(ckpt.tensors)) if m.gguf}
        probe = _Probe(model, family, cal, _Weights(ckpt, model), Path(work), importance, threads)
        wanted = {n: source_of[n] for n in names if n in source_of}
        return probe.run(wanted)


class _Probe:
    """The streamed KL probe of one model on one set of windows (module docstring)."""

    def __init__(self, model, family, cal, weights, work: Path, importance, threads: int):
        self.model, self.family, self.cal, self.weights, self.work = model, family, cal, weights, work
        self.importance, self.threads = importance, threads
        self.blocks, self.kinds = _blocks(model, family), _block_kinds(model, family)
        self.prefix = FAMILIES[family].blocks + "."
        names = {m: n for n, m in model.named_modules()}
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.embed_name, self.head_name = names[self.embed] + ".weight", names[self.head] + ".weight"
        self.norm = model.get_submodule(FINAL_NORM[family])
        # a tied head reads the embedding's tensor: its probe changes the model's input and output
        self.tied = weights.source(self.head_name) is weights.source(self.embed_name)

    def run(self, wanted: dict[str, str]) -> dict[str, float]:
        """{GGUF name: s_t} for `wanted` ({GGUF name: HF parameter name}) that the probe type fits."""
        gguf_of = {}
        for name, hf in wanted.items():
            gguf_of.setdefault(hf, name)
        losses, streams, kls = {}, {}, {}  # streams: HF name -> its perturbed model's hidden states
        embed_q = self._perturbed(self.embed_name, gguf_of, losses)
        if embed_q is not None:  # captured first: the reference's capture reuses the work directory
            streams[self.embed_name] = self._inputs(embed_q)
        acts = self._inputs(None)
        try:
            for j, block in enumerate(self.blocks):
                self._block(j, block, acts, streams, gguf_of, losses)
            ref_states = [acts.hidden(i) for i in range(len(acts))]
            with self._head_loaded():
                ref = self._log_probs(ref_states)
                for hf, states in streams.items():
                    tied_too = hf == self.embed_name and self.tied
                    kls[hf] = self._kl(ref, self._log_probs(states, embed_q if tied_too else None))
                head_q = None if self.tied else self._perturbed(self.head_name, gguf_of, losses)
                if head_q is not None:
                    kls[self.head_name] = self._kl(ref, self._log_probs(ref_states, head_q))
        finally:
            acts.close()
        return {name: max(kls[hf], 0.0) / losses[hf] if losses[hf] > 0 else 0.0
                for name, hf in wanted.items() if hf in kls}

    def _perturbed(self, hf: str, gguf_of: dict, losses: dict, x=None):
        """Parameter `hf` at PROBE_TYPE, dequantized (torch), its loss put in `losses`; None where
        it is not probed or the probe type does not fit its rows. x: its values (numpy), else read."""
        import numpy as np
        import torch

        t = self.weights.source(hf)
        if hf not in gguf_of or t is None or len(t.shape) != 2 or int(t.shape[-1]) % block_size(PROBE_TYPE):
            return None
        if x is None:
            x = self.weights.load(hf, tuple(int(d) for d in t.shape)).numpy()
        imp = self.importance(gguf_of[hf], tuple(x.shape))
        losses[hf] = rtn_loss(x, PROBE_TYPE, imp, self.threads)
        q = kernels.quantize(x, PROBE_TYPE, imatrix=imp, threads=self.threads)
        deq = np.asarray(kernels.dequantize(q, PROBE_TYPE, x.shape, threads=self.threads)).reshape(x.shape)
        return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32))

    def _inputs(self, embedding):
        """Block 0's inputs per window (gptq.py's capture, an _Activations); with `embedding`, the
        hidden states alone (a list) of the model whose embedding weight is that."""
        if embedding is None:
            return _capture_block_inputs(self.model, self.family, self.cal, self.weights, self.work, True)
        weights = _Replaced(self.weights, self.embed_name, embedding)
        acts = _capture_block_inputs(self.model, self.family, self.cal, weights, self.work, True)
        try:
            return [acts.hidden(i).clone() for i in range(len(acts))]
        finally:
            acts.close()

    def _block(self, j: int, block, acts, streams: dict, gguf_of: dict, losses: dict) -> None:
        """Block j on every stream so far; a new stream for each of its own probed tensors (from
        the reference's input, the tensor at the probe type); then the reference moves on."""
        prefix, kind = f"{self.prefix}{j}.", self.kinds[j]
        self.weights.materialize(block, prefix, read_only=True)
        try:
            for hf, hidden in streams.items():
                streams[hf] = [self._call(block, acts, i, kind, h) for i, h in enumerate(hidden)]
            for name, p in block.named_parameters():
                q = self._perturbed(prefix + name, gguf_of, losses, p.data.numpy())
                if q is None:
                    continue
                kept, p.data = p.data, q
                try:
                    streams[prefix + name] = [self._call(block, acts, i, kind, acts.hidden(i))
                                              for i in range(len(acts))]
                finally:
                    p.data = kept
            for i in range(len(acts)):
                acts.replace(i, self._call(block, acts, i, kind, acts.hidden(i)))
        finally:
            self.weights.release(block)

    @staticmethod
    def _call(block, acts, i: int, kind, hidden):
        """The block's output for window i's call arguments with `hidden` as its input."""
        args, kwargs = _with_hidden(*acts.call(i, kind), hidden)
        res = block(*args, **block_kwargs(kwargs))
        return (res[0] if isinstance(res, (tuple, list)) else res).detach()

    @contextmanager
    def _head_loaded(self):
        """The final norm and the head read from the checkpoint while the logits are taken."""
        self.weights.materialize(self.norm, FINAL_NORM[self.family] + ".", read_only=True)
        self.weights.materialize(self.head, self.head_name[:-len("weight")], read_only=True)
        try:
            yield
        finally:
            self.weights.release(self.norm)
            self.weights.release(self.head)

    def _log_probs(self, states, head_weight=None):
        """log-softmax of the logits of the last block's outputs `states` (one per window): the
        model's final norm and head (its weight `head_weight` when given), soft-capped as the
        model caps them (Gemma)."""
        import torch

        kept = self.head.weight.data
        if head_weight is not None:
            self.head.weight.data = head_weight
        try:
            logits = torch.cat([self.head(self.norm(h)) for h in states]).float()
        finally:
            self.head.weight.data = kept
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, -1)

    @staticmethod
    def _kl(ref, got) -> float:
        return float((ref.exp() * (ref - got)).sum(-1).mean())


class _Replaced:
    """A `_Weights` whose tensor `name` reads as `value` (the embedding's probe)."""

    def __init__(self, weights, name: str, value):
        self._weights, self._name, self._value = weights, name, value

    def __getattr__(self, attr):
        return getattr(self._weights, attr)

    def materialize(self, module, prefix: str = "", read_only: bool = False) -> None:
        self._weights.materialize(module, prefix, read_only)
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            if prefix + name == self._name:
                p.data = self._value


def _windows(tokenizer, calib: Path, ctx: int, windows: int):
    """The first windows x ctx tokens of the text, [windows, ctx] (fewer windows for a short text)."""
    import torch

    ids = tokenizer(read_text(calib)[: 16 * ctx * windows], add_special_tokens=True)["input_ids"]
    n = min(windows, len(ids) // ctx)
    if n < 1:
        raise InputError(calib, f"too short for one window of {ctx} tokens (the allocator's KL probe)")
    return torch.tensor(ids[: n * ctx]).reshape(n, ctx)
