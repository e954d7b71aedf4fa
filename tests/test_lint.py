"""The lint gate: ``make test`` runs pyflakes before pytest, and the tree it checks is clean.

A move once cut ``runinfo.hub_unreachable`` in half; the tests stubbed the name, so none failed,
but pyflakes saw the orphaned lines (undefined names after a ``return``)."""

import glob
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _linted() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    return re.search(r"^LINTED := (.*)$", makefile, re.M).group(1).split()


def test_make_test_lints_every_python_folder_first():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: lint\b", makefile, re.M), "make test must run the lint target first"
    assert re.search(r"^lint:.*\n\t\$\(PY\) -m pyflakes \$\(LINTED\)$", makefile, re.M)
    assert set(_linted()) == {"furlib", "tests", "benchmarks", "scripts", "notebooks/*.py"}
    assert "pyflakes" in (ROOT / "requirements-dev.txt").read_text()


def test_pyflakes_finds_nothing():
    paths = [p for pattern in _linted() for p in sorted(glob.glob(str(ROOT / pattern)))]
    done = subprocess.run([sys.executable, "-m", "pyflakes", *paths], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
