"""scripts/third_domain_text.py: the package descriptions GPTQ's defaults are chosen on."""
from pathlib import Path

from tests.script_module import load_script


def _script():
    return load_script("third_domain_text")


def _package(site: Path, dist: str, body: str) -> None:
    info = site / f"{dist}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\n\n{body}\n", encoding="utf-8")


PROSE_A = "Alpha parses things. " * 40
PROSE_B = "Beta draws pictures of owls. " * 30


def test_descriptions_in_name_order_without_licences_or_short_ones(tmp_path):
    site = tmp_path / "site"
    _package(site, "zeta_pkg-1.0", PROSE_B)
    _package(site, "alpha-2.3", PROSE_A)
    _package(site, "licensed-0.1", "MIT License\n\nCopyright (c) 2020 Someone\n" + "Permission ... " * 60)
    _package(site, "tiny-1.0", "A one-line description.")
    text, n = _script().third_domain_text(site)
    assert n == 2 and text == PROSE_A.strip() + "\n\n" + PROSE_B.strip()


def test_exclude_takes_normalised_distribution_names(tmp_path):
    site = tmp_path / "site"
    _package(site, "zeta_pkg-1.0", PROSE_B)
    _package(site, "alpha-2.3", PROSE_A)
    text, n = _script().third_domain_text(site, ["Zeta-Pkg"])
    assert n == 1 and text == PROSE_A.strip()


def test_cli_empty_site_is_one_line_exit_2(tmp_path, capsys):
    assert _script().main([str(tmp_path / "out.txt"), "--site-packages", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and not (tmp_path / "out.txt").exists()
