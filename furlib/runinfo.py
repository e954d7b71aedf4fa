"""What every run records: device choice, library versions, and the JSON run record.

Torch is imported where it is used: stage 01's worker processes import this module (through
``furlib.table_sources``) and need none of it (1.5 s of CPU and ~300 MB each).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LIBRARIES = ("torch", "torchvision", "diffusers", "lpips", "accelerate", "safetensors",
             "datasets", "pillow", "numpy", "papermill", "jupytext")


def pick_device(device: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else the CPU; an explicit 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='auto' or 'cpu'")
    try:
        picked = torch.device(device)
        if picked.type == "cuda" and (picked.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"{torch.cuda.device_count()} CUDA GPU(s) are visible")
        if picked.type != "cuda":  # (a CUDA probe would hold GPU memory in a launching parent)
            torch.empty(0, device=picked)  # 'mps' on Linux, say: here, not mid-run
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device={device!r} is not usable here ({' '.join(str(err).split())[:200]}); "
                         "use device='auto', 'cpu' or 'cuda'") from None
    return picked


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity: a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device) -> dict:
    import torch

    info = {"device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def write_record(path: Path, parameters: dict, results: dict, device: torch.device) -> Path:
    """The JSON record a notebook leaves beside its outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parameters": parameters,
              "results": results, "versions": versions(), "device": device_info(device)}
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def run_dir(outputs_dir: str, run_name: str) -> Path:
    if not run_name or any(c in run_name for c in "/\\") or run_name.startswith("."):
        raise ValueError(f"run_name must be a plain folder name, got {run_name!r}")
    root = Path(outputs_dir).expanduser()  # "~/runs" is the home folder, as in a shell
    if root.exists() and not root.is_dir():
        raise ValueError(f"outputs_dir={outputs_dir!r} is a file, not a folder: choose a folder for the runs")
    return root / run_name


def check_folders(run_dir: Path, names) -> None:
    """A stage's output folders under ``run_dir`` must be folders (or not yet exist): one that is a
    file fails here, before any work, not at the stage's first write."""
    paths = [Path(run_dir) / name for name in names]
    files = [str(p) for p in paths if p.exists() and not p.is_dir()]
    if files:
        raise ValueError(f"{', '.join(files)} should be a folder but is a file: move it away, then run again")


def read_json(path, fix: str, default=None):
    """A JSON object from ``path`` (``default`` when the file is missing); a garbled file is a
    ValueError naming it and ``fix`` (what to do), never json's bare 'Expecting value'."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is garbled ({err}): {fix}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    return value


def print_and_save(result: dict, out="") -> dict:
    """Print a benchmark's ``result`` as JSON and, given ``out``, write the same text there
    (its folder made); returns ``result``."""
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return result


def notebook_parameters(stage: str, namespace: dict) -> dict:
    """The current values of the parameters a notebook declares (for its run record)."""
    from furlib.pipeline import declared_parameters

    return {name: namespace[name] for name in declared_parameters(stage) if name in namespace}


def hub_unreachable() -> str:
    """Why the Hub's host cannot be resolved ('' when it can, or when a proxy does the lookup)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host}: {e}"
    return ""


def first_line(err: Exception, limit: int = 300) -> str:
    """An error's first line, cut to ``limit`` characters: a library's message inside one of ours."""
    return (str(err).strip().splitlines() or [""])[0][:limit]


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks (checkpoints and exports are hundreds of MB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
