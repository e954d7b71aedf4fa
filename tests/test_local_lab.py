"""`make lab`: Jupyter Lab from the project's .venv, and saving a notebook keeps git clean."""

import copy
import json
import re

from traitlets.config import Config

from furlib import pipeline

ROOT = pipeline.ROOT


def _hook():
    config = Config()
    path = ROOT / "tools" / "jupyter_lab_config.py"  # traitlets runs it with get_config and __file__
    exec(path.read_text(), {"get_config": lambda: config, "__file__": str(path)})
    return config.ContentsManager.pre_save_hook


def _executed_model():
    nb = json.loads(pipeline.notebook_path("01_data_prep").read_text())
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = i + 1
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "8 inputs -> 6 kept\n"}]
    return {"type": "notebook", "content": nb}


def test_saving_a_committed_notebook_drops_its_outputs():
    hook, model = _hook(), _executed_model()
    source_before = [c["source"] for c in model["content"]["cells"]]
    hook(model=model, path="notebooks/01_data_prep.ipynb", contents_manager=None)
    code = [c for c in model["content"]["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert [c["source"] for c in model["content"]["cells"]] == source_before, "code and text are kept"


class _Server:
    """What jupyter_server passes as ``contents_manager``: its root folder."""

    def __init__(self, root_dir):
        self.root_dir = str(root_dir)


def test_the_hook_matches_the_path_make_lab_s_server_gives():
    """`make lab` opens notebooks/01_data_prep.ipynb, so the server's root is notebooks/ and it saves
    "01_data_prep.ipynb"; from the repository root it saves "notebooks/01_data_prep.ipynb"."""
    for root, path in ((ROOT / "notebooks", "01_data_prep.ipynb"), (ROOT / "notebooks", "/01_data_prep.ipynb"),
                       (ROOT, "notebooks/01_data_prep.ipynb")):
        model = _executed_model()
        _hook()(model=model, path=path, contents_manager=_Server(root))
        assert all(c.get("outputs") in (None, []) for c in model["content"]["cells"]), (root, path)
    for root, path in ((ROOT / "notebooks", "old/01.ipynb"), (ROOT, "outputs/my_run/01_data_prep.ipynb"),
                       (ROOT / "outputs", "my_run/01_data_prep.ipynb")):
        model = _executed_model()
        _hook()(model=model, path=path, contents_manager=_Server(root))
        assert model == _executed_model(), (root, path)


def test_other_notebooks_keep_their_outputs():
    hook, model = _hook(), _executed_model()
    for path in ("outputs/my_run/01_data_prep.ipynb", "/scratch.ipynb", "notebooks/old/01.ipynb"):
        saved = copy.deepcopy(model)
        hook(model=saved, path=path, contents_manager=None)
        assert saved == model, path
    hook(model={"type": "file", "content": "x"}, path="notebooks/notes.txt")  # not a notebook: untouched


def test_make_lab_uses_the_venv_jupyter_and_the_config():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^lab:.*\n\t(.*)$", makefile, re.M).group(1)
    assert recipe.startswith("$(VENV)/bin/jupyter lab") and "--config=tools/jupyter_lab_config.py" in recipe
    lab = (ROOT / "requirements-lab.txt").read_text()
    assert "jupyterlab" in lab and "jupyterlab" not in (ROOT / "requirements.txt").read_text()


def test_what_install_and_runs_write_is_ignored_by_git():
    """`pip install -e .` (make install, the Colab cell) and running the notebooks write these; a
    tracked egg-info made `git status` dirty after an install and could block the cell's `git pull`."""
    import shutil
    import subprocess

    import pytest

    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["furlib.egg-info/PKG-INFO", "outputs/my_run/data/report.json", ".venv/.installed",
               "notebooks/.ipynb_checkpoints/01_data_prep-checkpoint.ipynb"]
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", *written],
                             capture_output=True, text=True).stdout.split()
    assert ignored == written
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "*.egg-info/*"], capture_output=True, text=True)
    assert tracked.stdout == ""


def test_make_lab_starts_as_root_and_in_a_container():
    """Jupyter refuses root without --allow-root; in a container the browser is outside."""
    import os
    import shutil
    import subprocess

    import pytest

    if not shutil.which("make"):
        pytest.skip("no make")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
    cmd = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.lab-installed", "lab",
                          "LAB_ARGS=--port=8890"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert cmd.startswith(".venv/bin/jupyter lab --config=tools/jupyter_lab_config.py") and "--port=8890" in cmd
    assert ("--allow-root" in cmd) == (os.geteuid() == 0)
    in_container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
    assert ("--ip=0.0.0.0" in cmd) == in_container


def test_pyproject_extras_are_the_requirement_files():
    """`pip install -e ".[dev]"` / `".[lab]"` install what `make test` / `make lab` install."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def listed(name):  # a requirements file's own lines, following its -r includes but the runtime's
        lines = [ln.split("#")[0].strip() for ln in (ROOT / name).read_text().splitlines()]
        own = [ln for ln in lines if ln and not ln.startswith("-r")]
        nested = [ln.split()[1] for ln in lines if ln.startswith("-r") and ln.split()[1] != "requirements.txt"]
        return own + [r for n in nested for r in listed(n)]

    assert sorted(extras["dev"]) == sorted(listed("requirements-dev.txt"))
    assert sorted(extras["lab"]) == sorted(listed("requirements-lab.txt"))
