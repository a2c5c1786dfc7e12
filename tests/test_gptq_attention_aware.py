"""The value projection's attention-aware Hessian (--attention-aware, pipeline/fast_forward.attention_mix).

An attention head's output is A_h x W_hᵀ, so the Hessian of its error in the value weights is
Σ_h (A_h x)ᵀ(A_h x), not xᵀx. Checked against:
- the attention probabilities written out by hand in float64 (softmax of scaled q kᵀ under a
  causal or an explicit mask, grouped-query heads), for `attention_mix` itself;
- transformers' own eager attention probabilities (output_attentions), for the Hessian the
  pipeline hands the solver for each block's v_proj;
(for LLaMA, and for Gemma 3 through a sliding-window layer) and the option's plumbing: default
on onto ggml grids, off for --format gptq, refused nowhere.
"""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from smolq.pipeline import gptq as gptq_pipeline  # noqa: E402
from smolq.pipeline.fast_forward import attention_mix  # noqa: E402
from smolq.pipeline.gptq import quantize_hf_gptq  # noqa: E402
from test_gptq_pipeline import tiny, tiny_with_text  # noqa: E402,F401 - the same tiny LLaMA and calibration text

FAST = dict(nsamples=3, seqlen=24, quiet=True)


def _by_hand(q, k, x, mask, scale):
    """Σ_h (A_h x)ᵀ(A_h x), A_h = softmax(scale q_h k_gᵀ + mask), in float64."""
    q, k, x = q.double(), k.double(), x.double()
    heads, kv = q.shape[1], k.shape[1]
    H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(heads):
            s = q[b, h] @ k[b, h // (heads // kv)].T * scale
            s = s.masked_fill(~mask, -math.inf)
            y = torch.softmax(s, dim=-1) @ x[b]
            H += y.T @ y
    return H


# (L, d): 40 tokens of 12 take the head-by-head way, 16 of 48 the one through Σ_h A_hᵀA_h
@pytest.mark.parametrize("L, d", [(40, 12), (16, 48)])
@pytest.mark.parametrize("heads, kv, batch", [(4, 4, 1), (6, 2, 1), (4, 2, 2)])
def test_attention_mix_is_the_hand_written_sum(heads, kv, batch, L, d, monkeypatch):
    g = torch.Generator().manual_seed(heads * 10 + kv)
    hd = 8
    q, k = torch.randn(batch, heads, L, hd, generator=g), torch.randn(batch, kv, L, hd, generator=g)
    x = torch.randn(batch, L, d, generator=g)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    got = attention_mix(q, k, x, None, 0.3, causal=True)
    assert torch.allclose(got.double(), _by_hand(q, k, x, causal, 0.3), rtol=1e-5, atol=1e-5)
    # an explicit boolean mask (a sliding window of 5) is the one used
    window = causal & ~torch.ones(L, L, dtype=torch.bool).tril(-5)
    got = attention_mix(q, k, x, window[None, None].expand(batch, 1, L, L), 0.3, causal=True)
    assert torch.allclose(got.double(), _by_hand(q, k, x, window, 0.3), rtol=1e-5, atol=1e-5)
    # the same window as an additive float mask (transformers' eager convention)
    additive = torch.zeros(L, L).masked_fill(~window, torch.finfo(torch.float32).min)
    got = attention_mix(q, k, x, additive[None, None].expand(batch, 1, L, L), 0.3, causal=True)
    assert torch.allclose(got.double(), _by_hand(q, k, x, window, 0.3), rtol=1e-5, atol=1e-5)
    # one head at a time (the temporaries' bound) is the same sum
    from smolq.pipeline import fast_forward

    monkeypatch.setattr(fast_forward, "MIX_CHUNK_BYTES", 1)
    got = attention_mix(q, k, x, None, 0.3, causal=True)
    assert torch.allclose(got.double(), _by_hand(q, k, x, causal, 0.3), rtol=1e-5, atol=1e-5)
    # and it is not xᵀx: the first tokens, which every later one attends to, weigh more
    assert not torch.allclose(got, sum(x[b].T @ x[b] for b in range(batch)), rtol=0.1)


def _record_solver_hessians(monkeypatch):
    """{linear name: the Hessian the solver was given}, for every block."""
    seen = {}
    real = gptq_pipeline._solve_linear

    def recording(lin, hessians, *args, **kwargs):
        seen[len(seen)] = hessians.full.clone()
        return real(lin, hessians, *args, **kwargs)

    monkeypatch.setattr(gptq_pipeline, "_solve_linear", recording)
    return seen


def _eager_value_hessians(block, names, acts, dev, kind=None, parts=None, stages=None, value=None):
    """The reference: every Linear's input Hessian, and v_proj's from transformers' eager attention
    probabilities (the block's attention switched to "eager" for this forward, its weights hooked)."""
    from smolq.transforms.gptq import HessianAccumulator

    value = value if value in names else None
    accs = {n: HessianAccumulator(block.get_submodule(n).weight.shape[1]) for n in names}
    xs = {}

    def input_hook(name):
        def hook(_m, args):
            xs[name] = args[0]
            if name != value:
                accs[name].add(args[0])
        return hook

    def attention_hook(_m, _args, out):
        A = out[1][0]  # [heads, L, L], softmaxed
        x = xs[value][0]
        accs[value].add_gram(sum((A[h] @ x).T @ (A[h] @ x) for h in range(A.shape[0])))

    def causal_mask(_m, args, kwargs):
        # the block inputs carry no mask (the sdpa convention: causal implied); eager needs one,
        # written here: causal, and for a sliding-window layer keys less than the window back
        # (transformers' rule: kv_idx > q_idx - sliding_window)
        if kwargs.get("attention_mask") is None:
            L = kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs else args[0].shape[1]
            i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
            hidden = j > i
            if kind == "sliding_attention":
                hidden = hidden | (j <= i - block.self_attn.config.sliding_window)
            kwargs["attention_mask"] = torch.zeros(1, 1, L, L).masked_fill(hidden, torch.finfo(torch.float32).min)
        elif kwargs["attention_mask"].dtype == torch.bool:  # sdpa's form (True: attend); eager adds its mask
            keep = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        return args, kwargs

    attn = block.self_attn
    handles = [block.get_submodule(n).register_forward_pre_hook(input_hook(n)) for n in names]
    handles.append(attn.register_forward_pre_hook(causal_mask, with_kwargs=True))
    if value is not None:
        handles.append(attn.register_forward_hook(attention_hook))
    kept = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        gptq_pipeline._run_block(block, acts, dev, kind=kind)
    finally:
        attn.config._attn_implementation = kept
        for h in handles:
            h.remove()
    return {n: gptq_pipeline._Hessians(a.H) for n, a in accs.items()}


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A tiny Gemma 3 (its first layers slide a window of 5 tokens) and the same calibration text."""
    return tiny_with_text(tmp_path_factory.mktemp("gemma3-aware"), "gemma3", seed=4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pipeline_value_hessian_is_transformers_attention(family, request, monkeypatch):
    root, hf = request.getfixturevalue("tiny" if family == "llama" else "tiny_gemma3")
    if family == "gemma3":
        import json

        cfg = json.loads((hf / "config.json").read_text())
        kinds = cfg.get("layer_types") or ["sliding_attention"]
        assert kinds[0] == "sliding_attention" and cfg["sliding_window"] < FAST["seqlen"]  # the window matters
    kw = dict(format="gguf", qtype="q4_0", calib=root / "calib.txt", hessian_reg="0", attention_aware=True, **FAST)
    monkeypatch.setenv("SMOLQ_GPTQ_FORWARD", "float32")
    seen = _record_solver_hessians(monkeypatch)
    quantize_hf_gptq(hf, root / "ours.gguf", **kw)
    ours = dict(seen)
    seen.clear()
    monkeypatch.setattr(gptq_pipeline, "_collect_hessians", _eager_value_hessians)
    quantize_hf_gptq(hf, root / "ref.gguf", **kw)
    ref = seen
    assert len(ours) == len(ref) == 14
    # Block 0 (its 7 Linears): the v_proj Hessian sees the model's own inputs and must agree to
    # float noise; the Linears after it see inputs through quantized ones, where the two
    # attentions' last bits can round a weight the other way. Block 1 compounds that (0.5 %),
    # so it is left out.
    for i in range(7):
        err = float((ours[i] - ref[i]).abs().max() / ref[i].abs().max())
        assert err < (1e-5 if i == 2 else 1e-3), (i, err)
    # v_proj (the third Linear of each block) got the attention-aware one, not its input's (q's)
    for v, q in ((2, 0), (9, 7)):
        assert not torch.allclose(ours[v], ours[q], rtol=0.05)


def test_off_means_the_input_hessian(tiny, monkeypatch):
    root, hf = tiny
    kw = dict(format="gguf", qtype="q4_0", calib=root / "calib.txt", hessian_reg="0", **FAST)
    seen = _record_solver_hessians(monkeypatch)
    s = quantize_hf_gptq(hf, root / "off.gguf", attention_aware=False, **kw)
    assert not s["attention_aware"]
    assert torch.equal(seen[2], seen[0]) and torch.equal(seen[9], seen[7])  # v's Hessian is q's (one input)
    on = quantize_hf_gptq(hf, root / "on.gguf", **kw)
    assert on["attention_aware"]  # the default onto a ggml grid
    assert (root / "on.gguf").read_bytes() != (root / "off.gguf").read_bytes()


def test_families_without_it_say_so(tmp_path):
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("gptj", tmp_path / "hf", seed=2)
    (tmp_path / "calib.txt").write_text("one two three four five six seven eight " * 40)
    s = quantize_hf_gptq(hf, tmp_path / "gptj.gguf", format="gguf", qtype="q4_0", calib=tmp_path / "calib.txt",
                         **FAST)
    assert not s["attention_aware"]


def test_cli_option_and_calib_alone_means_gptq(tiny, capsys):
    import json

    from smolq.cli import main

    root, hf = tiny
    rc = main(["quantize", str(hf), str(root / "cli.gguf"), "--type", "q4_0", "--calib",
               str(root / "calib.txt"), "--nsamples", "3", "--seqlen", "24", "--no-attention-aware", "--json", "-q"])
    assert rc in (0, None)
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "gptq" and summary["attention_aware"] is False
    assert set(summary["hessian_reg"]["chosen"].values()) == {0.75}
