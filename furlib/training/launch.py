"""What a launcher asked for, against what accelerate started: a silent single process is said.

``accelerate launch --cpu --num_processes 2`` (and ``--num_processes 2`` without ``--multi_gpu`` on a
machine with fewer GPUs) starts one process and tells it nothing; torchrun and ``--multi_gpu`` set
``WORLD_SIZE``, which accelerate ignores when ``device='auto'`` finds no GPU. ``fit`` warns then.
"""

import os
from pathlib import Path


def launcher_processes(env=None, parent_args=None) -> tuple[int, str]:
    """(processes a launcher asked for, how it asked), where that can be known: torchrun's and
    ``accelerate launch --multi_gpu``'s WORLD_SIZE, or the ``--num_processes N`` of the
    ``accelerate launch`` that started this process (``--cpu``, or no GPUs without ``--multi_gpu``,
    starts one process and says nothing). (1, '') when nothing asked for more."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE") or 1)
    if world > 1:
        return world, f"the launcher's WORLD_SIZE={world}"
    if parent_args is None:
        try:  # Linux: the command line of the process that started this one
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            parent_args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        except OSError:
            return 1, ""
    if not any("accelerate" in a for a in parent_args[:3]):
        return 1, ""
    for i, arg in enumerate(parent_args):
        value = arg.partition("=")[2] if arg.startswith("--num_processes=") else \
            parent_args[i + 1] if arg == "--num_processes" and i + 1 < len(parent_args) else ""
        if value.isdigit() and int(value) > 1:
            return int(value), f"accelerate launch --num_processes {value}"
    return 1, ""


def single_process_warning(device: str, world: int, env=None, parent_args=None) -> str:
    """'' unless a launcher asked for several processes and this one trains alone."""
    asked, how = launcher_processes(env, parent_args)
    if world > 1 or asked == 1:
        return ""
    fix = ("accelerate launch --cpu, or without --multi_gpu on a machine with fewer GPUs, starts one "
           "process whatever --num_processes says; for several processes use `accelerate launch "
           "--multi_gpu --num_processes N` (or torchrun) and, without a GPU per process, device='cpu' "
           "(they then train together over gloo)")
    return (f"WARNING: {how} asked for {asked} processes, but this process trains alone "
            f"(device={device!r}; accelerate sees 1 process): {fix}.")
