"""Calibration sequences for GPTQ: from a text file, a jsonl file, or the model itself.

- Plain text: the whole file is tokenized once and `nsamples` random windows
  of `seqlen` tokens are cut from it (the reference's C4/wikitext recipe,
  gptq.md 1.9). A text shorter than one window gives one short sample.
- jsonl (one JSON object per line with a "text" field, or an "input_ids"
  list of token ids used as they are, untokenized): random records; a
  record longer than `seqlen` contributes a random window, a shorter one is
  kept whole. Token-id records let another tool calibrate on exactly the
  tokens smolq sees (scripts/bench_gptq.py --peers). Each sample is its
  own sequence of its own length, run as a batch of one, so no padding is
  ever needed; `attention_mask` is still returned (all ones) for callers
  that batch.
- No file: data-free. Sequences are sampled from the unquantized model
  itself (temperature 1, starting from BOS). Cheaper than real text and
  slightly worse; the summary says so.

`seqlen` is capped by the model's context length. Everything is
deterministic for a given seed.

Without --nsamples/--seqlen (None) the windows follow the text (issue #19:
the reference's 128 x 2048 cut from an 8K-token text showed every token ~30
times and took half an hour on a 135M model): windows of AUTO_SEQLEN tokens,
as many as cover the text about MAX_REPEAT times, at most AUTO_MAX_SAMPLES
(64 x 512 is a few minutes for SmolLM2-135M on 2 CPU cores). A jsonl file
gets one window per record, at most AUTO_MAX_SAMPLES; data-free sampling
keeps DATA_FREE_DEFAULT.

Each sample also carries its part of a fit / held-out split (`parts`), for
choosing the Hessian regularisation by cross-validation (--hessian-reg auto):
held-out samples share no token with fit samples. A text: windows wholly in
its last quarter are held out, windows wholly before it fit, windows across
the cut are in neither part (they still calibrate the final solve). jsonl:
every HOLD_OUT_EVERY-th record is held out; data-free: every HOLD_OUT_EVERY-th
sequence.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from smolq.errors import InputError

DATA_FREE_MAX_SEQLEN = 512  # sampling from the model costs one forward per token
AUTO_SEQLEN = 512
AUTO_MAX_SAMPLES = 64
MAX_REPEAT = 2  # automatic windows see each token of the text about this many times at most
DATA_FREE_DEFAULT = (128, DATA_FREE_MAX_SEQLEN)  # (nsamples, seqlen) when neither is given
HOLD_OUT_EVERY = 4  # a quarter of the calibration is held out for cross-validation
FIT, HELD = "fit", "held"


@dataclass
class Calibration:
    samples: list  # LongTensor [1, L] each
    source: str  # "file:<path>", "jsonl:<path>" or "data-free"
    seqlen: int
    notes: list[str] = field(default_factory=list)
    parts: list = field(default_factory=list)  # per sample FIT, HELD or None (module docstring)

    def attention_mask(self, i: int):
        import torch

        return torch.ones_like(self.samples[i])

    @property
    def n_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.samples)  # samples may be batches of equal length


def model_context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def auto_windows(n_tokens: int, nsamples: int | None, seqlen: int | None, ctx: int | None) -> tuple[int, int]:
    """(nsamples, seqlen) for a text of `n_tokens`, filling in whichever is None (module docstring)."""
    if seqlen is None:
        seqlen = max(2, min(AUTO_SEQLEN, ctx or AUTO_SEQLEN, n_tokens))
    if nsamples is None:
        nsamples = max(1, min(AUTO_MAX_SAMPLES, MAX_REPEAT * n_tokens // seqlen))
    return nsamples, seqlen


def load_calibration(model, tokenizer, calib: str | Path | None, *, nsamples: int | None = None,
                     seqlen: int | None = None, seed: int = 0) -> Calibration:
    if (nsamples is not None and nsamples < 1) or (seqlen is not None and seqlen < 2):
        raise InputError(calib, "--nsamples must be >= 1 and --seqlen >= 2")
    notes = []
    ctx = model_context_length(model.config)
    if ctx is not None and seqlen is not None and seqlen > ctx:
        notes.append(f"seqlen {seqlen} capped at the model's context length {ctx}")
        seqlen = ctx
    rng = random.Random(seed)
    if calib is None:
        nsamples = DATA_FREE_DEFAULT[0] if nsamples is None else nsamples
        seqlen = DATA_FREE_DEFAULT[1] if seqlen is None else seqlen
        n = min(seqlen, DATA_FREE_MAX_SEQLEN)
        if n < seqlen:
            notes.append(f"data-free calibration: sequences of {n} tokens sampled from the model")
        else:
            notes.append("data-free calibration: sequences sampled from the unquantized model")
        samples = sample_from_model(model, tokenizer, nsamples, n, seed)
        return Calibration(samples, "data-free", n, notes, _every_kth(range(len(samples))))
    path = Path(calib)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "calibration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read calibration text: {exc}") from None
    records = _jsonl_records(path, text)
    if records is not None:
        nsamples = min(AUTO_MAX_SAMPLES, len(records)) if nsamples is None else nsamples
        seqlen = min(AUTO_SEQLEN, ctx or AUTO_SEQLEN) if seqlen is None else seqlen
        _check_token_ids(path, records, getattr(model.config, "vocab_size", None))
        samples, record_ids = _from_records(tokenizer, records, nsamples, seqlen, rng, path)
        return Calibration(samples, f"jsonl:{path}", seqlen, notes, _every_kth(record_ids))
    ids = _encode(tokenizer, text)
    if nsamples is None or seqlen is None:
        nsamples, seqlen = auto_windows(ids.shape[1], nsamples, seqlen, ctx)
        notes.append(f"calibration: {nsamples} windows of {seqlen} tokens from a text of {ids.shape[1]} tokens "
                     f"(--nsamples/--seqlen choose others)")
    samples, starts = _from_text(ids, nsamples, seqlen, rng, path)
    if len(samples) == 1 and samples[0].shape[1] < seqlen:
        notes.append(f"calibration text has only {samples[0].shape[1]} tokens: one short sample")
    return Calibration(samples, f"file:{path}", seqlen, notes, _text_parts(starts, samples, ids.shape[1]))


def _every_kth(ids) -> list:
    return [HELD if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else FIT for i in ids]


def _text_parts(starts, samples, n_tokens: int) -> list:
    """Windows wholly in the text's last quarter: HELD; wholly before it: FIT; across: None."""
    cut = n_tokens - n_tokens // HOLD_OUT_EVERY
    return [HELD if s >= cut else FIT if s + w.shape[1] <= cut else None for s, w in zip(starts, samples)]


def _jsonl_records(path: Path, text: str) -> list[str | list[int]] | None:
    """Each line's "text" string or "input_ids" list when the file is jsonl, else None (plain text)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].lstrip().startswith("{"):
        return None
    out = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError:
            if n == 1:
                return None  # plain text that happens to start with "{"
            raise InputError(path, f"line {n}: not valid JSON") from None
        record = _record(obj)
        if record is None:
            raise InputError(path, f"line {n}: expected an object with a \"text\" string or an \"input_ids\" "
                                   f"list of non-negative integers")
        if record:
            out.append(record)
    if not out:
        raise InputError(path, "no non-empty \"text\" or \"input_ids\" records")
    return out


def _check_token_ids(path: Path, records, vocab: int | None) -> None:
    """Token ids the model has no embedding for are the file's fault, said before any forward."""
    top = max((max(r) for r in records if not isinstance(r, str)), default=-1)
    if vocab and top >= vocab:
        raise InputError(path, f"token id {top} is outside the model's vocabulary of {vocab}")


def _record(obj) -> str | list[int] | None:
    """A jsonl line's text or token ids; None when it holds neither."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("text"), str):
        return obj["text"]
    ids = obj.get("input_ids")
    if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return ids
    return None


def _encode(tokenizer, text: str):
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    return ids.to(torch.long)


def _ids(ids: list[int]):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def _from_text(ids, nsamples, seqlen, rng, path):
    n = ids.shape[1]
    if n < 2:
        raise InputError(path, "calibration text is empty")
    if n <= seqlen:
        return [ids], [0]
    out, starts = [], []
    for _ in range(nsamples):
        start = rng.randrange(0, n - seqlen + 1)
        out.append(ids[:, start:start + seqlen])
        starts.append(start)
    return out, starts


def _from_records(tokenizer, records, nsamples, seqlen, rng, path):
    order = list(range(len(records)))
    rng.shuffle(order)
    out, record_ids = [], []
    for i in (order * (nsamples // len(order) + 1))[:nsamples]:
        ids = _encode(tokenizer, records[i]) if isinstance(records[i], str) else _ids(records[i])
        if ids.shape[1] > seqlen:
            start = rng.randrange(0, ids.shape[1] - seqlen + 1)
            ids = ids[:, start:start + seqlen]
        if ids.shape[1] >= 2:
            out.append(ids)
            record_ids.append(i)
    if not out:
        raise InputError(path, "every record is shorter than 2 tokens")
    return out, record_ids


def sample_from_model(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch: int = 16):
    """Data-free calibration: sequences the model writes itself, from BOS."""
    import torch

    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for b0 in range(0, nsamples, batch):
            nb = min(batch, nsamples - b0)
            ids = torch.full((nb, 1), bos, dtype=torch.long, device=device)
            past = None
            step = ids
            for _ in range(seqlen - 1):
                res = model(input_ids=step, past_key_values=past, use_cache=True)
                past = res.past_key_values
                probs = torch.softmax(res.logits[:, -1].float(), dim=-1).cpu()
                step = torch.multinomial(probs, 1, generator=gen).to(device)
                ids = torch.cat([ids, step], dim=1)
            out.extend(ids[i:i + 1].cpu() for i in range(nb))
    return out
