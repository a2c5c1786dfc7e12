"""GPTQ over a tiny LLaMA: GPTQ directory read back with a dequantizer written
here from gptq.md, logits through transformers, GGUF output through the
reference forward pass, resume and determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest

import golden_matrix
import torch

from smolq.errors import InputError
from smolq.pipeline import gptq as gptq_pipeline
from smolq.pipeline.gptq import quantize_hf_gptq
from tests.gptq_spec import dequantize as _dequantize
from tests.gptq_spec import load_dir as _tensors

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FAST = dict(nsamples=4, seqlen=32, quiet=True)


def tiny_with_text(root, family: str = "llama", seed: int = 3):
    """(root, HF dir): a tiny 2-block model of `family` (width 64) and root/calib.txt."""
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model(family, root / "hf", hidden_size=64, n_layers=2, seed=seed)
    text = " ".join(f"the {w} sat on mat {i % 17}" for i, w in enumerate(["cat", "dog", "bird"] * 150))
    (root / "calib.txt").write_text(text)
    return root, hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_text(tmp_path_factory.mktemp("gptq"))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)[None], use_cache=False).logits[0].double().numpy()


def _kl(p_logits, q_logits):
    lp = torch.log_softmax(torch.as_tensor(p_logits), -1)
    lq = torch.log_softmax(torch.as_tensor(q_logits), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_gptq_dir_reads_back_by_spec_and_runs_in_transformers(tiny):
    from transformers import AutoModelForCausalLM

    from smolq.pipeline.evaluate import load_gptq_as_hf
    from smolq.formats.gptq_ckpt import read_gptq_dir

    root, hf = tiny
    out = root / "int4-g32-act"
    summary = quantize_hf_gptq(hf, out, format="gptq", bits=4, group_size=32, act_order=True,
                               calib=root / "calib.txt", **FAST)
    assert summary["n_layers_quantized"] == 14 and summary["calibration"].startswith("file:")
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32 and qcfg["desc_act"] is True
    assert qcfg["checkpoint_format"] == "gptq" and qcfg["quant_method"] == "gptq"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qcfg
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors.index.json").is_file()
    assert not list(root.glob(".*gptq-work"))  # the work directory is gone after success

    t = _tensors(out)
    _, loaders = read_gptq_dir(out)
    src = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    spec_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for i in range(2):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            n_out, n_in = src.get_submodule(prefix).weight.shape
            assert t[f"{prefix}.qweight"].shape == (n_in * 4 // 32, n_out)
            assert t[f"{prefix}.qzeros"].shape == (n_in // 32, n_out * 4 // 32)
            assert t[f"{prefix}.scales"].shape == (n_in // 32, n_out) and t[f"{prefix}.scales"].dtype == np.float16
            g_idx = t[f"{prefix}.g_idx"]
            assert sorted(np.bincount(g_idx).tolist()) == [32] * (n_in // 32)  # act-order: scattered groups
            w = _dequantize(t, prefix, 4)
            np.testing.assert_array_equal(w, loaders[f"{prefix}.weight"]())
            spec_model.get_submodule(prefix).weight.data = torch.from_numpy(w)
    for name, p in spec_model.named_parameters():  # the rest is the source in fp16
        if not any(name.startswith(f"model.layers.{i}.{lin}") for i in range(2) for lin in LINEARS):
            p.data = torch.from_numpy(t[name].astype(np.float32))

    tokens = np.arange(1, 40) * 7 % 384
    ours = _hf_logits(load_gptq_as_hf(out), tokens)
    theirs = _hf_logits(spec_model, tokens)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3 * np.abs(theirs).max())
    # and the quantized model is still the model (random tiny weights: 4-bit costs ~0.1 nats here;
    # wrong dequantization costs several)
    assert _kl(_hf_logits(src, tokens), ours) < 0.3


def test_gptq_dir_3bit_shapes_and_values(tiny):
    from smolq.formats.gptq_ckpt import read_gptq_dir
    from tests.test_gptq_packing import spec_unpack_rows

    root, hf = tiny
    out = root / "int3"
    quantize_hf_gptq(hf, out, format="gptq", bits=3, group_size=64, sym=False, calib=root / "calib.txt", **FAST)
    t = _tensors(out)
    _, loaders = read_gptq_dir(out)
    prefix = "model.layers.1.mlp.down_proj"  # in 192, out 64
    assert t[f"{prefix}.qweight"].shape == (192 * 3 // 32, 64)
    assert t[f"{prefix}.qzeros"].shape == (3, 64 * 3 // 32)
    q = spec_unpack_rows(t[f"{prefix}.qweight"], 3)
    z = spec_unpack_rows(t[f"{prefix}.qzeros"].T.copy(), 3).T + 1
    s = t[f"{prefix}.scales"].astype(np.float32)
    g = t[f"{prefix}.g_idx"]
    np.testing.assert_array_equal(g, np.arange(192) // 64)
    np.testing.assert_array_equal((s[g] * (q - z[g])).T.astype(np.float32), loaders[f"{prefix}.weight"]())


def test_gguf_output_beats_rtn_on_calibration_domain_text(tiny):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.pipeline.convert import convert
    from smolq.sources.reference import hf_hparams, logits_from_file

    root, hf = tiny
    out = root / "gptq-q4_0.gguf"
    quantize_hf_gptq(hf, out, format="gguf", qtype="q4_0", calib=root / "calib.txt", **FAST)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q4_0"
    rtn = root / "rtn-q4_0.gguf"
    convert(hf, rtn, outtype="q4_0")

    text = (root / "calib.txt").read_text()
    tokens = np.array(AutoTokenizer.from_pretrained(hf)(text)["input_ids"][100:164])
    ref = _hf_logits(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), tokens)
    kl = {p.name: _kl(ref, logits_from_file(p, tokens[None], hparams_override=hf_hparams(hf))[0]) for p in (out, rtn)}
    # a wrong Q/K row permutation or a misplaced block would cost far more than RTN
    assert kl[out.name] < kl[rtn.name] < 0.3, kl


def test_resume_replays_saved_blocks_and_is_deterministic(tiny, monkeypatch):
    root, hf = tiny
    kw = dict(format="gptq", bits=4, group_size=32, calib=root / "calib.txt", seed=5, **FAST)
    fresh = root / "fresh"
    quantize_hf_gptq(hf, fresh, **kw)

    out = root / "resumed"
    real = gptq_pipeline._write_gptq_dir

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptq_pipeline, "_write_gptq_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        quantize_hf_gptq(hf, out, **kw)
    work = root / ".resumed.gptq-work"
    assert sorted(p.name for p in work.glob("block-*")) == ["block-0000.safetensors", "block-0001.safetensors"]
    assert not out.exists()
    (work / "block-0001.safetensors").unlink()  # as if it died during the second block
    monkeypatch.setattr(gptq_pipeline, "_write_gptq_dir", real)
    solved = []
    orig_solve = gptq_pipeline._solve_linear
    monkeypatch.setattr(gptq_pipeline, "_solve_linear", lambda lin, *a: solved.append(lin) or orig_solve(lin, *a))
    quantize_hf_gptq(hf, out, resume=True, **kw)
    assert len(solved) == 7  # only block 1 was solved again
    a, b = _tensors(fresh), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_refuses_other_settings(tiny):
    root, hf = tiny
    out = root / "other"
    work = root / ".other.gptq-work"
    work.mkdir()
    (work / "settings.json").write_text(json.dumps({"fingerprint": "nope"}))
    with pytest.raises(InputError, match="other settings"):
        quantize_hf_gptq(hf, out, format="gptq", resume=True, calib=root / "calib.txt", **FAST)


def test_data_free_calibration_and_device_errors(tiny):
    root, hf = tiny
    s = quantize_hf_gptq(hf, root / "free", format="gptq", bits=8, group_size=-1, nsamples=2, seqlen=16, quiet=True)
    assert s["calibration"] == "data-free"
    assert any("data-free" in n for n in s["notes"])
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            quantize_hf_gptq(hf, root / "x", format="gptq", device="cuda", calib=root / "calib.txt", **FAST)


def test_calibration_files(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.transforms.calib import load_calibration

    _, hf = tiny
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["short one", "a much longer record " * 40, ""]))
    cal = load_calibration(model, tok, jl, nsamples=6, seqlen=20, seed=1)
    lengths = sorted(int(s.shape[1]) for s in cal.samples)
    assert len(lengths) == 6 and max(lengths) == 20 and min(lengths) < 20  # short records kept whole
    assert cal.attention_mask(0).shape == cal.samples[0].shape
    again = load_calibration(model, tok, jl, nsamples=6, seqlen=20, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(cal.samples, again.samples))
    capped = load_calibration(model, tok, jl, nsamples=2, seqlen=100000, seed=1)
    assert capped.seqlen == model.config.max_position_embeddings and capped.notes
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        load_calibration(model, tok, bad, nsamples=2, seqlen=20)
    with pytest.raises(InputError, match="not found"):
        load_calibration(model, tok, tmp_path / "missing.txt", nsamples=2, seqlen=20)


def test_calibration_token_id_records(tiny, tmp_path):
    """jsonl records of token ids are used as given (no tokenizer), so another tool can be fed the
    very same windows; ids outside the vocabulary are refused naming the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.transforms.calib import load_calibration

    _, hf = tiny
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    vocab = model.config.vocab_size
    windows = [[(7 * i + j) % vocab for j in range(12)] for i in range(3)]
    jl = tmp_path / "ids.jsonl"
    jl.write_text("\n".join(json.dumps({"input_ids": w}) for w in windows))
    cal = load_calibration(model, tok, jl, nsamples=3, seqlen=12, seed=0)
    assert sorted(s[0].tolist() for s in cal.samples) == sorted(windows)
    assert all(s.dtype == torch.long for s in cal.samples)
    for bad_line in ('{"input_ids": [1, -2]}', '{"input_ids": [1, 2.5]}', '{"input_ids": "12"}'):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"input_ids": [1, 2]}\n' + bad_line + "\n")
        with pytest.raises(InputError, match="line 2"):
            load_calibration(model, tok, bad, nsamples=2, seqlen=12)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"input_ids": [1, vocab]}) + "\n")
    with pytest.raises(InputError, match=f"token id {vocab} is outside"):
        load_calibration(model, tok, big, nsamples=1, seqlen=12)


def _hessians_one_per_linear(block, names, acts, dev, kind=None, parts=None, stages=None, value=None):
    """The plain way: every Linear accumulates its own input Hessian (what GPTQ did before q/k/v
    and gate/up shared theirs), over all samples and over the cross-validation parts, and every
    forward runs the whole block (no module answered from kept inputs: `stages` is ignored)."""
    from smolq.transforms.gptq import HessianAccumulator

    assert value is None, "input Hessians only"

    keys = (None, "fit", "held") if parts else (None,)
    accs = {n: {k: HessianAccumulator(block.get_submodule(n).weight.shape[1]) for k in keys} for n in names}
    current = [None]

    def hook_for(name):
        def hook(_m, args, _out):
            accs[name][None].add(args[0])
            if current[0] is not None:
                accs[name]["fit" if current[0] == gptq_pipeline.FIT else "held"].add(args[0])
        return hook

    handles = [block.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]

    def before(i):
        current[0] = parts[i] if parts else None

    try:
        gptq_pipeline._run_block(block, acts, dev, kind=kind, before=before)
    finally:
        for h in handles:
            h.remove()
    return {n: gptq_pipeline._Hessians(a[None].H, a["fit"].H if parts else None, a["held"].H if parts else None)
            for n, a in accs.items()}


@pytest.mark.parametrize("reg", ["0", "auto"])
def test_shared_input_hessians_give_the_same_bytes(tiny, monkeypatch, reg):
    """q/k/v (and gate/up) take the same tensor, so GPTQ accumulates its Hessian once; the
    file must be byte-identical to one made with a Hessian accumulated per Linear. (Input
    Hessians only: the attention-aware value Hessian has its own tests below.)"""
    from smolq.transforms.gptq import HessianAccumulator

    root, hf = tiny
    adds = []
    real_add = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, x, mask=None: (adds.append(1), real_add(self, x, mask)))
    shared = root / f"shared-{reg}.gguf"
    quantize_hf_gptq(hf, shared, format="gguf", qtype="q4_0", calib=root / "calib.txt", hessian_reg=reg,
                     attention_aware=False, **FAST)
    n_shared = len(adds)
    monkeypatch.setattr(gptq_pipeline, "_collect_hessians", _hessians_one_per_linear)
    adds.clear()
    plain = root / f"plain-{reg}.gguf"
    quantize_hf_gptq(hf, plain, format="gguf", qtype="q4_0", calib=root / "calib.txt", hessian_reg=reg,
                     attention_aware=False, **FAST)
    assert shared.read_bytes() == plain.read_bytes()
    assert n_shared * 7 == len(adds) * 4, (n_shared, len(adds))  # 4 distinct inputs of 7 Linears per block


def test_hessian_forwards_stop_before_products_nobody_needs(tiny, monkeypatch):
    """Each true-sequential group's forward stops at the input of its last Linear (sample 0),
    and, once sample 0 has shown which Linears share an input, at the first one's (later
    samples); modules whose Linears are all quantized answer from kept inputs (the attention
    from the gate/up group on, the MLP in the output pass), so no product runs twice. Counted
    as the Linear products actually run, per forward over the block, sample 0 and later ones:
    - q/k/v: q, k (v's input is q's: later samples stop at q);
    - o: q, k, v;
    - gate/up: sample 0 runs the attention for real to check the answer (q, k, v, o) and o on
      the kept input, then gate (up shares its input); later samples: o on the kept input;
    - down: gate, up (the attention answers from its kept output);
    - the output pass: sample 0 checks the MLP (gate, up, down) and runs down on the kept
      input; later samples: down."""
    import torch

    root, hf = tiny
    groups = gptq_pipeline.FAMILIES["llama"].groups
    expected = dict(zip(groups, [(2, 0), (3, 3), (6, 1), (2, 2)]))
    runs, outputs, counted = [], [], [0]
    real_collect, real_run = gptq_pipeline._collect_hessians, gptq_pipeline._run_block

    def counting(block, names, acts, *args, **kwargs):
        before = counted[0]
        out = real_collect(block, names, acts, *args, **kwargs)
        runs.append((tuple(names), len(acts), counted[0] - before))
        return out

    def counting_run(block, acts, dev, replace=False, **kwargs):
        before = counted[0]
        real_run(block, acts, dev, replace=replace, **kwargs)
        if replace:
            outputs.append((len(acts), counted[0] - before))

    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: counted.__setitem__(0, counted[0] + isinstance(m, torch.nn.Linear)))
    monkeypatch.setattr(gptq_pipeline, "_collect_hessians", counting)
    monkeypatch.setattr(gptq_pipeline, "_run_block", counting_run)
    try:
        quantize_hf_gptq(hf, root / "stops.gguf", format="gguf", qtype="q4_0", calib=root / "calib.txt",
                         hessian_reg="0", attention_aware=False, **FAST)
    finally:
        handle.remove()
    assert runs and {names for names, _, _ in runs} == set(groups)
    for names, n, products in runs:
        first, later = expected[names]
        assert products == first + (n - 1) * later, (names, n, products)
    assert outputs and all(products == 4 + (n - 1) for n, products in outputs), outputs


@pytest.mark.parametrize("fmt, qtype, budget", [("gguf", "q4_0", None), ("gptq", None, None), ("gguf", "q4_k", 0)])
def test_answered_modules_give_the_same_bytes(tiny, monkeypatch, fmt, qtype, budget):
    """Modules answered from kept inputs (the attention and the MLP, in RAM; with budget 0 the
    RAM holds only the block inputs' size, the attention's, and the MLP's wider inputs go to
    the scratch file) give the bytes of running every forward whole."""
    import dataclasses

    root, hf = tiny
    kw = dict(format=fmt, qtype=qtype, calib=root / "calib.txt", **FAST)
    spilled = []
    real_put = gptq_pipeline._KeptFile.put
    monkeypatch.setattr(gptq_pipeline._KeptFile, "put", lambda self, t: (spilled.append(1), real_put(self, t))[1])
    if budget is not None:
        monkeypatch.setattr(gptq_pipeline, "STAGE_REUSE_MIN_BUDGET", budget)
    reused = root / f"reused-{fmt}-{qtype}-{budget}"
    quantize_hf_gptq(hf, reused, **kw)
    assert bool(spilled) == (budget is not None)
    assert not list(root.rglob("kept.f32"))
    layout = gptq_pipeline.FAMILIES["llama"]
    monkeypatch.setitem(gptq_pipeline.FAMILIES, "llama", dataclasses.replace(layout, stages=()))
    whole = root / f"whole-{fmt}-{qtype}-{budget}"
    quantize_hf_gptq(hf, whole, **kw)
    assert golden_matrix.hash_output(reused) == golden_matrix.hash_output(whole)



class _ToyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(4, 6)
        self.down = torch.nn.Linear(6, 8)  # the output is wider than the kept input

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _ToyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _ToyMLP()

    def forward(self, x):
        return self.mlp(x) + 1


@pytest.mark.parametrize("room", ["outputs", "inputs only", "spill", "nothing"])
def test_answered_module_equals_the_module_whatever_room_is_left(tmp_path, room):
    """_StageReuse on its own: inputs kept in RAM, or in the scratch file, or not at all, and
    outputs (wider than the inputs here) kept or not; every answer equals the module's own
    output, pass after pass, and nothing is counted as held once the block is done."""
    torch.manual_seed(0)
    block, n = _ToyBlock(), 3
    xs = [torch.randn(5, 4) for _ in range(n)]
    want = [block(x) for x in xs]
    kept_in = 5 * 6 * 4 * n  # the down Linear's inputs, float32
    budget = {"outputs": 10**6, "inputs only": kept_in, "spill": 0, "nothing": 0}[room]
    spill = gptq_pipeline._KeptFile(tmp_path / "kept.f32") if room == "spill" else None
    stages = gptq_pipeline._StageReuse(block, (("mlp", "mlp.down"),), n, budget=budget, spill=spill)
    assert stages.keep_inputs_of(["mlp.down"]) == {"mlp.down"}
    hook = block.mlp.down.register_forward_pre_hook(lambda m, a: stages.keep("mlp.down", a[0]))
    with torch.no_grad():
        for i, x in enumerate(xs):
            stages.at(i)
            block(x)
    hook.remove()
    assert (stages.kept["mlp"] is None) == (room == "nothing")
    for _ in range(3):  # later forwards of the block
        with torch.no_grad(), stages.in_use():
            for i, x in enumerate(xs):
                stages.at(i)
                assert torch.equal(block(x), want[i])
    assert "forward" not in vars(block.mlp)
    assert (stages.kept["mlp"] is None) == (room in ("inputs only", "nothing"))
    assert stages.bytes == (5 * 8 * 4 * n if room == "outputs" else 0)  # what RAM still holds
    stages.close()
    if spill is not None:
        spill.close()
        assert not (tmp_path / "kept.f32").exists()


# ---------------------------------------------------------------- bf16 products (forward_dtype)

def test_forward_dtype_follows_the_cpu_and_the_environment(monkeypatch):
    from smolq.pipeline.gptq import FORWARD_DTYPE_ENV, forward_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(FORWARD_DTYPE_ENV, raising=False)
    monkeypatch.setattr(gptq_pipeline, "_cpu_multiplies_bf16", lambda: True)
    assert forward_dtype(cpu) == "bfloat16" and forward_dtype(cuda) == "float32"
    monkeypatch.setattr(gptq_pipeline, "_cpu_multiplies_bf16", lambda: False)
    assert forward_dtype(cpu) == "float32"
    monkeypatch.setenv(FORWARD_DTYPE_ENV, "bfloat16")
    assert forward_dtype(cpu) == "bfloat16"
    monkeypatch.setattr(gptq_pipeline, "_cpu_multiplies_bf16", lambda: True)
    monkeypatch.setenv(FORWARD_DTYPE_ENV, "float32")
    assert forward_dtype(cpu) == "float32"
    monkeypatch.setenv(FORWARD_DTYPE_ENV, "fp8")
    with pytest.raises(InputError, match="SMOLQ_GPTQ_FORWARD"):
        forward_dtype(cpu)


def test_bf16_linear_is_the_bf16_product_and_follows_weight_changes():
    from smolq.pipeline.fast_forward import drop_bf16_products, forget_bf16_weight, use_bf16_products

    g = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(48, 40, bias=True))
    lin = block[0]
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g))
        lin.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(5, 48, generator=g)
    exact = torch.nn.functional.linear(x, lin.weight, lin.bias)
    by_hand = torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16()).float() + lin.bias
    use_bf16_products(block)
    with torch.no_grad():
        y = block(x)
    assert y.dtype == torch.float32 and torch.equal(y, by_hand) and not torch.equal(y, exact)
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()
    with torch.no_grad():
        lin.weight.data.mul_(2)  # as the solve writes its result: in place, through .data
        forget_bf16_weight(lin)
        y2 = block(x)
    assert torch.equal(y2, torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16()).float() + lin.bias)
    drop_bf16_products(block)
    with torch.no_grad():
        assert torch.equal(block(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_bf16_products_run_and_cost_no_quality(tiny, monkeypatch):
    """SMOLQ_GPTQ_FORWARD=bfloat16 (the default on CPUs with AMX / AVX512-BF16): every Linear
    product of the calibration forwards runs in bf16, the file differs from the float32 run's,
    and its KL to the unquantized model is about the float32 run's (both far below RTN's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smolq.pipeline import fast_forward
    from smolq.pipeline.convert import convert
    from smolq.sources.reference import hf_hparams, logits_from_file

    root, hf = tiny
    calls = []
    real = fast_forward.bf16_linear
    monkeypatch.setattr(fast_forward, "bf16_linear", lambda self, x: (calls.append(1), real(self, x))[1])
    outs = {}
    for dtype in ("float32", "bfloat16"):
        monkeypatch.setenv("SMOLQ_GPTQ_FORWARD", dtype)
        outs[dtype] = root / f"fwd-{dtype}.gguf"
        s = quantize_hf_gptq(hf, outs[dtype], format="gguf", qtype="q4_0", calib=root / "calib.txt", **FAST)
        assert s["forward_dtype"] == dtype
        assert bool(calls) == (dtype == "bfloat16")
    assert outs["float32"].read_bytes() != outs["bfloat16"].read_bytes()
    rtn = root / "fwd-rtn.gguf"
    convert(hf, rtn, outtype="q4_0")
    text = (root / "calib.txt").read_text()
    tokens = np.array(AutoTokenizer.from_pretrained(hf)(text)["input_ids"][100:164])
    ref = _hf_logits(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), tokens)
    kl = {p: _kl(ref, logits_from_file(p, tokens[None], hparams_override=hf_hparams(hf))[0])
          for p in (outs["float32"], outs["bfloat16"], rtn)}
    f32, bf16 = kl[outs["float32"]], kl[outs["bfloat16"]]
    assert bf16 < 1.25 * f32 and f32 < 1.25 * bf16 and max(f32, bf16) < 0.8 * kl[rtn], kl
