"""Faster equal pieces of transformers' forward, for the forwards smolq runs itself (imatrix, GPTQ).

Attention: causal self-attention in query blocks.

transformers' SDPA path hands torch the whole L x L score matrix with `is_causal`, and torch's
CPU kernel does not skip the masked half: on TinyLlama shapes (32 heads of 64, 512 tokens, one
thread) `is_causal=True` costs the same 33 ms per layer as a full mask. Cut into QUERY_BLOCKS
blocks of queries, block j needs only the keys up to its last query: eight blocks do 56 % of
the products and take 22 ms. The values are the same up to float rounding.

MLP: the gated SiLU MLP of LLaMA-like blocks (gate, up, down, SiLU) computed in place:
silu and the product write into the gate projection's output instead of two fresh
[tokens, ffn] tensors (two allocations and their page faults per block; the same values, bit
for bit). The Linears are still called as modules, so their hooks see the same inputs.

`use_fast_paths(model)` sets both on a transformers model. The attention function is registered in
transformers' AttentionInterface under NAME (its masks are made by transformers' own sdpa mask
function, registered under NAME too). Whatever it does not cover (an explicit mask, padding,
sliding windows that produce a mask, a cache longer than the queries, short sequences) goes to
transformers' sdpa function unchanged, so a model computes what it computed before.

Attention capture: while `capture_attention(fn)` is active, every call of the attention function
first calls fn(module, query, key, attention_mask, scaling, causal), so GPTQ can take what it
needs of the attention probabilities (the value projection's attention-aware Hessian,
pipeline/gptq.py) in the forward it runs anyway. `attention_mix` is that computation.
"""
from __future__ import annotations

NAME = "smolq_causal_blocks"
QUERY_BLOCKS = 8
MIN_BLOCK = 16  # shorter sequences are not worth cutting (and stay one SDPA call)
# transformers' MLP classes whose forward is down(act(gate(x)) * up(x)) (checked against their
# sources; the act must also be SiLU at run time: torch's, or transformers' ACT2FN["silu"]).
GATED_SILU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU = frozenset({"SiLU", "SiLUActivation"})


_capture: list = [None]  # the active capture_attention function, if any
MIX_CHUNK_BYTES = 32 << 20  # attention_mix's probability temporaries per step of heads


class capture_attention:
    """Context manager: `fn` sees every attention call's queries and keys (module docstring)."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        _capture[0] = self.fn
        return self

    def __exit__(self, *exc):
        _capture[0] = None
        return False


def attention_mix(query, key, x, attention_mask, scaling: float | None, causal: bool):
    """Σ_h (A_h x)ᵀ(A_h x) over the query heads h, A_h = the attention probabilities of head h.

    x [batch, L, d] is the value projection's input. The attention output of head h is
    A_h x W_hᵀ, so an error Δ in the value weights moves it by A_h x Δ_hᵀ: this is the Hessian
    of that output error, where x alone (xᵀx) would weigh each token by 1 instead of by the
    attention it receives (the first tokens of a window, which every later token attends to,
    count for far more). Two equal ways, the cheaper one taken: xᵀ(Σ_h A_hᵀA_h)x costs 2L³ per
    head (plus one 2L²d + 2Ld²), the attention applied to x head by head 2L²d + 2Ld² per head;
    at SmolLM2's and TinyLlama's widths and 512 tokens the first is 2-10x cheaper.
    """
    import torch

    L, d = query.shape[2], x.shape[-1]
    if L * L <= L * d + d * d:
        return _mix_through_probabilities(query, key, x.to(torch.float32), attention_mask, scaling, causal)
    return _mix_head_by_head(query, key, x, attention_mask, scaling, causal)


def _mix_through_probabilities(query, key, x, attention_mask, scaling, causal):
    import torch

    batch, heads, L = query.shape[:3]
    group = heads // key.shape[1]  # query heads per key/value head
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask[..., : key.shape[2]] if attention_mask is not None else None
    if mask is None and causal and L > 1:
        mask = torch.ones(L, L, dtype=torch.bool, device=query.device).tril()
    M = torch.zeros(batch, L, L, dtype=torch.float32, device=query.device)
    step = max(1, MIX_CHUNK_BYTES // (4 * batch * L * L))  # heads at a time: [batch, step, L, L] temporaries
    for h0 in range(0, heads, step):
        h1 = min(heads, h0 + step)
        k = key[:, torch.arange(h0, h1, device=key.device) // group]
        scores = torch.matmul(query[:, h0:h1].to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
        A = torch.softmax(scores, dim=-1)  # [batch, step, L, L]
        M += torch.matmul(A.transpose(-1, -2), A).sum(1)  # Σ_h A_hᵀA_h
    return sum(x[b].T @ (M[b] @ x[b]) for b in range(batch))


def _mix_head_by_head(query, key, x, attention_mask, scaling, causal):
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    heads, kv_heads = query.shape[1], key.shape[1]
    mask = attention_mask[..., : key.shape[2]] if attention_mask is not None else None
    d = x.shape[-1]
    H = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    xv = x[:, None].to(query.dtype)  # [batch, 1, L, d]: the "values" of one head
    for h in range(heads):
        g = h // (heads // kv_heads)
        y = sdpa(query[:, h:h + 1], key[:, g:g + 1], xv, attn_mask=mask,
                 is_causal=causal and mask is None and query.shape[2] > 1, scale=scaling)
        y = y.reshape(-1, d).to(torch.float32)
        H.addmm_(y.T, y)
    return H


def blocked_causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (query, key, value [batch, heads, L, dim]) ->
    (output [batch, L, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if _capture[0] is not None:
        _capture[0](module, query, key, attention_mask, scaling, causal)
    if (attention_mask is not None or not causal or dropout or key.shape[2] != length
            or length < 2 * MIN_BLOCK or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = causal_blocks(query, key, value, scaling, gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def causal_blocks(query, key, value, scale: float | None, gqa: bool):
    """softmax(q k^T * scale + causal mask) v, one block of queries at a time."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    length = query.shape[2]
    bounds = block_bounds(length)
    positions = torch.arange(length, device=query.device)
    outs = []
    for start, end in bounds:
        if start == 0:  # the first block is square: torch's own causal mask is exact there
            outs.append(sdpa(query[:, :, :end], key[:, :, :end], value[:, :, :end], is_causal=True, scale=scale,
                             enable_gqa=gqa))
            continue
        mask = positions[None, :end] <= positions[start:end, None]
        outs.append(sdpa(query[:, :, start:end], key[:, :, :end], value[:, :, :end], attn_mask=mask, scale=scale,
                         enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def block_bounds(length: int) -> list[tuple[int, int]]:
    """[start, end) of each query block: at most QUERY_BLOCKS, each at least MIN_BLOCK long."""
    n = max(1, min(QUERY_BLOCKS, length // MIN_BLOCK))
    cuts = [length * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def use_fast_paths(model) -> None:
    """Run `model`'s attention and gated SiLU MLPs through the functions above (where they apply)."""
    _use_blocked_causal(model)
    _use_inplace_mlp(model)


def inplace_silu_mlp(self, x):
    """LlamaMLP.forward's down(silu(gate(x)) * up(x)), with silu and * in place."""
    import torch

    gate = self.gate_proj(x)
    torch.nn.functional.silu(gate, inplace=True)
    gate.mul_(self.up_proj(x))
    return self.down_proj(gate)


def _use_inplace_mlp(model) -> None:
    import types

    for module in model.modules():
        if type(module).__name__ in GATED_SILU_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            module.forward = types.MethodType(inplace_silu_mlp, module)


def uses_fast_attention(model) -> bool:
    """Whether `model`'s attention calls go through blocked_causal_attention (and capture_attention)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def _use_blocked_causal(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return  # eager or another kernel chosen on purpose: left as it is
    AttentionInterface.register(NAME, blocked_causal_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = NAME


# --------------------------------------------------------------------------- bf16 Linear products
# Not equal like the pieces above: a GPTQ choice (pipeline/gptq.py, forward_dtype). Where the CPU
# multiplies bfloat16 natively (AMX, AVX512-BF16), oneDNN does a Linear's product 4-6x faster in
# bf16 than MKL in float32 (2 cores of a Xeon with AMX: ~1100-1900 against ~300 GFLOP/s at
# SmolLM2's shapes). The input and the weight are rounded to bf16, the product is summed in
# float32 and rounded to bf16, and the caller gets float32 back: about 0.4 % relative error per
# product, as a bf16 model on a GPU has. Hooks still see the float32 input (GPTQ's Hessians are
# summed from it in float32).
BF16_CACHE = "_smolq_bf16_weight"  # the module attribute holding its weight in bf16


def bf16_linear(self, x):
    """nn.Linear.forward with the product in bf16 (see above); the result in x's dtype."""
    import torch

    w = self.__dict__.get(BF16_CACHE)
    if w is None:
        w = self.__dict__[BF16_CACHE] = self.weight.detach().to(torch.bfloat16)
    y = torch.nn.functional.linear(x.to(torch.bfloat16), w).to(x.dtype)
    if self.bias is not None:
        y += self.bias
    return y


def use_bf16_products(module) -> None:
    """Every nn.Linear inside `module` multiplies in bf16 until drop_bf16_products."""
    import types

    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = types.MethodType(bf16_linear, m)


def forget_bf16_weight(linear) -> None:
    """After the Linear's weight changed in place: the next product converts it again."""
    linear.__dict__.pop(BF16_CACHE, None)


def drop_bf16_products(module) -> None:
    """Undo use_bf16_products (and free the bf16 copies)."""
    for m in module.modules():
        if m.__dict__.get("forward") is not None and getattr(m.forward, "__func__", None) is bf16_linear:
            del m.forward
        forget_bf16_weight(m)
