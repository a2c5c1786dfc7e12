#!/usr/bin/env python3
"""Write the third-domain text GPTQ's defaults are chosen on (README: GPTQ, the measurements).

It is neither the calibration's domain (Python sources) nor an evaluation text's (the Vim
manual, licences): the long descriptions (PyPI README bodies) of the Python packages installed
beside the interpreter running this script, in name order. Licence texts pasted in as a
description are left out, so it shares no text with the licences the benchmark evaluates on,
and so are descriptions shorter than MIN_CHARS (a line or two carries no prose).

The text depends on which packages the venv holds: measurements made on it compare files
against each other on the same text, never with numbers from another venv's text.

    .venv/bin/python scripts/third_domain_text.py /tmp/dev.txt
    # the 2026-12-06 13:00 text (55 descriptions, 668,524 bytes): the venv before the real readers
    .venv/bin/python scripts/third_domain_text.py /tmp/dev.txt --exclude accelerate,apache-tvm,\
        apache-tvm-ffi,bitsandbytes,diskcache,llama-cpp-python,ml-dtypes,psutil
"""
from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from pathlib import Path

MIN_CHARS = 500
LICENCE_START = re.compile(r"(?is)\s*(copyright|the mit license|mit license|apache license|bsd|gnu|"
                           r"permission is hereby)")


def description(metadata: Path) -> str:
    """The body of a METADATA file (after its header block), stripped."""
    text = metadata.read_text(encoding="utf-8", errors="replace")
    return text.partition("\n\n")[2].strip()


def distribution(metadata: Path) -> str:
    """The normalised distribution name of a .dist-info/METADATA path ("llama-cpp-python")."""
    name = metadata.parent.name.removesuffix(".dist-info").rpartition("-")[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def third_domain_text(site_packages: Path, exclude=()) -> tuple[str, int]:
    """(the text, how many descriptions it holds); `exclude`: distribution names left out."""
    skip = {re.sub(r"[-_.]+", "-", n).lower() for n in exclude}
    parts = []
    for meta in sorted(site_packages.glob("*.dist-info/METADATA")):
        if distribution(meta) in skip:
            continue
        body = description(meta)
        if len(body) >= MIN_CHARS and not LICENCE_START.match(body):
            parts.append(body)
    return "\n\n".join(parts), len(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the text file to write")
    p.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                   help="where the packages are (default: this interpreter's site-packages)")
    p.add_argument("--exclude", default="", metavar="NAME,...",
                   help="distributions to leave out (e.g. those installed after the text was first made)")
    args = p.parse_args(argv)
    text, n = third_domain_text(args.site_packages, [n for n in args.exclude.split(",") if n])
    if not n:
        print(f"{args.site_packages}: no package description of {MIN_CHARS} characters or more", file=sys.stderr)
        return 2
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {n} descriptions, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
