"""The README's API example runs as printed there, and an independent reader (the `gguf` package) agrees with it."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader

# The README's example, verbatim: run as it is below (in a fresh directory).
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The README's API example, verbatim: the ```python block under "## Python API"."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md example", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "gguf-v3" in printed and "Q4_K_M" in printed and "llama gguf-v3" in printed

    # An independent reader: gguf-py reads what smolq wrote, and agrees with smolq's summaries.
    s, q, m, src = (namespace[k] for k in ("s", "q", "m", "src"))
    f16 = GGUFReader(tmp_path / "tiny-f16.gguf")
    assert len(f16.tensors) == s["n_tensors"]
    assert {t.tensor_type.name for t in f16.tensors} <= {"F16", "F32"}
    assert (tmp_path / "tiny-f16.gguf").stat().st_size == s["bytes"]

    q4 = GGUFReader(tmp_path / "tiny-q4_k_m.gguf")
    by_name = {t.name: t for t in q4.tensors}
    assert {r["name"]: r["type"] for r in q["tensors"]} == {n: t.tensor_type.name for n, t in by_name.items()}
    assert int(q4.fields["general.file_type"].parts[-1][0]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert any(t.tensor_type.name == "Q4_K" for t in q4.tensors)

    # smolq.open describes the same file as the reader does.
    assert src.architecture == "llama" and src.container == "gguf" and src.version == 3
    assert [t.name for t in src.tensors] == [t.name for t in q4.tensors]
    for info in src.tensors:
        t = by_name[info.name]
        assert info.type == t.tensor_type.name
        assert list(info.shape) == [int(d) for d in reversed(t.shape)]  # gguf-py lists ggml order (ne0 first)
        assert info.nbytes == int(t.n_bytes)
    vocab = q4.fields["tokenizer.ggml.tokens"]
    assert src.vocab_size == len(vocab.data)

    # migrate: the legacy file's Q4_0 tensors carried into GGUF unchanged.
    mg = GGUFReader(tmp_path / "tiny-q4_0.gguf")
    assert m["format"] == "gguf-v3" and len(mg.tensors) == m["n_tensors"]
    assert any(t.tensor_type.name == "Q4_0" for t in mg.tensors)


def test_summaries_share_one_shape(tmp_path):
    import smolq
    from smolq.pipeline.summary import SUMMARY_KEYS
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf")
    results = [smolq.convert(hf, tmp_path / "a.gguf"),
               smolq.quantize(tmp_path / "a.gguf", tmp_path / "b.gguf", type="q8_0"),
               smolq.migrate(tmp_path / "b.gguf", tmp_path / "c.gguf", format="gguf-v2"),
               smolq.quantize(tmp_path / "a.gguf", tmp_path / "d.gguf", bits=4, dry_run=True)]
    for r in results:
        assert set(SUMMARY_KEYS) <= set(r), sorted(set(SUMMARY_KEYS) - set(r))
        assert r["n_tensors"] == len(r["tensors"])
        assert all({"name", "shape", "type", "bytes"} <= set(row) for row in r["tensors"])
        assert r["tensor_bytes"] == sum(row["bytes"] for row in r["tensors"])
    assert results[-1]["bytes"] is None and not (tmp_path / "d.gguf").exists()
    b = GGUFReader(tmp_path / "b.gguf")
    assert {t.tensor_type.name for t in b.tensors} <= {"Q8_0", "F32"}


def test_open_describes_checkpoints_and_legacy_files(tmp_path):
    import smolq
    from smolq.tiny import make_tiny_model

    hf = make_tiny_model("gptj", tmp_path / "hf", vocab_size="legacy")
    src = smolq.open(hf)
    assert (src.kind, src.architecture, src.format) == ("hf", "gptj", "hf")
    assert src.vocab_size == src.metadata["vocab_size"]
    assert any(t.name.endswith("attn.q_proj.weight") for t in src.tensors)
    smolq.convert(hf, tmp_path / "g.bin", outtype="f16")
    leg = smolq.open(tmp_path / "g.bin")
    assert (leg.container, leg.architecture, leg.dialect) == ("ggml", "gptj", "gpt4all")
    assert leg.n_tensors > 0 and all(t.type in ("F16", "F32") for t in leg.tensors)
    assert np.all([t.nbytes > 0 for t in leg.tensors])


def test_import_smolq_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, smolq; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
