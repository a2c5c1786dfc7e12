"""MLC-LLM weights: the quantization schemes' bit layout and TVM's tensor cache.

A converted MLC-LLM model directory holds `params_shard_<n>.bin` files and
`tensor-cache.json`, which lists them (TVM's `tvm.contrib.tvmjs.dump_tensor_cache`,
what `mlc_llm convert_weight` calls; MLC-LLM before 2025 named the file
`ndarray-cache.json`, same layout):

    {"metadata": {"ParamSize": n, "ParamBytes": b, "BitsPerParam": bpp},
     "records": [                                     # one per shard file
        {"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": N,
         "records": [{"name", "shape", "dtype", "format", "nbytes", "byteOffset"}, ...],
         "md5sum": "..."}, ...]}

Arrays are stored raw, C order, little endian. Shards hold up to 32 MiB; an
array that would overflow the pending shard starts a new one, and one at least
half the cap gets a shard of its own (written before the pending one is closed),
exactly as TVM's sharding manager does. MLC-LLM passes encode_format
"f32-to-bf16", so every record says so, although only float32 arrays would be
converted (an f16 model has none).

Group quantization (mlc_llm/quantization/group_quantization.py, utils.py): a
Linear's weight [out, in] is quantized along `in` in groups of `group_size`;
q = clamp(round(w / scale + max_int), 0, 2 * max_int) with scale = max|w| /
max_int (max_int = 2**(bits-1) - 1), computed in the model dtype; the codes are
packed along the same axis, element r of a uint32 word at bits [r*bits,
(r+1)*bits) (32 // bits per word: 8 for int4, 10 for int3), a group padded with
zero codes to a whole number of words. Decoding: w = (q - max_int) * scale.
Layout "NK" (q4f16_1, q3f16_1) stores q_weight [out, words] and q_scale
[out, groups]; "KN" (q4f16_0, q3f16_0) stores both transposed. Embeddings are
always [vocab, words] / [vocab, groups].
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolq.errors import FormatError
from smolq.lazy import lazy_module

np = lazy_module("numpy")  # imported at first use: `smolq --help` stays fast

CACHE_JSON = "tensor-cache.json"
OLD_CACHE_JSON = "ndarray-cache.json"  # MLC-LLM / TVM before the NDArray -> Tensor rename
CHAT_CONFIG = "mlc-chat-config.json"
SHARD_PREFIX = "params_shard"
SHARD_CAP = 32 << 20  # dump_tensor_cache's shard_cap_mb=32
ENCODE_FORMAT = "f32-to-bf16"  # what mlc_llm convert_weight passes for every array
CHAT_CONFIG_VERSION = "0.1.0"  # mlc_llm.support.constants.MLC_CHAT_CONFIG_VERSION


@dataclass(frozen=True)
class MLCQuant:
    """One of MLC-LLM's quantization names (mlc_llm/quantization/quantization.py)."""

    name: str
    bits: int | None  # None: no quantization (q0f16, q0f32)
    group_size: int
    layout: str  # "NK" | "KN" (linear_weight_layout)
    model_dtype: str = "float16"

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def words_per_group(self) -> int:
        return self.group_size // self.per_word

    def n_groups(self, k: int) -> int:
        return -(-k // self.group_size)

    def n_words(self, k: int) -> int:
        return self.n_groups(k) * self.words_per_group


QUANTS: dict[str, MLCQuant] = {q.name: q for q in (
    MLCQuant("q4f16_1", 4, 32, "NK"),
    MLCQuant("q4f16_0", 4, 32, "KN"),
    MLCQuant("q3f16_1", 3, 40, "NK"),
    MLCQuant("q0f16", None, 0, "NK"),
)}


def quantized_shapes(q: MLCQuant, rows: int, k: int, linear: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(q_weight, q_scale) shapes of a [rows, k] weight (rows: out features or vocabulary)."""
    w, s = (rows, q.n_words(k)), (rows, q.n_groups(k))
    if linear and q.layout == "KN":
        return w[::-1], s[::-1]
    return w, s


def pack_codes(codes: np.ndarray, q: MLCQuant) -> np.ndarray:
    """Codes [rows, k] (0 .. 2*max_int) -> uint32 words [rows, n_words(k)], zero codes as padding."""
    rows, k = codes.shape
    n = q.n_words(k)
    padded = np.zeros((rows, n * q.per_word), dtype=np.uint32)
    padded[:, :k] = codes
    padded = padded.reshape(rows, n, q.per_word)
    words = np.zeros((rows, n), dtype=np.uint32)
    for r in range(q.per_word):
        words |= padded[:, :, r] << np.uint32(r * q.bits)
    return words


def unpack_codes(words: np.ndarray, q: MLCQuant, k: int) -> np.ndarray:
    """uint32 words [rows, n] -> codes [rows, k] (the inverse of pack_codes)."""
    shifts = (np.arange(q.per_word, dtype=np.uint32) * np.uint32(q.bits))
    codes = (words[:, :, None] >> shifts) & np.uint32((1 << q.bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :k]


# ------------------------------------------------------------------ the tensor cache

class TensorCacheWriter:
    """Arrays -> params_shard_<n>.bin files in `directory` and their records, as TVM shards them."""

    def __init__(self, directory: str | os.PathLike, shard_cap: int = SHARD_CAP):
        self.directory = Path(directory)
        self.shard_cap = shard_cap
        self.shards: list[dict[str, Any]] = []
        self._pending: list[bytes] = []
        self._pending_records: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._names: set[str] = set()
        self.param_bytes = 0

    @property
    def n_arrays(self) -> int:
        return len(self._names)

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._names:
            raise ValueError(f"duplicate array {name} in the tensor cache")
        self._names.add(name)
        arr = np.ascontiguousarray(array)
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        self.param_bytes += len(data)
        rec = {"name": name, "shape": [int(d) for d in arr.shape], "dtype": str(arr.dtype),
               "format": ENCODE_FORMAT, "nbytes": len(data)}
        if self._pending_bytes + len(data) >= self.shard_cap:
            if len(data) * 2 >= self.shard_cap:  # out of band: a shard of its own
                rec["byteOffset"] = 0
                self._write_shard([data], [rec])
                return
            self._commit()
        rec["byteOffset"] = self._pending_bytes
        self._pending.append(data)
        self._pending_records.append(rec)
        self._pending_bytes += len(data)

    def _commit(self) -> None:
        if self._pending_bytes:
            self._write_shard(self._pending, self._pending_records)
        self._pending, self._pending_records, self._pending_bytes = [], [], 0

    def _write_shard(self, chunks: list[bytes], records: list[dict[str, Any]]) -> None:
        path = f"{SHARD_PREFIX}_{len(self.shards)}.bin"
        md5 = hashlib.md5()
        nbytes = 0
        with open(self.directory / path, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                md5.update(chunk)
                nbytes += len(chunk)
        self.shards.append({"dataPath": path, "format": "raw-shard", "nbytes": nbytes,
                            "records": records, "md5sum": md5.hexdigest()})

    def finish(self, metadata: dict[str, Any]) -> Path:
        """Close the last shard and write tensor-cache.json; returns its path."""
        self._commit()
        path = self.directory / CACHE_JSON
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"metadata": metadata, "records": self.shards}, fh, indent=4)
        return path


def read_tensor_cache(directory: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metadata, flat records with "dataPath" added) of an MLC directory's tensor cache."""
    d = Path(directory)
    path = d / CACHE_JSON if (d / CACHE_JSON).exists() else d / OLD_CACHE_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        flat = [{**rec, "dataPath": shard["dataPath"]} for shard in doc["records"] for rec in shard["records"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(path, f"not a TVM tensor cache: {exc}") from None
    return doc.get("metadata", {}), flat


def load_array(directory: str | os.PathLike, rec: dict[str, Any]) -> np.ndarray:
    """One record's array, read from its shard."""
    with open(Path(directory) / rec["dataPath"], "rb") as fh:
        fh.seek(rec["byteOffset"])
        data = fh.read(rec["nbytes"])
    return np.frombuffer(data, dtype=np.dtype(rec["dtype"]).newbyteorder("<")).reshape(rec["shape"])
