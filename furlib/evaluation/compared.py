"""Stage 03's ``compare`` entries: VAEs scored beside the run's own that 03 knows only by name.

Two things the run's own models get from its checkpoint and these must get elsewhere: errors that
name the entry (the shared loader, ``furlib.models.load_vae``, names the key it is given), and
whether the weights are pretrained. A release of stage 04 (its ``export/`` folder, or a single
file of it) records the bases it was made from (``manifest.json``, the safetensors header);
anything else says nothing, and nothing is guessed from names.
"""

import contextlib
import json
from pathlib import Path

from furlib.single_file import SAFETENSORS_SUFFIXES


def loader_key(parameter: str) -> str:
    """What ``load_vae``'s errors call an item (its ``what``): 02's ``base_model``, or ``parameter``'s entry."""
    return f"{parameter} entry" if parameter else "base_model"


@contextlib.contextmanager
def named_entry(parameter: str, item: str):
    """Errors raised loading ``item`` name ``parameter``'s entry: the loader's own already do (given
    ``what=loader_key(parameter)``); one that names no entry (a file's own fault, a library's) gets
    it in front. ``parameter`` '' (the run's own base) leaves them as the loader said them."""
    head = f"{loader_key(parameter)} {item!r}"
    try:
        yield
    except (ValueError, RuntimeError, OSError) as err:  # diffusers says "no weights file" as OSError
        if not parameter or str(err).startswith(head):
            raise
        raise (RuntimeError if isinstance(err, RuntimeError) else ValueError)(f"{head}: {err}") from err


def release_bases(item: str) -> tuple[str, ...]:
    """The bases a release of stage 04 says it was made from: the encoder's and the one its
    decoder trained from (``manifest.json`` of an export folder, or beside a single file of it),
    or a single file's header; () for anything 04 did not write, or that cannot be read (loading
    it then says why)."""
    path = Path(item).expanduser()
    if not path.exists():  # a hub id (a pushed export's manifest stays unread) or a missing path
        return ()
    folder = path if path.is_dir() else path.parent
    bases = _manifest_bases(folder / "manifest.json", None if path.is_dir() else path.name)
    if path.suffix in SAFETENSORS_SUFFIXES and path.is_file():
        bases += _header_base(path)
    return tuple(dict.fromkeys(b for b in bases if b))


def _manifest_bases(manifest: Path, file_name: str | None) -> tuple[str, ...]:
    """The release's bases from 04's manifest; for a single file, only where the manifest lists it."""
    try:
        record = json.loads(manifest.read_text())
        if file_name is not None and file_name not in {f["path"] for f in record["files"]}:
            return ()
        release = record["release"]
        return (release["base_model"], release.get("trained_base_model", ""))
    except (OSError, ValueError, KeyError, TypeError):  # no manifest, or not 04's
        return ()


def _header_base(path: Path) -> tuple[str, ...]:
    """``base_model`` from the safetensors header of a file furlib wrote (``written_by``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors' own error types; a garbled file fails at loading, named
        return ()
    return (meta.get("base_model", ""),) if meta.get("written_by", "").startswith("furlib") else ()
