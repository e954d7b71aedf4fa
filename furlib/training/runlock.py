"""One writer per run folder: ``RunLock`` on ``outputs/<run>/run.lock``.

Two trainings of the same ``run_name`` at once would interleave ``logs/log.jsonl`` and overwrite
each other's checkpoints. The lock file is created exclusively (``O_EXCL``) and holds the owner's
pid, host, process start time and command. A second writer is refused with those named. A lock
left by a crash (same host, that pid no longer running, or running but started at another time:
a reused pid) is stale and taken over, with a note. Of a multi-process run only rank 0 takes the
lock (it alone writes); ``fit`` tells the other ranks whether it got it.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "run.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_is_gone(owner: dict) -> bool:
    """True when the lock's owner cannot be running any more (same host only)."""
    if owner.get("host") != socket.gethostname():
        return False  # another machine sharing the folder: cannot tell, so it counts as live
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return True
    started = _start_time(pid)
    return started is not None and owner.get("started") not in (None, started)


class RunLock:
    """``with RunLock(run_dir) as lock:`` -- raises ``RuntimeError`` if a live process holds it;
    ``lock.note`` says when a stale lock of a crashed run was taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.note = ""
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RuntimeError(f"could not take {self.path}: another process keeps creating it")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            owner = {}  # a lock torn by a crash mid-write: nobody can own it
        if owner and not holder_is_gone(owner):
            raise RuntimeError(
                f"run folder {self.path.parent} is in use by process {owner.get('pid')} on "
                f"{owner.get('host')} (since {owner.get('since')}: {owner.get('command')!r}). Two trainings "
                "of one run would overwrite each other's checkpoints: wait for it or stop it, or choose "
                f"another run_name. If that process is gone, delete {self.path}.")
        self.note = (f"took over the stale lock of process {owner.get('pid')} on {owner.get('host')} "
                     f"(since {owner.get('since')}), which is no longer running")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
