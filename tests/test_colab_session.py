"""A simulated Colab session: 01 on one fresh runtime, then 02, 03 and 04 each on another.

Each runtime is a new empty folder and a new kernel with a fake ``google.colab`` already imported
(as Colab's kernel has it). The real setup cell clones the project (a local copy of this working
tree, as ``FURCEPTION_REPO``) and "installs" it (``FURCEPTION_PIP``, recorded, not run); the
parameters are the smoke profile's with ``outputs_dir`` on Drive. The fake ``drive.mount`` links the
runtime's own mount point to one folder that outlives the runtimes, as Google Drive does. Nothing
else is shared between the runtimes.
"""

import shutil
import subprocess
import sys

import papermill
import pytest

from furlib import pipeline

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
FAKE_DRIVE = '''import os, pathlib
SHARED = os.environ["TEST_SHARED_DRIVE"]
def mount(where):
    pathlib.Path(where).mkdir(parents=True, exist_ok=True)
    os.symlink(SHARED, os.path.join(where, "MyDrive"))
    print("Mounted at", where)
'''


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """(remote repository, folder of the fake google.colab package, shared Drive folder)."""
    root = tmp_path_factory.mktemp("colab")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=pipeline.ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    work = root / "upstream"
    for name in files:  # this working tree as it is, committed in a throwaway repository
        if (pipeline.ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pipeline.ROOT / name, work / name)
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(GIT + ["-C", str(work), "add", "."], check=True)
    subprocess.run(GIT + ["-C", str(work), "commit", "-qm", "snapshot"], check=True)
    fake = root / "fake_colab"
    (fake / "google" / "colab").mkdir(parents=True)  # 'google' stays a namespace package (protobuf's too)
    (fake / "google" / "colab" / "__init__.py").write_text("from google.colab import drive  # noqa\n")
    (fake / "google" / "colab" / "drive.py").write_text(FAKE_DRIVE)
    (fake / "sitecustomize.py").write_text("import google.colab  # Colab's kernel has it imported\n")
    (fake / "pip_log.py").write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n")
    (root / "drive").mkdir()
    return work, fake, root / "drive"


def _runtime(stage, colab, tmp_path, monkeypatch):
    """Run one notebook as Colab would on a fresh runtime; return its folder."""
    work, fake, shared = colab
    runtime = tmp_path / f"runtime_{stage}"
    (runtime / "content").mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FURCEPTION_REPO", str(work))
    monkeypatch.setenv("FURCEPTION_PIP", f"{sys.executable} {fake / 'pip_log.py'} {runtime / 'pip.txt'}")
    monkeypatch.setenv("FURLIB_COLAB_DRIVE", str(runtime / "drive"))  # this runtime's mount point
    monkeypatch.setenv("TEST_SHARED_DRIVE", str(shared))
    params = pipeline.load_profile(pipeline.ROOT / "params" / "smoke.yaml")
    params["outputs_dir"] = str(runtime / "drive" / "MyDrive" / "furception")
    mine = {k: v for k, v in params.items() if k in pipeline.declared_parameters(stage)}
    papermill.execute_notebook(str(pipeline.notebook_path(stage)), str(runtime / f"{stage}.ipynb"),
                               parameters=mine, cwd=str(runtime / "content"), progress_bar=False)
    return runtime


def test_four_notebooks_on_four_runtimes_share_one_run_through_drive(colab, tmp_path, monkeypatch):
    _, _, shared = colab
    for stage in pipeline.STAGES:
        runtime = _runtime(stage, colab, tmp_path, monkeypatch)
        executed = (runtime / f"{stage}.ipynb").read_text()
        assert "Mounted at" in executed, f"{stage} mounted Drive on its runtime"
        assert (runtime / "content" / "furception" / "furlib").is_dir(), "the setup cell cloned the project"
        assert (runtime / "pip.txt").read_text().startswith("install --quiet -e furception")
    run = shared / "furception" / "smoke"
    for stage in pipeline.STAGES:
        assert (run / f"{stage}.record.json").exists(), stage
    assert (run / "export" / "config.json").exists() and (run / "eval" / "metrics.md").exists()
    for stage in pipeline.STAGES:  # nothing written to the runtimes' own disks (the clone has outputs/README.md)
        local = tmp_path / f"runtime_{stage}" / "content" / "furception" / "outputs"
        assert [p.name for p in local.iterdir()] == ["README.md"], stage
