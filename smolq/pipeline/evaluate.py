"""Perplexity of a model on a text, and how far it is from a reference model: what `smolq eval` reports.

Windows (--score):
- "second-half" (default), llama.cpp's `llama-perplexity` protocol: the text
  (one trailing newline dropped, as `-f` reads it) is tokenized with the
  vocabulary's BOS in front when it adds one, cut into non-overlapping
  windows of --ctx tokens whose first token becomes BOS, and only the second
  half of each window is scored (positions ctx/2 .. ctx-2 predicting the
  next token), so every scored token has at least ctx/2 tokens of context.
  The same tokens and ctx give llama-perplexity's numbers.
- "all": every token of a window after its first is scored, no BOS (the
  gptq.md 1.9 / 3.7 recipe; what the zoo measures).

Backends (--backend): "llama" runs a GGUF through llama-cpp-python (one
window per decode, logits of every position); "reference" runs an HF or GPTQ
directory through transformers and a GGUF / legacy file through
smolq.sources.reference's forward pass over its dequantized tensors; "auto"
takes llama for a GGUF llama-cpp-python loads, else reference.

Tokenizer: --tokenizer DIR, else the HF tokenizer of MODEL or REF when one is
a directory, else llama.cpp's tokenizer of a GGUF it runs.

--kl-against REF: both models see the same windows; REF's logits of a window
are computed once, compared with MODEL's and dropped before the next window
(only one float per token and quantity is kept: smolq.pipeline.eval_stats).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import time
from pathlib import Path
from typing import Any, Iterator

from smolq.errors import InputError, SmolqError
from smolq.formats.detect import sniff_container
from smolq.formats.gptq_ckpt import is_gptq_dir, read_gptq_dir
from smolq.lazy import lazy_module
from smolq.pipeline.eval_stats import TokenStats, log_softmax, summarize
from smolq.sources.reference import forward, hf_hparams, read_model

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

SCORES = ("second-half", "all")
BACKENDS = ("auto", "llama", "reference")
_log_softmax = log_softmax  # the name scripts/bench_gptq.py imports

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
    backend = "transformers"

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.n_vocab = int(model.get_output_embeddings().weight.shape[0])

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            ids = torch.from_numpy(tokens).to(self.device)
            return self.model(input_ids=ids, use_cache=False).logits.float().cpu().numpy()


class FileModel:
    backend = "smolq reference"

    def __init__(self, path: Path, hparams_override):
        self.path = path
        self.arch, self.tensors, hp = read_model(path)
        self.hparams = {**dict(hparams_override or {}), **hp}
        self.n_vocab = int(self.tensors["token_embd.weight"].shape[0])
        self.logits(np.zeros((1, 1), dtype=np.int64))  # one token: a missing hyperparameter shows now, not later

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        try:
            return forward(self.arch, self.tensors, self.hparams, tokens, dtype=np.float32)
        except KeyError as exc:  # a legacy header lacks e.g. the RMS norm epsilon
            raise InputError(self.path, f"{exc.args[0]}: pass --tokenizer HF_DIR, whose config.json has it") from None


class LlamaCppModel:
    """A GGUF run by llama-cpp-python: one window per decode, the cache cleared between windows."""

    def __init__(self, path: Path, ctx: int):
        llama_cpp = importlib.import_module("llama_cpp")
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise InputError(path, f"llama-cpp-python cannot load it ({exc}); try --backend reference") from None
        self.n_vocab = int(self.llm.n_vocab())
        self.backend = f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama_cpp_python')})"

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """A view of llama-cpp-python's logits buffer (no copy of ctx x vocab floats): valid until the next call."""
        window = [int(t) for t in tokens[0]]
        self.llm.reset()
        self.llm.eval(window)
        return self.llm.scores[: len(window)][None]

    def encode(self, text: str, specials: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=specials, special=False))


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


def _llama_loadable(path: Path) -> bool:
    """A GGUF file, and llama-cpp-python installed (whether it loads this one is known only by trying)."""
    try:
        is_gguf = sniff_container(path) == "gguf"
    except SmolqError:
        return False
    return is_gguf and importlib.util.find_spec("llama_cpp") is not None


def open_model(path: Path, device: str = "cpu", hparams_from: Path | None = None, *, backend: str = "reference",
               ctx: int = 512):
    """Something with .logits(tokens [1, n]) -> [1, n, vocab] and .n_vocab: llama-cpp-python, transformers
    (HF, GPTQ) or the reference forward pass of a file, as `backend` (auto, llama, reference) asks."""
    kind = _kind(path)
    if backend == "llama" and kind == "file" and not _llama_loadable(path):
        raise InputError(path, "--backend llama runs model files through llama-cpp-python: not a GGUF file, "
                               "or llama-cpp-python is not installed")
    fallback = None
    if backend in ("llama", "auto") and kind == "file" and _llama_loadable(path):
        try:
            return LlamaCppModel(path, ctx)
        except InputError as exc:
            if backend == "llama":
                raise
            fallback = exc.message
    model = _open_reference(path, kind, device, hparams_from)
    if fallback is not None:
        model.backend = f"{model.backend} ({fallback.split(';')[0]})"
    return model


def _open_reference(path: Path, kind: str, device: str, hparams_from: Path | None):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # eval prints its own report; a bar would precede a one-line error

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


# ---------------------------------------------------------------------------
# tokens and windows
# ---------------------------------------------------------------------------


class HfTokenizer:
    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(directory)

    def encode(self, text: str, specials: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=specials)["input_ids"])


def _read_text(text_path: Path) -> str:
    try:
        return text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(text_path, f"cannot read text: {exc}") from None


def _tokenize(tokenizer_dir: Path, text_path: Path) -> np.ndarray:
    """The text's tokens, no special tokens (scripts/bench_gptq.py's and --score all's tokenization)."""
    return np.asarray(HfTokenizer(tokenizer_dir).encode(_read_text(text_path), False), dtype=np.int64)


def leading_bos(tokenizer) -> int | None:
    """The token the tokenizer puts in front of every text (BOS), or None when it adds none in front."""
    empty, one = tokenizer.encode("", True), tokenizer.encode("a", True)
    return empty[0] if empty and one and one[0] == empty[0] else None


def tokens_for(tokenizer, text: str, score: str) -> tuple[np.ndarray, int | None]:
    """(tokens, BOS to start each window with or None), as the --score protocol reads the text."""
    if score == "all":
        return np.asarray(tokenizer.encode(text, False), dtype=np.int64), None
    text = text[:-1] if text.endswith("\n") else text  # llama.cpp's -f drops one trailing newline
    bos = leading_bos(tokenizer)
    body = tokenizer.encode(text, False)
    return np.asarray(([bos] if bos is not None else []) + body, dtype=np.int64), bos


def windows(tokens: np.ndarray, ctx: int, bos: int | None, n_windows: int) -> Iterator[np.ndarray]:
    """Non-overlapping windows of ctx tokens; each starts with `bos` when there is one (llama-perplexity)."""
    for w in range(n_windows):
        window = tokens[w * ctx:(w + 1) * ctx].copy()
        if bos is not None:
            window[0] = bos
        yield window


def first_scored(ctx: int, score: str) -> int:
    """The first window position whose logits are scored (they predict the token after it)."""
    return ctx // 2 if score == "second-half" else 0


def _pick_tokenizer(tokenizer: Path | None, paths: list[Path], models: list) -> tuple[Any, str]:
    if tokenizer is not None:
        return HfTokenizer(tokenizer), str(tokenizer)
    for path in paths:
        if path.is_dir():
            return HfTokenizer(path), str(path)
    for path, model in zip(paths, models):
        if isinstance(model, LlamaCppModel):
            return model, f"{path} (llama.cpp)"
    raise InputError(paths[0], "a GGUF/legacy file run by the reference forward pass has no tokenizer "
                               "smolq can run: pass --tokenizer HF_DIR (or --backend llama for a GGUF)")


# ---------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------


def _check_vocab(model_path: Path, model, ref_path: Path, ref) -> None:
    if ref is not None and ref.n_vocab != model.n_vocab:
        raise InputError(ref_path, f"vocabulary of {ref.n_vocab} tokens, but {model_path} has {model.n_vocab}: "
                                   f"KL divergence needs the same vocabulary")


def _check_tokens(tokens: np.ndarray, model_path: Path, model, tok_name: str) -> None:
    if len(tokens) and int(tokens.max()) >= model.n_vocab:
        raise InputError(model_path, f"the tokenizer of {tok_name} produces token {int(tokens.max())}, "
                                     f"beyond the model's vocabulary of {model.n_vocab}")


def _validate(ctx: int, score: str, backend: str) -> None:
    if ctx < 4:
        raise InputError(None, "--ctx must be at least 4")
    if score not in SCORES:
        raise InputError(None, f"--score must be one of {', '.join(SCORES)}, not {score!r}")
    if backend not in BACKENDS:
        raise InputError(None, f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")


def _measure(model, ref, tokens: np.ndarray, bos: int | None, ctx: int, first: int, n_windows: int) -> TokenStats:
    stats = TokenStats()
    for window in windows(tokens, ctx, bos, n_windows):
        x = window[None]
        logits = model.logits(x)[0, first:-1]
        ref_logits = ref.logits(x)[0, first:-1] if ref is not None else None
        stats.add(logits, window[first + 1:], ref_logits)
    return stats


def _open_models(paths: list[Path], tokenizer: Path | None, device: str, backend: str, ctx: int) -> list:
    """MODEL (and REF) opened on their backends, checked to share one vocabulary."""
    hparams_from = tokenizer or next((p for p in paths if p.is_dir()), None)  # what a legacy header lacks
    models = [open_model(p, device, hparams_from, backend=backend, ctx=ctx) for p in paths]
    if len(models) == 2:
        _check_vocab(paths[0], models[0], paths[1], models[1])
    return models


def _n_windows(tokens: np.ndarray, ctx: int, max_windows: int, text: Path) -> int:
    n = len(tokens) // ctx
    if max_windows > 0:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(text, f"text has {len(tokens)} tokens, fewer than one window of {ctx}")
    return n


def evaluate(model: Path, text: Path, *, ctx: int = 512, device: str = "cpu", kl_against: Path | None = None,
             tokenizer: Path | None = None, max_windows: int = 0, backend: str = "auto",
             score: str = "second-half") -> dict[str, Any]:
    """Perplexity of `model` on `text` (and KLD etc. against `kl_against`), as a JSON-able summary
    (the numbers: smolq.pipeline.eval_stats.summarize, under "stats")."""
    started = time.perf_counter()
    _validate(ctx, score, backend)
    text = Path(text)
    raw = _read_text(text)
    paths = [Path(model)] + ([Path(kl_against)] if kl_against is not None else [])
    kinds = [_kind(p) for p in paths]
    models = _open_models(paths, tokenizer, device, backend, ctx)
    tok, tok_name = _pick_tokenizer(tokenizer, paths, models)
    tokens, bos = tokens_for(tok, raw, score)
    _check_tokens(tokens, paths[0], models[0], tok_name)
    n_windows = _n_windows(tokens, ctx, max_windows, text)
    ref = models[1] if len(models) == 2 else None
    summary = summarize(_measure(models[0], ref, tokens, bos, ctx, first_scored(ctx, score), n_windows))
    out = {"model": str(paths[0]), "kind": kinds[0], "backend": models[0].backend, "text": str(text),
           "tokenizer": tok_name, "ctx": ctx, "score": score, "bos": bos, "n_windows": n_windows,
           "n_tokens": summary["n_scored"], "ppl": summary["ppl"]["value"], "nll": summary["ppl"]["nll"],
           "stats": summary}
    if ref is not None:
        out.update({"kl_against": str(paths[1]), "ref_kind": kinds[1], "ref_backend": ref.backend,
                    "kld": summary["kld"]["mean"]})
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out
