"""HF GPTQ checkpoints: qweight / qzeros / scales / g_idx safetensors (gptq.md 2).

Per quantized Linear (in = in_features, out = out_features, G groups):
  qweight int32 [in*bits/32, out]   packed along the input dim
  qzeros  int32 [G, out*bits/32]    packed along the output dim
  scales  fp16  [G, out]
  g_idx   int32 [in]
Words hold 32/bits values least-significant first; 3-bit packs 32 values
into 3 words ("10|1|10|1|10", gptq.md 2.3), which is the same thing as one
96-bit little-endian integer holding value k at bits 3k.
Zero points: checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" the
true zero (gptq.md 2.4). smolq writes v1 and reads both.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from smolq import kernels
from smolq.errors import FormatError, InputError
from smolq.formats import safetensors_file
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CONFIG_NAMES = ("quantize_config.json", "quant_config.json", "config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


# ---------------------------------------------------------------------------
# word packing (numpy reference; the C kernel does the same, tests hold them equal)
# ---------------------------------------------------------------------------


def pack_words_numpy(values: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """[n, m] ints in [0, 2**bits) -> int32 words packed along `axis`.

    Every 32 values along the axis become `bits` words: a run of 32·bits bits
    in which value k sits at bit offset bits·k, split into 32-bit words
    least-significant first. For bits 2/4/8 that is 32/bits values per word;
    for 3 bits it is exactly the 10|1|10|1|10 layout.
    """
    v = np.asarray(values).astype(np.uint64)
    if axis == 1:
        return pack_words_numpy(v.T, bits, 0).T.copy()
    n, m = v.shape
    if n % 32:
        raise ValueError(f"{n} values do not fill whole groups of 32")
    v = v.reshape(n // 32, 32, m)
    words = np.zeros((n // 32, bits, m), dtype=np.uint64)
    for k in range(32):
        bit = bits * k
        w, off = divmod(bit, 32)
        words[:, w] |= (v[:, k] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:  # straddles into the next word
            words[:, w + 1] |= v[:, k] >> np.uint64(32 - off)
    return words.astype(np.uint32).view(np.int32).reshape(n // 32 * bits, m)


def unpack_words_numpy(packed: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    p = np.asarray(packed)
    if axis == 1:
        return unpack_words_numpy(p.T, bits, n, 0).T.copy()
    m = p.shape[1]
    words = p.view(np.uint32).astype(np.uint64).reshape(n // 32, bits, m)
    mask = np.uint64((1 << bits) - 1)
    out = np.zeros((n // 32, 32, m), dtype=np.uint64)
    for k in range(32):
        w, off = divmod(bits * k, 32)
        val = words[:, w] >> np.uint64(off)
        if off + bits > 32:
            val |= words[:, w + 1] << np.uint64(32 - off)
        out[:, k] = val & mask
    return out.reshape(n, m).astype(np.int32)


def pack_words(values: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Pack with the C kernel (pack_words_numpy is the spec it is tested against)."""
    return kernels.gptq_pack(np.asarray(values, dtype=np.int32), bits, axis)


def unpack_words(packed: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    return kernels.gptq_unpack(np.asarray(packed), bits, n, axis)


# ---------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------


@dataclass
class GPTQLayer:
    """One quantized Linear in unpacked form (what IntGrid produces)."""

    qint: np.ndarray  # [out, in] levels in [0, 2**bits)
    scales: np.ndarray  # [G, out] float (exact fp16 values)
    zeros: np.ndarray  # [G, out] true zero points
    g_idx: np.ndarray  # [in]
    bits: int

    @classmethod
    def from_grid(cls, grid) -> "GPTQLayer":
        return cls(qint=grid.qint.cpu().numpy(), scales=grid.scales.cpu().numpy(),
                   zeros=grid.zeros.cpu().numpy().astype(np.int64), g_idx=grid.g_idx.cpu().numpy(), bits=grid.bits)

    def dequantize(self) -> np.ndarray:
        """[out, in] float32: scale·(q − zero), gathered through g_idx."""
        s = self.scales.astype(np.float32)[self.g_idx].T
        z = self.zeros.astype(np.float32)[self.g_idx].T
        return s * (self.qint.astype(np.float32) - z)

    def packed(self, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
        zeros = self.zeros - 1 if checkpoint_format == "gptq" else self.zeros
        if zeros.min() < 0 or zeros.max() >= 1 << self.bits:
            raise ValueError(f"zero points out of range for {checkpoint_format} storage")
        return {
            "qweight": pack_words(self.qint.T.astype(np.int32), self.bits, 0),
            "qzeros": pack_words(zeros.astype(np.int32), self.bits, 1),
            "scales": self.scales.astype(np.float16),
            "g_idx": self.g_idx.astype(np.int32),
        }

    @classmethod
    def from_packed(cls, t: dict[str, np.ndarray], bits: int, checkpoint_format: str) -> "GPTQLayer":
        n_in = t["g_idx"].shape[0]
        n_out = t["scales"].shape[1]
        qint = unpack_words(t["qweight"], bits, n_in, 0).T
        zeros = unpack_words(t["qzeros"], bits, n_out, 1).astype(np.int64)
        if checkpoint_format == "gptq":
            zeros = (zeros + 1)  # v1: every loader adds one back (gptq.md 2.4)
        return cls(qint=qint, scales=t["scales"].astype(np.float32), zeros=zeros,
                   g_idx=t["g_idx"].astype(np.int64), bits=bits)


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def quantize_config(bits: int, group_size: int, *, sym: bool, desc_act: bool, static_groups: bool,
                    true_sequential: bool, damp: float, checkpoint_format: str = "gptq") -> dict:
    """AutoGPTQ's quantize_config.json fields (gptq.md 2.5), plus transformers' `format`."""
    return {
        "bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": desc_act,
        "static_groups": static_groups, "sym": sym, "true_sequential": true_sequential,
        "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
        "checkpoint_format": checkpoint_format, "format": checkpoint_format,
    }


def read_quantize_config(directory: Path) -> dict:
    """quantize_config.json, else quant_config.json, else config.json["quantization_config"]."""
    for name in CONFIG_NAMES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(path, f"unreadable JSON: {exc}") from None
        if name == "config.json":
            data = data.get("quantization_config")
            if not data:
                continue
        cfg = dict(data)
        cfg.setdefault("bits", cfg.get("w_bit"))
        cfg.setdefault("group_size", cfg.get("q_group_size", -1))
        fmt = cfg.get("checkpoint_format") or cfg.get("format") or "gptq"
        cfg["checkpoint_format"] = fmt
        if cfg.get("quant_method", "gptq") != "gptq" or fmt not in ("gptq", "gptq_v2"):
            raise InputError(path, f"not a GPTQ checkpoint this reader knows (quant_method "
                             f"{cfg.get('quant_method')!r}, format {fmt!r})")
        if cfg["bits"] not in (2, 3, 4, 8):
            raise InputError(path, f"unsupported GPTQ bits {cfg['bits']!r} (2, 3, 4, 8)")
        return cfg
    raise InputError(directory, "no quantize_config.json, quant_config.json or config.json quantization_config")


def is_gptq_dir(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        read_quantize_config(p)
    except (InputError, FormatError):
        return False
    return True


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(directory: Path, i: int, n: int, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """One safetensors shard in `directory`, the staging directory of an atomic_directory
    (the output appears only as a whole); returns its part of the weight map.

    Each tensor is written from its own memory (a view of the mapped source included): the
    library's save_file first turns every tensor into a bytes copy, which for a 1.1B
    model's embedding and head was 250 MiB more at the end of a GPTQ run."""
    name = shard_name(i, n)
    data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with open(directory / name, "wb") as fh:
        safetensors_file.write_arrays(fh, data, {"format": "pt"})
    return {k: name for k in tensors}


def finish_dir(directory: Path, src_dir: Path, weight_map: dict[str, str], qcfg: dict) -> None:
    """Index, config.json with quantization_config, quantize_config.json, tokenizer files."""
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = qcfg
    config["torch_dtype"] = "float16"
    config["dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, directory / name)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise FormatError(index, f"bad index: {exc}") from None
        files = [directory / n for n in names]
        for f in files:
            if not f.is_file():
                raise InputError(f, "shard named in model.safetensors.index.json is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError(directory, "no .safetensors files")
    return files


def read_gptq_dir(path: str | Path) -> tuple[dict, dict[str, Callable[[], np.ndarray]]]:
    """(quantization config, {tensor name: loader}) with every GPTQ layer
    dequantized lazily to `<module>.weight` (float32 [out, in]); other tensors
    come back as stored. Reads both zero conventions."""
    from safetensors import safe_open

    directory = Path(path)
    cfg = read_quantize_config(directory)
    where: dict[str, Path] = {}
    for f in _safetensors_files(directory):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    where[k] = f
        except Exception as exc:  # safetensors raises its own error types
            raise FormatError(f, f"not a readable safetensors file: {exc}") from None

    def load(name: str) -> np.ndarray:
        with safe_open(str(where[name]), framework="numpy") as st:
            if st.get_slice(name).get_dtype() != "BF16":
                return st.get_tensor(name)
        return _bf16_as_f32(where[name], name)

    out: dict[str, Callable[[], np.ndarray]] = {}
    modules = {k[: -len(".qweight")] for k in where if k.endswith(".qweight")}
    for m in sorted(modules):
        missing = [s for s in SUFFIXES if f"{m}.{s}" not in where and s != "g_idx"]
        if missing:
            raise FormatError(where[f"{m}.qweight"], f"{m}: GPTQ layer lacks {', '.join(missing)}")
        out[f"{m}.weight"] = _layer_loader(m, load, cfg, where)
    for k in where:
        if k.rsplit(".", 1)[0] in modules and k.rsplit(".", 1)[1] in SUFFIXES:
            continue
        out[k] = (lambda k=k: load(k))
    return cfg, out


def _bf16_as_f32(path: Path, name: str) -> np.ndarray:
    """A bfloat16 tensor widened exactly to float32 (bf16 is an f32's top half). numpy has no
    bfloat16, so safetensors' numpy reader refuses it; GPTQModel stores the unquantized tensors
    (norms, embeddings) of its checkpoints in bf16."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))[name]
        begin, end = info["data_offsets"]
        fh.seek(8 + n + begin)
        bits = np.frombuffer(fh.read(end - begin), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _layer_loader(m, load, cfg, where):
    def run() -> np.ndarray:
        t = {s: load(f"{m}.{s}") for s in ("qweight", "qzeros", "scales")}
        n_in = t["qweight"].shape[0] * 32 // cfg["bits"]
        if f"{m}.g_idx" in where:
            t["g_idx"] = load(f"{m}.g_idx")
        else:  # early GfL checkpoints: contiguous groups (gptq.md 2.7)
            gs = cfg["group_size"] if cfg["group_size"] > 0 else n_in
            t["g_idx"] = np.arange(n_in) // gs
        if t["g_idx"].shape[0] != n_in or t["g_idx"].max() >= t["scales"].shape[0]:
            raise FormatError(where[f"{m}.qweight"], f"{m}: g_idx does not match qweight/scales")
        return GPTQLayer.from_packed(t, cfg["bits"], cfg["checkpoint_format"]).dequantize()
    return run


def iter_dequantized(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    _, loaders = read_gptq_dir(path)
    for name, load in loaders.items():
        yield name, load()
