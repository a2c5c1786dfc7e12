"""The i-quant tables in the C kernel are gguf-py's published ones, not typed by hand."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_iq_tables_header_equals_what_gguf_publishes():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_iq_tables.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_check_notices_a_changed_table(tmp_path):
    header = (REPO / "smolq" / "kernels" / "iq_tables.h").read_text()
    stale = tmp_path / "iq_tables.h"
    stale.write_text(header.replace("0x0808080808080808", "0x0808080808080809", 1))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_iq_tables.py"), "--check",
                           "--out", str(stale)], capture_output=True, text=True)
    assert done.returncode == 1 and "stale" in done.stderr
