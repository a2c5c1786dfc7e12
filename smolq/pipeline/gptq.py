"""GPTQ over a whole HF model, one transformer block at a time (gptq.md 1.9).

    calibration tokens -> inputs of block 0 (captured by a hook that stops the model)
    for each block: hooks collect each Linear's Hessian -> solve -> the block's
    Linear weights become the dequantized result -> the quantized block's
    outputs are the next block's inputs.

Memory is one block plus activations, never the model: the model is a
skeleton whose parameters live on the meta device; the embedding (for block
0's inputs) and then each block in turn get their tensors from the checkpoint
(mmap, safetensors or .bin, shards) and go back to meta when done. Block
inputs (nsamples x seqlen x hidden x 4 bytes, logged) move to a scratch file
in the work directory when large. Data-free calibration is the exception: it
samples from the whole unquantized model, so it is capped (DATA_FREE_MAX_BYTES).

With true-sequential the Linears of a block are solved in groups, re-running
the block between groups so later groups see the quantized earlier ones.
Every finished block is saved (its grids' integer results) under a work
directory beside the output; `resume=True` replays saved blocks instead of
solving them again. The output is written only after the last block:
- format "gptq": an HF GPTQ directory (formats/gptq_ckpt.py), v1 zeros;
- GGUF / legacy: the convert pipeline's tensors, with every planned block-type
  Linear replaced by its GPTQ-on-ggml-grid blocks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolq.arch import arch_for_config
from smolq.atomic import atomic_directory, atomic_output
from smolq import kernels
from smolq.errors import InputError
from smolq.fileio import phase
from smolq.threads import set_threads
from smolq.formats import gptq_ckpt, safetensors_file
from smolq.formats.base import TensorEntry
from smolq.formats.gptq_ckpt import GPTQLayer
from smolq.ggml_types import GGMLType
from smolq.pipeline.fast_forward import (attention_mix, capture_attention, drop_bf16_products, forget_bf16_weight,
                                         use_bf16_products, use_fast_paths, uses_fast_attention)
from smolq.lazy import lazy_module
from smolq.pipeline import convert as cp
from smolq.pipeline.allocate import allocation_metadata
from smolq.pipeline.convert import build_steps
from smolq.plan.budget import recipe_json
from smolq.plan.mix import BITS_PRESETS, is_quantizable
from smolq.plan.targets import resolve_target
from smolq.progress import note
from smolq.sinks import gguf as gguf_sink
from smolq.sinks import legacy as legacy_sink
from smolq.sinks.gguf import gguf_metadata
from smolq.sources.checkpoint import open_checkpoint
from smolq.sources.gptq import looks_like_gptq
from smolq.sources.vocab import load_vocab
from smolq.transforms.calib import FIT, HELD, load_calibration
from smolq.transforms.gptq import (HESSIAN_REG_DEFAULT, HessianAccumulator, choose_regularisation,
                                   default_hessian_reg, default_refit, gptq_solve, parse_hessian_reg,
                                   refit_scales, regularise)
from smolq.transforms.grids import BLOCK_SPECS, SCALE_RULES
from smolq.transforms.iq_grids import GPTQ_GRID_TYPES, JOINT_GRID_TYPES, grid_for

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

log = logging.getLogger("smolq.gptq")
T = GGMLType


@dataclass(frozen=True)
class FamilyLayout:
    blocks: str  # attribute path of the block list
    groups: tuple[tuple[str, ...], ...]  # true-sequential groups of Linear names inside a block
    # The config attribute naming each block's kind where blocks of different kinds get different
    # call arguments (Gemma 3's layer_types: sliding-window layers get the local RoPE table and a
    # windowed mask, global ones the global table and the causal mask); None: all blocks alike.
    kinds: str | None = None
    # Sub-modules whose output is their last Linear applied to that Linear's input (attention:
    # o_proj of the heads' output; the MLP: down_proj of the gated product): (module, last Linear).
    # Once that input is seen with every earlier Linear of the module quantized, later forwards
    # of the block take the module's output from it instead of running the module again.
    stages: tuple[tuple[str, str], ...] = ()
    # The attention's value Linear, for its attention-aware Hessian (--attention-aware): its
    # output reaches the block only mixed by the attention probabilities. None: not available.
    value: str | None = None


# AutoGPTQ's per-architecture lists (gptq.md 1.9).
FAMILIES = {
    "llama": FamilyLayout("model.layers", (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
        stages=(("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")), value="self_attn.v_proj"),
    "gptj": FamilyLayout("transformer.h", (
        ("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
        stages=(("attn", "attn.out_proj"), ("mlp", "mlp.fc_out"))),
    "mpt": FamilyLayout("transformer.blocks", (
        ("attn.Wqkv",), ("attn.out_proj",), ("ffn.up_proj",), ("ffn.down_proj",)),
        stages=(("attn", "attn.out_proj"), ("ffn", "ffn.down_proj"))),
    "gemma3": FamilyLayout("model.layers", (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)), kinds="layer_types",
        stages=(("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")), value="self_attn.v_proj"),
}
# model_type -> layout; Mistral, Qwen2 and Qwen3 blocks have LLaMA's Linears under the same names.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gptj": "gptj", "mpt": "mpt",
               "gemma3_text": "gemma3"}


@dataclass
class Settings:
    format: str
    qtype: str | None
    bits: int
    group_size: int
    act_order: bool
    sym: bool
    true_sequential: bool
    damp: float
    calib: str | None
    nsamples: int
    seqlen: int
    seed: int
    static_groups: bool = False
    scale_rule: str = "weighted"
    mse: float = 0.0
    hessian_reg: str | float = 0.0  # "auto" (cross-validated per Linear) or a fixed amount
    forward_dtype: str = "float32"  # the calibration forwards' Linear products (forward_dtype())
    attention_aware: bool = False  # the value Linear's Hessian through the attention probabilities
    recipe: str | None = None  # the per-tensor types of --target-*/--recipe (compact JSON), else None
    refit_scales: bool = False  # scale re-fitting after rounding (transforms/gptq.refit_scales)

    def fingerprint(self, src: Path) -> str:
        d = dict(self.__dict__, src=str(src.resolve()))
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class _StopForward(Exception):
    pass


# ---------------------------------------------------------------------------
# the public entry
# ---------------------------------------------------------------------------


def quantize_hf_gptq(src_dir, out_path, *, format: str = "gptq", qtype: str | None = None, bits: int = 4,
                     group_size: int = 128, act_order: bool = False, sym: bool = True, true_sequential: bool = True,
                     damp: float = 0.01, calib=None, nsamples: int | None = None, seqlen: int | None = None,
                     device: str = "cpu",
                     seed: int = 0, resume: bool = False, quiet: bool = False, static_groups: bool = False,
                     scale_rule: str = "weighted", mse: float = 0.0, hessian_reg=HESSIAN_REG_DEFAULT,
                     attention_aware: bool | None = None, recipe=None,
                     refit_scales: bool | None = None) -> dict[str, Any]:
    """GPTQ-quantize the HF checkpoint `src_dir` into `out_path`; returns a summary.

    format "gptq": HF GPTQ directory with `bits` 2/3/4/8 and `group_size`.
    Otherwise a GGUF / legacy format name (as `smolq convert --format`):
    `qtype` is a type or llama.cpp mix ("q4_k_m"); without it `bits` picks
    the default mix for that width. Linears whose planned type is a ggml
    block type are GPTQ-rounded onto that type's grid. `nsamples` / `seqlen`
    None: chosen from the calibration text's length (transforms/calib.py).
    `hessian_reg`: "auto" chooses each Linear's Hessian regularisation toward its
    diagonal by cross-validation on a held-out part of the calibration set; a
    number in [0, 1] fixes it (0: plain GPTQ); HESSIAN_REG_DEFAULT: 0.75 onto ggml grids, 0 for
    format "gptq". `attention_aware`: the value Linear's Hessian through the attention
    probabilities (LLaMA-like blocks); None: on for ggml grids, off for format "gptq".
    `recipe`: ({GGUF tensor name: type}, its file) sets every tensor's type instead of `qtype`'s mix
    (a GGUF output; the Linears are GPTQ-rounded onto the types it names).
    """
    import torch

    started = time.perf_counter()
    src, out = Path(src_dir), Path(out_path)
    fmt = (format or "gptq").lower()
    if fmt != "gptq" and qtype is None:

        if bits not in BITS_PRESETS:
            raise InputError(out, f"--bits {bits} has no ggml preset; choose one of {sorted(BITS_PRESETS)}")
        qtype = BITS_PRESETS[bits]
    if fmt == "gptq" and bits not in (2, 3, 4, 8):
        raise InputError(out, f"GPTQ checkpoints hold 2, 3, 4 or 8 bits, not {bits}")
    if group_size != -1 and group_size < 1:
        raise InputError(out, f"--group-size must be -1 or positive, not {group_size}")

    if scale_rule not in SCALE_RULES:
        raise InputError(out, f"unknown --scale-rule {scale_rule!r}; choose one of {', '.join(SCALE_RULES)}")
    if mse < 0:
        raise InputError(out, f"--mse must be 0 (off) or a positive exponent, not {mse}")
    try:
        hessian_reg = parse_hessian_reg(default_hessian_reg(hessian_reg, fmt == "gptq"))
    except ValueError:
        raise InputError(out, f"--hessian-reg must be auto or a number in [0, 1], not {hessian_reg}") from None

    if looks_like_gptq(src):
        raise InputError(src, "is already GPTQ-quantized; `smolq convert` imports it (GGUF, exact where the grid maps)")
    dev = _device(device)
    settings = Settings(fmt, qtype, bits, group_size, act_order, sym, true_sequential, damp,
                        None if calib is None else str(Path(calib).resolve()), nsamples, seqlen, seed,
                        static_groups, scale_rule, mse, hessian_reg, forward_dtype(dev),
                        fmt != "gptq" if attention_aware is None else bool(attention_aware),
                        None if recipe is None else recipe_json(recipe[0]),
                        default_refit(fmt == "gptq") if refit_scales is None else bool(refit_scales))

    torch.manual_seed(seed)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    model, tokenizer, family = _load_model(src)
    use_fast_paths(model)  # attention without its masked half, MLPs in place
    if settings.attention_aware and not (FAMILIES[family].value and uses_fast_attention(model)):
        settings.attention_aware = False  # the family's attention does not go through fast_forward
        note(f"--attention-aware: not available for {family} blocks; the value Linears' Hessians are their "
             f"inputs'", quiet=quiet)
    plan = _plan_types(src, out, fmt, qtype, model, family, recipe)
    _check_scale_rule(scale_rule, plan, out)
    _check_static_groups(static_groups, plan, out)
    with open_checkpoint(src) as ckpt:
        weights = _Weights(ckpt, model)
        cal = _calibration(model, tokenizer, weights, calib, nsamples, seqlen, seed, quiet)
        if not quiet:
            note(_plan_line(model, family, cal, plan, dev, settings))
        work = _work_dir(out, settings, src, resume)
        try:
            stats = _quantize_blocks(model, family, cal, plan, settings, dev, work, quiet, weights)
        except KeyboardInterrupt:
            _say_how_to_resume(work)
            raise

    with phase("gptq write output"):
        if fmt == "gptq":
            size = _write_gptq_dir(model, family, src, out, work, settings)
        else:
            size = _write_ggml_file(src, out, fmt, qtype, model, family, work, recipe)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "source": str(src), "output": str(out), "format": fmt, "method": "gptq", "family": family,
        "qtype": qtype, "bits": bits if fmt == "gptq" else None, "group_size": group_size if fmt == "gptq" else None,
        "act_order": act_order, "sym": sym, "true_sequential": true_sequential, "damp": damp,
        "calibration": cal.source, "n_samples": len(cal.samples), "n_tokens": cal.n_tokens,
        "seqlen": cal.seqlen, "notes": cal.notes + stats["notes"], "n_layers_quantized": stats["n_linears"],
        "damp_raised": stats["damp_raised"], "hessian_reg": stats["hessian_reg"], "bytes": size,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(dev), "forward_dtype": settings.forward_dtype, "attention_aware": settings.attention_aware,
        "refit_scales": settings.refit_scales,
    }


FORWARD_DTYPE_ENV = "SMOLQ_GPTQ_FORWARD"  # float32 / bfloat16: overrides forward_dtype()'s choice


def forward_dtype(dev) -> str:
    """The dtype of the Linear products in the calibration forwards: "bfloat16" on a CPU that
    multiplies it natively (AMX or AVX512-BF16 in /proc/cpuinfo; fast_forward says what it
    costs and gains), else "float32"; SMOLQ_GPTQ_FORWARD=float32|bfloat16 decides instead.
    GPUs keep float32 (the reference's choice, like TF32 off)."""
    asked = os.environ.get(FORWARD_DTYPE_ENV, "").strip().lower()
    if asked in ("float32", "bfloat16"):
        return asked
    if asked:
        raise InputError(None, f"{FORWARD_DTYPE_ENV}={asked!r}: use float32 or bfloat16")
    return "bfloat16" if dev.type == "cpu" and _cpu_multiplies_bf16() else "float32"


def _cpu_multiplies_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _plan_line(model, family, cal, plan, dev, settings: Settings) -> str:
    """What the run will do and about how long it takes, printed before it starts."""
    import torch

    blocks = _blocks(model, family)
    linears = [(f"{FAMILIES[family].blocks}.{i}.{n}", block.get_submodule(n))
               for i, block in enumerate(blocks) for n in _linears(family)]
    linears = [(name, lin) for name, lin in linears if plan.get(f"{name}.weight") != "skip"]
    passes = len(FAMILIES[family].groups) + 1  # one block run per true-sequential group, one to pass outputs on
    seconds = estimate_seconds([tuple(lin.weight.shape) for _, lin in linears], cal.n_tokens,
                               len(cal.samples) * len(blocks) * passes, dev,
                               [plan.get(f"{name}.weight") in BLOCK_SPECS for name, _ in linears])
    return (f"GPTQ plan: {len(cal.samples)} x {cal.seqlen} = {cal.n_tokens} calibration tokens, {len(blocks)} blocks "
            f"({len(linears)} linears), {torch.get_num_threads()} threads on {dev}"
            f"{', bf16 products' if settings.forward_dtype == 'bfloat16' else ''}"
            f"{', attention-aware values' if settings.attention_aware else ''}"
            f", hessian-reg {settings.hessian_reg}; "
            f"estimated {_minutes(seconds)} "
            f"(rough; an ETA follows each block)")


def estimate_seconds(shapes: list[tuple[int, int]], n_tokens: int, block_calls: int, dev,
                     searched: list[bool] | None = None) -> float:
    """A rough time for GPTQ of Linears of `shapes` ([out, in]) on `n_tokens` calibration tokens,
    with `block_calls` calls of a block on one sample in all: the start-up, floating-point work
    (each Linear's product once per token, as the true-sequential groups answer modules already
    quantized from kept inputs; the Hessian's upper bands; Cholesky and inverse; the lazy-batch
    updates) at the rate a short matmul probe measures here, and a fixed cost per column of the
    solve (more where a ggml block grid searches each group's scales: `searched`) and per block
    call for their small ops. Fitted to SmolLM2-135M runs on 2 cores (README, Benchmarks)."""
    rate, op_seconds = _probe_speed(dev)
    flops = 0.0
    for rows, cols in shapes:
        flops += 2.0 * rows * cols * n_tokens  # the Linear's product
        flops += HESSIAN_SHARE * 2.0 * cols * cols * n_tokens  # its Hessian
        flops += 2.0 * cols ** 3 + 2.0 * rows * cols * (cols + 128)  # Cholesky and inverse; updates
    searched = searched or [False] * len(shapes)
    column_ops = sum(cols * (SEARCHED_COLUMN_OPS if s else COLUMN_OPS) for (_, cols), s in zip(shapes, searched))
    return START_UP_SECONDS + flops / rate + (column_ops + block_calls * BLOCK_CALL_OPS) * op_seconds


START_UP_SECONDS = 5.0  # imports of torch and transformers, the model skeleton, the calibration
HESSIAN_SHARE = 0.65  # of a whole xᵀx product: its upper bands (HessianAccumulator)
COLUMN_OPS = 40  # small-op times per column of the solve: the loop, each Linear's set-up and saving
SEARCHED_COLUMN_OPS = 100  # the same where each group's scales are searched (ggml block grids)
BLOCK_CALL_OPS = 150  # small ops (norms, RoPE, reshapes, hooks) per call of a block on one sample


def _probe_speed(dev) -> tuple[float, float]:
    """(float32 matmul flop/s, seconds per small op) measured in about 0.1 s on `dev`."""
    import torch

    a = torch.randn(256, 512, device=dev)
    b = torch.randn(512, 512, device=dev)
    v = torch.randn(576, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm up
    sync()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05:
        torch.mm(a, b)
        sync()
        n += 1
    rate = n * 2.0 * 256 * 512 * 512 / (time.perf_counter() - t0)
    t0, m = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05:
        v.mul_(1.0)
        sync()
        m += 1
    return rate, (time.perf_counter() - t0) / m


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _say_how_to_resume(work: Path) -> None:
    """After Ctrl-C: the finished blocks stay in the work directory for --resume."""
    done = len(list(work.glob("block-*.safetensors")))
    print(f"smolq: {done} finished block(s) kept in {work}; run the same command with --resume to continue",
          file=sys.stderr)


def quantize_hf(*, src, out, preset: str | None = None, fmt: str | None = None, calib=None, threads: int = 0,
                dry_run: bool = False, quiet: bool = True, **extra) -> dict[str, Any]:
    """Adapter for `smolq quantize --method gptq`: preset names like "Q4_K_M";
    `fmt` "gptq" makes a GPTQ directory with the preset's width in bits."""
    fmt = (fmt or ("gptq" if Path(out).suffix == "" else "gguf")).lower()
    if dry_run:
        raise InputError(out, "--dry-run is not available with --method gptq")
    set_threads(threads)  # torch and OpenMP; the C kernel gets the same count through `threads`
    if fmt == "gptq":
        m = re.search(r"(\d)", preset or "Q4")
        return quantize_hf_gptq(src, out, format="gptq", bits=int(m.group(1)) if m else 4, calib=calib,
                                quiet=quiet, **extra)
    return quantize_hf_gptq(src, out, format=fmt, qtype=preset, calib=calib, quiet=quiet, **extra)


run = quantize_hf


# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------


def _device(name: str):
    import torch

    name = (name or "cpu").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name} requested but CUDA is not available here; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference disables TF32 (gptq.md 1.1)
        torch.backends.cudnn.allow_tf32 = False
        return torch.device(name)
    if name != "cpu":
        raise InputError(None, f"unknown --device {name!r}; choose cpu, cuda or auto")
    return torch.device("cpu")


def _load_model(src: Path):
    """(weightless model skeleton, tokenizer, family): parameters on the meta device.

    Weights are read from the checkpoint only when a part of the model runs
    (`_Weights.materialize`), so memory holds one block at a time, not the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (src / "config.json").is_file():
        raise InputError(src, "not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(src)
    family = MODEL_TYPES.get(getattr(config, "model_type", ""))
    if family is None:
        raise InputError(src / "config.json", f"GPTQ supports LLaMA, Mistral, Qwen2, Qwen3, GPT-J, MPT and Gemma 3, "
                                              f"not model_type "
                                              f"{getattr(config, 'model_type', None)!r}")
    try:
        import torch

        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(src, f"transformers cannot load it: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for a bad file
        raise InputError(src, f"its tokenizer cannot be loaded: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, family


@contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (no memory) but real buffers.

    A plain `torch.device("meta")` build would also leave the computed buffers
    (RoPE frequencies, GPT-J's sinusoid table) without values; they are not in
    the checkpoint. Each parameter is created uninitialised (never touched, so
    never resident) and moved to meta as it is registered.
    """
    import torch
    from transformers.initialization import no_init_weights

    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        with no_init_weights():
            yield
    finally:
        torch.nn.Module.register_parameter = register


class _Weights:
    """Checkpoint tensors put into (and taken back out of) the meta-device model, by name."""

    def __init__(self, ckpt, model, reuse_buffers: bool = False):
        """reuse_buffers: read-only weights are decoded into float32 buffers kept from
        the last released block of the same shapes (imatrix: every block alike), so
        no block pays again for the page faults of fresh allocations."""
        self.ckpt, self.model = ckpt, model
        embed = model.get_input_embeddings()
        self.embed_name = next(n for n, m in model.named_modules() if m is embed) + ".weight"
        self._free: dict[tuple[int, ...], list] | None = {} if reuse_buffers else None
        self._lent: set[int] = set()  # data pointers of the buffers now in a module

    def source(self, name: str):
        """The checkpoint tensor behind parameter/buffer `name` (None: not in the checkpoint)."""
        t = self.ckpt.tensors.get(name)
        if t is None and name.endswith("lm_head.weight") and getattr(self.model.config, "tie_word_embeddings", False):
            t = self.ckpt.tensors.get(self.embed_name)
        return t

    def load(self, name: str, shape):
        """Tensor `name` as float32 torch, exactly as transformers would load it in fp32."""
        import torch

        t = self.source(name)
        if t is None:
            raise InputError(self.ckpt.path, f"the checkpoint has no tensor {name}")
        if tuple(t.shape) != tuple(shape):
            raise InputError(t.file, f"tensor {t.name} has shape {list(t.shape)}, the config needs {list(shape)}")
        if t.dtype == "F16":  # the kernel's F16C decode: the same values, ~5x numpy's conversion
            return torch.from_numpy(kernels.dequantize(t.load(), GGMLType.F16, tuple(int(d) for d in t.shape),
                                                       threads=torch.get_num_threads()))
        return torch.from_numpy(np.array(t.load(), dtype=np.float32))  # a copy: the mmap is released

    def load_f32_view(self, name: str, shape):
        """Like `load`, but an F32 tensor stays a read-only view of the mapped file (no copy)."""
        import warnings

        import torch

        t = self.source(name)
        if t is not None and t.dtype == "F16" and self._free is not None and tuple(t.shape) == tuple(shape):
            return self._decode_into_buffer(t)
        if t is None or t.dtype != "F32" or tuple(t.shape) != tuple(shape):
            return self.load(name, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only numpy array: only read here
            return torch.from_numpy(t.load())

    def materialize(self, module, prefix: str = "", read_only: bool = False) -> None:
        """Give every meta parameter of `module` (named `prefix` in the model) its checkpoint value.
        read_only: F32 parameters stay views of the mapped file (no copy; nothing may write them)."""
        import torch

        load = self.load_f32_view if read_only else self.load
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            if p.device.type == "meta":
                owner, leaf = _owner(module, name)
                owner._parameters[leaf] = torch.nn.Parameter(load(prefix + name, p.shape), requires_grad=False)
        for name, b in list(module.named_buffers()):
            if self.ckpt.tensors.get(prefix + name) is not None:
                owner, leaf = _owner(module, name)
                owner._buffers[leaf] = self.load(prefix + name, b.shape).to(b.dtype)

    def _decode_into_buffer(self, t):
        """An F16 checkpoint tensor decoded (the kernel's F16C path) into a reused buffer."""
        import torch

        shape = tuple(int(d) for d in t.shape)
        free = self._free.setdefault(shape, [])
        buf = free.pop() if free else torch.empty(shape, dtype=torch.float32)
        kernels.dequantize(t.load(), GGMLType.F16, shape, threads=torch.get_num_threads(), out=buf.numpy())
        self._lent.add(buf.data_ptr())
        return buf

    def release(self, module) -> None:
        """Back to meta: the parameters' memory is freed (or kept for reuse), the skeleton stays."""
        import torch

        for name, p in list(module.named_parameters(remove_duplicate=False)):
            owner, leaf = _owner(module, name)
            if p.device.type != "meta" and p.data_ptr() in self._lent:
                self._lent.discard(p.data_ptr())
                self._free[tuple(p.shape)].append(p.data)
            owner._parameters[leaf] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                         requires_grad=False)
        if self._free is None:
            _trim_heap()

    def nbytes(self, module) -> int:
        return sum(p.numel() * 4 for p in module.parameters())


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc). A freed block's arrays sit in
    the heap below glibc's (raised) mmap threshold, and resident memory would
    creep up block after block; elsewhere this is a no-op."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _owner(module, dotted: str):
    path, _, leaf = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _blocks(model, family):
    obj = model
    for part in FAMILIES[family].blocks.split("."):
        obj = getattr(obj, part)
    return obj


def _block_kinds(model, family) -> list:
    """Each block's kind (None everywhere for families whose blocks all take the same arguments)."""
    n = len(_blocks(model, family))
    attr = FAMILIES[family].kinds
    kinds = list(getattr(model.config, attr)) if attr else []
    return kinds[:n] if len(kinds) >= n else [None] * n


def _linears(family):
    return [name for group in FAMILIES[family].groups for name in group]


def _plan_types(src, out, fmt, qtype, model, family, recipe=None) -> dict[str, GGMLType | None]:
    """HF Linear weight name -> ggml block type to GPTQ onto (None: GPTQ int grid / not GPTQ'd)."""
    names = [f"{FAMILIES[family].blocks}.{i}.{lin}.weight"
             for i in range(len(_blocks(model, family))) for lin in _linears(family)]
    if fmt == "gptq":
        return {n: None for n in names}

    with open_checkpoint(src) as ckpt:
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        target = resolve_target(fmt, out, arch)
        steps, _ = build_steps(arch, ckpt, target, qtype, out, calibrated=_calibrated(names), recipe=recipe)
    by_source = {s.map.source: s.type for s in steps}
    return {n: by_source.get(n) if by_source.get(n) in GPTQ_GRID_TYPES else "skip" for n in names}


def _calibrated(names):
    """build_steps' test for the tensors GPTQ quantizes itself (the Hessian is their importance)."""
    names = frozenset(names)
    return lambda source, t: source in names and t in GPTQ_GRID_TYPES


def _check_scale_rule(rule: str, plan: dict[str, GGMLType | None], out: Path) -> None:
    """"plain" is ggml's reference rounding of the 32-element blocks; K-quant grids have no such rule."""
    kquants = sorted({t.name for t in plan.values() if t in BLOCK_SPECS and BLOCK_SPECS[t].kquant})
    if rule == "plain" and kquants:
        raise InputError(out, f"--scale-rule plain exists for the 32-element block types only; "
                              f"this plan also has {', '.join(kquants)}")


def _check_static_groups(static: bool, plan: dict[str, GGMLType | None], out: Path) -> None:
    """Lattice grids round 4 columns together as the solver reaches them: nothing to fix up front."""
    lattice = sorted({t.name for t in plan.values() if t in JOINT_GRID_TYPES})
    if static and lattice:
        raise InputError(out, f"--static-groups does not apply to the lattice types ({', '.join(lattice)}): "
                              f"they round groups of columns jointly under the error feedback")


def _work_dir(out: Path, settings: Settings, src: Path, resume: bool) -> Path:
    work = out.parent / f".{out.name}.gptq-work"
    fp = settings.fingerprint(src)
    stamp = work / "settings.json"
    if work.exists():
        same = stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp
        if resume and not same:
            raise InputError(work, "--resume: the saved blocks were made with other settings or another model")
        if not resume:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fp, "settings": settings.__dict__}, indent=2))
    return work


# ---------------------------------------------------------------------------
# the block loop
# ---------------------------------------------------------------------------


# Data-free calibration samples token by token from the whole unquantized
# model, so it is the one step that holds every weight at once (fp32). Above
# this size it is refused: pass --calib instead.
DATA_FREE_MAX_BYTES = 4 << 30
# Block inputs (nsamples x seqlen x hidden x 4 bytes) larger than this go to a
# scratch file in the work directory, read and rewritten one sample at a time.
ACTIVATIONS_IN_RAM_MAX = 512 << 20


def _calibration(model, tokenizer, weights: "_Weights", calib, nsamples, seqlen, seed, quiet):

    if calib is not None:  # only the config and the tokenizer are used
        return load_calibration(model, tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    need = weights.nbytes(model)
    if need > DATA_FREE_MAX_BYTES:
        raise InputError(weights.ckpt.path, f"data-free calibration runs the whole model in fp32 ({need / 2**30:.1f} GiB, "
                                            f"over the {DATA_FREE_MAX_BYTES / 2**30:.0f} GiB limit); pass --calib FILE")
    note(f"data-free calibration: the whole model is loaded in fp32 ({need / 2**20:.0f} MiB) to sample from it",
         quiet=quiet)
    weights.materialize(model)
    try:
        return load_calibration(model, tokenizer, None, nsamples=nsamples, seqlen=seqlen, seed=seed)
    finally:
        weights.release(model)


class _Activations:
    """The current block's inputs, per calibration sample.

    The hidden states (nsamples x seqlen x hidden x 4 bytes, fp32 so results
    do not depend on where they are kept) are the bulk: in RAM while small,
    else in a scratch file read and rewritten one sample at a time. A block's
    output replaces its input in place. The other call arguments (RoPE
    cos/sin, masks, positions) stay in RAM, each distinct value once, per
    block kind (FamilyLayout.kinds) where blocks of different kinds get
    different ones.
    """

    def __init__(self, n_values: int, path: Path):
        self.nbytes = n_values * 4
        self.path = path if self.nbytes > ACTIVATIONS_IN_RAM_MAX else None
        self._fh = open(path, "w+b") if self.path else None
        self._hidden: list = []  # tensors (RAM) or (offset, shape) (file)
        self._rest: dict[Any, list] = {}  # block kind -> per sample (args, kwargs) with hidden_states = None
        self._pool: list = []
        self._end = 0

    def __len__(self) -> int:
        return len(self._hidden)

    def add(self, args, kwargs, kind=None) -> None:
        """Sample i's inputs of the first block (whose kind is `kind`)."""
        hidden = _hidden_of(args, kwargs)
        self.add_arguments(args, kwargs, kind)
        if self._fh is None:
            self._hidden.append(hidden.detach().cpu())
        else:
            self._hidden.append((self._end, tuple(hidden.shape)))
            self._end += hidden.numel() * 4
            self.replace(len(self._hidden) - 1, hidden)

    def add_arguments(self, args, kwargs, kind) -> None:
        """Sample i's call arguments but the hidden states, for blocks of `kind`."""
        args, kwargs = _with_hidden(args, kwargs, None)
        self._rest.setdefault(kind, []).append((self._dedupe(args), self._dedupe(kwargs)))

    def call(self, i: int, kind=None):
        """(args, kwargs) of sample i's call of a block of `kind` (None: families whose blocks
        all take the same arguments; a kind never captured is a KeyError, not another's)."""
        args, kwargs = self._rest[kind][i]
        return _with_hidden(args, kwargs, self.hidden(i))

    def hidden(self, i: int):
        """Sample i's hidden states alone (what any block of any kind gets)."""
        import torch

        h = self._hidden[i]
        if self._fh is None:
            return h
        offset, shape = h
        return torch.from_numpy(_read_f32(self._fh, offset, shape))

    def replace(self, i: int, hidden) -> None:
        hidden = hidden.detach().cpu()
        if self._fh is None:
            self._hidden[i] = hidden
            return
        offset, shape = self._hidden[i]
        assert tuple(hidden.shape) == shape
        _write_f32(self._fh, offset, hidden.numpy())

    def other_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._pool)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.path.unlink(missing_ok=True)

    def _dedupe(self, obj):
        """`obj` with every tensor equal to one seen before replaced by that one (masks and
        RoPE tables repeat for samples of one length)."""
        import torch

        if isinstance(obj, torch.Tensor):
            obj = obj.detach().cpu()
            for t in self._pool:
                if t.shape == obj.shape and t.dtype == obj.dtype and torch.equal(t, obj):
                    return t
            self._pool.append(obj)
            return obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._dedupe(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._dedupe(v) for k, v in obj.items()}
        return obj


def _read_f32(fh, offset: int, shape) -> "np.ndarray":
    """float32 values of `shape` at `offset` of a scratch file (_Activations, _KeptFile)."""
    fh.seek(offset)
    return np.fromfile(fh, dtype=np.float32, count=int(np.prod(shape))).reshape(shape)


def _write_f32(fh, offset: int, a) -> int:
    """`a` as float32 bytes at `offset` of a scratch file; returns the bytes written."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    fh.seek(offset)
    fh.write(memoryview(a).cast("B"))
    return a.nbytes


def _capture_block_inputs(model, family, cal, weights: "_Weights", work: Path, quiet: bool) -> _Activations:
    """Block 0's call arguments per sample, and those of the first block of every other kind;
    only the embedding is loaded: the blocks up to the last one needed just record their
    arguments and pass the hidden states on, and the forward stops there."""
    import torch

    blocks = _blocks(model, family)
    kinds = _block_kinds(model, family)
    firsts = {kinds.index(k) for k in kinds}  # the first block of each kind
    embed = model.get_input_embeddings()
    hidden_size = embed.weight.shape[1]
    acts = _Activations(cal.n_tokens * hidden_size, work / "activations.f32")
    note(f"calibration activations: {len(cal.samples)} samples, {cal.n_tokens} tokens x {hidden_size} x 4 B = "
         f"{acts.nbytes / 2**20:.1f} MiB " + (f"in {acts.path.name} (work dir)" if acts.path else "in RAM"),
         quiet=quiet)

    def recorder(j: int):
        def forward(*args, **kwargs):
            if j == 0:
                acts.add(args, kwargs, kinds[0])
            elif j in firsts:
                acts.add_arguments(args, kwargs, kinds[j])
            if j == max(firsts):
                raise _StopForward
            return _hidden_of(args, kwargs)  # the block is not loaded: the next one only needs the arguments
        return forward

    weights.materialize(embed, weights.embed_name[:-len("weight")])
    for j in range(max(firsts) + 1):
        blocks[j].forward = recorder(j)
    try:
        with torch.no_grad():
            for i, ids in enumerate(cal.samples):
                try:
                    model(input_ids=ids, attention_mask=cal.attention_mask(i), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for j in range(max(firsts) + 1):
            del blocks[j].forward
        weights.release(embed)
    return acts


def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


def _to(obj, dev):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, tuple):
        return tuple(_to(o, dev) for o in obj)
    if isinstance(obj, list):
        return [_to(o, dev) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    return obj


def block_kwargs(kwargs: dict) -> dict:
    """A block's captured keyword arguments for a call of its own: no cache (the captured
    forward's cache objects would be written to), use_cache off."""
    k = {key: v for key, v in kwargs.items() if key not in ("past_key_values", "past_key_value", "layer_past")}
    k["use_cache"] = False
    return k


def _run_block(block, acts: _Activations, dev, replace: bool = False, kind=None, before=None) -> None:
    """Run `block` (of `kind`) on every sample's inputs (moved to `dev` for the call); with
    `replace`, its outputs become the inputs of the next block; `before(i)` is called
    before sample i runs."""
    import torch

    with torch.no_grad():
        for i in range(len(acts)):
            if before is not None:
                before(i)
            args, kwargs = acts.call(i, kind)
            a, k = _to(args, dev), block_kwargs(_to(kwargs, dev))
            try:
                res = block(*a, **k)
            except _StopForward:
                if replace:
                    raise
                continue  # a hook has what it needs from this sample
            if replace:
                acts.replace(i, res[0] if isinstance(res, (tuple, list)) else res)


def _quantize_blocks(model, family, cal, plan, settings: Settings, dev, work: Path, quiet: bool,
                     weights: "_Weights") -> dict:
    import torch


    blocks = _blocks(model, family)
    kinds = _block_kinds(model, family)
    with phase("gptq capture block 0 inputs"):
        acts = _capture_block_inputs(model, family, cal, weights, work, quiet)
    if acts.other_bytes():
        note(f"other block arguments (RoPE tables, masks): {acts.other_bytes() / 2**20:.1f} MiB in RAM", quiet=quiet)
    groups = FAMILIES[family].groups if settings.true_sequential else (tuple(_linears(family)),)
    n_linears, damp_raised, notes = 0, [], []
    parts, reg_chosen = _cv_parts(cal, settings, notes), {}
    spent: list[float] = []  # seconds per block so far, for the ETA
    spill = _KeptFile(work / "kept.f32")  # module inputs kept past the RAM budget (_StageReuse)
    try:
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            prefix = f"{FAMILIES[family].blocks}.{i}"
            with phase("gptq load block"):
                weights.materialize(block, prefix + ".")
                block.to(dev)
            if settings.forward_dtype == "bfloat16":
                use_bf16_products(block)
            saved = work / f"block-{i:04d}.safetensors"
            stages = _StageReuse(block, (), len(acts), budget=0)  # a restored block keeps nothing
            if saved.is_file():
                _restore_block(block, saved)
                what = "restored"
            else:
                records = {}
                stages = _StageReuse(block, FAMILIES[family].stages if settings.true_sequential else (),
                                     len(acts), budget=max(acts.nbytes, STAGE_REUSE_MIN_BUDGET), spill=spill)
                for group in groups:
                    todo = [n for n in group if plan.get(f"{prefix}.{n}.weight") != "skip"]
                    if not todo:
                        continue
                    with phase("gptq forward for hessians"):
                        hessians = _collect_hessians(block, todo, acts, dev, kinds[i], parts, stages,
                                                     FAMILIES[family].value if settings.attention_aware else None)
                    _trim_heap()  # the forward's freed activations back to the OS before the solve's peak
                    for name in todo:
                        h = hessians.pop(name)
                        last_user = all(other.full is not h.full for other in hessians.values())
                        rec, damp_used, a = _solve_linear(block.get_submodule(name), h,
                                                          plan.get(f"{prefix}.{name}.weight"), settings, dev,
                                                          last_user)
                        reg_chosen[f"{prefix}.{name}"] = a
                        records.update({f"{name}.{k}": v for k, v in rec.items()})
                        n_linears += 1
                        if damp_used > settings.damp:
                            damp_raised.append(f"{prefix}.{name}: damp {damp_used:.3g}")
                with phase("gptq save block"):
                    _save_block(saved, records)
                what = "quantized"
            with phase("gptq recompute outputs"):
                with stages.in_use():
                    _run_block(block, acts, dev, replace=True, kind=kinds[i], before=stages.at)
            stages.close()
            drop_bf16_products(block)
            weights.release(block)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            spent.append(time.perf_counter() - t0)
            eta = sum(spent) / len(spent) * (len(blocks) - i - 1)
            note(f"block {i + 1}/{len(blocks)} {what} in {spent[-1]:.1f}s, ETA {_minutes(eta)}", quiet=quiet)
    finally:
        acts.close()
        spill.close()
    if damp_raised:
        notes.append("dampening raised for " + ", ".join(damp_raised))
    if parts is not None and reg_chosen:
        counts = {a: list(reg_chosen.values()).count(a) for a in sorted(set(reg_chosen.values()))}
        notes.append("hessian regularisation chosen by cross-validation: " +
                     ", ".join(f"{a:g} for {n} linears" for a, n in counts.items()))
    return {"n_linears": n_linears, "damp_raised": damp_raised, "notes": notes,
            "hessian_reg": {"mode": "auto" if parts is not None else settings.hessian_reg, "chosen": reg_chosen}}


def _cv_parts(cal, settings: Settings, notes: list) -> list | None:
    """The samples' fit / held-out parts when --hessian-reg auto can use them, else None
    (then a fixed amount applies: 0 when auto had no split to work with)."""
    if settings.hessian_reg != "auto":
        return None
    if FIT in cal.parts and HELD in cal.parts:
        return cal.parts
    notes.append("--hessian-reg auto: the calibration set is too small to hold a part out; no regularisation")
    settings.hessian_reg = 0.0
    return None


STAGE_REUSE_MIN_BUDGET = 64 << 20  # kept module inputs/outputs may take max(this, the block inputs' bytes)


class _StageReuse:
    """Forwards of one block that are not run twice (issue #19: a true-sequential block ran its
    attention four times per sample, once per group and once more for its outputs).

    For each stage (module, last Linear) of the family, the group holding the last Linear keeps
    that Linear's input per sample, provided no other Linear of the module is in that group (so
    all of them are quantized already). From then on the module is answered instead of run: the
    first time per sample as last(kept input), which is then kept in its place as the module's
    output, later times a copy of that output. Those are the module's own bits: it would apply
    the same Linear to the same input. The first answer is also checked against the module run
    for real, and a module whose bits differ, or whose output is a tuple carrying tensors, is
    run as before. Kept tensors are held in RAM while all of them fit `budget` bytes; past it
    they go to `spill` (a scratch file: the page cache holds them, not the process), or, without
    one, the stage is not kept.
    """

    def __init__(self, block, stages, n_samples: int, budget: int, spill: "_KeptFile | None" = None):
        self.block, self.n, self.budget, self.spill = block, n_samples, budget, spill
        self.stages = [(mod, last) for mod, last in stages if _has_submodule(block, mod)]
        self.kept: dict[str, list | None] = {}  # module -> per sample [tensor, is_output]; None: not kept
        self.rest: dict[str, tuple | None] = {}  # module -> the rest of its tuple output, once checked
        self.bytes = 0
        self.i = 0

    def at(self, i: int) -> None:
        self.i = i

    def keep_inputs_of(self, names) -> set[str]:
        """The Linears among `names` (one group, quantized after this forward) whose inputs
        to keep: last Linears whose module has no other Linear in this group."""
        out = set()
        for mod, last in self.stages:
            others = [n for n in names if n.startswith(mod + ".") and n != last]
            if last in names and not others and mod not in self.kept:
                out.add(last)
                self.kept[mod] = [None] * self.n
        return out

    def keep(self, linear: str, x) -> None:
        mod = next(m for m, last in self.stages if last == linear)
        entries = self.kept.get(mod)
        if entries is None:
            return
        held = self._hold(x.detach())
        if held is None:
            self._drop(mod)
            return
        entries[self.i] = [held, False]

    def _hold(self, t):
        """t kept: a copy in RAM within the budget, else its place in the spill file, else None."""
        if self.bytes + _nbytes(t) <= self.budget:
            self.bytes += _nbytes(t)
            return t.clone()
        if self.spill is not None and self.spill.holds(t):
            return self.spill.put(t)
        return None

    def _get(self, held):
        return self.spill.get(held) if isinstance(held, _KeptFile.Ref) else held

    def _let_go(self, held) -> None:
        if not isinstance(held, _KeptFile.Ref):
            self.bytes -= _nbytes(held)

    def _drop(self, mod: str) -> None:
        for e in self.kept.get(mod) or ():
            if e is not None:
                self._let_go(e[0])
        self.kept[mod] = None  # not kept for this block: the module runs as before

    @contextmanager
    def in_use(self):
        """Within: the modules whose inputs are all kept answer from them."""
        patched = []
        for mod, last in self.stages:
            entries = self.kept.get(mod)
            if entries is not None and all(e is not None for e in entries):
                module = self.block.get_submodule(mod)
                module.forward = self._answer(mod, module, self.block.get_submodule(last))
                patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward

    def _answer(self, mod, module, last):
        real = type(module).forward

        def forward(*args, **kwargs):
            entries = self.kept[mod]
            if entries is None:  # dropped by the check
                return real(module, *args, **kwargs)
            entry = entries[self.i]
            if not entry[1]:
                y = last(self._get(entry[0]))
                if mod not in self.rest:
                    result = real(module, *args, **kwargs)
                    if not self._check(mod, y, result):
                        return result
                self._let_go(entry[0])
                held = self._hold(y)
                if held is None:  # no room for the output: this answer is the last one
                    entries[self.i] = None  # its input is let go of already
                    self._drop(mod)
                    return self._shaped(mod, y)
                entry[:] = [held, True]
            return self._shaped(mod, self._get(entry[0]).clone())  # the block may add to it in place

        return forward

    def _shaped(self, mod, out):
        rest = self.rest[mod]
        return out if rest is None else (out, *rest)

    def _check(self, mod, y, result) -> bool:
        import torch

        first, rest = (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, None)
        if (rest is not None and any(r is not None for r in rest)) or not torch.equal(first, y):
            self._drop(mod)
            return False
        self.rest[mod] = rest
        return True

    def close(self) -> None:
        self.kept.clear()
        self.bytes = 0
        if self.spill is not None:
            self.spill.reset()


class _KeptFile:
    """Kept tensors past the RAM budget, in a scratch file of the work directory, rewritten
    from its start for every block (read back exactly: float32 bytes)."""

    @dataclass(frozen=True)
    class Ref:
        offset: int
        shape: tuple
        device: Any

    def __init__(self, path: Path):
        self.path, self._fh, self._end = path, None, 0

    def holds(self, t) -> bool:
        import torch

        return t.dtype == torch.float32

    def put(self, t) -> "_KeptFile.Ref":
        if self._fh is None:
            self._fh = open(self.path, "w+b")
        ref = _KeptFile.Ref(self._end, tuple(t.shape), t.device)
        self._end += _write_f32(self._fh, self._end, t.detach().cpu().numpy())
        return ref

    def get(self, ref: "_KeptFile.Ref"):
        import torch

        return torch.from_numpy(_read_f32(self._fh, ref.offset, ref.shape)).to(ref.device)

    def reset(self) -> None:
        self._end = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _has_submodule(block, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


@dataclass
class _Hessians:
    full: Any  # every sample's, exactly as without cross-validation
    fit: Any = None  # the fit part's, the held-out part's (--hessian-reg auto only)
    held: Any = None


def _collect_hessians(block, names, acts: _Activations, dev, kind=None, parts=None,
                      stages: "_StageReuse | None" = None, value: str | None = None) -> dict[str, _Hessians]:
    """Each Linear's input Hessian over all samples, and over the fit and held-out parts
    when `parts` (one of FIT / HELD / None per sample) is given. `stages` keeps the inputs it
    wants (of a module's last Linear) and answers for the modules it already can.
    value: the attention's value Linear, whose Hessian is taken through the attention
    probabilities instead (fast_forward.attention_mix): each sample's forward then runs on
    to the attention call, which adds it and stops the forward."""
    stages = stages or _StageReuse(block, (), len(acts), budget=0)
    value = value if value in names else None
    value_input = [None]  # the value Linear's input in the running sample
    value_samples = [0]  # samples whose attention call added to the value Hessian
    keep = stages.keep_inputs_of(names)
    accs, handles = {}, []
    current = [None]  # the part of the sample being run
    # Linears fed the very same tensor (q/k/v, gate/up) have the same Hessian: the first of
    # them accumulates it, the others share its accumulators (one matmul, not three).
    last: list = [None, None]  # (the latest input tensor, the Linear that accumulated it)
    # True-sequential groups come in forward order, so a sample's forward stops once every
    # Linear of this group has seen its input (pre-hooks: the last one's product is not
    # computed). After sample 0 has shown which Linears share an input, a sample stops once
    # each accumulating Linear has its input: the q/k/v group runs only the first norm, and
    # gate/up's group stops before the gate product.
    fired: set[str] = set()
    owner: dict[str, str] = {}  # Linear -> the one whose accumulators it shares (set by sample 0)
    owners: set[str] = set()  # the accumulating Linears, once every Linear has fired once

    def new_acc(n_in):
        return {p: HessianAccumulator(n_in, device=dev) for p in ((None, FIT, HELD) if parts else (None,))}

    for name in names:
        lin = block.get_submodule(name)
        accs[name] = new_acc(lin.weight.shape[1])

        def hook(_m, args, name=name):
            x = args[0]
            if name == value:
                value_input[0] = x.detach()
                fired.add(name)
                if name in keep:
                    stages.keep(name, x)
                return  # its Hessian comes from the attention call (add_value_hessian)
            shares = last[0] is x
            if name not in owner:
                owner[name] = owner[last[1]] if shares else name
            elif (owner[name] != name) != shares:
                raise RuntimeError(f"{name}: its input changed between calibration samples")
            last[0], last[1] = x, name
            fired.add(name)
            if name in keep:
                stages.keep(name, x)
            if owner[name] == name:
                acc = accs[name]
                x = x.detach()
                acc[None].add(x)
                if current[0] is not None:
                    acc[current[0]].add(x)
            if value is not None:
                return  # the forward runs on to the attention call
            if len(fired) == len(names):
                owners.update(owner.values())
                raise _StopForward  # the rest of the block does not feed these Linears
            if owners and owners <= fired:
                raise _StopForward  # the Linears still to come share inputs already counted

        handles.append(lin.register_forward_pre_hook(hook))

    def add_value_hessian(_module, query, key, mask, scaling, causal):
        x = value_input[0]
        if x is None:
            return
        value_input[0] = None
        value_samples[0] += 1
        G = attention_mix(query, key, x.to(query.device), mask, scaling, causal)
        for p in (None, current[0]) if current[0] is not None else (None,):
            accs[value][p].add_gram(G, x.shape[0] if x.dim() == 3 else 1)
        if fired >= set(names):
            raise _StopForward  # q, k and v have their inputs; the attention output is not needed

    def before(i):
        current[0] = parts[i] if parts else None
        fired.clear()
        stages.at(i)

    try:
        with stages.in_use(), capture_attention(add_value_hessian if value else None):
            _run_block(block, acts, dev, kind=kind, before=before)
        if value is not None and value_samples[0] != len(acts):
            raise RuntimeError(f"{value}: the attention-aware Hessian saw {value_samples[0]} of {len(acts)} "
                               f"samples (the attention did not run through smolq's function)")
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    return {n: _Hessians(a[None].H, a[FIT].H if parts else None, a[HELD].H if parts else None)
            for n, a in ((n, accs[owner.get(n, n)]) for n in accs)}


def _solve_linear(lin, hessians: _Hessians, qtype, settings: Settings, dev, last_user: bool = False):
    """GPTQ one Linear; its weight becomes the dequantized result. Returns (record, damp, a):
    a is the Hessian regularisation used, chosen by cross-validation when the fit and
    held-out Hessians are there (the final solve then uses every sample's Hessian).
    last_user: no other Linear shares these Hessians, so they are let go of before the solve."""
    import torch

    W = lin.weight.data.to(dev, torch.float32)
    rows, cols = W.shape

    def new_grid():
        return grid_for(rows, cols, qtype=qtype, bits=settings.bits, group_size=settings.group_size,
                        sym=settings.sym, mse=settings.mse, rule=settings.scale_rule, device=dev)

    solve_kw = {"damp": settings.damp, "act_order": settings.act_order, "static_groups": settings.static_groups}
    a = settings.hessian_reg
    if hessians.held is not None:
        with phase("gptq hessian-reg cross-validation"):
            a = choose_regularisation(W, hessians.fit, hessians.held, new_grid, **solve_kw).a
    grid = new_grid()
    # Given up by its last user (or a regularised copy), the Hessian is the solve's to permute and
    # factor in place (no second n x n copy at the solve's peak).
    # the refit needs the Hessian the solve uses up: its own one, only where the grid refits
    # (regularise makes a new tensor unless a is 0)
    kept = None
    if settings.refit_scales and grid.refits_scales:
        kept = regularise(hessians.full, a)
        kept = kept.clone() if kept is hessians.full else kept
    res = gptq_solve(W, _hessian_for_solve(hessians, a, last_user), grid, consume_h=last_user or a != 0,
                     **solve_kw)
    Q = res.Q
    if kept is not None:
        with phase("gptq scale refit"):
            refit_scales(W, kept, grid)
        Q = grid.dequantized()
        del kept
    lin.weight.data.copy_(Q.to(lin.weight.device, lin.weight.dtype))
    forget_bf16_weight(lin)
    if qtype is None:
        rec = {"qint": grid.qint.cpu().numpy(), "scales": grid.scales.cpu().numpy(),
               "zeros": grid.zeros.cpu().numpy().astype(np.int32), "g_idx": grid.g_idx.cpu().numpy().astype(np.int32)}
    else:
        rec = {"blocks": grid.to_bytes(), "qtype": np.array([int(qtype)], dtype=np.int32)}
    return rec, res.damp, a


def _hessian_for_solve(hessians: _Hessians, a, last_user: bool):
    """The Hessian to solve with. When no other Linear shares it, the holder lets go first,
    so once the solve has its permuted copy the original is freed: for a 1.1B model's
    down_proj that is 121 MiB less at the solve's peak. (Passed straight into the call:
    no name in the caller keeps it alive.)"""
    full = hessians.full
    if last_user:
        hessians.full = hessians.fit = hessians.held = None
    return regularise(full, a)


def _save_block(path: Path, records: dict[str, np.ndarray]) -> None:
    """The block's records, each array written from its own memory (no serialized copy: at
    the end of a 1.1B block that copy was the process's peak)."""
    with atomic_output(path) as fh:
        safetensors_file.write_arrays(fh, {k: np.ascontiguousarray(v) for k, v in records.items()})


def _load_records(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{linear name: {field: array}} from a saved block."""
    from safetensors.numpy import load_file

    flat = load_file(str(path))
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in flat.items():
        name, fld = key.rsplit(".", 1)
        out.setdefault(name, {})[fld] = v
    return out


def record_weights(rec: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The dequantized [out, in] float32 weight a saved record stands for."""
    if "blocks" in rec:
        import gguf

        t = gguf.GGMLQuantizationType(int(rec["qtype"][0]))
        return gguf.quants.dequantize(rec["blocks"], t).reshape(shape)

    return GPTQLayer(rec["qint"], rec["scales"], rec["zeros"].astype(np.int64), rec["g_idx"].astype(np.int64),
                     bits=0).dequantize()


def _restore_block(block, path: Path) -> None:
    import torch

    for name, rec in _load_records(path).items():
        lin = block.get_submodule(name)
        w = record_weights(rec, tuple(lin.weight.shape))
        lin.weight.data.copy_(torch.from_numpy(w).to(lin.weight.device, lin.weight.dtype))


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------


def _write_gptq_dir(model, family, src: Path, out: Path, work: Path, s: Settings) -> int:

    blocks = _blocks(model, family)
    n_shards = len(blocks) + 1
    state = model.state_dict()  # names and shapes only: the skeleton's parameters are on meta
    quantized = set()
    weight_map: dict[str, str] = {}
    qcfg = gptq_ckpt.quantize_config(s.bits, s.group_size, sym=s.sym, desc_act=s.act_order,
                                     static_groups=s.static_groups, true_sequential=s.true_sequential, damp=s.damp)
    with open_checkpoint(src) as ckpt, atomic_directory(out) as tmp:
        weights = _Weights(ckpt, model)

        def f16(key):  # unquantized tensors: the source (fp32 as loaded) stored in fp16
            v = state[key]
            t = weights.source(key)
            if t is not None and t.dtype == "F16" and tuple(t.shape) == tuple(v.shape):
                return np.asarray(t.load())  # already fp16: written from the mapped file, no copy
            if v.device.type == "meta" or t is not None:
                v = weights.load_f32_view(key, v.shape)
            return v.detach().cpu().to(dtype=_f16()).numpy()

        for i in range(len(blocks)):
            prefix = f"{FAMILIES[family].blocks}.{i}"
            tensors = {}
            for name, rec in _load_records(work / f"block-{i:04d}.safetensors").items():
                layer = GPTQLayer(rec["qint"], rec["scales"], rec["zeros"].astype(np.int64),
                                  rec["g_idx"].astype(np.int64), s.bits)
                for fld, arr in layer.packed("gptq").items():
                    tensors[f"{prefix}.{name}.{fld}"] = arr
                quantized.add(f"{prefix}.{name}.weight")
            for key in state:
                if key.startswith(prefix + ".") and key not in quantized:
                    tensors[key] = f16(key)
            weight_map.update(gptq_ckpt.write_shard(tmp, i + 1, n_shards, tensors))
        tied = getattr(model.config, "tie_word_embeddings", False)
        rest = {k: f16(k) for k in state
                if not k.startswith(FAMILIES[family].blocks + ".") and not (tied and k == "lm_head.weight")}
        weight_map.update(gptq_ckpt.write_shard(tmp, 0, n_shards, rest))
        gptq_ckpt.finish_dir(tmp, src, weight_map, qcfg)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def _f16():
    import torch

    return torch.float16


def _write_ggml_file(src: Path, out: Path, fmt: str, qtype: str, model, family, work: Path, recipe=None) -> int:

    blocks = _blocks(model, family)
    records: dict[str, tuple[Path, str]] = {}
    for i in range(len(blocks)):
        path = work / f"block-{i:04d}.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as st:
            for key in st.keys():
                if key.endswith(".blocks"):
                    records[f"{FAMILIES[family].blocks}.{i}.{key[:-len('.blocks')]}.weight"] = (path, key)

    def gptq_loader(step, path, key, layout):
        def load():
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as st:
                data = st.get_tensor(key)
            return cp.place_blocks(data, step.map, step.type, layout).reshape(-1)
        return load

    with open_checkpoint(src) as ckpt:
        arch = arch_for_config(ckpt.config, ckpt.path / "config.json")
        target = resolve_target(fmt, out, arch)
        steps, preset = build_steps(arch, ckpt, target, qtype, out, calibrated=_calibrated(records), recipe=recipe)
        entries = []
        for st in steps:
            e = cp._entries([st], target.layout)[0]
            if st.map.source in records:
                path, key = records[st.map.source]
                e = TensorEntry(st.name, st.type, tuple(st.map.shape), gptq_loader(st, path, key, target.layout),
                                target.layout)
            entries.append(e)
        vocab = load_vocab(ckpt.path, arch.n_vocab, arch.family, ckpt.config)
        if target.is_gguf:
            meta = gguf_metadata(arch, vocab, ckpt, preset.ftype)
            if recipe is not None:  # quantize.recipe: the chosen types of the tensors llama.cpp quantizes
                meta.update(allocation_metadata({e.name: e.type for e in entries
                                                 if is_quantizable(e.name, e.shape, False, arch.gguf_arch)}))
            return gguf_sink.write(out, target.version, meta, entries)
        lt = target.legacy
        tokens = vocab.legacy_tokens(arch.family, lt.container, lt.dialect)
        ftype = preset.ftype if arch.family == "llama" and preset.ftype is not None else None
        return legacy_sink.write(out, target, arch.family, arch.legacy_hparams(lt), tokens, entries, ftype=ftype)
