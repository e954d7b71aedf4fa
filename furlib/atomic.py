"""Writing a file or folder so that a kill at any moment leaves the old version or the new one,
never half of either; and the one sweeper of what killed writers leave behind.

Folders that already exist cannot be renamed over, so ``replace_folder`` is three renames:
``target`` -> ``.old-<target>`` (aside), ``new`` -> ``target``, then the aside is deleted. A death
between the first two leaves the old folder whole, aside; ``recover_folder`` (called before
anything reads or replaces ``target``) moves it back. Replace, then delete, never the other way
round. The sweeper never touches an aside: it is the last good version.

A temporary is ``.tmp-<host>-<pid>-<thread>-<name>`` beside its target: hidden (every listing of
prepared images, checkpoints and cache entries skips dot-names), unique per writer (racing writers,
even on machines sharing the folder, never share one), and renamed over the target with
``os.replace`` (atomic within one filesystem). Used by 01's store and report, the pixel cache,
checkpoints and the training log.
"""

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

PREFIX = ".tmp-"
STALE_S = 3600.0  # no write here takes an hour: an older temporary's writer is gone


def temporary(path) -> Path:
    """The temporary name this process and thread write ``path`` under."""
    path = Path(path)
    return path.with_name(f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}-{path.name}")


@contextlib.contextmanager
def replacing(path):
    """``with replacing(path) as tmp:`` write the file (or create the folder) ``tmp``; leaving the
    block renames it over ``path`` whole. An error inside removes ``tmp`` and leaves ``path`` as it
    was. Racing writers of one path each publish a whole version; the last rename wins."""
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def sweep(folder, older_than_s: float = STALE_S) -> int:
    """Remove the temporaries (files or folders) in ``folder`` older than ``older_than_s``; returns
    how many. ``older_than_s=0`` removes all: only for a caller whose lock excludes every other
    writer of ``folder`` (02's checkpoints under the run lock)."""
    swept, cutoff = 0, time.time() - older_than_s
    for tmp in Path(folder).glob(PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            if older_than_s <= 0 or tmp.lstat().st_mtime < cutoff:
                _remove(tmp)
                swept += 1
    return swept


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def aside_path(target: Path) -> Path:
    target = Path(target)
    return target.with_name(f".old-{target.name}")


def recover_folder(target: Path) -> str:
    """Put back a folder a killed ``replace_folder`` left aside; returns a note ('' if none)."""
    target, aside = Path(target), aside_path(target)
    if not aside.exists():
        return ""
    if target.exists():  # the new folder got in: the aside is the replaced one
        shutil.rmtree(aside, ignore_errors=True)
        return ""
    os.replace(aside, target)
    return f"restored {target} from {aside.name}, left aside by an interrupted replace"


def replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` into place as ``target``; an existing ``target`` is deleted only afterwards."""
    new, target, aside = Path(new), Path(target), aside_path(target)
    recover_folder(target)
    if target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)
