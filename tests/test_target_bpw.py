"""--target-bpw / --target-size / --recipe (issue 15, item 3).

The allocator (plan.budget.allocate) against brute force on small instances and
on many random budgets (never over, within one tensor of the budget, a larger
budget never a larger loss); end to end on a tiny LLaMA: the written file's size
against the target, each tensor's predicted loss against numpy on gguf-py's
dequantization of the written bytes (an independent decoder), the recipe round
trip byte for byte, and bad budgets refused in one line with nothing written.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from smolq import api
from smolq.errors import InputError
from smolq.ggml_types import GGMLType as T
from smolq.plan.budget import (
    BudgetTooSmall,
    Choices,
    Option,
    SizeTarget,
    allocate,
    candidate_types,
    parse_candidates,
    parse_size,
    recipe_for,
)
from smolq.tiny import make_tiny_model

gguf = pytest.importorskip("gguf")

CANDIDATES = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0,iq4_xs,iq3_s"


# --- the allocator, pure ------------------------------------------------------------------------

def random_choices(rng, n_tensors, n_options, scale=1000):
    """Tensors whose options get bigger and (mostly) better, with some dominated ones mixed in."""
    out = []
    for k in range(n_tensors):
        size = int(rng.integers(1, 50)) * scale
        opts = []
        for bits in sorted(rng.choice(np.arange(2, 9), n_options, replace=False)):
            loss = float(rng.uniform(0.5, 2.0) * 2.0 ** (-bits) * size)
            opts.append(Option(T.Q8_0, int(size * bits / 8) + int(rng.integers(0, 40)), loss))
        out.append(Choices(f"t{k}", opts))
    return out


def brute_force(choices, budget):
    best = None
    for combo in itertools.product(*[c.options for c in choices]):
        if sum(o.nbytes for o in combo) <= budget:
            loss = sum(o.loss for o in combo)
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_is_optimal_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    choices = random_choices(rng, 4, 3, scale=10)  # the bytes span far fewer than 65536 units: exact
    lo = sum(min(o.nbytes for o in c.options) for c in choices)
    hi = sum(max(o.nbytes for o in c.options) for c in choices)
    for budget in np.linspace(lo, hi + 5, 17).astype(int):
        got = allocate(choices, int(budget))
        assert got.nbytes <= budget
        assert got.loss == pytest.approx(brute_force(choices, budget), rel=1e-12)


def test_allocate_never_over_within_one_tensor_and_monotonic():
    rng = np.random.default_rng(7)
    choices = random_choices(rng, 40, 5, scale=4096)
    lo = sum(min(o.nbytes for o in c.options) for c in choices)
    hi = sum(max(o.nbytes for o in c.options) for c in choices)
    largest = max(max(o.nbytes for o in c.options) for c in choices)
    budgets = sorted(int(b) for b in rng.integers(lo, hi + 1, 100))
    prev = None
    for budget in budgets:
        got = allocate(choices, budget)
        assert got.nbytes <= budget
        assert budget - got.nbytes < largest
        assert got.loss == sum(got.losses)  # the reported total is the sum of the chosen losses
        if prev is not None:
            assert got.loss <= prev
        prev = got.loss
    everything = allocate(choices, hi * 2)
    assert everything.loss == pytest.approx(sum(min(o.loss for o in c.options) for c in choices))


def test_allocate_refuses_a_budget_below_the_smallest_choice():
    choices = [Choices("a", [Option(T.Q4_K, 100, 1.0), Option(T.Q8_0, 200, 0.1)])]
    assert allocate(choices, 100).types == [T.Q4_K]
    with pytest.raises(BudgetTooSmall):
        allocate(choices, 99)


@pytest.mark.parametrize("text, expected", [
    ("80MiB", 80 * 2**20), ("1.2G", 1_200_000_000), ("500M", 500_000_000), ("123456", 123456),
    ("64KiB", 65536), ("1.5kb", 1500), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12XB", "-5M", "0", "1..2G"])
def test_parse_size_refuses(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_size_target_budget():
    assert SizeTarget.of(4.5, None).data_budget(1000, 777) == 562  # bits of tensor data, header apart
    assert SizeTarget.of(None, "1K").data_budget(1000, 300) == 700  # the whole file
    for bad in [(0.0, None), (float("nan"), None), (4.0, "1M")]:
        with pytest.raises(InputError):
            SizeTarget.of(*bad)


def test_candidates_follow_the_plan_shape_fallbacks_and_imatrix_rules():
    assert parse_candidates("q4_k, Q6_K,q4_k") == (T.Q4_K, T.Q6_K)
    with pytest.raises(InputError):
        parse_candidates("f16")
    # rows of 64: K-quants fall back as llama-quantize does (Q4_K -> Q5_0, Q6_K -> Q8_0)
    assert candidate_types((8, 64), (T.Q4_K, T.Q6_K, T.Q8_0), False) == [T.Q5_0, T.Q8_0]
    # IQ2_XS needs an importance vector; IQ4_XS does not
    assert candidate_types((8, 256), (T.IQ2_XS, T.IQ4_XS), False) == [T.IQ4_XS]
    assert candidate_types((8, 256), (T.IQ2_XS, T.IQ4_XS), True) == [T.IQ2_XS, T.IQ4_XS]


def test_recipe_for_refuses_another_models_recipe(tmp_path):
    names = ["token_embd.weight", "blk.0.attn_q.weight"]
    assert recipe_for(names, {"token_embd.weight": T.Q4_K, "blk.0.attn_q.weight": T.Q6_K}, "r") == [T.Q4_K, T.Q6_K]
    with pytest.raises(InputError, match="has no type for tensor blk.0.attn_q.weight"):
        recipe_for(names, {"token_embd.weight": T.Q4_K}, "r")
    with pytest.raises(InputError, match="does not have"):
        recipe_for(names[:1], {"token_embd.weight": T.Q4_K, "blk.9.ffn_up.weight": T.Q4_K}, "r")


# --- end to end on a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An f32 GGUF whose rows fit every block (256), its imatrix, and a finetune of the same shapes."""
    d = tmp_path_factory.mktemp("alloc")
    files = {}
    for seed, name in ((0, "base"), (1, "finetune")):
        hf = make_tiny_model("llama", d / f"hf{seed}", hidden_size=256, seed=seed,
                             config_overrides={"intermediate_size": 768})
        files[name] = d / f"{name}.gguf"
        api.convert(hf, files[name], outtype="f32")
    files["imatrix"] = random_imatrix(files["base"], d / "r.imatrix")
    return files


def random_imatrix(f32_gguf, path):
    from smolq.formats.imatrix import from_sums, write_imatrix

    rng = np.random.default_rng(3)
    names = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(str(f32_gguf)).tensors
             if len(t.shape) == 2 and t.name not in ("token_embd.weight", "output.weight")}
    sums = {n: rng.uniform(0.05, 3.0, k).astype(np.float32) * 64 for n, k in names.items()}
    write_imatrix(path, from_sums(sums, {n: 64 for n in names}, datasets=["random"], chunk_count=1,
                                  chunk_size=64))
    return path


def read_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def numpy_loss(src, out, imp):
    """sum_j imp_j ||W[:, j] - Q[:, j]||^2 / sum_j imp_j ||W[:, j]||^2, Q decoded by gguf-py."""
    w = np.asarray(src.data, dtype=np.float64).reshape(-1, int(src.shape[0]))
    q = gguf.quants.dequantize(out.data, out.tensor_type).astype(np.float64).reshape(w.shape)
    imp = np.ones(w.shape[1]) if imp is None else np.asarray(imp, dtype=np.float64)
    return float(((w - q) ** 2).sum(axis=0) @ imp / ((w ** 2).sum(axis=0) @ imp))


def test_sizes_against_the_written_file_over_random_budgets(model, tmp_path):
    rng = np.random.default_rng(11)
    smallest = api.quantize(model["base"], tmp_path / "x.gguf", target_size="1G", candidates="q2_k",
                            dry_run=True)["allocation"]["file_bytes"]
    largest_file = api.quantize(model["base"], tmp_path / "x.gguf", target_size="1G", candidates="q8_0",
                                dry_run=True)
    largest_tensor = max(r["bytes"] for r in largest_file["tensors"])
    results = []
    for i, size in enumerate(sorted(int(s) for s in rng.integers(smallest, largest_file["allocation"]["file_bytes"], 8))):
        out = tmp_path / f"b{i}.gguf"
        s = api.quantize(model["base"], out, target_size=size, candidates=CANDIDATES)
        written = out.stat().st_size
        assert written == s["bytes"] == s["allocation"]["file_bytes"]
        assert written <= size, (written, size)
        assert size - written < largest_tensor, (written, size)
        results.append(s["allocation"]["predicted_loss"])
    assert results == sorted(results, reverse=True)  # more bytes, never more loss
    assert results[0] > results[-1]


@pytest.mark.parametrize("with_imatrix", [False, True])
def test_predicted_losses_match_numpy_on_gguf_py_decoding(model, tmp_path, with_imatrix):
    out = tmp_path / "q.gguf"
    extra = {"imatrix": model["imatrix"]} if with_imatrix else {}
    s = api.quantize(model["base"], out, target_bpw=4.0, candidates=CANDIDATES, **extra)
    src, written = read_tensors(model["base"]), read_tensors(out)
    im = api.read_imatrix(model["imatrix"]) if with_imatrix else None
    rows = {r["name"]: r for r in s["tensors"] if "loss" in r}
    assert len(rows) == 16 and len({r["type"] for r in rows.values()}) > 1  # a real mix
    for name, row in rows.items():
        assert written[name].tensor_type.name == row["type"]
        imp = im.importance(name) if im is not None else None
        expected = numpy_loss(src[name], written[name], imp)
        assert row["loss"] == pytest.approx(expected, rel=1e-4), name
    assert s["allocation"]["predicted_loss"] == pytest.approx(sum(r["loss"] for r in rows.values()), rel=1e-12)
    assert s["allocation"]["bpw"] <= 4.0
    recipe = json.loads(str(gguf.GGUFReader(str(out)).fields["quantize.recipe"].contents()))
    assert recipe == {name: row["type"] for name, row in rows.items()}


def test_recipe_round_trip_same_bytes_and_applies_to_a_finetune(model, tmp_path, cli):
    first, again, saved = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "r.json"
    api.quantize(model["base"], first, target_size="1MB", candidates=CANDIDATES, save_recipe=saved)
    api.quantize(model["base"], again, recipe=saved)
    assert first.read_bytes() == again.read_bytes()
    # `smolq inspect --recipe` of the output writes the same recipe
    from_file = tmp_path / "i.json"
    r = cli("inspect", first, "--recipe", from_file)
    assert r.returncode == 0 and json.loads(from_file.read_text()) == json.loads(saved.read_text())
    tuned = tmp_path / "ft.gguf"
    api.quantize(model["finetune"], tuned, recipe=saved)
    types = {n: t.tensor_type.name for n, t in read_tensors(tuned).items()}
    assert types == json.loads(saved.read_text())


def test_dry_run_prints_the_recipe_with_losses_and_size(model, tmp_path, cli):
    out = tmp_path / "d.gguf"
    r = cli("quantize", model["base"], out, "--target-bpw", "5", "--candidates", CANDIDATES, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and "target 5 bpw: file" in r.stdout and "predicted loss" in r.stdout
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--target-size", "100000"], "too small: the smallest file these candidates make is"),
    (["--target-bpw", "1"], "--target-bpw 1 is too small"),
    (["--target-size", "12XB"], "--target-size '12XB'"),
    (["--target-size", "1M", "--type", "q4_0"], "drop --type"),
    (["--target-size", "1M", "--recipe", "r.json"], "give one"),
])
def test_bad_budget_one_line_exit_2_no_output(model, tmp_path, cli, args, message):
    out = tmp_path / "bad.gguf"
    r = cli("quantize", model["base"], out, *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_recipe_file_one_line(model, tmp_path, cli):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"token_embd.weight": "Q4_K"}))
    r = cli("quantize", model["base"], tmp_path / "o.gguf", "--recipe", bad)
    assert r.returncode == 2 and "has no type for tensor" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.gguf").exists()


def test_from_a_checkpoint_equals_the_gguf_route(model, tmp_path, cli):
    """`convert DIR --target-size` and `quantize DIR --target-size` convert to F32 first (a temporary
    directory beside OUT): the same bytes as quantizing the F32 GGUF; a bad budget leaves nothing."""
    hf = model["base"].parent / "hf0"
    via_gguf, via_convert, via_quantize = tmp_path / "g.gguf", tmp_path / "c.gguf", tmp_path / "q.gguf"
    api.quantize(model["base"], via_gguf, target_size="1.2MB", candidates="q4_k,q6_k,q8_0")
    assert cli("convert", hf, via_convert, "--target-size", "1.2MB", "--candidates", "q4_k,q6_k,q8_0", "-q").returncode == 0
    assert cli("quantize", hf, via_quantize, "--target-size", "1.2MB", "--candidates", "q4_k,q6_k,q8_0", "-q").returncode == 0
    assert via_gguf.read_bytes() == via_convert.read_bytes() == via_quantize.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    r = cli("convert", hf, bad / "x.gguf", "--target-size", "10000", "-q")
    assert r.returncode == 2 and "too small" in r.stderr and not list(bad.iterdir())


def test_llama_cpp_loads_and_runs_a_budget_file(model, tmp_path):
    """A per-tensor mix of K- and i-quants with quantize.recipe in its metadata: llama.cpp loads it,
    and its logits follow the F32 file's."""
    from real_loaders import llama_cpp_logits, open_llama, probe_sequences

    out = tmp_path / "m.gguf"
    s = api.quantize(model["base"], out, target_bpw=5.0, candidates=CANDIDATES)
    assert len({r["type"] for r in s["tensors"] if "loss" in r}) > 1
    ref_llm, llm = open_llama(model["base"]), open_llama(out)
    seqs = probe_sequences(ref_llm, 384)
    for ref, got in zip(llama_cpp_logits(ref_llm, seqs), llama_cpp_logits(llm, seqs)):
        assert np.isfinite(got).all()
        assert np.corrcoef(ref.reshape(-1), got.reshape(-1))[0, 1] > 0.95


def test_a_tied_embedding_counts_twice(tmp_path):
    """No output.weight: token_embd is also the output projection, and its loss is weighed double."""
    hf = make_tiny_model("llama", tmp_path / "hf", tied=True, hidden_size=256,
                         config_overrides={"intermediate_size": 768})
    f32, out = tmp_path / "f32.gguf", tmp_path / "t.gguf"
    api.convert(hf, f32, outtype="f32")
    s = api.quantize(f32, out, target_bpw=5.0, candidates="q4_k,q6_k")
    src, written = read_tensors(f32), read_tensors(out)
    assert "output.weight" not in written
    rows = {r["name"]: r for r in s["tensors"] if "loss" in r}
    assert rows["token_embd.weight"]["loss"] == pytest.approx(
        2 * numpy_loss(src["token_embd.weight"], written["token_embd.weight"], None), rel=1e-4)
    assert rows["blk.0.ffn_up.weight"]["loss"] == pytest.approx(
        numpy_loss(src["blk.0.ffn_up.weight"], written["blk.0.ffn_up.weight"], None), rel=1e-4)
