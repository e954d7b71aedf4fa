"""Writing a file or folder so that a kill at any moment leaves the old version or the new one,
never half of either; and the one sweeper of what killed writers leave behind.

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
