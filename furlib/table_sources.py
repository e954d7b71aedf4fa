"""Table sources of stage 01 and of training from a stream: local parquet/arrow files, folders of
them, ``save_to_disk`` folders and Hub datasets, read with ``datasets`` as rows of ``Input``.

A row's ``input_id`` is ``<file or folder name>/<row>`` or ``<dataset>:<split>/<row>``; its image
column is read undecoded (bytes or a path; a relative path is taken ``beside`` the table). Its
stamp is the dataset's fingerprint (``fp:`` + a hash of its files' names, sizes and mtimes, or
``hub:`` + the commit it was read at): replacing a dataset's images gives every row a new stamp.
Rows carry their stream position (``Input.position``) so a stopped run resumes there
(``resume=``) instead of reading every earlier row again; the rows before it come back as
placeholders (``src=RESUMED``) that only the journal can answer for. A Hub dataset is streamed.
"""

import hashlib
import os
from pathlib import Path

from furlib.inputs import RESUMED, Input, source_kind
from furlib.runinfo import first_line, hub_unreachable

OFFLINE_HELP = ("Offline, use source='builtin' (or 'builtin-art', 'builtin-photos'), a local folder of images, "
                "a local .parquet/.arrow file, or a folder written by datasets' save_to_disk.")


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
    return RuntimeError(
        f"could not read Hub dataset {source!r} split {source_split!r} ({type(e).__name__}: "
        f"{first_line(e)}); no local file or folder of that name exists either. {OFFLINE_HELP} "
        f"A Hub source is streamed, never cached, so it needs the Hub every time: to work offline, "
        f"download it once (hf download {source} --repo-type dataset --local-dir <folder>) and give "
        f"that folder as source. Re-running resumes an interrupted run.")
