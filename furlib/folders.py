"""Replacing a folder without a moment where neither the old nor the new one exists.

A folder cannot be renamed over a non-empty one, so the replace is three renames:
``target`` -> ``.old-<target>`` (aside), ``new`` -> ``target``, then the aside is deleted. A death
between the first two leaves the old folder whole, aside; ``recover_folder`` (called before
anything reads or replaces ``target``) moves it back. The old folder is deleted only once the new
one is in place: replace, then delete, never the other way round.
"""

import os
import shutil
from pathlib import Path


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
