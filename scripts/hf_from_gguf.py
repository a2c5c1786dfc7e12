#!/usr/bin/env python3
"""Rebuild a Hugging Face LLaMA directory from a LLaMA GGUF file.

    python scripts/hf_from_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf

A thin call to `smolq convert FILE OUT --format hf --outtype f32`
(smolq.pipeline.hf_export): every tensor dequantized by smolq's C kernel to
float32, Q/K rows back in HF's rotate-half order, config.json from the GGUF
metadata, tokenizer.json / tokenizer_config.json (and tokenizer.model for a
SentencePiece vocabulary) rebuilt from the GGUF vocabulary. Kept for the
scripts that call `hf_from_gguf` (bench_gptq.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smolq.errors import SmolqError
from smolq.pipeline.hf_export import export_hf

SHARD_BYTES = 256 << 20  # float32 shards of about this size


def hf_from_gguf(gguf_path: str | Path, out_dir: str | Path, *, tokenizer: bool = True) -> Path:
    """Write the HF directory (float32 weights); returns it. Output is atomic."""
    export_hf(gguf_path, out_dir, "f32", max_shard_size=SHARD_BYTES, tokenizer=tokenizer)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.add_argument("--no-tokenizer", action="store_true", help="weights and config only")
    args = p.parse_args(argv)
    try:
        out = hf_from_gguf(args.gguf, args.out_dir, tokenizer=not args.no_tokenizer)
    except SmolqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
