#!/usr/bin/env python3
"""Swap some tensors of a GGUF file for another file's: where a quantized model's loss lies.

    # llama.cpp's value projections in smolq's Q4_K_M file (same types: the same size)
    .venv/bin/python scripts/swap_tensors.py smolq-q4km.gguf llama-q4km.gguf out.gguf --match 'attn_v\\.'
    # the query and key projections put back at F32 (a diagnostic: the file grows)
    .venv/bin/python scripts/swap_tensors.py smolq-q4km.gguf model-f32.gguf out.gguf --match 'attn_[qk]\\.' --float

Then `llama-perplexity` on OUT against BASE tells what those tensors cost (README: GPTQ, "Where
smolq's lead over llama.cpp lies", "Where smolq's remaining Q4_K_M loss lies").

Without --float every tensor whose name matches REGEX (re.search) takes DONOR's bytes, which
must have the same type and shape; the rest of BASE (metadata, other tensors, layout) is kept
byte for byte. With --float the matching tensors are DONOR's values decoded to F32 (gguf-py's
dequantize: any type) and the file is written again with gguf-py's writer, every other tensor
and key copied as it was. OUT appears whole or not at all; bad input is one line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path


class SwapError(Exception):
    """Bad input: the message names the file and the problem."""


def matching(reader, pattern: re.Pattern) -> list:
    """BASE's tensors whose names match."""
    return [t for t in reader.tensors if pattern.search(t.name)]


def donor_tensor(donor, donor_path: Path, t, same_type: bool):
    """DONOR's tensor of t's name, checked against t (shape; type too for a byte swap)."""
    u = donor.get(t.name)
    if u is None:
        raise SwapError(f"{donor_path}: no tensor {t.name}")
    if list(u.shape) != list(t.shape):
        raise SwapError(f"{donor_path}: {t.name} has shape {list(u.shape)}, the base file's is {list(t.shape)}")
    if same_type and (u.tensor_type != t.tensor_type or u.n_bytes != t.n_bytes):
        raise SwapError(f"{donor_path}: {t.name} is {u.tensor_type.name}, the base file's is {t.tensor_type.name} "
                        f"(--float takes any type)")
    return u


def swap_bytes(base_path: Path, donor, donor_path: Path, chosen: list, tmp: Path) -> None:
    """BASE copied to tmp, the chosen tensors' data overwritten in place with DONOR's."""
    pairs = [(t, donor_tensor(donor, donor_path, t, same_type=True)) for t in chosen]
    shutil.copyfile(base_path, tmp)
    with open(tmp, "r+b") as fh:
        for t, u in pairs:
            fh.seek(int(t.data_offset))  # gguf-py's offset is from the start of the file
            fh.write(u.data.tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def copy_keys(reader, writer) -> None:
    """Every metadata key of a gguf-py reader into a gguf-py writer, with its type (the GGUF.*
    keys and general.architecture, which the writer sets itself, left out)."""
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), kind)


def swap_float(base, donor, donor_path: Path, chosen: list, tmp: Path) -> None:
    """BASE written again to tmp with the chosen tensors as F32 values decoded from DONOR."""
    import numpy as np
    from gguf import GGUFWriter
    from gguf.quants import dequantize

    values = {t.name: np.ascontiguousarray(dequantize(u.data, u.tensor_type), dtype=np.float32)
              for t in chosen for u in [donor_tensor(donor, donor_path, t, same_type=False)]}
    writer = GGUFWriter(str(tmp), base.fields["general.architecture"].contents())
    copy_keys(base, writer)
    for t in base.tensors:
        if t.name in values:
            writer.add_tensor(t.name, values[t.name])
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb") as fh:  # on disk before the rename, as the byte swap's copy is
        os.fsync(fh.fileno())


def swap(base_path: Path, donor_path: Path, out: Path, pattern: str, as_float: bool = False) -> list[str]:
    """Write OUT (module docstring); returns the names of the tensors taken from DONOR."""
    from gguf import GGUFReader

    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise SwapError(f"--match {pattern!r}: {e}") from None
    readers = []
    for path in (base_path, donor_path):
        try:
            readers.append(GGUFReader(path))
        except OSError as e:
            raise SwapError(f"{path}: {e.strerror or e}") from None
        except Exception as e:  # gguf-py's reader fails on a cut or foreign file with whatever it hits
            raise SwapError(f"{path}: not a GGUF file gguf-py can read ({type(e).__name__}: {e})") from None
    base, donor_reader = readers
    chosen = matching(base, rx)
    if not chosen:
        raise SwapError(f"{base_path}: no tensor name matches {pattern!r}")
    donor = {u.name: u for u in donor_reader.tensors}
    tmp = out.with_name(f".{out.name}.swap-tmp")
    try:
        if as_float:
            swap_float(base, donor, donor_path, chosen, tmp)
        else:
            swap_bytes(base_path, donor, donor_path, chosen, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return [t.name for t in chosen]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path, help="the GGUF file whose other tensors are kept")
    p.add_argument("donor", type=Path, help="the GGUF file the matching tensors come from")
    p.add_argument("out", type=Path)
    p.add_argument("--match", required=True, metavar="REGEX", help="tensor names to take (re.search)")
    p.add_argument("--float", action="store_true", help="take DONOR's values as F32 (any type; the file grows)")
    a = p.parse_args(argv)
    try:
        names = swap(a.base, a.donor, a.out, a.match, a.float)
    except (SwapError, OSError) as e:
        print(f"swap_tensors: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {len(names)} tensors from {a.donor}{' as F32' if a.float else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
