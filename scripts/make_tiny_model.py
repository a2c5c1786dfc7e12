#!/usr/bin/env python3
"""Make a tiny random Hugging Face checkpoint offline (see smolq/tiny.py).

    python scripts/make_tiny_model.py llama /tmp/tiny-llama --gqa --tied
    python scripts/make_tiny_model.py gptj /tmp/tiny-gptj --vocab-size legacy --dtype float16
"""
from __future__ import annotations

import argparse

from smolq.tiny import FAMILIES, make_tiny_model


def _vocab(value: str):
    return value if value == "legacy" else int(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("out_dir")
    p.add_argument("--gqa", action="store_true", help="LLaMA: 8 query heads sharing 2 KV heads")
    p.add_argument("--tied", action="store_true", help="LLaMA: tie_word_embeddings (no lm_head)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--weights", default="safetensors", choices=["safetensors", "bin"])
    p.add_argument("--vocab-size", type=_vocab, default=None, help="an integer, or 'legacy' for GPT4All sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-params-style", default="nested", choices=["top", "nested"])
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    out = make_tiny_model(
        args.family,
        args.out_dir,
        gqa=args.gqa,
        tied=args.tied,
        dtype=args.dtype,
        shards=args.shards,
        weights=args.weights,
        vocab_size=args.vocab_size,
        seed=args.seed,
        rope_params_style=args.rope_params_style,
        hidden_size=args.hidden_size,
        n_layers=args.layers,
    )
    print(out)


if __name__ == "__main__":
    main()
