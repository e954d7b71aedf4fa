"""What stage 01 reads: one ``Input`` of a source, and which kind of source a path or id names.

An input's ``input_id`` is a path relative to the folder, ``<file or folder name>/<row>``,
``<dataset>:<split>/<row>`` or ``builtin/...``. Its stamp says which version of it was seen: a
local file's [size, mtime_ns]; a table or Hub row's, its dataset's fingerprint
(``furlib.table_sources``). Folders, the built-in set and any source as a whole are read by
``furlib.sources``; tables and Hub datasets by ``furlib.table_sources``.
"""

import os
import re
from pathlib import Path
from typing import NamedTuple

from furlib.builtin import BUILTIN_SOURCES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".bmp", ".tif",
                  ".tiff", ".gif", ".tga"}  # what Pillow reads (AVIF: Pillow 11.2+ wheels)
TABLE_SUFFIXES = (".parquet", ".arrow")


RESUMED = "resumed"  # the src of a row a resumed stream skipped without reading


class Input(NamedTuple):
    input_id: str
    src: object  # what load_rgb accepts, a zero-argument function returning a PIL image, RESUMED
    stamp: object = None  # see the module docstring
    reason: str = ""  # set when the input is rejected without reading it
    position: dict | None = None  # a stream row's: {"next_index", "state"} to resume after it
    detail: str = ""  # with ``reason``: what a person reads in the rejection table


def source_kind(source) -> tuple[str, Path]:
    """builtin, folder (of images), table (parquet/arrow/save_to_disk) or hub."""
    if not isinstance(source, (str, os.PathLike)):  # e.g. a datasets.Dataset from a notebook
        raise TypeError(f"source must be a path or a Hub dataset id, not a {type(source).__name__}: "
                        "save a dataset with .save_to_disk(folder) or .to_parquet(file) and give that path "
                        "(a re-run resumes from the journal, which needs a source it can find again)")
    if str(source).startswith("hf://"):
        raise ValueError(f"source {str(source)!r}: give the Hub dataset's id ('owner/name', with "
                         "source_split), not an hf:// path")
    if any(c in str(source) for c in "*?"):
        raise ValueError(f"source {str(source)!r} is a glob: give the folder that holds the files (all "
                         "its .parquet/.arrow files are read; the Hub's data/<split>-*.parquet names "
                         "give source_split its splits)")
    path = Path(str(source)).expanduser()
    if source in BUILTIN_SOURCES:
        return "builtin", path
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(f"source file {source!r}: expected a .parquet or .arrow file")
        return "table", path
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "table", path  # written by save_to_disk
        suffixes = lambda: (p.suffix.lower() for p in path.rglob("*"))  # noqa: E731
        tables_only = not any(s in IMAGE_SUFFIXES for s in suffixes()) and any(
            s in TABLE_SUFFIXES for s in suffixes())
        return ("table" if tables_only else "folder"), path
    if re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", str(source)):
        return "hub", path
    raise FileNotFoundError(f"source {source!r}: no such file or folder (looked in {Path.cwd()}), "
                            "and not a Hub dataset id; give an absolute path")
