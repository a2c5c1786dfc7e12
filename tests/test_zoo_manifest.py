"""smolq zoo, the parts without builds: manifest checks, keys and shards, memory rule, gates, report, merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from smolq.errors import InputError
from smolq.zoo import keys, report, runner
from smolq.zoo.manifest import Gates, load_manifest, parse_size

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "zoo.toml"

BASE = """
[zoo]
out = "out"
[gates]
max_rmse = 0.5
[[models]]
name = "m"
source = "model.gguf"
gates = { max_size = "1 KiB" }
  [[models.outputs]]
  type = "q4_0"
  [[models.outputs]]
  container = "ggjt"
  version = 3
  type = "q4_0"
  gates = { max_rmse = 0.01 }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "zoo.toml"
    p.write_text(text)
    return p


def test_example_manifest_parses():
    m = load_manifest(EXAMPLE)
    assert [x.name for x in m.models] == ["tiny-llama", "tiny-gptj", "tiny-mpt"]
    ids = [o.id for o in m.outputs]
    assert "tiny-llama/q4_0" in ids and "tiny-llama/ggjt-v3-q4_0" in ids and "tiny-llama/gptq-int4" in ids
    assert m.eval is not None and m.eval.ctx == 64
    assert m.out == (EXAMPLE.parent / "../zoo-out")


def test_defaults_names_paths_and_gate_inheritance(tmp_path):
    m = load_manifest(write(tmp_path, BASE))
    a, b = m.outputs
    assert (a.name, a.container, a.relpath) == ("q4_0", "gguf-v3", "m/q4_0.gguf")
    assert (b.name, b.container, b.relpath) == ("ggjt-v3-q4_0", "ggjt-v3", "m/ggjt-v3-q4_0.bin")
    # top-level max_rmse, model max_size, output's own max_rmse wins
    assert a.gates == Gates(max_rmse=0.5, max_size=1024)
    assert b.gates == Gates(max_rmse=0.01, max_size=1024)
    assert m.model("m").source == tmp_path / "model.gguf"
    assert load_manifest(write(tmp_path, BASE), out=tmp_path / "elsewhere").out == tmp_path / "elsewhere"


def test_options_decide_the_key_and_the_name_does_not(tmp_path):
    m = load_manifest(write(tmp_path, BASE))
    renamed = load_manifest(write(tmp_path, BASE.replace('  type = "q4_0"\n  [[models.outputs]]',
                                                          '  type = "q4_0"\n  name = "other"\n  [[models.outputs]]')))
    assert renamed.outputs[0].name == "other"
    assert renamed.outputs[0].options() == m.outputs[0].options()
    k1 = keys.output_key("src", m.outputs[0].options(), None)
    assert k1 == keys.output_key("src", renamed.outputs[0].options(), None)
    assert k1 != keys.output_key("src2", m.outputs[0].options(), None)
    assert k1 != keys.output_key("src", m.outputs[1].options(), None)
    assert k1 != keys.output_key("src", m.outputs[0].options(), "calib")


@pytest.mark.parametrize("change, needle", [
    ('[[models]]\nname = "m"', "unknown key"),  # replaced below with a typo
    ('type = "q4_0"\n  [[models.outputs]]\n  container = "ggjt"', "q9_9"),
    ('container = "ggjt"', "gguf-v1"),
    ('max_rmse = 0.5', "non-negative number"),
    ('max_size = "1 KiB"', "size like"),
    ('source = "model.gguf"', "exactly one of source"),
    ('version = 3', "has no version 7"),
    ('name = "m"', "use letters"),
])
def test_bad_manifests_are_one_line_errors_naming_the_field(tmp_path, change, needle):
    replacements = {
        '[[models]]\nname = "m"': '[[models]]\nname = "m"\ncontaner = "x"',
        'type = "q4_0"\n  [[models.outputs]]\n  container = "ggjt"': 'type = "q9_9"\n  [[models.outputs]]\n  container = "ggjt"',
        'container = "ggjt"': 'container = "gguff"',
        'max_rmse = 0.5': 'max_rmse = "big"',
        'max_size = "1 KiB"': 'max_size = "lots"',
        'source = "model.gguf"': 'source = "model.gguf"\ntiny = { family = "llama" }',
        'version = 3': 'version = 7',
        'name = "m"': 'name = "a/b"',
    }
    path = write(tmp_path, BASE.replace(change, replacements[change], 1))
    with pytest.raises(InputError) as err:
        load_manifest(path)
    assert str(path) in err.value.one_line() and needle in err.value.one_line()
    assert "\n" not in err.value.one_line()


def test_structural_errors(tmp_path):
    for text, needle in [
        ("[zoo]\n", "no [[models]]"),
        ('[[models]]\nname = "a"\nsource = "x"\n[[models.outputs]]\ntype = "q8_0"\n[[models]]\nname = "a"\n'
         'source = "y"\n[[models.outputs]]\ntype = "q8_0"\n', "duplicate model name"),
        ('[[models]]\nname = "a"\nsource = "x"\n[[models.outputs]]\ntype = "q8_0"\n[[models.outputs]]\n'
         'mix = "Q8_0"\n', "duplicate output name"),
        ('[[models]]\nname = "a"\nsource = "x"\n[[models.outputs]]\ntype = "q8_0"\nbits = 4\n', "apply to method"),
        ('[[models]]\nname = "a"\nsource = "x"\n[[models.outputs]]\n', "type must be"),
        ('[[models]]\nname = "a"\nsource = "x"\n[[models.outputs]]\ncontainer = "gptq"\nbits = 5\n', "2, 3, 4 or 8"),
        ('[[models]]\nname = "a"\nsource = "x"\n[[models.outputs]]\ncontainer = "gptq"\ntype = "q4_0"\n', "not type"),
        ("this is = not toml [", "not valid TOML"),
    ]:
        with pytest.raises(InputError) as err:
            load_manifest(write(tmp_path, text))
        assert needle in err.value.one_line(), (text, err.value.one_line())
    with pytest.raises(InputError, match="no such manifest"):
        load_manifest(tmp_path / "absent.toml")


def test_gptq_outputs(tmp_path):
    m = load_manifest(write(tmp_path, '[[models]]\nname = "a"\nsource = "x"\n'
                                      '[[models.outputs]]\ncontainer = "gptq"\ngroup_size = 32\n'
                                      '[[models.outputs]]\nmethod = "gptq"\ntype = "q4_k_m"\n'))
    d, g = m.outputs
    assert (d.name, d.type, d.is_directory, d.relpath, dict(d.gptq)) == ("gptq-int4", "int4", True, "a/gptq-int4",
                                                                          {"bits": 4, "group_size": 32})
    assert (g.name, g.container, g.method, g.relpath) == ("q4_k_m-gptq", "gguf-v3", "gptq", "a/q4_k_m-gptq.gguf")


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("1 KiB") == 1024
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("300MB") == 300_000_000
    with pytest.raises(InputError):
        parse_size("-1")
    with pytest.raises(InputError):
        parse_size("3 parsecs")


def test_shards_partition_and_are_stable():
    ids = [f"model{i}/out{j}" for i in range(20) for j in range(5)]
    for n in (1, 2, 3, 7):
        parts = [{i for i in ids if keys.shard_of(i, n) == k} for k in range(1, n + 1)]
        assert set().union(*parts) == set(ids)
        assert sum(len(p) for p in parts) == len(ids)
    # the assignment is a pure function of the id: recomputed, and independent of the other ids
    assert [keys.shard_of(i, 3) for i in ids] == [keys.shard_of(i, 3) for i in reversed(ids)][::-1]
    import hashlib

    i = ids[7]
    assert keys.shard_of(i, 3) == int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") % 3 + 1
    assert keys.parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "x", "1/0", "1-3"):
        with pytest.raises(InputError):
            keys.parse_shard(bad)


def test_memory_rule():
    assert runner.fits([], 10**12, 1)  # the first job always starts, however large
    assert runner.fits([100], 50, 200)
    assert not runner.fits([100, 60], 50, 200)
    assert runner.available_memory() > 0


def test_gates_by_hand():
    row = {"max_rmse": 0.02, "ppl_delta": 1.5, "ppl_delta_pct": 3.0, "bytes": 2048, "problems": []}
    res = report.evaluate_gates(Gates(max_rmse=0.01, max_ppl_increase=2.0, max_size=1024), row)
    assert [(g["gate"], g["ok"]) for g in res] == [("max_rmse", False), ("max_ppl_increase", True), ("max_size", False)]
    assert "0.02 > max_rmse 0.01" in res[0]["why"]
    missing = report.evaluate_gates(Gates(max_ppl_increase_pct=5), {"ppl_delta_pct": None, "problems": []})
    assert missing == [{"gate": "max_ppl_increase_pct", "limit": 5, "value": None, "ok": False, "why": "not measured"}]
    decode = report.evaluate_gates(Gates(), {"problems": ["blk.0: 3 NaN/inf values"]})
    assert decode[0]["gate"] == "decode" and not decode[0]["ok"]


def _fake_row(oid: str, ok: bool = True, status: str = "built") -> dict:
    model, name = oid.split("/")
    gates = [{"gate": "max_rmse", "limit": 0.1, "value": 0.05 if ok else 0.5, "ok": ok,
              "why": None if ok else "0.5 > max_rmse 0.1"}]
    return {"id": oid, "model": model, "output": name, "container": "gguf-v3", "type": "q4_0", "method": "rtn",
            "path": f"{oid}.gguf", "status": status, "error": None, "bytes": 10, "bpw": 4.5, "build_s": 1.0,
            "metrics_s": 0.5, "max_rmse": 0.05, "max_rmse_tensor": "t", "ppl": None, "ppl_delta": None,
            "gates": gates, "ok": ok}


def test_report_markdown_names_failing_rows_and_merge(tmp_path):
    plan = {"manifest": "zoo.toml", "digest": "d", "models": ["a", "b"], "outputs": ["a/x", "a/y", "b/x"]}
    models = [{"name": "a", "source": "tiny llama"}, {"name": "b", "source": "b.gguf"}]
    full = report.build_report(plan, [_fake_row("b/x"), _fake_row("a/y", ok=False), _fake_row("a/x")], models, None)
    assert [r["id"] for r in report.rows_of(full)] == ["a/x", "a/y", "b/x"]  # manifest order
    assert not full["ok"] and full["summary"]["gate_failures"] == ["a/y: 0.5 > max_rmse 0.1"]
    md = report.render_markdown(full)
    assert "**FAIL**" in md and "a/y: 0.5 > max_rmse 0.1" in md and "## a" in md and "## b" in md

    # two shard reports merge into the full one (timings aside), and overlaps and gaps are caught
    s1 = report.build_report(plan, [_fake_row("a/y", ok=False)], models[:1], "1/2")
    s2 = report.build_report(plan, [_fake_row("a/x"), _fake_row("b/x")], models, "2/2")
    for name, rep in (("s1", s1), ("s2", s2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(rep))
    merged = report.merge_reports([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged")
    assert report.without_timings(merged) == report.without_timings(full)
    assert (tmp_path / "merged" / "report.md").read_text() == report.render_markdown(full)
    with pytest.raises(InputError, match="two shard reports"):
        report.merge_reports([tmp_path / "s2", tmp_path / "s2"], tmp_path / "m2")
    gap = report.merge_reports([tmp_path / "s2"], tmp_path / "m3")
    assert not gap["ok"] and gap["summary"]["missing"] == 1 and "a/y: missing" in gap["summary"]["errors"][0]
    other = dict(s1, plan=dict(plan, digest="other"))
    (tmp_path / "s1" / "report.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="different manifest"):
        report.merge_reports([tmp_path / "s2", tmp_path / "s1"], tmp_path / "m4")
