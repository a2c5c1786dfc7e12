"""The numbers `smolq eval` reports, computed as llama.cpp's `llama-perplexity` computes them.

Per scored token (one row of logits predicting the next token): the model's
NLL, and against a reference model the reference's NLL, KL(ref || model),
whether both put their highest logit on the same token, and Δp (the model's
probability of the actual next token minus the reference's). `TokenStats`
keeps one float per token and quantity (the percentiles need them all; the
logits themselves are dropped window by window), `summarize` turns them into
what tools/perplexity/perplexity.cpp prints (function kl_divergence):

- a mean with its uncertainty: sqrt((mean(x^2) - mean(x)^2) / (n - 1)),
  0 for n <= 10 (`mean_and_uncertainty` there);
- PPL = exp(mean NLL) ± PPL * (uncertainty of the mean NLL);
- ln(PPL/PPL_ref) ± sqrt(u^2 + u_ref^2 - 2 cov), cov of the two mean NLLs;
- KLD percentiles by linear interpolation between the sorted values at
  fraction * (n - 1); the median is the mean of the two middle values;
- same top token: rate p ± sqrt(p (1 - p) / (n - 1));
- RMS Δp = sqrt(mean Δp^2) ± (uncertainty of mean Δp^2) / (2 RMS).

Where smolq differs from llama-perplexity, on purpose: llama-perplexity
stores the reference's log-probabilities as 16-bit integers over the top 16
nats (a step of at most 16/65535 nats) and leaves tokens more than 16 nats
below the reference's best out of the KL sum; smolq computes KL in float64
over the whole vocabulary, from the reference's logits of the same window.
On the same windows the mean KLDs agree to ~1e-4 nats and percentiles to a
few 1e-4 (tests/test_eval_kl.py on a tiny model; README: SmolLM2, 6e-4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from smolq.lazy import lazy_module

np = lazy_module("numpy")

# the KLD percentiles reported (llama-perplexity prints these and a few lower ones)
ROWS_PER_STEP = 64  # logits rows turned into statistics at once
KLD_PERCENTILES = (("max", 1.0), ("p99.9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@dataclass
class TokenStats:
    """One float per scored token and quantity, appended window by window."""

    nll: list = field(default_factory=list)
    nll_ref: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    same_top: list = field(default_factory=list)
    p_diff: list = field(default_factory=list)

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None = None) -> None:
        """logits [n, vocab] predicting targets [n]; ref_logits [n, vocab] of the reference, if any."""
        # a few rows at a time: float64 copies of 512 rows of a 128k vocabulary would take gigabytes
        for start in range(0, len(targets), ROWS_PER_STEP):
            rows = slice(start, start + ROWS_PER_STEP)
            self._add_rows(logits[rows], targets[rows], None if ref_logits is None else ref_logits[rows])

    def _add_rows(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None) -> None:
        rows = np.arange(len(targets))
        lp = log_softmax(logits)
        self.nll.append(-lp[rows, targets])
        if ref_logits is None:
            return
        rp = log_softmax(ref_logits)
        self.nll_ref.append(-rp[rows, targets])
        self.kld.append((np.exp(rp) * (rp - lp)).sum(-1))
        # argmax takes the first of equal maxima, as llama.cpp's strict '>' scan does
        self.same_top.append(np.argmax(logits, -1) == np.argmax(ref_logits, -1))
        self.p_diff.append(np.exp(lp[rows, targets]) - np.exp(rp[rows, targets]))

    @property
    def count(self) -> int:
        return sum(len(a) for a in self.nll)

    def values(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def mean_and_uncertainty(x: np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean) as llama-perplexity computes them."""
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    mean = float(x.sum()) / n
    var = float((x * x).sum()) / n - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of the means of a and b, as llama-perplexity computes it (0 below 10 values)."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float((a * b).sum()) / n - (float(a.sum()) / n) * (float(b.sum()) / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear between the sorted values around fraction * (n - 1)."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    pos = fraction * (len(sorted_values) - 1)
    i = int(pos)
    frac = pos - i
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - frac) * sorted_values[i] + frac * sorted_values[j])


def median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(sorted_values[n // 2]) if n % 2 else float(0.5 * (sorted_values[n // 2 - 1] + sorted_values[n // 2]))


def _ppl(nll: np.ndarray) -> dict[str, float]:
    mean, unc = mean_and_uncertainty(nll)
    ppl = math.exp(mean)
    return {"value": ppl, "unc": ppl * unc, "nll": mean}


def _kld(kld: np.ndarray) -> dict[str, float]:
    mean, unc = mean_and_uncertainty(kld)
    ordered = np.sort(kld)
    out = {"mean": mean, "unc": unc, "median": median(ordered)}
    out.update({name: percentile(ordered, frac) for name, frac in KLD_PERCENTILES})
    return out


def _ln_ppl_ratio(nll: np.ndarray, nll_ref: np.ndarray) -> dict[str, float]:
    mean, unc = mean_and_uncertainty(nll)
    mean_ref, unc_ref = mean_and_uncertainty(nll_ref)
    var = unc * unc + unc_ref * unc_ref - 2.0 * covariance(nll, nll_ref)
    return {"value": mean - mean_ref, "unc": math.sqrt(max(var, 0.0))}


def _same_top(same: np.ndarray) -> dict[str, float]:
    n = len(same)
    rate = float(same.sum()) / n
    return {"value": rate, "unc": math.sqrt(rate * (1 - rate) / (n - 1)) if n > 1 else 0.0}


def _p_diff(p_diff: np.ndarray) -> dict[str, float]:
    mean, unc = mean_and_uncertainty(p_diff)
    mse, mse_unc = mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    return {"mean": mean, "unc": unc, "rms": rms, "rms_unc": 0.5 / rms * mse_unc if rms > 0 else 0.0}


def summarize(stats: TokenStats) -> dict[str, Any]:
    """The JSON-able numbers of `smolq eval` (PPL always; the rest when a reference ran)."""
    nll = stats.values("nll")
    out: dict[str, Any] = {"n_scored": len(nll), "ppl": _ppl(nll)}
    if not stats.kld:
        return out
    nll_ref = stats.values("nll_ref")
    out["ppl_ref"] = _ppl(nll_ref)
    out["ln_ppl_ratio"] = _ln_ppl_ratio(nll, nll_ref)
    out["kld"] = _kld(stats.values("kld"))
    out["same_top"] = _same_top(stats.values("same_top"))
    out["p_diff"] = _p_diff(stats.values("p_diff"))
    return out
