"""Helpers for tests that load smolq's files with real inference engines.

Every real reader runs in a CHILD process (`run_reader`), never inside the
test process: a native library that crashes (a SIGSEGV in llama.cpp's
decode, an abort() in a GPT4All loader) then fails one test with a
`ReaderError` that names the reader, the file and the signal, and the rest of
the suite still runs. A hang is cut off by a timeout.

The readers, each optional (a test skips, saying why, when its reader is
absent; `make setup` installs them):

- llama-cpp-python (in the test venv, built portably by the Makefile):
  `open_llama` returns a `LlamaCpp` handle whose `tokenize`, `logits` and
  `greedy` each run in a fresh child.
- GPT4All's prebuilt backends, installed with `pip install --no-deps --target`
  into .venv/real/gpt4all-<version> (they need setuptools<70 and must not
  share a directory). `run_gpt4all` drives one: the 1.x binding (legacy
  ggml/ggjt/ggmm loaders) and the 2.x binding (GGUF loaders).

`READERS_USED` counts the child runs per reader (and their crashes);
conftest.py prints it, with the readers that were not available and why, at
the end of `make test`.

And the yardstick: transformers (`hf_greedy`, and smolq.sources.reference's
`hf_logits`), plus `check_choices`, which compares the tokens an engine chose
with a reference's logits while tolerating only genuine near-ties.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GPT4ALL_TIMEOUT_S = 180  # a tiny model loads and generates in about a second
LLAMA_CPP_TIMEOUT_S = 180


# --------------------------------------------------------------------------- the child-process harness

READERS_USED: Counter = Counter()  # reader name -> child runs in this test session
READER_CRASHES: Counter = Counter()  # reader name -> runs that died by a signal


class ReaderError(AssertionError):
    """A real reader failed in its child process: killed by a signal, non-zero
    exit, no result, or past its timeout. `signal` is the signal's name when it
    died by one (e.g. "SIGSEGV"); `log` has the child's output."""

    def __init__(self, reader: str, model: str, problem: str, log: str = "", signal_name: str | None = None):
        super().__init__(f"{reader} on {model}: {problem}\n--- {reader} output ---\n{log[-4000:]}")
        self.reader, self.model, self.problem, self.log, self.signal = reader, model, problem, log, signal_name


class ReaderRefused(ReaderError):
    """The reader ran fine but refused the file (its own error, in `log`)."""


def _signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_reader(reader: str, child_code: str, request: dict, *, model: str | os.PathLike = "-",
               env: dict[str, str] | None = None, timeout: float = LLAMA_CPP_TIMEOUT_S,
               python: str | os.PathLike | None = None) -> dict:
    """Run `child_code` (a Python program) in a fresh interpreter (`python`, by
    default this one; a peer's own venv for the GPTQ loaders) as
    `python -c child_code request.json result.json out_dir` and return the
    JSON object it wrote to result.json (with "_dir": a directory holding any
    other files it wrote there, valid until the next call's clean-up: read
    them before returning). Raises ReaderError when the child dies by a
    signal, exits non-zero, writes no result or runs past `timeout`.
    `reader` and `model` only name what ran in the messages."""
    READERS_USED[reader] += 1
    with tempfile.TemporaryDirectory(prefix="smolq-reader-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        try:
            proc = subprocess.run([str(python or sys.executable), "-c", child_code, str(req), str(res), tmp],
                                  env={**os.environ, **(env or {})}, cwd=tmp, capture_output=True, text=True,
                                  errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            log = (exc.stdout or "") + (exc.stderr or "") if isinstance(exc.stdout, str) else ""
            raise ReaderError(reader, str(model), f"ran past {timeout} s", log) from None
        log = proc.stdout + proc.stderr
        sig = _signal_name(proc.returncode)
        if sig is not None:
            READER_CRASHES[reader] += 1
            raise ReaderError(reader, str(model), f"crashed: killed by {sig}", log, sig)
        if proc.returncode != 0 or not res.exists():
            raise ReaderError(reader, str(model), f"exited with {proc.returncode} and no result", log)
        result = json.loads(res.read_text())
        result["_log"] = log
        return _load_arrays(result, Path(tmp))


def _load_arrays(result: dict, tmp: Path) -> dict:
    """Replace {"npy": name} entries (arrays the child saved) by the arrays."""
    def load(obj):
        if isinstance(obj, dict) and set(obj) == {"npy"}:
            return np.load(tmp / obj["npy"])
        if isinstance(obj, dict):
            return {k: load(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [load(v) for v in obj]
        return obj
    return load(result)


def reader_inventory() -> list[tuple[str, str | None]]:
    """(reader, None if available else why not) for every real reader the tests use."""
    out = []
    if importlib.util.find_spec("llama_cpp") is None:
        out.append(("llama-cpp-python", "not installed (make setup builds llama-cpp-python==0.3.36)"))
    else:
        out.append((f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}", None))
    for version in ("1.0.8", "2.5.1"):
        why = None if gpt4all_dir(version) else f"not installed in .venv/real/gpt4all-{version}"
        out.append((f"gpt4all {version}", why))
    why = None if llama_tool("llama-quantize") else "not built (make setup: scripts/build_llama_tools.py)"
    out.append(("llama.cpp tools (llama-quantize, llama-imatrix, llama-perplexity)", why))
    for name, what in PEER_VENVS.items():
        out.append((what, None if peer_python(name) else f"not installed in .venv/peers/{name} (make test-peers)"))
    # Not run through run_reader: bitsandbytes loads in the test process, tvm in tests/test_mlc.py's own children.
    for module, dist in (("bitsandbytes", "bitsandbytes"), ("tvm", "apache-tvm")):
        if importlib.util.find_spec(module) is None:
            out.append((dist, "not installed (make setup installs it)"))
        else:
            out.append((f"{dist} {importlib.metadata.version(dist)}", None))
    return out


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


def llama_tool(name: str) -> Path | None:
    """llama.cpp's own `name` (llama-quantize, llama-imatrix, llama-perplexity), or None.

    Built portably by scripts/build_llama_tools.py into .venv/real/llama.cpp-tools/bin;
    $SMOLQ_LLAMA_TOOLS (a bin directory) overrides. Run them with subprocess (they are
    separate programs, so a crash is already one failing test).
    """
    env = os.environ.get("SMOLQ_LLAMA_TOOLS")
    candidates = [Path(env)] if env else [Path(sys.prefix) / "real" / "llama.cpp-tools" / "bin",
                                          REPO / ".venv" / "real" / "llama.cpp-tools" / "bin"]
    for directory in candidates:
        if (directory / name).is_file() and os.access(directory / name, os.X_OK):
            return directory / name
    return None


def require_llama_tool(name: str) -> Path:
    path = llama_tool(name)
    if path is None:
        pytest.skip(f"llama.cpp's {name} is not built (make setup runs scripts/build_llama_tools.py "
                    f"into .venv/real/llama.cpp-tools)")
    return path


# The GPTQ loaders each live in a venv of their own under .venv/peers/<name> (`make test-peers`
# builds them; see the Makefile for why they stay out of the test venv): name -> what is in it.
PEER_VENVS = {
    "gptqmodel": "GPTQModel 7.6.0 + optimum 2.3.0 on CPU torch 2.13.0",
    "autogptq": "AutoGPTQ 0.7.1 (no CUDA extension) + transformers 4.38.2 on CPU torch 2.13.0",
}


def peer_python(name: str) -> Path | None:
    """The interpreter of the peer venv `name` (a key of PEER_VENVS), or None when it is not built.

    Looked for beside the running interpreter's venv (sys.prefix/peers/<name>), then in the
    repository's .venv; SMOLQ_PEER_<NAME> (a venv directory) overrides both. A venv counts once
    `make test-peers` finished it (its .installed marker), never half installed.
    """
    env = os.environ.get(f"SMOLQ_PEER_{name.upper()}")
    candidates = [Path(env)] if env else [Path(sys.prefix) / "peers" / name, REPO / ".venv" / "peers" / name]
    for venv in candidates:
        if (venv / ".installed").is_file() and (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    return None


def require_peer(name: str) -> Path:
    path = peer_python(name)
    if path is None:
        pytest.skip(f"{PEER_VENVS[name]} is not installed in .venv/peers/{name} (make test-peers builds it; "
                    f"the README says why it is not part of make test)")
    return path


def require_gpt4all(version: str) -> Path:
    path = gpt4all_dir(version)
    if path is None:
        pytest.skip(f"gpt4all=={version} is not installed in .venv/real/gpt4all-{version} "
                    f"(make setup: pip install --no-deps --target .venv/real/gpt4all-{version} "
                    f"gpt4all=={version} 'setuptools<70')")
    return path


def require_llama_cpp() -> None:
    """Skip unless llama-cpp-python is installed. It is only ever imported in a
    child process (run_reader): its shared library loads there."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed; make setup builds llama-cpp-python==0.3.36")


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
    and ReaderError if the child crashes or runs past `timeout` seconds.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    request = {"model": str(model_path), "prompts": prompt_list, "n_predict": n_predict,
               "n_ctx": n_ctx, "threads": threads, "n_batch": n_batch}
    data = run_reader(f"gpt4all {gpt4all_path.name.removeprefix('gpt4all-')}", _GPT4ALL_CHILD, request,
                      model=model_path, timeout=timeout,
                      env={"PYTHONPATH": str(gpt4all_path), "OMP_NUM_THREADS": str(threads)})
    if not data["loaded"]:
        raise GPT4AllLoadError(f"gpt4all ({gpt4all_path.name}) refused to load {model_path}", data["_log"])
    return [Generation(r["prompt"], r["prompt_tokens"], r["tokens"]) for r in data["results"]]


# --------------------------------------------------------------------------- llama.cpp, in a child process

# Runs inside the child. The request names the model, the context options and
# a list of operations; each answer goes into "results" (logits as .npy files).
_LLAMA_CPP_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
req = json.load(open(sys.argv[1]))
out_dir = sys.argv[3]
kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if req["f32_kv"] else {}
n_ctx, threads = req["n_ctx"], req["threads"]
try:
    llm = llama_cpp.Llama(req["model"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False, **kv)
except ValueError as exc:  # llama.cpp refused the file ("Failed to load model from file")
    json.dump({"loaded": False, "error": str(exc)}, open(sys.argv[2], "w"))
    sys.exit(0)
results = []
for i, op in enumerate(req["ops"]):
    if op["op"] == "tokenize":
        results.append(llm.tokenize(op["text"].encode("utf-8", "surrogateescape"), add_bos=op["add_bos"],
                                    special=op["special"]))
    elif op["op"] == "logits":
        names = []
        for j, seq in enumerate(op["sequences"]):
            llm.reset()
            llm.eval([int(t) for t in seq])
            name = f"logits-{i}-{j}.npy"
            np.save(f"{out_dir}/{name}", np.array(llm.scores[: len(seq)], dtype=np.float32))
            names.append({"npy": name})
        results.append(names)
    elif op["op"] == "greedy":
        llm.reset()
        toks = []
        for t in llm.generate([int(t) for t in op["prompt"]], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            if len(toks) == op["n"]:
                break
        results.append(toks)
    elif op["op"] == "system_info":
        results.append(llama_cpp.llama_print_system_info().decode())
json.dump({"loaded": True, "results": results}, open(sys.argv[2], "w"))
"""


@dataclass
class LlamaCpp:
    """llama.cpp (llama-cpp-python) on one model file. Each call loads the file
    in a fresh child process, runs there, and returns plain data."""

    path: str
    n_ctx: int = 64
    threads: int = 1
    f32_kv: bool = True  # llama.cpp's default F16 KV cache alone moves f32 logits by ~3e-3

    def run(self, ops: list[dict]) -> list:
        request = {"model": self.path, "n_ctx": self.n_ctx, "threads": self.threads, "f32_kv": self.f32_kv,
                   "ops": ops}
        data = run_reader("llama-cpp-python", _LLAMA_CPP_CHILD, request, model=self.path,
                          env={"OMP_NUM_THREADS": str(self.threads)})
        if not data["loaded"]:
            raise ReaderRefused("llama-cpp-python", self.path, f"refused the file: {data['error']}", data["_log"])
        return data["results"]

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        text = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else text
        return self.run([{"op": "tokenize", "text": text, "add_bos": add_bos, "special": special}])[0]

    def logits(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """llama.cpp's logits [len(seq), n_vocab] for each sequence, each from an empty context."""
        return self.run([{"op": "logits", "sequences": [[int(t) for t in s] for s in sequences]}])[0]

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """`n` tokens chosen by llama.cpp's own sampler at temperature 0 (greedy)."""
        return self.run([{"op": "greedy", "prompt": [int(t) for t in prompt], "n": n}])[0]


def open_llama(model_path: str | os.PathLike, *, n_ctx: int = 64, threads: int = 1, f32_kv: bool = True) -> LlamaCpp:
    """A LlamaCpp handle with logits at every position; skips when llama-cpp-python is absent."""
    require_llama_cpp()
    return LlamaCpp(str(model_path), n_ctx, threads, f32_kv)


def probe_sequences(llm: LlamaCpp, n_vocab: int, length: int = 24) -> np.ndarray:
    """Three token sequences to compare engines on: one of real text through llama.cpp's own
    tokenizer (positions that look like text), two of ids spread over the whole vocabulary
    (every embedding/output row is fair game)."""
    text = llm.tokenize("The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5", add_bos=True)
    rng = np.random.default_rng(7)
    rows = [np.resize(np.asarray(text), length)] + [rng.integers(0, n_vocab, length) for _ in range(2)]
    return np.stack(rows).astype(np.int64)


def llama_cpp_logits(llm: LlamaCpp, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return llm.logits(sequences)


def llama_cpp_greedy(llm: LlamaCpp, prompt: Sequence[int], n: int) -> list[int]:
    return llm.greedy(prompt, n)


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
