"""Which importance vector each tensor is quantized with: llama-quantize's --imatrix rules.

    --imatrix FILE (either container) -> --include-weights / --exclude-weights
    (substrings of entry names, never both) -> per tensor, by its GGUF name:
    the entry's vector when its size is the tensor's row length; none when the
    file has no entry (llama-quantize goes on without one) unless the type
    cannot do without (the very-low-bit types, plan.mix.requires_imatrix); a
    mis-sized entry stops the run (an imatrix for another model), except on
    token_embd, which llama-quantize quantizes without it.

The output GGUF records the file as llama-quantize does (quantize.imatrix.*).
Nothing here reads tensor data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from smolq.errors import InputError
from smolq.formats.gguf import MetaValue
from smolq.formats.imatrix import Imatrix, read_imatrix
from smolq.ggml_types import GGMLType
from smolq.kernels import NEEDS_IMATRIX
from smolq.lazy import lazy_module
from smolq.plan.mix import Preset, canonical_name, requires_imatrix

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

T = GGMLType

# Tensors llama.cpp never asks an imatrix for (and the imatrix never has).
NO_IMATRIX_NAMES = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")
KV_STRING_MAX = 127  # llama_model_kv_override keeps 127 bytes of a string value

@dataclass
class ImatrixChoice:
    """The importance matrix a quantize run uses, after --include/--exclude-weights."""

    imatrix: Imatrix
    given_as: str  # the path as the user wrote it (recorded in quantize.imatrix.file)

    @property
    def path(self) -> Path:
        return Path(self.given_as)

    def vector(self, name: str, shape: Sequence[int]) -> np.ndarray | None:
        """The importance vector for tensor `name` (any naming scheme), checked against its rows."""
        gguf_name = canonical_name(name)
        vec = self.imatrix.importance(gguf_name)
        n_per_row = int(shape[-1]) if shape else 0
        n_mat = int(shape[0]) if len(shape) == 3 else 1  # stacked experts: one vector each
        if vec is not None and vec.size != n_per_row * n_mat:
            if gguf_name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None  # llama-quantize ignores this one mismatch
            raise InputError(self.path, f"entry {gguf_name} has {vec.size} values but the tensor's rows have "
                                        f"{n_per_row * n_mat}: an imatrix for another model?")
        if vec is not None and n_mat > 1:
            raise InputError(self.path, f"{gguf_name}: per-expert importance vectors are not supported yet")
        return vec


def check_required(choice: ImatrixChoice | None, name: str, dst: GGMLType, preset: Preset,
                   vec: np.ndarray | None, model: str | os.PathLike | None = None) -> None:
    """Refuse, before anything is written, a very-low-bit tensor without an importance vector.

    Besides llama-quantize's rule (requires_imatrix, which spares token_embd and
    output), the quantizers of NEEDS_IMATRIX cannot run without one at all: there
    llama-quantize aborts (GGML_ASSERT) on a tensor the imatrix has no entry for,
    e.g. output.weight in a --pure IQ2_XXS file; smolq says so in one line."""
    gguf_name = canonical_name(name)
    by_rule = requires_imatrix(gguf_name, dst, preset)
    if vec is not None or not (by_rule or dst in NEEDS_IMATRIX):
        return
    if choice is None:
        raise InputError(model, f"{dst.name} (tensor {gguf_name}) needs an importance matrix: "
                                f"pass --imatrix FILE (smolq imatrix or llama-imatrix makes one)")
    if not by_rule:  # token_embd / output: llama-quantize gives them no vector, then aborts in ggml
        raise InputError(choice.path, f"has no entry for {gguf_name}, and {dst.name} cannot be written without "
                                      f"one (llama-quantize aborts here): give it another type "
                                      f"(--output-tensor-type / --token-embedding-type, or no --pure), or make the "
                                      f"imatrix with --process-output")
    raise InputError(choice.path, f"has no entry for {gguf_name}, which {dst.name} cannot be quantized "
                                  f"without: an imatrix for another model?")


def choose_imatrix(path: str | os.PathLike | None, include: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> ImatrixChoice | None:
    """Read --imatrix FILE and apply --include-weights / --exclude-weights (None: no imatrix)."""
    include, exclude = list(include or ()), list(exclude or ())
    if include and exclude:
        raise InputError(None, "--include-weights and --exclude-weights cannot be used together")
    if path is None:
        if include or exclude:
            raise InputError(None, "--include-weights / --exclude-weights need --imatrix FILE")
        return None
    im = read_imatrix(path)
    for name in im.entries:
        if not np.isfinite(im.importance(name)).all():
            raise InputError(path, f"entry {name} has non-finite values")
    im = im.select(include, exclude)
    if not im.entries:  # llama-quantize then runs as if no imatrix was given
        return None
    return ImatrixChoice(im, os.fspath(path))


def imatrix_metadata(choice: ImatrixChoice) -> list[tuple[str, MetaValue]]:
    """The quantize.imatrix.* keys llama-quantize adds to its output, in its order."""
    im = choice.imatrix
    kv = [("quantize.imatrix.file", MetaValue.string(_kv_string(choice.given_as)))]
    if im.datasets:
        kv.append(("quantize.imatrix.dataset", MetaValue.string(_kv_string(im.datasets[0]))))
    kv.append(("quantize.imatrix.entries_count", MetaValue.u32(len(im.entries))))
    if im.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", MetaValue.u32(im.chunk_count)))
    return kv


def record_use(summary: dict, choice: ImatrixChoice | None, vectors: Sequence[object]) -> None:
    """Say in a run's summary which importance matrix was used, and flag each tensor row that took a vector."""
    if choice is None:
        return
    im = choice.imatrix
    summary["imatrix"] = {"file": choice.given_as, "format": im.format, "entries": len(im.entries),
                          "chunks": im.chunk_count, "datasets": list(im.datasets),
                          "n_tensors": sum(v is not None for v in vectors)}
    for row, vec in zip(summary.get("tensors", []), vectors):
        if vec is not None:
            row["imatrix"] = True


def _kv_string(text: str) -> str:
    raw = text.encode("utf-8")[:KV_STRING_MAX]
    return raw.decode("utf-8", "ignore")
