"""`smolq imatrix`: llama.cpp's importance matrix of an HF checkpoint, one block at a time.

    calibration text -> tokens, cut into chunks as llama-imatrix cuts them
    -> block 0's inputs (gptq.py's capture: only the embedding is loaded)
    -> per block: forward hooks add up every Linear's squared inputs per
       column (and count the tokens), the block's outputs become the next
       block's inputs -> [--process-output: the final norm, then lm_head's]
    -> formats/imatrix.py writes llama.cpp's GGUF (or legacy .dat) file.

What llama-imatrix counts (tools/imatrix/imatrix.cpp): the text is tokenized
once with the tokenizer's special tokens (BOS when it adds one); chunk i is
tokens [i*ctx, (i+1)*ctx) with its first token replaced by BOS when the
model adds BOS; every token of every chunk feeds every matrix multiplication
(not only the second half, which is what its perplexity scores); output.weight
only with --process-output. Entries are named by GGUF tensor names; q/k/v
(and gate/up) see the same input, so they get the same vector.

Memory is one block plus the activations (gptq.py's streaming). After each
block its sums and the next block's inputs are saved in a work directory
beside the output (every SAVE_EVERY_S seconds at most: the inputs are as big
as the calibration activations), so Ctrl-C loses at most that much work and
--resume goes on from there; the output is written (atomically) only at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from smolq.arch import arch_for_config
from smolq.atomic import atomic_output
from smolq.errors import InputError
from smolq.formats.imatrix import FORMATS, from_sums, write_imatrix
from smolq.lazy import lazy_module
from smolq.pipeline.fast_forward import use_fast_paths
from smolq.pipeline.gptq import (
    FAMILIES,
    _StopForward,
    _blocks,
    _capture_block_inputs,
    _linears,
    _load_model,
    _run_block,
    _Weights,
    _block_kinds,
)
from smolq.sources.checkpoint import open_checkpoint
from smolq.transforms.calib import Calibration

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

# The module that normalises the last block's output before lm_head (--process-output).
FINAL_NORM = {"llama": "model.norm", "gptj": "transformer.ln_f", "mpt": "transformer.norm_f", "gemma3": "model.norm"}
# Chunks run together up to this many tokens (llama.cpp's default micro-batch, -ub 512). Bigger
# batches were measured slower on one thread (1.1B, 4 chunks: 61 s at 2048, 56 s at 512): an
# MLP activation of 2048 tokens is past glibc's mmap threshold, so each one is a fresh mapping
# whose page faults cost more system time than the wider matrix products save.
BATCH_TOKENS = 512
# Only the first chunks*ctx tokens of a long calibration text are used: a prefix of about this
# many characters per token is tokenized (twice, to check the cut; see leading_tokens) instead
# of the whole text (0.4 s for 600 KB), with this many tokens to spare before the cut.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_MARGIN = 256
# Finished blocks are saved for --resume at most this often (and after the last one): saving
# costs a write of every block input, so a Ctrl-C loses up to this much work, never more.
SAVE_EVERY_S = 60.0


@dataclass(frozen=True)
class Settings:
    """What decides the result: a saved block is reused only under the same settings."""

    src: str
    calib_sha256: str
    ctx: int
    chunks: int
    process_output: bool

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


# --- tokens and chunks -------------------------------------------------------------------

def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "calibration file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory; --calib takes a text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read calibration text: {exc}") from None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (llama.cpp's add_bos_token)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def leading_tokens(tokenizer, text: str, need: int | None) -> tuple[list[int], bool]:
    """The text's token ids (special tokens added), or the first ones when `need` are enough:
    (ids, whether they are the whole text's).

    llama-imatrix tokenizes the whole text, and so does this when the chunks take all of it.
    A few chunks of a long text need its beginning only: two prefixes cut at line ends, the
    second a quarter longer, are tokenized, and their ids are taken when both have `need` +
    PREFIX_MARGIN ids and agree on them (a token near a cut may differ from the whole text's,
    one far before it does not). Anything else falls back to the whole text."""
    def encode(part: str) -> list[int]:
        return tokenizer(part, add_special_tokens=True, verbose=False)["input_ids"]

    if need is not None:
        first = text.find("\n", need * PREFIX_CHARS_PER_TOKEN)
        second = text.find("\n", first + need * PREFIX_CHARS_PER_TOKEN // 4) if first >= 0 else -1
        if second >= 0:
            keep = need + PREFIX_MARGIN
            a, b = encode(text[:first + 1]), encode(text[:second + 1])
            if len(a) >= keep and a[:keep] == b[:keep]:
                return a[:keep], False
    return encode(text), True


def chunk_tokens(ids: list[int], ctx: int, chunks: int, bos: int | None, path: Path) -> list[list[int]]:
    """llama-imatrix's chunks: ctx tokens each, the first one BOS when the model adds BOS."""
    if ctx < 2:
        raise InputError(None, f"--ctx must be at least 2, not {ctx}")
    if len(ids) < 2 * ctx:
        raise InputError(path, f"tokenizes to {len(ids)} tokens; a context of {ctx} needs at least {2 * ctx} "
                               f"(llama-imatrix's rule): give more text or a smaller --ctx")
    n = len(ids) // ctx
    if chunks > 0:
        n = min(n, chunks)
    out = []
    for i in range(n):
        chunk = list(ids[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def calibration_chunks(tokenizer, path: Path, text: str, ctx: int, chunks: int) -> Calibration:
    """The chunks as batches of whole chunks (no padding), at most BATCH_TOKENS tokens a batch."""
    import torch

    ids, whole = leading_tokens(tokenizer, text, ctx * chunks if chunks > 0 else None)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    rows = chunk_tokens(ids, ctx, chunks, bos, path)
    per_batch = max(1, BATCH_TOKENS // ctx)
    samples = [torch.tensor(rows[i:i + per_batch], dtype=torch.long) for i in range(0, len(rows), per_batch)]
    source = f"{len(ids)} tokens" if whole else f"the first {len(ids)} tokens of the text"
    notes = [f"{len(rows)} chunks of {ctx} tokens from {source}" + (", BOS first" if bos is not None else "")]
    return Calibration(samples, f"file:{path}", ctx, notes)


# --- the sums ----------------------------------------------------------------------------

class SquareSums:
    """Per Linear: the sum over tokens of each input column's square, and the token count.

    Linears fed the same tensor (q/k/v, gate/up) share one computation."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple[Any, Any] | None = None  # (input tensor, its column sums)

    def add(self, name: str, x) -> None:
        import torch

        if self._last is not None and self._last[0] is x:
            col = self._last[1]
        else:
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            col = flat.square().sum(dim=0).to(torch.float64)  # per batch in fp32, across batches in fp64
            self._last = (x, col)
        tokens = x.numel() // x.shape[-1]
        if name in self.sums:
            self.sums[name] += col
        else:
            self.sums[name] = col.clone()
        self.counts[name] = self.counts.get(name, 0) + tokens

    def release(self) -> None:
        self._last = None

    def as_numpy(self) -> dict[str, np.ndarray]:
        return {n: v.cpu().numpy().astype(np.float32) for n, v in self.sums.items()}


def _hook_linears(module, names: dict[str, str], acc: SquareSums) -> list:
    """Forward pre-hooks on module's Linears (module-relative name -> entry name)."""
    handles = []
    for rel, entry in names.items():
        def hook(_m, args, entry=entry):
            acc.add(entry, args[0])

        handles.append(module.get_submodule(rel).register_forward_pre_hook(hook))
    return handles


def _block_entries(family: str, index: int, gguf_of: dict[str, str]) -> dict[str, str]:
    prefix = f"{FAMILIES[family].blocks}.{index}"
    out = {}
    for lin in _linears(family):
        gguf = gguf_of.get(f"{prefix}.{lin}.weight")
        if gguf is not None:
            out[lin] = gguf
    return out


# --- the work directory (Ctrl-C and --resume) --------------------------------------------

class WorkDir:
    """`.OUT.imatrix-work/` beside the output: settings, per-block sums, the latest block outputs."""

    def __init__(self, out: Path, settings: Settings, resume: bool):
        self.path = out.parent / f".{out.name}.imatrix-work"
        stamp = self.path / "settings.json"
        fp = settings.fingerprint()
        if self.path.exists():
            same = stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp
            if resume and not same:
                raise InputError(self.path, "--resume: the saved blocks were made with other settings, "
                                            "another model or another text")
            if not resume:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"fingerprint": fp, "settings": settings.__dict__}, indent=2))

    def done_blocks(self) -> int:
        """Blocks whose sums and outputs are both saved (0: start from the beginning)."""
        state = self.path / "state.json"
        if not state.is_file():
            return 0
        return int(json.loads(state.read_text())["done"])

    def save(self, done: int, sums: SquareSums, acts) -> None:
        """After block `done - 1`: all sums so far and block `done`'s inputs (written one
        sample at a time, so memory stays bounded), then the marker that makes them count."""
        import torch

        arrays = {f"sum:{n}": v for n, v in sums.as_numpy().items()}
        arrays.update({f"count:{n}": np.array([c], dtype=np.int64) for n, c in sums.counts.items()})
        with atomic_output(self.path / "sums.npz") as fh:
            np.savez(fh, **arrays)
        shapes = []
        with atomic_output(self.path / "hidden.f32") as fh:
            for j in range(len(acts)):
                h = acts.hidden(j).detach().to(torch.float32).contiguous()
                shapes.append(list(h.shape))
                fh.write(memoryview(h.numpy()).cast("B"))
        with atomic_output(self.path / "state.json") as fh:
            fh.write(json.dumps({"done": done, "shapes": shapes}).encode())

    def load(self, sums: SquareSums, acts) -> None:
        """Sums so far into `sums`; the saved inputs into `acts`, one sample at a time."""
        import torch

        with np.load(self.path / "sums.npz") as z:
            for key in z.files:
                kind, name = key.split(":", 1)
                if kind == "sum":
                    sums.sums[name] = torch.from_numpy(z[key].astype(np.float64))
                else:
                    sums.counts[name] = int(z[key][0])
        shapes = json.loads((self.path / "state.json").read_text())["shapes"]
        if len(shapes) != len(acts):
            raise InputError(self.path, "--resume: the saved activations do not fit this run; start afresh")
        with open(self.path / "hidden.f32", "rb") as fh:
            for j, shape in enumerate(shapes):
                data = np.fromfile(fh, dtype=np.float32, count=int(np.prod(shape))).reshape(shape)
                acts.replace(j, torch.from_numpy(data))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --- the public entry --------------------------------------------------------------------

def compute_imatrix(src: str | os.PathLike, out: str | os.PathLike, calib: str | os.PathLike, *, ctx: int = 512,
                    chunks: int = -1, process_output: bool = False, format: str | None = None,
                    threads: int = 0, resume: bool = False, quiet: bool = True,
                    on_progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """The importance matrix of the HF checkpoint `src` on the text `calib`, written to `out`.

    ctx: tokens per chunk; chunks: how many (-1: all the text gives); format
    "gguf" or "dat" (None: from the suffix, .dat -> legacy). Returns a summary."""
    started = time.perf_counter()
    src, out, calib_path = Path(src), Path(out), Path(calib)
    fmt = (format or ("dat" if out.suffix.lower() == ".dat" else "gguf")).lower()
    if fmt not in FORMATS:
        raise InputError(out, f"unknown imatrix format {format!r}; choose gguf or dat")
    _check_paths(src, out)
    text = read_text(calib_path)
    if threads and threads > 0:
        import torch

        torch.set_num_threads(threads)
    if quiet:
        _quiet_transformers()
    model, tokenizer, family = _load_model(src)
    use_fast_paths(model)  # attention without its masked half, MLPs in place: the same sums, sooner
    cal = calibration_chunks(tokenizer, calib_path, text, ctx, chunks)
    settings = Settings(str(src.resolve()), hashlib.sha256(text.encode("utf-8")).hexdigest(), ctx, chunks,
                        process_output)
    with open_checkpoint(src) as ckpt:
        gguf_of = _gguf_names(ckpt)
        weights = _Weights(ckpt, model, reuse_buffers=True)
        work = WorkDir(out, settings, resume)
        try:
            sums = _collect(model, family, cal, weights, work, gguf_of, process_output, quiet, on_progress)
        except KeyboardInterrupt:
            _say_how_to_resume(work)
            raise
    n_chunks = sum(int(s.shape[0]) for s in cal.samples)
    im = from_sums(sums.as_numpy(), sums.counts, datasets=[str(calib)], chunk_count=n_chunks, chunk_size=ctx)
    size = write_imatrix(out, im, fmt)
    work.remove()
    return {"source": str(src), "output": str(out), "format": fmt, "family": family, "calibration": str(calib),
            "ctx": ctx, "chunks": n_chunks, "tokens": n_chunks * ctx, "n_entries": len(im.entries),
            "process_output": process_output, "bytes": size, "notes": cal.notes,
            "seconds": round(time.perf_counter() - started, 3)}


def _check_paths(src: Path, out: Path) -> None:
    if not src.exists():
        raise InputError(src, "no such file or directory")
    if not src.is_dir():
        raise InputError(src, "smolq imatrix runs a Hugging Face checkpoint directory (config.json, weights); "
                              "convert a GGUF back with `smolq convert FILE DIR --format hf`")
    if out.is_dir():
        raise InputError(out, "output is a directory; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(out, f"cannot write output: directory {parent} does not exist")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _gguf_names(ckpt) -> dict[str, str]:
    """HF weight name -> GGUF tensor name, from the family's own tensor maps."""
    arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
    return {m.source: m.gguf for m in arch.tensor_maps(set(ckpt.tensors)) if m.gguf is not None}


def _say_how_to_resume(work: WorkDir) -> None:
    print(f"smolq: {work.done_blocks()} finished block(s) kept in {work.path}; run the same command with "
          f"--resume to continue", file=sys.stderr)


def _collect(model, family, cal, weights, work: WorkDir, gguf_of, process_output, quiet, on_progress) -> SquareSums:
    blocks = _blocks(model, family)
    kinds = _block_kinds(model, family)  # Gemma 3: sliding and global blocks take different arguments
    acts = _capture_block_inputs(model, family, cal, weights, work.path, quiet)
    sums = SquareSums()
    start = work.done_blocks()
    if start:
        work.load(sums, acts)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    per_block = cal.n_tokens * hidden_size * 4
    n_steps = len(blocks) + int(process_output)
    _event(on_progress, event="start", n_tensors=n_steps, n_bytes=per_block * n_steps)
    try:
        for i in range(start):
            _event(on_progress, event="tensor", name=f"block {i} (saved)", nbytes=per_block)
        saved = time.monotonic()
        for i in range(start, len(blocks)):
            outputs_needed = process_output or i + 1 < len(blocks)
            _one_block(blocks[i], i, family, acts, weights, gguf_of, sums, kinds[i], outputs_needed)
            if time.monotonic() - saved >= SAVE_EVERY_S and i + 1 < len(blocks):
                work.save(i + 1, sums, acts)
                saved = time.monotonic()
            _event(on_progress, event="tensor", name=f"block {i}", nbytes=per_block)
        if process_output:
            _output_sums(model, family, acts, weights, gguf_of, sums)
            _event(on_progress, event="tensor", name="output", nbytes=per_block)
    finally:
        acts.close()
    return sums


def _event(on_progress, **event) -> None:
    if on_progress is not None:
        on_progress(event)


def _one_block(block, index, family, acts, weights, gguf_of, sums: SquareSums, kind=None,
               outputs_needed: bool = True) -> None:
    import torch

    # Inference only: f32 weights stay views of the checkpoint (no copy).
    weights.materialize(block, f"{FAMILIES[family].blocks}.{index}.", read_only=True)
    handles = _hook_linears(block, _block_entries(family, index, gguf_of), sums)
    if not outputs_needed:
        # Nothing reads this block's output (the last one, without --process-output): the forward
        # stops once the input of its last Linear is counted, and that product is never computed.
        handles.append(block.get_submodule(_linears(family)[-1]).register_forward_pre_hook(_stop_forward))
    try:
        _run_block(block, acts, torch.device("cpu"), replace=outputs_needed, kind=kind)
    finally:
        for h in handles:
            h.remove()
        sums.release()
        weights.release(block)


def _stop_forward(_module, _args):
    raise _StopForward


def _output_sums(model, family, acts, weights, gguf_of, sums: SquareSums) -> None:
    """--process-output: lm_head's inputs are the final norm of the last block's outputs.
    A tied model has no output.weight in GGUF, and llama-imatrix then records nothing."""
    import torch

    entry = gguf_of.get("lm_head.weight")
    if entry is None:
        return
    norm = model.get_submodule(FINAL_NORM[family])
    weights.materialize(norm, FINAL_NORM[family] + ".")
    try:
        with torch.no_grad():
            for j in range(len(acts)):
                sums.add(entry, norm(acts.hidden(j)))
                sums.release()
    finally:
        weights.release(norm)
