"""Which inputs each process of each shard of stage 01 reads: only its own, at the dataset level.

Worker ``w`` of ``W`` (``W = num_shards × num_proc``; process ``k`` of shard ``s`` is
``w = s + num_shards × k``) owns the inputs whose index ``i`` has ``i % W == w``:

- **builtin, folder**: listing is cheap (names only); each worker decodes only its own files.
- **a memory-mapped table** (``.arrow`` file, ``save_to_disk`` folder): ``Dataset.select`` of the
  worker's rows; the others are never read.
- **a stream of several files** (parquet/arrow files, a Hub dataset): when ``W`` divides the number
  of files (``IterableDataset.n_shards``) and no ``max_images`` needs the global order, worker
  ``w`` streams only files ``f % W == w`` (``IterableDataset.shard``), so N machines download the
  dataset once between them. Otherwise every worker streams every row and keeps its own (a row
  filter: ``how == "row filter"`` says so, and the notebook prints it).

Input ids of a stream of several files are ``<prefix>/<file>/<row>`` (the same whatever the split,
so journals are reused across splits); a single-file stream keeps ``<prefix>/<row>``. A stream's
position (``Input.position``) is the file, the next row in it, the file stream's own state and
the rows of the files finished before; a resumed run reads none of those again.
"""

from pathlib import Path

from furlib import sources
from furlib.sources import RESUMED, Input

FILE_STRIDE = 2 ** 40  # sort index of row r of file f: f * FILE_STRIDE + r (the stream's order)


def own_inputs(job: dict, w: int, workers: int, resume: dict | None = None):
    """(iterable of (index, Input) owned by worker ``w`` of ``workers``, their count or None, how)."""
    sel, source = job["selection"], job["source"]
    kind, path = sources._kind(source)
    if kind in ("builtin", "folder"):
        inputs, total = sources.iter_inputs(source, job["source_split"], job["image_column"],
                                            sel["max_images"], sel["art_count"], sel["seed"],
                                            exclude=job["data_dir"])
        own = ((i, item) for i, item in enumerate(inputs) if i % workers == w)
        return own, (len(range(w, total, workers)) if total else None), "listing"
    ds, prefix, stamp = _open(kind, path, job)
    resume = resume if resume and resume.get("stamp") == stamp else None
    if hasattr(ds, "__len__"):  # memory-mapped: select the worker's rows, read nothing else
        n = min(len(ds), sel["max_images"]) if sel["max_images"] else len(ds)
        mine = range(w, n, workers)
        rows = _selected_rows(ds.select(mine), mine, prefix, job["image_column"], stamp, resume)
        how = "rows"
    else:
        by_files = workers > 1 and ds.n_shards % workers == 0 and not sel["max_images"]
        rows = _stream_rows(ds, prefix, job["image_column"], stamp, w, workers, by_files,
                            sel["max_images"], resume)
        mine, how = None, "files" if by_files or workers == 1 else "row filter"
    if kind == "hub":
        rows = sources._guarded(rows, str(source), job["source_split"])
    return rows, (len(mine) if mine is not None else None), how


def _open(kind: str, path, job: dict):
    """(dataset of one undecoded image column, id prefix, version stamp) of a table or Hub source."""
    import datasets

    source, split, column = job["source"], job["source_split"], job["image_column"]
    if kind == "table":
        ds, prefix, stamp = sources.open_table(path, split), path.name, sources.fingerprint(path)
    else:
        offline = sources.hub_offline()
        if not offline and (why := sources.hub_unreachable()):  # fail in ms, not after retries
            raise sources._hub_error(str(source), split, ConnectionError(why))
        try:
            ds, commit = sources._open_hub(str(source), split, job["selection"]["source_revision"])
        except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one clear error
            raise sources._hub_error(str(source), split, e) from None
        prefix, stamp = f"{source}:{split}", f"hub:{commit}"
    if ds.column_names is not None and column not in ds.column_names:
        raise sources._ColumnError(f"image_column={column!r} is not a column of {prefix}: {ds.column_names}")
    if ds.features is not None and isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds.select_columns([column]), prefix, stamp


def row_value(row: dict, column: str):
    """What ``load_rgb`` accepts from one undecoded row: bytes or a path."""
    value = row[column]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    return Path(value) if isinstance(value, str) else value


def _selected_rows(ds, mine: range, prefix: str, column: str, stamp, resume):
    stream = ds.to_iterable_dataset()  # one way to resume: the stream's own state_dict
    start = 0
    if resume and resume.get("file") is None:
        stream.load_state_dict(resume["state"])
        start = resume["next_row"]
        yield from ((mine[j], Input(f"{prefix}/{mine[j]}", RESUMED, stamp)) for j in range(start))
    for j, row in enumerate(stream, start):
        position = {"file": None, "next_row": j + 1, "stamp": stamp, "state": stream.state_dict()}
        yield mine[j], Input(f"{prefix}/{mine[j]}", row_value(row, column), stamp, "", position)


def _stream_rows(ds, prefix, column, stamp, w, workers, by_files, limit, resume):
    """A stream's rows file by file: only the worker's files (``by_files``), else every row read
    and every ``workers``-th kept; ``limit``: the first rows of the stream only (0: all)."""
    shards = ds.n_shards
    name = (lambda f, r: f"{prefix}/{r}") if shards == 1 else (lambda f, r: f"{prefix}/{f}/{r}")
    done = dict(resume["done"]) if resume else {}  # file -> rows, for files finished before
    seen = 0  # rows of the stream passed so far, in its order (the row filter and the limit)
    for f in range(w, shards, workers) if by_files else range(shards):
        part = ds.shard(num_shards=shards, index=f) if shards > 1 else ds
        start = done.get(str(f), 0)
        if str(f) not in done and resume and resume.get("file") == f:
            part.load_state_dict(resume["state"])
            start = resume["next_row"]
        for r in range(start):  # read before the resume: only the journal answers for them
            if by_files or seen % workers == w:
                yield f * FILE_STRIDE + r, Input(name(f, r), RESUMED, stamp)
            seen += 1
        if str(f) in done:
            continue
        for r, row in enumerate(part, start):
            if limit and seen >= limit:
                return
            if by_files or seen % workers == w:
                position = {"file": f, "next_row": r + 1, "done": done, "stamp": stamp,
                            "state": part.state_dict()}
                yield f * FILE_STRIDE + r, Input(name(f, r), row_value(row, column), stamp, "", position)
            seen += 1
        done = dict(done, **{str(f): seen - sum(done.values())})  # a new dict: earlier positions keep theirs
