"""Blocked causal attention and the in-place MLP (smolq/pipeline/fast_forward.py) against torch's own causal SDPA and
transformers' sdpa function, which it replaces where it applies."""
import pytest

torch = pytest.importorskip("torch")

from smolq.pipeline.fast_forward import block_bounds, blocked_causal_attention  # noqa: E402


class _Module(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def _qkv(length, heads=8, kv_heads=2, dim=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("length", [32, 64, 100, 512, 17])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_equals_full_causal_attention(length, kv_heads):
    q, k, v = _qkv(length, kv_heads=kv_heads)
    out, weights = blocked_causal_attention(_Module(8 // kv_heads), q, k, v, None, scaling=0.3)
    reps = 8 // kv_heads
    k_full, v_full = k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1)
    # Independent reference: the masked scores written out, softmax in float64.
    scores = (q.double() @ k_full.double().transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) @ v_full.double()).transpose(1, 2)
    assert weights is None and out.shape == (2, length, 8, 16) and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_blocks_cover_the_sequence_once():
    for length in (32, 33, 100, 128, 512, 2048, 4096):
        b = block_bounds(length)
        assert b[0][0] == 0 and b[-1][1] == length and all(e1 == s2 for (_, e1), (s2, _) in zip(b, b[1:]))
        assert len(b) <= 8 and all(e - s >= 16 for s, e in b)


def test_a_mask_goes_to_transformers_sdpa_unchanged():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(64)
    mask = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    ours, _ = blocked_causal_attention(_Module(4), q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Module(4), q, k, v, mask, scaling=0.25)
    assert torch.equal(ours, theirs)  # the same call, not a recomputation


def test_inplace_mlp_is_bit_identical_and_only_where_it_applies():
    from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

    from smolq.pipeline.fast_forward import NAME, use_fast_paths

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 48))
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 48, 64)
    with torch.no_grad():
        ref_mlp, ref_logits = mlp(x), model(ids).logits
        use_fast_paths(model)
        assert model.config._attn_implementation == NAME and "forward" in vars(mlp)
        assert torch.equal(mlp(x), ref_mlp)
        torch.testing.assert_close(model(ids).logits, ref_logits, rtol=1e-5, atol=1e-5)
    gemma = Gemma3MLP(Gemma3TextConfig(hidden_size=64, intermediate_size=176))
    use_fast_paths(torch.nn.Sequential(gemma))  # GELU: left as it is (no config: no attention either)
    assert "forward" not in vars(gemma)
