import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Tiny models on a small CI machine: one intra-op thread avoids oversubscription when several
# processes (make test's two pytest workers, papermill kernels, data-loader workers) share two cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def proc_fields(pid: int) -> list | None:
    """The fields of Linux's ``/proc/PID/stat`` after the command name (state, parent pid, ...);
    None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
