"""Which checkpoint of a run is used: its step folders, each verified against its checksums, and
the pick (``latest`` when intact; else the newest intact one with a note, or a refusal).

A checkpoint is a ``step_<digits>`` folder under ``outputs/<run_name>/checkpoints/`` written by
``furlib.checkpoint`` (its layout there), with ``checksums.json`` ({file name: {"sha256": hex,
"bytes": int}}, written last) and ``latest`` naming the newest complete one. Notes and errors end
with the fix a person applies (``FIX``). Nothing here unpickles: only JSON and file hashes are read.

03 and 04 may read a run that 02 still trains, whose pruning (keep_checkpoints) removes the older
checkpoints after each save. So a reader holds each folder before it checks it (``hold``: a file
``.reader-<host>-<pid>`` in it, hidden from ``verify``) and pruning skips a held one (``held``);
files, not locks, as the trainer may be another machine sharing the folder (a Drive). A hold
lapses after ``HOLD_S``, at once where its process is seen gone: a reader that died never stops
pruning for long. A folder pruned before its hold was written is found gone by its check, with
``latest`` moved on: the pick starts over, and says so (no damage).
"""

import atexit
import contextlib
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path

from furlib import atomic
from furlib.runinfo import check_folders, file_sha256

CHECKSUMS = "checksums.json"
REFUSE_HINT = " (set on_bad_checkpoint='refuse' to stop instead)"
FIX = "delete that folder (the run resumes from the one before) or set on_bad_checkpoint='fallback'"
STEP_NAME = re.compile(r"step_(\d+)")  # a checkpoint folder; a user's step_0002000_backup copy is none
HOLD_PREFIX = ".reader-"  # + <host>-<pid>: a reader's hold on the checkpoint folder it lies in
HOLD_S = 1800.0  # a hold lapses after 30 min (03 and 04 read their checkpoint within minutes of picking it)
PICKS = 3  # looks at a run whose checkpoint went while it was checked; the last one's outcome stands


def step_of(folder: Path) -> int:
    """The step a checkpoint folder's name (``step_<digits>``) gives."""
    return int(STEP_NAME.fullmatch(Path(folder).name)[1])


def step_folders(ckpt_root: Path) -> list[Path]:
    """A run's checkpoint folders (``step_<digits>``), newest step first; anything else there (a
    user's ``step_0002000_backup`` copy, a ``step_0002000.zip``) is neither resumed nor pruned."""
    found = [p for p in Path(ckpt_root).glob("step_*") if STEP_NAME.fullmatch(p.name)]
    return sorted(found, key=step_of, reverse=True)


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches its checksum."""
    folder = Path(folder)
    try:
        return _problem(folder)
    except FileNotFoundError as err:  # removed while checked (pruned): ``pick_checkpoint`` tells
        return "the folder does not exist" if not folder.is_dir() else f"{Path(err.filename or '?').name} is missing"


def _problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return "the folder does not exist"
    if not (folder / CHECKSUMS).exists():  # a step_* folder from before checksums: state only
        return _state_problem(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{CHECKSUMS} is not valid JSON ({err})"
    malformed = _malformed_sums(sums)
    if malformed:
        return f"{CHECKSUMS} {malformed} (hand-edited or damaged): restore the folder, or delete it"
    held = {p.name for p in folder.iterdir() if p.name != CHECKSUMS and not p.name.startswith(".")}
    unlisted = sorted((held | {"state.json"}) - set(sums))
    if unlisted:  # a list with fewer files would leave the others unverified
        return f"{CHECKSUMS} does not list {unlisted}: they cannot be verified"
    for fname, want in sums.items():
        path = folder / fname
        if not path.exists():
            return f"{fname} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{fname} has {path.stat().st_size} bytes, {want['bytes']} were written (truncated?)"
        if file_sha256(path) != want["sha256"]:
            return f"{fname} does not match its SHA-256 (damaged on disk)"
    written = json.loads((folder / "state.json").read_text()).get("files", [])  # verified just above
    if sorted(set(written) - set(sums)):  # a file deleted together with its checksum line
        return f"{sorted(set(written) - set(sums))} were written (state.json says) but are gone from {CHECKSUMS}"
    return None


def _malformed_sums(sums) -> str:
    """What is wrong with the shape of a parsed checksums.json ('' when it is right)."""
    if not isinstance(sums, dict):
        return f"holds {type(sums).__name__}, not an object of file names"
    for fname, want in sums.items():
        if not (isinstance(want, dict) and isinstance(want.get("sha256"), str)
                and isinstance(want.get("bytes"), int) and not isinstance(want.get("bytes"), bool)):
            return f"entry {fname!r} is {want!r}, not {{'sha256': hex string, 'bytes': integer}}"
        if "/" in fname or "\\" in fname or fname.startswith("."):
            return f"entry {fname!r} is not a file name of the folder"
    return ""


def _state_problem(folder: Path) -> str | None:
    try:
        json.loads((folder / "state.json").read_text())["step"]
    except FileNotFoundError:
        return "state.json is missing"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return f"state.json is unreadable ({err!r})"
    return None


class _WentWhileChecked(Exception):
    """A folder failed its check while training saved a newer checkpoint: pruned, not damaged."""


def pick_checkpoint(run_dir: Path, on_bad: str = "fallback", holding: bool = False) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume or release, notes). ``latest`` when intact; else, with
    ``on_bad='fallback'``, the newest intact step folder and a note saying what was skipped
    and why; with ``on_bad='refuse'`` an error (not for a folder ``latest`` names that is gone:
    deleted as ``FIX`` says, the one before is used, with the note). None: no checkpoint.
    ``holding`` (03 and 04, never the trainer, whose own pruning it would stop): the pick is held."""
    check_folders(run_dir, ["checkpoints"])  # a file there: training would run, then fail at its first save
    root, went = Path(run_dir) / "checkpoints", []
    for attempt in range(PICKS):
        try:
            folder, notes = _pick(root, on_bad, holding, last=attempt == PICKS - 1)
            return folder, went + notes
        except _WentWhileChecked as err:
            went.append(str(err))


def _pick(root: Path, on_bad: str, holding: bool, last: bool) -> tuple[Path | None, list[str]]:
    pointer = root / "latest"
    named = latest_named(root)
    folders = step_folders(root)
    if named is None and not folders:
        return None, []
    candidates = ([named] if named else []) + [f for f in folders if f != named]
    skipped, notes = [], []
    for folder in candidates:
        if holding:
            hold(folder)  # before the check: a prune that comes later skips it, one before is seen below
        problem = verify(folder)
        if problem is None:
            break
        if not last and latest_named(root) != named:
            raise _WentWhileChecked(f"NOTE: {folder.name} was removed while it was checked (the training of this "
                                    "run saved a newer checkpoint and pruned it; no damage): picked again")
        skipped.append(f"{folder}: {problem}")
        if on_bad == "refuse" and folder.exists():  # one deleted as FIX says: the one before is used
            raise RuntimeError(f"checkpoint {folder} is damaged: {problem}. Fix: {FIX}")
    else:
        raise RuntimeError("no intact checkpoint in " + str(root) + ":\n  " + "\n  ".join(skipped) +
                           f"\nFix: restore one from a backup, or delete {root} to start the run over")
    if named is None:
        skipped.insert(0, f"{pointer}: missing, empty or unreadable")
    if skipped:
        which = f"the older {folder.name}" if folders and folder != folders[0] else f"{folder.name}, the newest step"
        notes.append(f"WARNING: using {which}; skipped " + "; ".join(skipped) + REFUSE_HINT)
    if not (folder / CHECKSUMS).exists():
        notes.append(f"{folder} has no {CHECKSUMS} (written by an older version): its files are not verified")
    return folder, notes


def latest_named(root: Path) -> Path | None:
    """The step folder ``root/latest`` names; None when it is missing, empty, a folder or not text."""
    try:
        name = (Path(root) / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if name and "/" not in name else None


_HOLDS: set[Path] = set()  # this process's holds, let go when it exits (a run folder is left clean)


def hold(folder: Path) -> None:
    """Keep ``folder`` from the pruning of a training that goes on while this process reads it: its
    hold on another checkpoint of the run is let go. Best effort: a read-only copy of a run is
    pruned by no one, and a folder already gone is ``verify``'s to report."""
    folder, name = Path(folder), f"{HOLD_PREFIX}{socket.gethostname()}-{os.getpid()}"
    if not _HOLDS:
        atexit.register(_let_go)
    with contextlib.suppress(OSError):
        for other in folder.parent.glob(f"step_*/{name}"):
            if other.parent != folder:
                other.unlink(missing_ok=True)
                _HOLDS.discard(other)
        atomic.write_text(folder / name, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                     "since": time.time()}))
        _HOLDS.add(folder / name)


def _let_go() -> None:
    for path in _HOLDS:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def held(folder: Path) -> bool:
    """Whether a reader holds ``folder`` (``hold``): one whose hold is under ``HOLD_S`` old (either
    way: a clock far off holds nothing) and, on this host, whose process still runs. An unreadable
    hold holds nothing."""
    for path in Path(folder).glob(HOLD_PREFIX + "*"):
        try:
            record = json.loads(path.read_text())
            since, pid, host = float(record["since"]), int(record["pid"]), str(record["host"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if abs(time.time() - since) < HOLD_S and (host != socket.gethostname() or _running(pid)):
            return True
    return False


def _running(pid: int) -> bool:
    """Whether process ``pid`` of this host runs; True where there is no /proc to tell (then ``HOLD_S``
    alone ends a hold, as a reused pid's would)."""
    return not Path("/proc/self").is_dir() or Path(f"/proc/{pid}").is_dir()


def latest_checkpoint(run_dir: Path, on_bad: str = "fallback") -> Path | None:
    """The newest intact checkpoint folder of a run (None if it has none); notes become warnings."""
    folder, notes = pick_checkpoint(run_dir, on_bad)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return folder


def find_run_checkpoint(run_dir: Path, on_bad: str = "refuse") -> Path:
    """The run's latest checkpoint for 03/04, held while they read it (``hold``); a missing one is a
    clear error. A damaged latest is refused, naming the intact one ``on_bad='fallback'`` would use
    (then printed, not only warned: a release or a score of an older step must not pass unseen)."""
    ckpt, notes = pick_checkpoint(run_dir, "fallback", holding=True)  # no intact one at all: its own error
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint: run 02_train with this run_name first")
    damaged = [n for n in notes if n.startswith("WARNING")]
    if damaged and on_bad == "refuse":
        what = damaged[0].removeprefix("WARNING: ").removesuffix(REFUSE_HINT)
        raise RuntimeError(f"the run's latest checkpoint is damaged: {what}. Run 02 again (it trains on "
                           f"from {ckpt.name}), or set on_bad_checkpoint='fallback' here to use {ckpt.name}")
    for note in notes:
        print(note, flush=True)
    return ckpt
