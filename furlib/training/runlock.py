"""One writer per run folder: ``RunLock`` on ``outputs/<run>/run.lock``.

Two trainings of the same ``run_name`` at once would interleave ``logs/log.jsonl`` and overwrite
each other's checkpoints. ``run.lock`` is an OS lock (``filelock``: ``flock`` on Linux), so
exactly one process holds it, taking it is one system call with no moment in between, and the
kernel releases it when its holder dies however it dies. Who holds it (pid, host, process start
time, command) is written beside it, whole and atomically, to ``run.lock.owner``: a second writer
is refused with those named. An owner record found by a process that *got* the lock belongs to a
run that died without releasing it: it is taken over with a note. Of a multi-process run only
rank 0 takes the lock (it alone writes); ``fit`` tells the other ranks whether it got it.
03 and 04 only read a run, and may while it trains (a checkpoint is published whole, and the one
they read is held from pruning: ``furlib.checkpoint_pick.hold``): they ask ``training_note``
whether one does, and say so, never waiting for the lock.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "run.lock"
OWNER_NAME = "run.lock.owner"
_HELD: set = set()  # held OS locks: a lock is released by release() or the process's end, never by GC


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def read_owner(path: Path) -> dict:
    """The owner record at ``path`` ({} when there is none); a malformed one names the file."""
    try:
        owner = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RuntimeError(f"lock owner record {path} is unreadable ({err}); it is only information: "
                           f"delete it if no training of this run is running") from err
    if not isinstance(owner, dict):
        raise RuntimeError(f"lock owner record {path} holds {type(owner).__name__}, not an object; delete "
                           "it if no training of this run is running")
    return owner


def _unknown_owner(since: str = "?") -> dict:
    """The owner record that stands in for an unreadable one: the OS lock alone says whether its
    writer still runs."""
    return {"pid": "?", "host": "?", "since": since}


def _write_owner(path: Path, owner: dict) -> None:
    """Whole or not at all: a reader never sees half a record."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, path)


class RunLock:
    """``with RunLock(run_dir) as lock:`` -- raises ``RuntimeError`` if another process holds it;
    ``lock.note`` says when the lock of a crashed run was taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner_path = Path(run_dir) / OWNER_NAME
        self.note = ""
        self.held = False
        self._os_lock = None

    def acquire(self) -> "RunLock":
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        os_lock = FileLock(str(self.path), timeout=0)
        try:
            os_lock.acquire()
        except Timeout:
            raise RuntimeError(self._busy_message()) from None
        try:
            previous = read_owner(self.owner_path)
        except RuntimeError as err:
            previous = _unknown_owner(f"unreadable record: {err}")
        if previous:  # we hold the OS lock, so its writer is gone: it died without releasing it
            self.note = (f"took over the stale lock of process {previous.get('pid')} on {previous.get('host')} "
                         f"(since {previous.get('since')}), which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}
        _write_owner(self.owner_path, me)
        self._os_lock, self.held = os_lock, True
        _HELD.add(os_lock)
        return self

    def _busy_message(self) -> str:
        owner = {}
        for _ in range(20):  # the holder writes its record just after taking the lock: give it 1 s
            owner = read_owner(self.owner_path)
            if owner:
                break
            time.sleep(0.05)
        return (f"run folder {self.path.parent} is in use by process {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')} (since {owner.get('since', '?')}: {owner.get('command', '?')!r}). "
                "Two trainings of one run would overwrite each other's checkpoints: wait for it or stop it, "
                "or choose another run_name. The lock is the operating system's: it is released when that "
                "process ends, so there is nothing to delete.")

    def release(self) -> None:
        if self.held:
            self.owner_path.unlink(missing_ok=True)  # first: a record without a holder means a crash
            self._os_lock.release()
            _HELD.discard(self._os_lock)
            self._os_lock, self.held = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: Path) -> dict:
    """The owner record of the training that holds ``run_dir``'s lock now; {} when none does (no
    record, or a crashed run's, its lock free). The lock is taken only for the instant it is found
    free, and only where a record is left."""
    from filelock import FileLock, Timeout

    try:
        owner = read_owner(Path(run_dir) / OWNER_NAME)
    except RuntimeError:  # unreadable: the lock alone says whether a training holds it
        owner = _unknown_owner()
    if not owner:
        return {}
    probe = FileLock(str(Path(run_dir) / LOCK_NAME), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return owner
    except OSError:  # a folder no one can write to: no training writes there either
        return {}
    probe.release()
    return {}


def training_note(run_dir: Path, step: int, doing: str) -> str:
    """'' unless a training holds ``run_dir`` now; then what 03 or 04 (``doing``: 'evaluating',
    'exporting') reads of it: its latest complete checkpoint, which training goes past."""
    owner = holder(run_dir)
    if not owner:
        return ""
    return (f"NOTE: run {Path(run_dir).name} is still training (process {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {owner.get('since', '?')}): {doing} step {step}, its latest complete "
            "checkpoint; the steps trained after it are not in this. Run this stage again once training has ended "
            "for the final weights.")
