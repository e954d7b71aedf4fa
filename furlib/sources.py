"""Where stage 01's inputs come from: the built-in set, a folder, a table file, or the Hub.

Each input is an ``Input`` (fields below); its ``input_id`` is a path relative to the folder,
``<file or folder name>/<row>``, ``<dataset>:<split>/<row>`` or ``builtin/...``. Nothing is
decoded here (``furlib.data.prepare`` does that); a Hub dataset is streamed.

Stamps say which version of an input was seen: a local file's [size, mtime_ns]; for a row of a
table or Hub dataset, the dataset's fingerprint (``fp:`` + a hash of its files' names, sizes and
mtimes, or ``hub:`` + the commit it was read at): replacing a dataset's images gives every row a
new stamp. Table and Hub rows carry their stream position (``Input.position``) so a stopped run
resumes there (``resume=``) instead of reading every earlier row again; the rows before it come
back as placeholders (``src=RESUMED``) that only the journal can answer for.
"""

import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from furlib.builtin import ART_VERSION, BUILTIN_SOURCES, builtin_sources
from furlib.runinfo import hub_unreachable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".avif", ".bmp", ".tif",
                  ".tiff", ".gif", ".tga"}  # what Pillow reads (AVIF: Pillow 11.2+ wheels)
TABLE_SUFFIXES = (".parquet", ".arrow")
FOLDER_METADATA = {"metadata.jsonl", "metadata.csv", "metadata.parquet"}  # imagefolder's, not inputs
OFFLINE_HELP = ("Offline, use source='builtin' (or 'builtin-art', 'builtin-photos'), a local folder of images, "
                "a local .parquet/.arrow file, or a folder written by datasets' save_to_disk.")


RESUMED = "resumed"  # the src of a row a resumed stream skipped without reading


class Input(NamedTuple):
    input_id: str
    src: object  # what load_rgb accepts, a zero-argument function returning a PIL image, RESUMED
    stamp: object = None  # see the module docstring
    reason: str = ""  # set when the input is rejected without reading it
    position: dict | None = None  # a stream row's: {"next_index", "state"} to resume after it
    detail: str = ""  # with ``reason``: what a person reads in the rejection table


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
    return open_table(path, source_split) if kind == "table" else None


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
        rows, total = _table_rows(path, source_split, image_column, resume) if kind == "table" \
            else _hub_rows(str(source), source_split, image_column, revision, resume)
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


def fingerprint(path: Path) -> str:
    """A table file's or folder's version: sha256 of every file's relative name, size, mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path.parent)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return "fp:" + digest.hexdigest()[:24]


def _table_rows(path: Path, source_split: str, image_column: str, resume=None):
    """Rows of a parquet/arrow file, a save_to_disk folder, or a folder of parquet/arrow files."""
    ds = open_table(path, source_split)
    total = len(ds) if hasattr(ds, "__len__") else None
    rows = beside_table(enumerate(_dataset_rows(ds, path.name, image_column, fingerprint(path), resume)), path)
    return (item for _, item in rows), total


def beside(table: Path, image: Path) -> Path:
    """An image path a table holds: a relative one is taken from the table's own folder (a folder
    source: that folder), not from wherever the notebook runs."""
    return image if image.is_absolute() else (table if table.is_dir() else table.parent) / image


def beside_table(rows, table: Path):
    """``(index, Input)`` rows with their image paths taken ``beside`` the table."""
    for index, item in rows:
        yield index, item._replace(src=beside(table, item.src)) if isinstance(item.src, Path) else item


def open_table(path: Path, source_split: str = "train"):
    """A local table source as a ``datasets`` Dataset (memory-mapped) or IterableDataset."""
    import datasets
    import pyarrow as pa

    try:
        if path.is_file() and path.suffix.lower() == ".arrow":
            ds = _arrow_file(path)
        elif path.is_file():
            _check_parquet(path)
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            parquets = sorted(path.rglob("*.parquet"))
            for f in parquets:  # footers only: one bad file is named, not met deep in the stream
                _check_parquet(f)
            ds = datasets.load_dataset("parquet" if parquets else "arrow", data_dir=str(path), streaming=True)
    except (pa.ArrowException, OSError) as err:  # pyarrow's words name no file
        raise ValueError(f"{path} is not a readable parquet/arrow table ({' '.join(str(err).split())}): a file cut "
                         "short, or another format under that name") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if source_split not in ds:
            raise ValueError(f"source_split={source_split!r} not in {path}; splits: {list(ds)}")
        ds = ds[source_split]
    elif source_split != "train" and str(ds.split) != source_split:  # "train": every row, the default
        raise _no_splits(path, source_split, ds.split)
    return ds


def _no_splits(path: Path, source_split: str, split) -> ValueError:
    """A table without splits given another split: reading all its rows would pass them off as that one."""
    if path.is_file():  # (a parquet file's split is the 'train' it was read as: no news)
        what = "is one table file, without splits"
        other = "give a folder of files named by split (the Hub's data/<split>-*.parquet)"
    else:
        saved = f", saved from split {str(split)!r}" if split else ""
        what = f"holds one Dataset without splits (Dataset.save_to_disk{saved})"
        other = "save a DatasetDict (DatasetDict({'train': ..., 'validation': ...}).save_to_disk) to choose one"
    return ValueError(f"source_split={source_split!r}, but {path} {what}: leave source_split at its "
                      f"default 'train' to read all its rows, or {other}")


def _check_parquet(path: Path) -> None:
    """A parquet file's footer reads and it has rows (datasets' stream fails on either, deep inside)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable parquet file ({' '.join(str(err).split())}): a file cut short, "
                         "or another format under that name; replace or remove it") from None
    if rows == 0:
        raise ValueError(f"{path} has no rows: remove it from the source")


def _arrow_file(path: Path):
    """An ``.arrow`` file as a memory-mapped Dataset: datasets' own (Arrow's streaming format), or
    the random-access "file" format (Feather v2: pandas' ``to_feather``, polars' ``write_ipc``)."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path))
    except pa.ArrowInvalid:
        return datasets.Dataset(pa.ipc.open_file(pa.memory_map(str(path))).read_all())


def open_stream(source, source_split: str = "train", image_column: str = "image",
                revision: str = ""):
    """(``datasets.IterableDataset`` of one undecoded image column, id prefix) of a table or Hub
    source, for training straight from it (``furlib.training.streaming``)."""
    import datasets

    kind, path = source_kind(source)
    if kind == "table":
        ds, prefix = open_table(path, source_split), path.name
    elif kind == "hub":
        try:
            ds, commit = _open_hub(str(source), source_split, revision)
        except Exception as e:  # noqa: BLE001 - as _hub_rows: one clear error
            raise _hub_error(str(source), source_split, e) from None
        prefix = f"{source}@{commit[:12]}:{source_split}"
    else:
        raise ValueError(f"train_source={source!r} is a {kind} source: stream only parquet/arrow "
                         "files or folders, save_to_disk folders or Hub datasets (prepare a folder "
                         "of images with 01_data_prep)")
    if image_column not in (ds.column_names or [image_column]):
        raise _ColumnError(f"image_column={image_column!r} is not a column of {source}: {ds.column_names}")
    if ds.features is not None and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    ds = ds.select_columns([image_column])
    if isinstance(ds, datasets.Dataset):  # shards, so ranks and loader workers can split it
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))
    return ds, prefix


class _ColumnError(ValueError):
    pass


def _dataset_rows(ds, prefix: str, image_column: str, stamp, resume=None):
    """One Input per row; the image column is read undecoded (bytes or a path) for load_rgb.

    Every row is an image candidate (``max_images`` counts rows); an empty or non-image value
    is rejected when it is decoded. Rows before ``resume["next_index"]`` are placeholders."""
    import datasets

    columns = ds.column_names
    if columns is not None and image_column not in columns:
        raise _ColumnError(f"image_column={image_column!r} is not a column of {prefix}: {columns}")
    if ds.features is not None and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    ds = ds.select_columns([image_column])
    if isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()  # one way to resume: the stream's own state_dict
    start = 0
    if resume and resume.get("stamp") == stamp:
        ds.load_state_dict(resume["state"])
        start = resume["next_index"]
        yield from (Input(f"{prefix}/{i}", RESUMED, stamp) for i in range(start))
    for index, row in enumerate(ds, start):
        value = row[image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        value = Path(value) if isinstance(value, str) else value
        yield Input(f"{prefix}/{index}", value, stamp, "",
                    {"next_index": index + 1, "stamp": stamp, "state": ds.state_dict()})


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_rows(source: str, source_split: str, image_column: str, revision: str = "", resume=None):
    """Stream a Hub dataset; any failure to reach or read it becomes one clear RuntimeError."""
    offline = hub_offline()
    if not offline and (why := hub_unreachable()):  # fail in ms, not after minutes of retries
        raise _hub_error(source, source_split, ConnectionError(why))
    try:
        ds, commit = _open_hub(source, source_split, revision)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end the same way
        raise _hub_error(source, source_split, e) from None
    rows = _dataset_rows(ds, f"{source}:{source_split}", image_column, f"hub:{commit}", resume)
    return _guarded(rows, source, source_split), None


def _open_hub(source: str, source_split: str, revision: str):
    """(streamed split, the commit it reads): ``revision`` resolved once, so one run reads one commit."""
    import datasets
    from huggingface_hub import HfApi

    commit = HfApi().dataset_info(source, revision=revision or None).sha
    return datasets.load_dataset(source, split=source_split, streaming=True, revision=commit), commit


def _guarded(rows, source: str, source_split: str):
    """Re-raise a failure while streaming as the same clear RuntimeError."""
    try:
        yield from rows
    except _ColumnError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _hub_error(source, source_split, e) from None


def _hub_error(source: str, source_split: str, e: Exception) -> RuntimeError:
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    return RuntimeError(
        f"could not read Hub dataset {source!r} split {source_split!r} ({type(e).__name__}: "
        f"{first_line}); no local file or folder of that name exists either. {OFFLINE_HELP} "
        f"A Hub source is streamed, never cached, so it needs the Hub every time: to work offline, "
        f"download it once (hf download {source} --repo-type dataset --local-dir <folder>) and give "
        f"that folder as source. Re-running resumes an interrupted run.")
