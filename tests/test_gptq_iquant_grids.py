"""GPTQ onto the i-quant and ternary grids (smolq/transforms/iq_grids.py).

Oracles, none of them smolq's: llama.cpp's own quantizer (libggml's
ggml_quantize_chunk through tests/iquant_oracle.py) for the bytes, gguf-py's
`gguf.quants.dequantize` for what the bytes decode to, llama-cpp-python for
the written GGUF.

- With a diagonal Hessian GPTQ propagates no error (the inverse Cholesky
  factor is diagonal), so its blocks must be exactly llama.cpp's RTN bytes of
  the type with the Hessian diagonal as the importance matrix (issue #15).
- With a Hessian of correlated inputs, GPTQ's layer error tr(D H Dᵀ) must not
  exceed that of llama.cpp's imatrix RTN, both decoded by gguf-py (smolq's
  default rule; for TQ that is a weighted scale, llama.cpp's is max|w|).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smolq.ggml_types import GGMLType
from smolq.transforms.gptq import gptq_solve, layer_error
from smolq.transforms.iq_grids import grid_for

TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "TQ1_0", "TQ2_0")
# llama.cpp's TQ quantizers take no importance matrix: their RTN is smolq's "plain" rule.
RTN_RULE = {"TQ1_0": "plain", "TQ2_0": "plain"}
ROWS, COLS = 12, 512


def _oracle():
    from iquant_oracle import ggml_quantize, libggml

    if libggml() is None:
        pytest.skip("libggml (llama-cpp-python) not installed: no llama.cpp oracle")
    return ggml_quantize


def _gguf_decode(blocks: np.ndarray, name: str, shape) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(shape)


def _weights(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.02
    w[:, rng.integers(0, COLS, 6)] *= 8  # a few outlier inputs, as real layers have
    return torch.from_numpy(w)


def _correlated_hessian(seed: int) -> torch.Tensor:
    """H = 2XᵀX/n of inputs with correlated features and uneven scales."""
    rng = np.random.default_rng(1000 + seed)
    mix = np.eye(COLS) + 0.5 * rng.standard_normal((COLS, COLS)) / COLS ** 0.5
    X = (rng.standard_normal((4 * COLS, COLS)) @ mix) * rng.uniform(0.2, 2.0, COLS)
    return torch.from_numpy((2 * X.T @ X / X.shape[0]).astype(np.float32))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_diagonal_hessian_gives_llama_cpp_rtn_bytes(name, act_order):
    ggml_quantize = _oracle()
    W = _weights(1)
    hdiag = torch.from_numpy(np.random.default_rng(2).uniform(0.05, 4.0, COLS).astype(np.float32))
    grid = grid_for(ROWS, COLS, qtype=GGMLType.from_name(name), rule=RTN_RULE.get(name, "weighted"))
    res = gptq_solve(W, torch.diag(hdiag), grid, act_order=act_order)
    ours = grid.to_bytes()
    ref = ggml_quantize(name, W.numpy(), hdiag.numpy())
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    # the solver's dequantized weights are what the blocks decode to
    np.testing.assert_array_equal(_gguf_decode(ours, name, W.shape), res.Q.numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", TYPES)
def test_correlated_hessian_error_not_above_imatrix_rtn(name, seed):
    ggml_quantize = _oracle()
    W, H = _weights(seed), _correlated_hessian(seed)
    grid = grid_for(ROWS, COLS, qtype=GGMLType.from_name(name))
    gptq_solve(W, H, grid)
    ours = torch.from_numpy(_gguf_decode(grid.to_bytes(), name, W.shape))
    rtn = torch.from_numpy(_gguf_decode(ggml_quantize(name, W.numpy(), torch.diag(H).numpy()), name, W.shape))
    assert layer_error(W, ours, H) <= layer_error(W, rtn, H)


def test_plain_rule_gives_llama_cpp_bytes_without_imatrix():
    ggml_quantize = _oracle()
    W = _weights(3)
    for name in ("IQ4_NL", "IQ4_XS"):
        grid = grid_for(ROWS, COLS, qtype=GGMLType.from_name(name), rule="plain")
        gptq_solve(W, torch.eye(COLS), grid)
        np.testing.assert_array_equal(grid.to_bytes(), ggml_quantize(name, W.numpy(), None))


@pytest.mark.parametrize("name", ["IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S"])
def test_all_zero_block_keeps_llama_cpp_bytes(name):
    """ggml skips an all-zero 32-block (IQ3_S then shifts the row's later points): still its bytes."""
    ggml_quantize = _oracle()
    W = _weights(4)
    W[0, 32:64] = 0
    W[3, 256:288] = 0
    hdiag = torch.from_numpy(np.random.default_rng(5).uniform(0.05, 4.0, COLS).astype(np.float32))
    grid = grid_for(ROWS, COLS, qtype=GGMLType.from_name(name))
    res = gptq_solve(W, torch.diag(hdiag), grid)
    ours = grid.to_bytes()
    np.testing.assert_array_equal(ours, ggml_quantize(name, W.numpy(), hdiag.numpy()))
    np.testing.assert_array_equal(_gguf_decode(ours, name, W.shape), res.Q.numpy())


def test_lattice_grids_refuse_static_groups():
    with pytest.raises(ValueError, match="static groups"):
        gptq_solve(_weights(0), torch.eye(COLS), grid_for(ROWS, COLS, qtype=GGMLType.IQ3_S), static_groups=True)


def test_rows_not_a_multiple_of_the_block_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        grid_for(4, 96, qtype=GGMLType.IQ4_XS)


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """A tiny LLaMA whose every Linear input is a multiple of 256 (the IQ super-blocks)."""
    from smolq.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gptq_iq")
    hf = make_tiny_model("llama", root / "hf", hidden_size=256, n_layers=2, seed=5,
                         config_overrides={"intermediate_size": 512})
    text = " ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(["cat", "dog", "bird"] * 150))
    (root / "calib.txt").write_text(text)
    return root, hf


def _kl(p_logits, q_logits) -> float:
    lp = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# Presets end to end: (preset, block types it must contain). The KL bound: far below what a
# misplaced block or scale costs on this model; ternary (TQ2_0) is bounded by llama.cpp's RTN.
PRESETS = [("iq4_xs", {"IQ4_XS"}), ("iq4_nl", {"IQ4_NL"}), ("iq3_s", {"IQ3_S"}), ("iq3_m", {"IQ3_S"}),
           ("iq3_xxs", {"IQ3_XXS"}), ("iq2_m", {"IQ2_S"}), ("tq2_0", {"TQ2_0"})]
KL_BOUND = 0.3


@pytest.mark.parametrize("preset,types", PRESETS)
def test_gguf_from_gptq_on_iq_grid_reads_and_runs_in_llama_cpp(tiny256, preset, types):
    import gguf
    from real_loaders import open_llama
    from transformers import AutoModelForCausalLM

    from smolq.pipeline.convert import convert
    from smolq.pipeline.gptq import quantize_hf_gptq

    root, hf = tiny256
    out = root / f"gptq-{preset}.gguf"
    summary = quantize_hf_gptq(hf, out, format="gguf", qtype=preset, calib=root / "calib.txt", nsamples=4,
                               seqlen=32, quiet=True)
    assert summary["n_layers_quantized"] == 14  # every block Linear went through a GPTQ grid
    reader = gguf.GGUFReader(out)
    block_types = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert types <= block_types
    tokens = np.arange(1, 25) * 7 % 300
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens)[None], use_cache=False).logits[0].numpy()
    got = np.asarray(open_llama(out).logits([tokens])[0])
    assert np.isfinite(got).all()
    bound = KL_BOUND
    if preset.startswith("tq"):  # llama.cpp's own ternary RTN of the same model (smolq's is byte-identical)
        rtn = root / f"rtn-{preset}.gguf"
        convert(hf, rtn, outtype=preset)
        bound = _kl(ref, np.asarray(open_llama(rtn).logits([tokens])[0]))
    assert _kl(ref, got) < bound


def test_static_groups_with_a_lattice_preset_is_refused_before_any_work(tiny256):
    from smolq.errors import InputError
    from smolq.pipeline.gptq import quantize_hf_gptq

    root, hf = tiny256
    out = root / "static-iq3_s.gguf"
    with pytest.raises(InputError, match="static-groups"):
        quantize_hf_gptq(hf, out, format="gguf", qtype="iq3_s", calib=root / "calib.txt", nsamples=4, seqlen=32,
                         quiet=True, static_groups=True, act_order=True)
    assert not out.exists()


def test_cli_quantize_gptq_type_iq4_xs(tiny256, cli):
    """`smolq quantize SRC OUT --method gptq --type iq4_xs --calib FILE`: a GGUF gguf-py reads."""
    import gguf

    root, hf = tiny256
    out = root / "cli-iq4_xs.gguf"
    r = cli("quantize", hf, out, "--method", "gptq", "--type", "iq4_xs", "--calib", root / "calib.txt",
            "--nsamples", "2", "--seqlen", "16", "-q")
    assert r.returncode == 0, r.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "IQ4_XS" and types["blk.1.attn_q.weight"] == "IQ4_XS"


def test_cli_static_groups_on_lattice_type_is_one_line_exit_2(tiny256, cli):
    root, hf = tiny256
    out = root / "cli-static.gguf"
    r = cli("quantize", hf, out, "--method", "gptq", "--type", "iq2_s", "--static-groups", "--act-order",
            "--calib", root / "calib.txt", "--nsamples", "2", "--seqlen", "16", "-q")
    assert r.returncode == 2 and "static-groups" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
