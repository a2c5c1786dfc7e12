"""Helpers for tests that load smolq's files with real inference engines.

Two independent readers, both optional (a test skips, saying why, when its
reader is absent; `make setup` installs them):

- llama-cpp-python (in the test venv): `llama_cpp_logits` runs a file on
  token sequences and returns llama.cpp's logits at every position;
  `llama_cpp_greedy` lets its own sampler pick greedy tokens.
- GPT4All's prebuilt backends, installed with `pip install --no-deps --target`
  into .venv/real/gpt4all-<version> (they need setuptools<70 and must not
  share a directory). `run_gpt4all` drives one in a child process, so a crash
  or an abort() inside its C++ loader fails one test instead of the session,
  and a hang is cut off by a timeout. It works with the 1.x binding (legacy
  ggml/ggjt/ggmm loaders) and the 2.x binding (GGUF loaders).

And the yardstick: transformers (`hf_greedy`, and smolq.sources.reference's
`hf_logits`), plus `check_choices`, which compares the tokens an engine chose
with a reference's logits while tolerating only genuine near-ties.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GPT4ALL_TIMEOUT_S = 180  # a tiny model loads and generates in about a second


# --------------------------------------------------------------------------- locating the readers


def gpt4all_dir(version: str) -> Path | None:
    """The --target directory holding gpt4all==`version`, or None.

    Looked for beside the running interpreter's venv (sys.prefix/real/...), then
    in the repository's .venv; SMOLQ_GPT4ALL_<major>_<minor>_<patch> (e.g.
    SMOLQ_GPT4ALL_2_5_1) overrides both.
    """
    env = os.environ.get("SMOLQ_GPT4ALL_" + version.replace(".", "_"))
    candidates = [Path(env)] if env else [Path(sys.prefix) / "real" / f"gpt4all-{version}",
                                          REPO / ".venv" / "real" / f"gpt4all-{version}"]
    for path in candidates:
        if (path / "gpt4all" / "llmodel_DO_NOT_MODIFY" / "build").is_dir():
            return path
    return None


def require_gpt4all(version: str) -> Path:
    path = gpt4all_dir(version)
    if path is None:
        pytest.skip(f"gpt4all=={version} is not installed in .venv/real/gpt4all-{version} "
                    f"(make setup: pip install --no-deps --target .venv/real/gpt4all-{version} "
                    f"gpt4all=={version} 'setuptools<70')")
    return path


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # not installed, or its shared library failed to load
        pytest.skip(f"llama-cpp-python is not importable ({exc}); make setup builds llama-cpp-python==0.3.36")
    return llama_cpp


# --------------------------------------------------------------------------- GPT4All, in a child process

# Runs inside the child with PYTHONPATH=<gpt4all dir>. argv: request.json result.json.
# The 1.x binding's llmodel_prompt takes (model, prompt, 3 callbacks, ctx); the
# 2.x one adds a prompt template, a `special` flag and a fake reply. The
# template "%1%2" adds nothing before or after the user text (without %2,
# 2.x appends "\n\n" after the reply and reports it to the prompt callback).
_GPT4ALL_CHILD = r"""
import ctypes, json, sys
req = json.load(open(sys.argv[1]))
try:
    from gpt4all import _pyllmodel as P
    v2 = True
except ImportError:
    from gpt4all import pyllmodel as P
    v2 = False
if v2:
    m = P.LLModel(req["model"], req["n_ctx"], 0)
    ok = m.load_model()
else:
    m = P.LLModel()
    ok = m.load_model(req["model"])
if not ok:
    json.dump({"loaded": False}, open(sys.argv[2], "w"))
    sys.exit(0)
m.set_thread_count(req["threads"])
results = []
for prompt in req["prompts"]:
    prompt_tokens, tokens = [], []
    on_prompt = P.PromptCallback(lambda t: prompt_tokens.append(int(t)) is None)
    on_response = P.ResponseCallback(lambda t, _text: tokens.append(int(t)) is None)
    on_recalc = P.RecalculateCallback(lambda busy: busy)
    # top_k=1 is greedy whatever temp is; temp stays 1 because temp 0 divides by zero
    # in the old samplers. No repeat penalty: it would change the logits.
    m._set_context(n_predict=req["n_predict"], top_k=1, top_p=1.0, temp=1.0, n_batch=req["n_batch"],
                   repeat_penalty=1.0, repeat_last_n=0, reset_context=True)
    if v2:
        P.llmodel.llmodel_prompt(m.model, prompt.encode(), b"%1%2", on_prompt, on_response, on_recalc,
                                 m.context, False, ctypes.c_char_p())
    else:
        P.llmodel.llmodel_prompt(m.model, prompt.encode(), on_prompt, on_response, on_recalc, m.context)
    results.append({"prompt": prompt, "prompt_tokens": prompt_tokens, "tokens": tokens})
json.dump({"loaded": True, "binding": "2.x" if v2 else "1.x", "results": results}, open(sys.argv[2], "w"))
"""


@dataclass
class Generation:
    """What GPT4All evaluated for one prompt (its own tokenization, as its
    prompt callback reported it) and the token ids it generated greedily."""

    prompt: str
    prompt_tokens: list[int]
    tokens: list[int]


class GPT4AllLoadError(AssertionError):
    """The backend refused the file; `log` has its output (the reason, usually)."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n--- gpt4all output ---\n{log[-4000:]}")
        self.log = log


def run_gpt4all(gpt4all_path: Path, model_path: str | os.PathLike, prompts: str | Sequence[str], n_predict: int,
                *, n_ctx: int = 128, threads: int = 1, n_batch: int = 8,
                timeout: float = GPT4ALL_TIMEOUT_S) -> list[Generation]:
    """Load `model_path` with the GPT4All backend in `gpt4all_path` and let it
    generate `n_predict` tokens greedily after each prompt (a fresh context per prompt).

    The C API takes text, not token ids, so prompts are strings; each
    Generation reports the ids the backend's own tokenizer produced.
    Raises GPT4AllLoadError (with the backend's output) if the file is refused,
    the child crashes, or it runs past `timeout` seconds.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    with tempfile.TemporaryDirectory(prefix="smolq-gpt4all-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model": str(model_path), "prompts": prompt_list, "n_predict": n_predict,
                                       "n_ctx": n_ctx, "threads": threads, "n_batch": n_batch}))
        env = {**os.environ, "PYTHONPATH": str(gpt4all_path), "OMP_NUM_THREADS": str(threads)}
        try:
            proc = subprocess.run([sys.executable, "-c", _GPT4ALL_CHILD, str(request), str(result)],
                                  env=env, cwd=tmp, capture_output=True, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            log = (exc.stdout or "") + (exc.stderr or "") if isinstance(exc.stdout, str) else ""
            raise GPT4AllLoadError(f"gpt4all ({gpt4all_path.name}) ran past {timeout} s on {model_path}", log) from None
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not result.exists():
            raise GPT4AllLoadError(f"gpt4all ({gpt4all_path.name}) exited with {proc.returncode} on {model_path}", log)
        data = json.loads(result.read_text())
    if not data["loaded"]:
        raise GPT4AllLoadError(f"gpt4all ({gpt4all_path.name}) refused to load {model_path}", log)
    return [Generation(r["prompt"], r["prompt_tokens"], r["tokens"]) for r in data["results"]]


# --------------------------------------------------------------------------- llama.cpp, in process


def open_llama(model_path: str | os.PathLike, *, n_ctx: int = 64, threads: int = 1, f32_kv: bool = True):
    """A llama_cpp.Llama with logits at every position. f32_kv keeps the KV cache
    in F32 (llama.cpp's default F16 cache alone moves f32 logits by ~3e-3)."""
    llama_cpp = require_llama_cpp()
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    return llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False, **kv)


def llama_cpp_logits(llm, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """llama.cpp's logits [len(seq), n_vocab] for each token sequence, each from an empty context."""
    out = []
    for seq in sequences:
        llm.reset()
        llm.eval([int(t) for t in seq])
        out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    return out


def llama_cpp_greedy(llm, prompt: Sequence[int], n: int) -> list[int]:
    """`n` tokens chosen by llama.cpp's own sampler at temperature 0 (greedy)."""
    llm.reset()
    out = []
    for token in llm.generate([int(t) for t in prompt], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


# --------------------------------------------------------------------------- the transformers side


@functools.lru_cache(maxsize=2)
def _hf_model(hf_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_greedy(hf_dir: str | os.PathLike, prompt: Sequence[int], n: int) -> list[int]:
    """transformers' greedy continuation (float32, no sampling, no EOS stop)."""
    import torch

    model = _hf_model(str(hf_dir))
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@dataclass
class ChoiceCheck:
    """How an engine's token choices compare with a reference's logits.

    `n_exact` positions where the engine picked the reference's argmax;
    `worst_gap` the largest (reference max logit - reference logit of the
    engine's pick): 0 when every pick is the argmax, small when the engine
    only broke a near-tie differently."""

    n_positions: int
    n_exact: int
    worst_gap: float

    def __str__(self) -> str:
        return f"{self.n_exact}/{self.n_positions} exact, worst gap {self.worst_gap:.3g}"


def check_choices(reference_logits: np.ndarray, chosen: Sequence[int]) -> ChoiceCheck:
    """Compare chosen tokens (one per row of reference_logits) with the reference."""
    ref = np.asarray(reference_logits, dtype=np.float64)
    chosen = np.asarray(chosen, dtype=np.int64)
    assert ref.shape[0] == chosen.shape[0], (ref.shape, chosen.shape)
    picked = ref[np.arange(len(chosen)), chosen]
    gaps = ref.max(axis=-1) - picked
    return ChoiceCheck(len(chosen), int(np.sum(ref.argmax(-1) == chosen)), float(gaps.max(initial=0.0)))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Per row: the lead of the best logit over the second best."""
    part = np.sort(np.asarray(logits, dtype=np.float64), axis=-1)
    return part[..., -1] - part[..., -2]
