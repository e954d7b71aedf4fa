"""Where stage 01's inputs come from: the built-in set, a folder, a table file, or the Hub.

Each input is an ``Input`` (``furlib.inputs``: its fields, ids and stamps; the kinds of source).
Nothing is decoded here (``furlib.data.input_entry`` does that). This module lists folders
and iterates any source; tables and Hub datasets are read by ``furlib.table_sources`` (streamed from
the Hub, resumable).
"""

import os
from pathlib import Path

from PIL import Image

from furlib import table_sources
from furlib.builtin import ART_VERSION, builtin_sources
from furlib.inputs import IMAGE_SUFFIXES, Input, source_kind

FOLDER_METADATA = {"metadata.jsonl", "metadata.csv", "metadata.parquet"}  # imagefolder's, not inputs


def iter_source(source, source_split: str = "train", image_column: str = "image",
                max_images: int = 0, *, art_count: int = 24, seed: int = 0):
    """Yield ``(input_id, src)`` for each image of a source (``src`` is what load_rgb accepts).

    ``source``: "builtin", "builtin-art" or "builtin-photos" (``builtin.BUILTIN_SOURCES``); a local folder (recursive, by extension; hidden files skipped); a local
    .parquet/.arrow file; a ``save_to_disk`` folder or a folder of parquet/arrow files; else a
    Hugging Face Hub dataset id, streamed. ``max_images``: 0 = all.
    """
    inputs, _ = iter_inputs(source, source_split, image_column, max_images, art_count, seed)
    for item in inputs:
        src = item.src() if callable(item.src) else item.src
        if not item.reason and isinstance(src, (bytes, Path, Image.Image)):
            yield item.input_id, src


def check_revision(source, revision: str) -> None:
    """A revision pins a Hub dataset's commit; a local source has none to pin."""
    kind, path = source_kind(source)
    if revision and kind != "hub":
        raise ValueError(f"source_revision={revision!r} pins a Hub dataset's commit, but source "
                         f"{str(source)!r} is a local {kind}: leave source_revision empty")


def check_table(source, source_split: str):
    """Open a local table source (file or saved dataset) with its split, so a wrong split or an
    unreadable table fails before 01 changes anything in the data folder; returns it, for 01 to
    read rather than open again (every open resolves all the files of a folder of them). Other
    sources: None."""
    kind, path = source_kind(source)
    return table_sources.open_table(path, source_split) if kind == "table" else None


def source_key(source, source_split: str, image_column: str) -> str:
    """What journal keys are scoped to: the same input id from another source is another input."""
    kind, path = source_kind(source)
    where = {"builtin": str(source), "hub": f"hub:{source}"}.get(kind) or str(path.resolve())
    return where if kind in ("builtin", "folder") else f"{where}|{source_split}|{image_column}"


def iter_inputs(source, source_split, image_column, max_images, art_count=24, seed=0,
                exclude=None, revision: str = "", resume: dict | None = None):
    """(iterable of Input, total count or None) for any kind of source.

    ``revision``: a Hub dataset's branch, tag or commit (default: the main branch's latest commit,
    resolved once, so the whole run reads one commit). ``resume``: a row's ``position`` from an
    earlier run of the same dataset version; ignored for folders, whose listing is cheap.
    """
    kind, path = source_kind(source)
    if kind == "builtin":
        art_stamp = f"art{ART_VERSION}-seed{seed}"
        items = [Input(i, s, file_stamp(s) if isinstance(s, Path) else art_stamp)
                 for i, s in builtin_sources(art_count, seed, str(source))]
    elif kind == "folder":
        items = [folder_input(path, f) for f in folder_files(path, exclude, max_images)]
    else:
        rows, total = table_sources._table_rows(path, source_split, image_column, resume) if kind == "table" \
            else table_sources._hub_rows(str(source), source_split, image_column, revision, resume)
        total = min(total, max_images) if total and max_images else (total or max_images or None)
        return _take(rows, max_images), total
    items = list(_take(items, max_images))
    return items, len(items)


def _take(items, max_images: int):
    """The inputs up to and including the ``max_images``-th image candidate (0 = all)."""
    count = 0
    for item in items:
        yield item
        count += not item.reason
        if max_images and count >= max_images:
            return


def file_stamp(path: Path):
    """A local file's version: [size, mtime_ns], or None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def folder_files(root: Path, exclude=None, max_images: int = 0) -> list[str]:
    """Every non-hidden file below ``root`` (sorted), except imagefolder metadata and ``exclude``,
    up to the ``max_images``-th image (0: all). Paths as strings and not stat'ed: a million cost
    ~90 MB and a walk; each input's ``stat`` waits for ``folder_input``, where it is read.
    A linked folder is followed when it leads out of ``root`` or to a hidden folder in it, each
    real folder once (a link back up is no loop; one to a listed folder inside is listed there);
    a folder that cannot be listed is listed itself, for ``folder_input`` to reject (``unreadable``)."""
    skip = Path(exclude).resolve() if exclude else None
    top = os.path.realpath(root)
    out, images, seen = [], 0, {top}

    def first_visit(path: str) -> bool:
        real = os.path.realpath(path)
        inside = os.path.islink(path) and os.path.commonpath([top, real]) == top \
            and not any(part.startswith(".") for part in Path(os.path.relpath(real, top)).parts)  # walked there
        fresh = not inside and real not in seen and (skip is None or Path(real) != skip)
        seen.add(real)
        return fresh

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=lambda e: out.append(e.filename)):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and first_visit(os.path.join(folder, d)))
        for name in sorted(files):
            if not name.startswith(".") and name not in FOLDER_METADATA:
                out.append(os.path.join(folder, name))
                images += os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
                if max_images and images >= max_images:
                    return out
    return out


def folder_input(root: Path, file: str) -> Input:
    """The Input of one of ``folder_files``: its id (path below ``root``), stamp and verdict."""
    path = Path(file)
    input_id, suffix = _printable(path.relative_to(root).as_posix()), path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Input(input_id, path, file_stamp(path))
    if path.is_dir():
        return Input(input_id, path, None, "unreadable", detail="a folder that cannot be listed")
    return Input(input_id, path, file_stamp(path), "not_an_image",
                 detail=f"{suffix or 'no suffix'}: not one of {' '.join(sorted(IMAGE_SUFFIXES))}")


def _printable(name: str) -> str:
    """A file name's bytes that are not UTF-8 (names from another system's archive), which
    Python keeps as lone surrogates no table, figure or UTF-8 file takes, written as ``\\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
