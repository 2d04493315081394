"""One style across the tree: ruff's formatter and linter, as configured in pyproject.toml."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args", [["format", "--check", "--diff"], ["check", "--no-fix"]])
def test_ruff(args):
    r = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, (
        f"ruff {args[0]} found drift; run `ruff {args[0]} .`:\n{r.stdout}{r.stderr}"
    )
