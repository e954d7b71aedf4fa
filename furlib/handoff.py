"""How the four stages share one run when each notebook runs on its own machine.

A Colab notebook opened from its badge, and every Kaggle notebook, gets a fresh runtime: the
``outputs/`` an earlier notebook wrote is not there. The one way this project supports:

- **Colab**: every notebook gets the same ``outputs_dir`` on Google Drive, e.g.
  ``/content/drive/MyDrive/furception``; ``use_outputs_dir`` mounts Drive the first time a stage
  needs it (Colab asks for the permission once per runtime).
- **Kaggle**: a notebook's output (``/kaggle/working``) becomes the next notebook's input (*Add
  Input > Your Work*), read-only under ``/kaggle/input/<notebook>/``; copy the run folder from
  there into ``outputs_dir`` (the message below gives the command and names the copy it found).

Stages check for the files they need with ``require`` and say exactly what is missing and what
to do, instead of failing later on an empty folder.
"""

import os
import sys
from pathlib import Path

# where Colab mounts Google Drive; FURLIB_COLAB_DRIVE moves it for the simulated Colab session test
DRIVE = Path(os.environ.get("FURLIB_COLAB_DRIVE", "/content/drive"))
KAGGLE_INPUT = Path("/kaggle/input")
COLAB_DRIVE_DIR = "/content/drive/MyDrive/furception"  # the outputs_dir the README suggests


def on_colab() -> bool:
    return "google.colab" in sys.modules


def on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def use_outputs_dir(outputs_dir: str) -> str:
    """Mount Google Drive on Colab when ``outputs_dir`` lies on it; returns a note for the
    notebook to print ('' when there is nothing to say)."""
    path = Path(outputs_dir).expanduser().absolute()
    on_drive = path == DRIVE or DRIVE in path.parents
    if on_drive and on_colab() and not (DRIVE / "MyDrive").is_dir():
        from google.colab import drive  # Colab only: imported here, never at module level

        drive.mount(str(DRIVE))
    if on_drive and not (DRIVE / "MyDrive").is_dir():
        raise FileNotFoundError(f"outputs_dir={outputs_dir!r} is on Google Drive, which is not mounted "
                                f"at {DRIVE} (only Colab mounts it): use a local outputs_dir here")
    if (on_colab() or on_kaggle()) and not on_drive:
        where = "Colab" if on_colab() else "Kaggle"
        return (f"NOTE: outputs_dir={outputs_dir!r} is this {where} runtime's own disk, gone when it stops; "
                f"{where} runs each notebook on its own runtime. {share_advice()}")
    return ""


def share_advice(run_path: str = "outputs/<run_name>") -> str:
    return ("To hand a run to the next notebook: on Colab set outputs_dir="
            f"'{COLAB_DRIVE_DIR}' in every notebook (Drive is mounted on first use); on Kaggle "
            "add this notebook's output as the next one's input (Add Input > Your Work) and copy "
            f"the run folder from /kaggle/input/<notebook>/furception/{run_path} into outputs_dir.")


def require(run_dir, needed: str, stage: str, writer: str) -> Path:
    """``run_dir / needed``, or FileNotFoundError saying it is missing, who writes it and what to do."""
    run_dir = Path(run_dir)
    path = run_dir / needed
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        return path
    state = "is empty" if path.is_dir() else "does not exist"
    copies = kaggle_copies(run_dir.name, needed)
    found = (f" A copy is attached on this Kaggle runtime: cp -r {copies[0]} {run_dir.parent}/"
             if copies else "")
    raise FileNotFoundError(
        f"{stage} needs {path} (written by {writer}), and it {state} on this machine "
        f"(outputs_dir {run_dir.parent.absolute()}). Run {writer} here first with run_name="
        f"{run_dir.name!r} and this outputs_dir, or bring the run over: {share_advice()}{found}")


def kaggle_copies(run_name: str, needed: str) -> list[Path]:
    """Run folders named ``run_name`` holding ``needed`` among Kaggle's attached inputs."""
    if not KAGGLE_INPUT.is_dir():
        return []
    found = []
    for pattern in ("*", "*/*", "*/*/*", "*/*/*/*"):  # the notebook's output, its clone, outputs/
        found += [p for p in sorted(KAGGLE_INPUT.glob(f"{pattern}/{run_name}")) if (p / needed).exists()]
    return found
