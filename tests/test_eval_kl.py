"""`smolq eval --kl-against REF`: the numbers llama-perplexity --kl-divergence reports.

Oracles: llama.cpp's own llama-perplexity (same files, text, ctx and chunks,
run as a separate program) for the llama-cpp-python backend, and a small case
computed by hand for the statistics themselves.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from real_loaders import READERS_USED, require_llama_tool

REPO = Path(__file__).resolve().parents[1]
TOOLS = "llama.cpp tools (llama-quantize, llama-imatrix, llama-perplexity)"  # conftest's summary line
CTX, CHUNKS = 64, 12  # 12 chunks x 31 scored tokens: over the 100 llama-perplexity wants for its statistics
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs "
         "and many other creatures of the forest sing").split()


def _smolq(*args) -> subprocess.CompletedProcess:
    """smolq in a child process: llama-cpp-python (a native library) never runs inside the test process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "smolq", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA as HF dir, f32 GGUF and Q2_K GGUF (far enough from f32 for KLD to matter), and a text."""
    from smolq.cli import main
    from smolq.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("evalkl")
    make_tiny_model("llama", d / "hf", hidden_size=256, n_layers=2)
    assert main(["convert", str(d / "hf"), str(d / "f32.gguf"), "--outtype", "f32", "-q"]) == 0
    assert main(["quantize", str(d / "f32.gguf"), str(d / "q2_k.gguf"), "--type", "q2_k", "-q"]) == 0
    rng = np.random.default_rng(3)
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(60)) + "\n")
    return d


# --------------------------------------------------------------------------- llama-perplexity, the oracle

LLAMA_NUMBERS = {  # name -> regex over llama-perplexity's final statistics
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.]+) ±\s*([-\d.]+)",
    "ppl_ref": r"Mean PPL\(base\)\s*:\s*([-\d.]+) ±\s*([-\d.]+)",
    "kld": r"Mean    KLD:\s*([-\d.]+) ±\s*([-\d.]+)",
    "kld_p99": r"99\.0%   KLD:\s*([-\d.]+)",
    "kld_p90": r"90\.0%   KLD:\s*([-\d.]+)",
    "kld_median": r"Median  KLD:\s*([-\d.]+)",
    "kld_max": r"Maximum KLD:\s*([-\d.]+)",
    "same_top": r"Same top p:\s*([-\d.]+) ±\s*([-\d.]+) %",
    "rms_dp": r"RMS Δp    :\s*([-\d.]+) ±\s*([-\d.]+) %",
}


def _llama_perplexity(d: Path, *args, expect=LLAMA_NUMBERS.values()) -> str:
    tool = require_llama_tool("llama-perplexity")
    # -b CTX: one window per decode, as smolq runs them; -fa off: llama-cpp-python's default attention;
    # -t 1: two threads spin-wait for minutes on a busy 2-core machine
    # (flash attention, llama-perplexity's CPU default, rounds differently: ~1e-4 in PPL)
    cmd = [str(tool), "-f", "text.txt", "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), "-t", "1",
           "-fa", "off", *map(str, args)]
    for _ in range(5):  # its asynchronous logger can drop the last lines at exit (DESIGN.md): run again
        READERS_USED[TOOLS] += 1
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=d, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        if all(re.search(p, out) for p in expect):
            return out
    raise AssertionError(f"llama-perplexity printed no final statistics:\n{out[-3000:]}")


PLAIN_PPL = r"Final estimate: PPL = ([-\d.]+) \+/- ([-\d.]+)"


@pytest.fixture(scope="module")
def llama_numbers(tiny):
    out = _llama_perplexity(tiny, "-m", "f32.gguf", "--kl-divergence-base", "base.kld", expect=[PLAIN_PPL])
    plain = tuple(float(g) for g in re.search(PLAIN_PPL, out).groups())
    out = _llama_perplexity(tiny, "-m", "q2_k.gguf", "--kl-divergence-base", "base.kld", "--kl-divergence")
    found = {}
    for name, pattern in LLAMA_NUMBERS.items():
        match = re.search(pattern, out)
        assert match, f"no {name} in llama-perplexity's output:\n{out[-3000:]}"
        found[name] = tuple(float(g) for g in match.groups())
    found["plain_ppl_f32"] = plain
    return found


@pytest.fixture(scope="module")
def smolq_numbers(tiny):
    proc = _smolq("eval", tiny / "q2_k.gguf", "--text", tiny / "text.txt", "--ctx", CTX, "--max-windows", CHUNKS,
                  "--kl-against", tiny / "f32.gguf", "--backend", "llama", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_same_windows_as_llama_perplexity(smolq_numbers):
    s = smolq_numbers
    assert s["backend"].startswith("llama.cpp") and s["ref_backend"].startswith("llama.cpp")
    assert s["score"] == "second-half" and s["n_windows"] == CHUNKS
    assert s["n_tokens"] == CHUNKS * (CTX - 1 - CTX // 2)  # positions ctx/2 .. ctx-2 of each window
    assert s["bos"] == 1  # the tiny SentencePiece vocabulary adds BOS, so each window starts with it


def test_agrees_with_llama_perplexity(smolq_numbers, llama_numbers):
    """Tolerances. The model's logits are llama.cpp's in both runs (same source, one window per decode,
    no flash attention), so PPL(Q) agrees to the digits printed. llama-perplexity keeps the reference's
    log-probabilities as 16-bit steps of at most 16/65535 nats: each is off by at most
    d = 8/65535 = 1.2e-4 nats, which moves a token's NLL by <= d (PPL(base): relative <= d) and its KLD,
    sum p (lp_ref - lp), by <= d * (1 + sum p |lp_ref - lp|) ~ 2.5e-4 here; and it drops tokens more
    than 16 nats below the best (p < 1.2e-7 each, at most 384 of them here). Same top token: equal, but
    for near-ties the 16-bit steps can reorder, so one token either way."""
    s, ref = smolq_numbers["stats"], llama_numbers
    d = 8 / 65535
    kld_tol = 3 * d
    assert s["ppl"]["value"] == pytest.approx(ref["ppl"][0], rel=2e-6)
    assert s["ppl"]["unc"] == pytest.approx(ref["ppl"][1], rel=1e-4)
    assert s["ppl_ref"]["value"] == pytest.approx(ref["ppl_ref"][0], rel=d)
    assert s["kld"]["mean"] == pytest.approx(ref["kld"][0], abs=kld_tol)
    assert s["kld"]["unc"] == pytest.approx(ref["kld"][1], abs=kld_tol / 10)
    for ours, theirs in (("p99", "kld_p99"), ("p90", "kld_p90"), ("median", "kld_median"), ("max", "kld_max")):
        assert s["kld"][ours] == pytest.approx(ref[theirs][0], abs=kld_tol), ours
    one_token = 100.0 / smolq_numbers["n_tokens"]
    assert 100 * s["same_top"]["value"] == pytest.approx(ref["same_top"][0], abs=one_token + 5e-4)
    assert 100 * s["same_top"]["unc"] == pytest.approx(ref["same_top"][1], abs=0.05)
    assert 100 * s["p_diff"]["rms"] == pytest.approx(ref["rms_dp"][0], abs=5e-3)
    assert s["kld"]["mean"] > 100 * kld_tol  # the comparison means something: Q2_K is far from f32


def test_perplexity_alone_agrees_with_llama_perplexity(tiny, llama_numbers):
    """Without a reference: llama-perplexity's plain "Final estimate" on the f32 file (same logits; it
    prints 4 and 5 decimals)."""
    proc = _smolq("eval", tiny / "f32.gguf", "--text", tiny / "text.txt", "--ctx", CTX, "--max-windows", CHUNKS,
                  "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert "kld" not in s["stats"] and s["tokenizer"].endswith("(llama.cpp)")
    assert s["ppl"] == pytest.approx(llama_numbers["plain_ppl_f32"][0], abs=1e-4)
    assert s["stats"]["ppl"]["unc"] == pytest.approx(llama_numbers["plain_ppl_f32"][1], abs=1e-5)


def test_reference_backend_runs_what_llama_cpp_runs(tiny, cli):
    """The f32 GGUF through smolq's reference forward pass (in this process: no llama.cpp in it) and
    through llama.cpp (in a child): same perplexity (both float32; summation orders differ), and KL
    against the HF checkpoint (transformers) close to zero."""
    args = ("eval", tiny / "f32.gguf", "--text", tiny / "text.txt", "--ctx", CTX, "--max-windows", 4,
            "--kl-against", tiny / "hf", "--json", "--backend")
    res = cli(*args, "reference")
    assert res.returncode == 0, res.stderr[-3000:]
    proc = _smolq(*args, "llama")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {"reference": json.loads(res.stdout), "llama": json.loads(proc.stdout)}
    assert runs["reference"]["backend"] == "smolq reference" and runs["llama"]["backend"].startswith("llama.cpp")
    assert runs["reference"]["ref_backend"] == "transformers"
    assert runs["reference"]["ppl"] == pytest.approx(runs["llama"]["ppl"], rel=1e-4)
    assert runs["reference"]["kld"] < 1e-8 and runs["llama"]["kld"] < 1e-5
    assert runs["reference"]["stats"]["same_top"]["value"] == 1.0


@pytest.fixture(scope="module")
def legacy(tiny):
    from smolq.cli import main

    path = tiny / "q4_0.bin"
    assert main(["convert", str(tiny / "hf"), str(path), "--outtype", "q4_0", "-q"]) == 0
    return path


def test_legacy_file_runs_on_the_reference_backend(tiny, legacy):
    """auto: a legacy ggjt file is no GGUF for llama-cpp-python; smolq's forward pass runs it."""
    args = ("eval", legacy, "--text", tiny / "text.txt", "--ctx", CTX, "--max-windows", 4,
            "--kl-against", tiny / "f32.gguf", "--json")
    proc = _smolq(*args, "--tokenizer", tiny / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["backend"] == "smolq reference" and s["ref_backend"].startswith("llama.cpp")
    assert 0 < s["kld"] < 0.5 and s["stats"]["kld"]["p99"] >= s["stats"]["kld"]["median"]


def test_table_says_what_ran(tiny):
    proc = _smolq("eval", tiny / "q2_k.gguf", "--text", tiny / "text.txt", "--ctx", CTX, "--max-windows", 4,
                  "--kl-against", tiny / "f32.gguf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for label in ("PPL", "PPL(ref)", "mean KLD", "99% KLD", "median KLD", "same top token", "RMS Δp"):
        assert re.search(rf"^  {re.escape(label)} ", out, re.M), (label, out)
    assert "[llama.cpp (llama-cpp-python" in out and "second half of each window" in out


# --------------------------------------------------------------------------- the statistics by hand

def _rows(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_statistics_by_hand():
    """12 tokens over a 3-token vocabulary, target token 0 each time. The reference predicts
    P = (1/2, 1/4, 1/4) everywhere; the model predicts P 10 times, A = (1/4, 1/2, 1/4) once and
    B = (1/6, 1/6, 2/3) once."""
    from smolq.pipeline.eval_stats import TokenStats, summarize

    P, A, B = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [1 / 6, 1 / 6, 2 / 3]
    stats = TokenStats()
    stats.add(_rows([P] * 10 + [A, B]), np.zeros(12, dtype=np.int64), _rows([P] * 12))
    s = summarize(stats)

    kl_a = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # = ln2 / 4
    kl_b = 0.5 * math.log(3) + 0.25 * math.log(1.5) + 0.25 * math.log(0.375)
    kl = [0.0] * 10 + [kl_a, kl_b]  # sorted: kl_a < kl_b
    mean = sum(kl) / 12
    assert s["kld"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert s["kld"]["unc"] == pytest.approx(math.sqrt((sum(k * k for k in kl) / 12 - mean ** 2) / 11), rel=1e-12)
    assert s["kld"]["median"] == 0.0
    # llama-perplexity's percentile: between sorted[i] and sorted[i+1] at fraction * 11
    assert s["kld"]["p90"] == pytest.approx(0.9 * kl_a, rel=1e-6)            # 9.9: 0.1 * 0 + 0.9 * kl_a
    assert s["kld"]["p95"] == pytest.approx(0.55 * kl_a + 0.45 * kl_b, rel=1e-6)  # 10.45
    assert s["kld"]["p99"] == pytest.approx(0.11 * kl_a + 0.89 * kl_b, rel=1e-6)  # 10.89
    assert s["kld"]["max"] == pytest.approx(kl_b, rel=1e-12)

    assert s["same_top"]["value"] == pytest.approx(10 / 12)
    assert s["same_top"]["unc"] == pytest.approx(math.sqrt(10 / 12 * 2 / 12 / 11))

    nll = [math.log(2)] * 10 + [math.log(4), math.log(6)]
    nll_mean = sum(nll) / 12
    nll_unc = math.sqrt((sum(x * x for x in nll) / 12 - nll_mean ** 2) / 11)
    assert s["ppl"]["value"] == pytest.approx(math.exp(nll_mean), rel=1e-12)
    assert s["ppl"]["unc"] == pytest.approx(math.exp(nll_mean) * nll_unc, rel=1e-9)
    assert s["ppl_ref"]["value"] == pytest.approx(2.0, rel=1e-12)
    assert s["ppl_ref"]["unc"] == pytest.approx(0.0, abs=1e-7)  # constant NLL: zero up to cancellation

    dp = [0.0] * 10 + [0.25 - 0.5, 1 / 6 - 0.5]
    assert s["p_diff"]["mean"] == pytest.approx(sum(dp) / 12, rel=1e-12)
    assert s["p_diff"]["rms"] == pytest.approx(math.sqrt(sum(x * x for x in dp) / 12), rel=1e-12)


def test_few_tokens_have_no_uncertainty():
    """llama-perplexity gives no uncertainty for 10 values or fewer (and no covariance below 10)."""
    from smolq.pipeline.eval_stats import TokenStats, summarize

    stats = TokenStats()
    stats.add(_rows([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]), np.array([0, 1, 1]), _rows([[0.6, 0.4]] * 3))
    s = summarize(stats)
    assert s["ppl"]["unc"] == 0.0 and s["kld"]["unc"] == 0.0 and s["ln_ppl_ratio"]["unc"] == 0.0


class _Counting:
    """A fake model: logits from a fixed table by token id, counting its forward passes."""

    def __init__(self, table):
        self.table, self.calls, self.n_vocab = np.asarray(table, dtype=np.float32), 0, len(table[0])

    def logits(self, tokens):
        self.calls += 1
        return self.table[tokens]


def test_reference_logits_once_per_window_and_scored_positions():
    from smolq.pipeline.evaluate import _measure

    rng = np.random.default_rng(0)
    model, ref = _Counting(rng.normal(size=(5, 5))), _Counting(rng.normal(size=(5, 5)))
    tokens = rng.integers(1, 5, size=40)
    stats = _measure(model, ref, tokens, 0, 8, 4, 5)
    assert model.calls == 5 and ref.calls == 5
    assert stats.count == 5 * 3  # positions 4, 5, 6 of each window of 8 predict tokens 5, 6, 7
    first = tokens[:8]
    expected = [-(model.table[first[p]][first[p + 1]] - np.log(np.exp(model.table[first[p]].astype(np.float64)).sum()))
                for p in (4, 5, 6)]
    assert np.allclose(stats.nll[0], expected, rtol=1e-6)


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def other_vocab(tiny):
    """The same tiny LLaMA shape with another vocabulary size, as HF dir and GGUF."""
    from smolq.cli import main
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("llama", tiny / "hf-other", hidden_size=256, n_layers=2, vocab_size=400)
    assert main(["convert", str(hf), str(tiny / "other.gguf"), "--outtype", "f32", "-q"]) == 0
    return hf


def test_reference_with_another_vocabulary(tiny, other_vocab, cli):
    res = cli("eval", tiny / "hf", "--text", tiny / "text.txt", "--ctx", CTX, "--kl-against", other_vocab)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and str(other_vocab) in line and "vocabulary" in line, line


def test_gguf_reference_with_another_vocabulary_through_llama_cpp(tiny, other_vocab):
    proc = _smolq("eval", tiny / "q2_k.gguf", "--text", tiny / "text.txt", "--ctx", CTX,
                  "--kl-against", tiny / "other.gguf")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(r"other\.gguf.*vocabulary of \d+ tokens", proc.stderr), proc.stderr[-2000:]


def test_legacy_file_without_its_config(tiny, legacy, cli):
    """A ggjt header has no RMS norm epsilon: without an HF config to supply it, one line, exit 2."""
    res = cli("eval", legacy, "--text", tiny / "text.txt", "--ctx", CTX, "--kl-against", tiny / "f32.gguf",
              "--backend", "reference")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--tokenizer" in res.stderr, res.stderr
    assert str(legacy) in res.stderr


def test_llama_backend_refuses_a_legacy_file(tiny, legacy, cli):
    res = cli("eval", legacy, "--text", tiny / "text.txt", "--tokenizer", tiny / "hf", "--backend", "llama")
    assert res.returncode == 2 and "--backend llama" in res.stderr and str(legacy) in res.stderr, res.stderr


@pytest.mark.parametrize("args, says", [
    (("--score", "third"), "--score"),
    (("--backend", "fast"), "--backend"),
    (("--ctx", "3"), "--ctx"),
])
def test_bad_options(tiny, cli, args, says):
    res = cli("eval", tiny / "hf", "--text", tiny / "text.txt", *args)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
