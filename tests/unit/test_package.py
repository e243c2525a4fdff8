"""The package boundary: importing the plugin pulls in no optional dependency."""

import subprocess
import sys

import pytest

OPTIONAL = ("gguf", "mwparserfromhell", "lm_eval", "matplotlib")


@pytest.mark.unit
def test_import_does_not_load_optional_dependencies():
    code = (
        "import sys, tomoe_modifier\n"
        f"loaded = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "LOADED []" in out.stdout, out.stdout
