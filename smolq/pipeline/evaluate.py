"""Perplexity of a model on a text (and KL against a reference model): what `smolq eval` reports.

Perplexity is exp(mean NLL) over non-overlapping windows of --ctx tokens
(each window predicts its own tokens 1..ctx-1; gptq.md 1.9 / 3.7 recipe).
MODEL may be:
- an HF checkpoint directory (transformers forward pass);
- a GPTQ directory (smolq dequantizes every qweight into the HF model);
- a GGUF or legacy ggml file (smolq.sources.reference's forward pass over the
  file's dequantized tensors). A file has no tokenizer smolq can run, so the
  text is tokenized with --tokenizer DIR, or with the --kl-against directory.
--kl-against REF: mean KL(REF || MODEL) of the next-token distributions on
the same windows.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from smolq.errors import InputError
from smolq.formats.gptq_ckpt import is_gptq_dir, read_gptq_dir
from smolq.lazy import lazy_module
from smolq.sources.reference import forward, hf_hparams, read_model

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def _kind(path: Path) -> str:
    if path.is_dir():
        if is_gptq_dir(path):
            return "gptq"
        if (path / "config.json").is_file():
            return "hf"
        raise InputError(path, "directory without config.json: not an HF or GPTQ checkpoint")
    if path.is_file():
        return "file"
    raise InputError(path, "no such file or directory")


class TorchModel:
    def __init__(self, model, device):
        self.model, self.device = model, device

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            ids = torch.from_numpy(tokens).to(self.device)
            return self.model(input_ids=ids, use_cache=False).logits.float().cpu().numpy()


class FileModel:
    def __init__(self, path: Path, hparams_override):
        self.arch, self.tensors, hp = read_model(path)
        self.hparams = {**dict(hparams_override or {}), **hp}

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return forward(self.arch, self.tensors, self.hparams, tokens, dtype=np.float32)


def _torch_device(device: str):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, f"--device {device} requested but CUDA is not available here; use --device cpu")
    return torch.device(device)


def load_gptq_as_hf(path: Path, device: str = "cpu"):
    """An HF model (float32) whose Linear weights are the GPTQ dir's dequantized ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _, loaders = read_gptq_dir(path)
    state = {name: torch.from_numpy(np.asarray(load(), dtype=np.float32)) for name, load in loaders.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise InputError(path, f"GPTQ tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


def open_model(path: Path, device: str = "cpu", hparams_from: Path | None = None):
    """Something with .logits(tokens): a transformers model (HF, GPTQ) or the reference forward of a file."""
    import torch
    from transformers import AutoModelForCausalLM

    kind = _kind(path)
    if kind == "hf":
        dev = _torch_device(device)
        return TorchModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval(), dev)
    if kind == "gptq":
        dev = _torch_device(device)
        return TorchModel(load_gptq_as_hf(path, device), dev)
    override = None
    if hparams_from is not None and (hparams_from / "config.json").is_file():
        override = hf_hparams(hparams_from)
    return FileModel(path, override)


def _tokenize(tokenizer_dir: Path, text_path: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(text_path, f"cannot read text: {exc}") from None
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def evaluate(model: Path, text: Path, *, ctx: int = 512, device: str = "cpu", kl_against: Path | None = None,
             tokenizer: Path | None = None, max_windows: int = 0) -> dict[str, Any]:
    """Perplexity of `model` on `text` (and mean KL against `kl_against`), as a JSON-able summary."""
    started = time.perf_counter()
    model, text = Path(model), Path(text)
    if ctx < 2:
        raise InputError(None, "--ctx must be at least 2")
    kind = _kind(model)
    tok_dir = tokenizer or (model if kind != "file" else (kl_against if kl_against and kl_against.is_dir() else None))
    if tok_dir is None:
        raise InputError(model, "a GGUF/legacy file has no tokenizer to run: pass --tokenizer HF_DIR")
    tokens = _tokenize(tok_dir, text)
    n_windows = len(tokens) // ctx
    if max_windows > 0:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise InputError(text, f"text has {len(tokens)} tokens, fewer than one window of {ctx}")
    m = open_model(model, device, hparams_from=tok_dir)
    ref = open_model(kl_against, device, hparams_from=tok_dir) if kl_against is not None else None
    nll, kl, count = 0.0, 0.0, 0
    for w in range(n_windows):
        window = tokens[w * ctx:(w + 1) * ctx][None]
        lp = _log_softmax(m.logits(window)[0, :-1])
        target = window[0, 1:]
        nll -= float(lp[np.arange(len(target)), target].sum())
        if ref is not None:
            rp = _log_softmax(ref.logits(window)[0, :-1])
            kl += float((np.exp(rp) * (rp - lp)).sum())
        count += len(target)
    out = {"model": str(model), "kind": kind, "text": str(text), "ctx": ctx, "n_windows": n_windows,
           "n_tokens": count, "ppl": math.exp(nll / count), "nll": nll / count,
           "seconds": round(time.perf_counter() - started, 3)}
    if ref is not None:
        out["kl"] = kl / count
        out["kl_against"] = str(kl_against)
    return out
