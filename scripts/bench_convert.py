#!/usr/bin/env python3
"""Benchmark `smolq convert` on a random LLaMA checkpoint: wall time, throughput, peak RSS.

    .venv/bin/python scripts/bench_convert.py                 # ~1.1B params (TinyLlama shapes), f16
    .venv/bin/python scripts/bench_convert.py --size small    # ~110M, quick check
    .venv/bin/python scripts/bench_convert.py --outtypes f16 q4_0 q8_0
    .venv/bin/python scripts/bench_convert.py --profile      # + time per phase (smolq.fileio.PROFILE)

The checkpoint is written as sharded f16 safetensors into a temp dir by a
streaming writer (one tensor in memory at a time). Each conversion runs in a
fresh child process, which reports its RSS after imports (the baseline) and
its peak RSS (VmHWM) after converting; the goal is peak - baseline < 1 GiB
for 1B. Results: a table on stdout and JSON in bench-results/.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # LLaMA shapes: (hidden, layers, heads, kv heads, intermediate, vocab)
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B
    "small": (768, 12, 12, 12, 2048, 32000),
}
SHARD_BYTES = 1 << 30


def llama_tensors(hidden, layers, heads, kv, inter, vocab):
    hd = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (heads * hd, hidden)
        yield p + "self_attn.k_proj.weight", (kv * hd, hidden)
        yield p + "self_attn.v_proj.weight", (kv * hd, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * hd)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng, sparse: bool = False) -> None:
    """A safetensors file written tensor by tensor (header first, then random f16 data).
    sparse: the data is a hole (zeros, no disk space): for memory checks of huge shapes."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            fh.truncate(8 + len(raw) + offset)
            return
        for name, shape in tensors:
            scale = 1.0 if len(shape) == 1 else 0.02
            data = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
            fh.write(data.tobytes())


def make_checkpoint(directory: Path, size: str, sparse: bool = False) -> int:
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    rng = np.random.default_rng(0)
    tensors = list(llama_tensors(hidden, layers, heads, kv, inter, vocab))
    shards, cur, cur_bytes = [], [], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if cur and cur_bytes + n > SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(directory / fname, shard, rng, sparse)
        weight_map.update({name: fname for name, _ in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory, vocab)
    return sum(int(np.prod(s)) for _, s in tensors)


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer.json padded to `vocab` ids (the bench measures tensors, not tokens)."""
    from smolq.sources.vocab import byte_encoder

    enc = byte_encoder()
    tokens = {enc[b]: b for b in range(256)}
    for i in range(256, vocab):
        tokens[f"tok{i}"] = i
    # ByteLevel's options spelled out: the tokenizers library refuses the file without them, and
    # bench_gptq.py --scaling / gpu_check.py run transformers on this directory.
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {"model": {"type": "BPE", "vocab": tokens, "merges": []},
          "pre_tokenizer": byte_level, "decoder": byte_level, "added_tokens": []}
    (directory / "tokenizer.json").write_text(json.dumps(tj))


CHILD = r"""
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import smolq
from smolq import convert
from smolq.fileio import PROFILE
PROFILE.enabled = sys.argv[4] == "1"
base = rss("VmRSS:")
t = time.perf_counter()
s = convert(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "baseline_rss": base, "peak_rss": rss("VmHWM:"), "bytes": s["bytes"],
                  "n_tensors": s["n_tensors"], "phases": PROFILE.as_dict()}))
"""


def run_one(src: Path, out: Path, outtype: str, profile: bool = False) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), outtype, "1" if profile else "0"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"convert failed for {outtype}:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--outtypes", nargs="+", default=["f16", "q4_0"])
    ap.add_argument("--workdir", default=None, help="where to put the checkpoint and outputs (default: a temp dir)")
    ap.add_argument("--results", default="bench-results")
    ap.add_argument("--profile", action="store_true", help="time per phase: produce, write, copy, writeback, fsync, rename")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="smolq-bench-") as tmp:
        src = Path(tmp) / "ckpt"
        src.mkdir()
        t = time.perf_counter()
        n_params = make_checkpoint(src, args.size)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"checkpoint: {n_params / 1e9:.2f}B params, {src_bytes / 2**30:.2f} GiB f16, "
              f"made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        rows = []
        for outtype in args.outtypes:
            out = Path(tmp) / f"out-{outtype}.gguf"
            r = run_one(src, out, outtype, args.profile)
            out.unlink()
            rows.append({
                "outtype": outtype, "wall_s": round(r["wall_s"], 2),
                "params_per_s": round(n_params / r["wall_s"]), "src_MiB_per_s": round(src_bytes / 2**20 / r["wall_s"], 1),
                "out_bytes": r["bytes"], "peak_rss_above_baseline_MiB": round((r["peak_rss"] - r["baseline_rss"]) / 2**20, 1),
                "baseline_rss_MiB": round(r["baseline_rss"] / 2**20, 1), "phases": r["phases"],
            })
    print(f"{'outtype':8} {'wall s':>8} {'Mparam/s':>9} {'src MiB/s':>10} {'out MiB':>9} {'peak RSS +MiB':>14}")
    for r in rows:
        print(f"{r['outtype']:8} {r['wall_s']:8.2f} {r['params_per_s'] / 1e6:9.1f} {r['src_MiB_per_s']:10.1f} "
              f"{r['out_bytes'] / 2**20:9.1f} {r['peak_rss_above_baseline_MiB']:14.1f}")
    if args.profile:
        for r in rows:
            print(f"\n{r['outtype']}: time per phase (per thread; produce runs beside write/copy)")
            for k, v in r["phases"].items():
                print(f"  {k:10} {v['calls']:5d} calls  wall {v['wall_s']:7.3f}  user {v['user_s']:7.3f}  "
                      f"sys {v['sys_s']:7.3f}")
    results = Path(args.results)
    results.mkdir(exist_ok=True)
    record = {"bench": "convert", "size": args.size, "n_params": n_params, "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows}
    path = results / f"convert-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
