"""Round-trip statistics against numpy, and the checksum against a pure-Python
rendering of its definition (smolq_kernel.h)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import smolq.kernels as K


def numpy_stats(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    r, t = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    e = r - t
    return {
        "rmse": float(np.sqrt(np.mean(e * e))),
        "max_abs": float(np.abs(e).max()),
        "snr_db": float(10 * np.log10(np.sum(r * r) / np.sum(e * e))),
        "cosine": float(np.dot(r, t) / (np.linalg.norm(r) * np.linalg.norm(t))),
    }


@pytest.mark.parametrize("n", [1, 1000, 200_003])
def test_error_stats_match_numpy(n):
    rng = np.random.default_rng(n)
    ref = rng.standard_normal(n).astype(np.float32)
    test = (ref + rng.standard_normal(n) * 0.01).astype(np.float32)
    want = numpy_stats(ref, test)
    for threads in (1, 3):
        got = K.error_stats(ref, test, threads=threads)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_error_stats_of_a_real_quantization():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    y = K.dequantize(K.quantize(x, "Q4_0"), "Q4_0", x.shape)
    got, want = K.error_stats(x, y), numpy_stats(x, y)
    assert got["snr_db"] == pytest.approx(want["snr_db"], rel=1e-9)
    assert 15 < got["snr_db"] < 25  # 4-bit RTN on Gaussian data: roughly 18-20 dB
    assert got["max_abs"] == pytest.approx(want["max_abs"], rel=1e-12)


def test_error_stats_edge_cases():
    z = np.zeros(10, np.float32)
    one = np.ones(10, np.float32)
    s = K.error_stats(z, z)
    assert s["rmse"] == 0 and s["max_abs"] == 0 and s["snr_db"] == math.inf and s["cosine"] == 1.0
    s = K.error_stats(one, one)
    assert s["snr_db"] == math.inf and s["cosine"] == pytest.approx(1.0)
    assert K.error_stats(z, one)["cosine"] == 0.0
    assert K.error_stats(one, -one)["cosine"] == pytest.approx(-1.0)
    nan = one.copy()
    nan[3] = np.nan
    assert math.isnan(K.error_stats(one, nan)["max_abs"])
    with pytest.raises(ValueError, match="vs"):
        K.error_stats(one, z[:5])


def python_checksum(data: bytes) -> int:
    """The definition: FNV-1a 64 of each 1 MiB chunk, then FNV-1a 64 over the
    chunk hashes (8 bytes LE each) and the total length (8 bytes LE)."""
    mask, prime, offset = (1 << 64) - 1, 0x100000001B3, 0xCBF29CE484222325

    def fnv(h: int, bs: bytes) -> int:
        for b in bs:
            h = ((h ^ b) * prime) & mask
        return h

    chunk = 1 << 20
    h = offset
    for i in range(0, len(data), chunk):
        h = fnv(h, fnv(offset, data[i:i + chunk]).to_bytes(8, "little"))
    return fnv(h, len(data).to_bytes(8, "little"))


def test_checksum_matches_its_definition():
    rng = np.random.default_rng(7)
    for n in (0, 1, 13, (1 << 20) + 4097):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert K.checksum(data) == python_checksum(data)
    assert K.checksum(b"") == python_checksum(b"")


def test_checksum_is_stable_and_sensitive():
    rng = np.random.default_rng(8)
    buf = rng.integers(0, 256, 3 * (1 << 20) + 5, dtype=np.uint8)
    base = K.checksum(buf, threads=1)
    assert all(K.checksum(buf, threads=t) == base for t in (2, 3, 0))
    assert K.checksum(bytes(buf)) == base and K.checksum(memoryview(bytes(buf))) == base
    seen = {base}
    for pos in (0, 1, 1 << 20, buf.size - 1, int(rng.integers(0, buf.size))):
        for bit in (0, 7):
            flipped = buf.copy()
            flipped[pos] ^= 1 << bit
            c = K.checksum(flipped)
            assert c not in seen
            seen.add(c)
    assert K.checksum(buf[:-1]) != base
    assert K.checksum(np.zeros(8, np.uint8)) != K.checksum(np.zeros(9, np.uint8))


def test_count_nonfinite():
    x = np.arange(100, dtype=np.float32)
    assert K.count_nonfinite(x) == 0
    x[[3, 50, 99]] = [np.nan, np.inf, -np.inf]
    assert K.count_nonfinite(x) == 3
