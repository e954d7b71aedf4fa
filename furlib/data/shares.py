"""Which inputs each shard and each process of stage 01 reads: only its own, at the dataset level.

**Shards** (machines or runs, ``num_shards``) split the inputs in fixed parts, so they need no
contact: input ``i`` of a listing or a table belongs to shard ``shard_of(i, num_shards)``, which
spreads every regular pattern (every 10th input a PNG, pairs of a JPEG and its mask) evenly over
the shards, unlike ``i % num_shards``.

**Processes** of one shard (``num_proc``) share its inputs as they free up, where the source can be
read at any position (``Dealer``): a folder, the built-in set, a memory-mapped table (``.arrow``
file, ``save_to_disk`` folder; ``Dataset.select`` of the rows dealt, the others never read). A
slow stretch of inputs (large images, conversions) then costs one process a little longer, not
the whole shard the slowest process's share.

**A stream of several files** (parquet/arrow files, a Hub dataset) can only be read in order, so
it is split by files: worker ``w`` of ``W = num_shards × num_proc`` (process ``k`` of shard ``s``
is ``w = s + num_shards × k``) streams files ``f % W == w`` (``IterableDataset.shard``) when ``W``
divides the number of files (``IterableDataset.n_shards``) and no ``max_images`` needs the
global order, so N machines download the dataset once between them. Otherwise every worker
streams every row and keeps every ``W``-th (a row filter: ``how == "row filter"`` says so, and
the notebook prints it).

The processes of a shard run in spawned processes (``run_processes``): the parent shows the
shard's progress bar, and an interrupt (Ctrl-C, Jupyter's stop button) or one process's error
stops every process after the inputs it has in flight; a process whose parent was killed stops by
itself (``until_stopped``). None goes on with its share unseen.

Input ids of a stream of several files are ``<prefix>/<file>/<row>`` (the same whatever the split,
so journals are reused across splits); a single-file stream keeps ``<prefix>/<row>``. A stream's
position (``Input.position``) is the file, the next row in it, the file stream's own state and
the rows of the files finished before; a resumed run reads none of those again. Dealt sources
need no position: their journal answers for every input already done.
"""

import hashlib
import json
import multiprocessing
import os
import signal
import weakref
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import resource_tracker
from pathlib import Path

from furlib import atomic, sources, table_sources
from furlib.inputs import RESUMED, Input, source_kind

FILE_STRIDE = 2 ** 40  # sort index of row r of file f: f * FILE_STRIDE + r (the stream's order)
GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing
MAX_BLOCK = 64  # inputs dealt at once at most (a block is remaining / (4 x processes), at least 1)
NEXT, DONE, TOTAL, STOP = range(4)  # the counters a shard's processes share (``run_processes``)


def shard_of(index: int, num_shards: int) -> int:
    """The shard of input ``index``: floor(frac(index × φ⁻¹) × num_shards), Fibonacci hashing.
    The fractions of any arithmetic progression of indices are equidistributed, so a pattern
    repeating every p inputs lands on every shard alike."""
    return ((index * GOLDEN) & (2 ** 64 - 1)) * num_shards >> 64


def run_processes(task, processes: int, progress: bool) -> list:
    """``[task(k, processes) for k in range(processes)]``, each in its own spawned process (no
    forked copies of threads or open streams). They share the counters ``shared_counters()``
    returns: the next input to deal, inputs done and the shard's count (-1: not known), which
    the parent's bar shows, and the stop flag.

    The counters start multiprocessing's resource tracker, a process that ignores SIGTERM and
    outlives the pool: a Jupyter kernel's shutdown spent 29 s on it (ipykernel SIGTERMs it for
    14 s, then SIGKILLs its unreaped zombie for 14 s). A tracker this call started stops at its
    end once nothing of the call is left to track; after an error, whose traceback keeps the
    counters, it stops with this process, as before."""
    tracker = resource_tracker._resource_tracker  # noqa: SLF001 (no public stop)
    started_here = tracker._fd is None  # noqa: SLF001
    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", [0, 0, -1, 0])
    lock = weakref.ref(counters.get_lock())  # a named semaphore: a stopped tracker unlinks a live one
    try:
        return _run_pool(task, processes, progress, context, counters)
    finally:
        del counters
        if started_here and lock() is None:
            tracker._stop()  # noqa: SLF001


def _run_pool(task, processes: int, progress: bool, context, counters) -> list:
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_join, initargs=(counters,))
    try:
        futures = [pool.submit(task, k, processes) for k in range(processes)]
        _follow(futures, counters, progress)
        return [f.result() for f in futures]
    finally:  # an interrupt or one process's error: the others stop within seconds, after the
        counters[STOP] = 1  # inputs they have in flight, not after their whole share
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting; their journals keep what is done
            for process in list(pool._processes.values()):  # noqa: SLF001 (no public kill)
                process.kill()
            pool.shutdown(wait=False)
            raise


_COUNTERS = None  # in a process of ``run_processes``: the counters it shares with the others


def _join(counters) -> None:
    global _COUNTERS
    _COUNTERS = counters
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it sets the stop flag


def shared_counters():
    """The counters of this process's shard, or None outside ``run_processes``."""
    return _COUNTERS


def until_stopped(inputs):
    """``inputs`` until the parent sets the stop flag or is gone (killed: its orphans stop)."""
    for item in inputs:
        if _COUNTERS[STOP] or orphaned():
            return
        yield item


def orphaned() -> bool:
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _follow(futures: list, counters, progress: bool) -> None:
    """The shard's progress bar, in the parent, until every process has ended or one failed."""
    from furlib.progress import tqdm

    with tqdm(desc="prepare", unit="img", disable=not progress) as bar:
        pending = futures
        while pending:
            pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)[1]
            if any(f.exception() for f in futures if f.done()):
                return  # the caller's result() raises it
            bar.total = counters[TOTAL] if counters[TOTAL] >= 0 else None
            bar.update(counters[DONE] - bar.n)


class Dealer:
    """Deals consecutive blocks of a shard's ``total`` inputs to its ``processes`` as each asks,
    through ``counters[NEXT]`` (``run_processes``'s counters; None: one process takes all).
    Blocks shrink towards the end (guided scheduling), so the processes finish together."""

    def __init__(self, processes: int = 1, counters=None):
        self.processes, self.counters = processes, counters

    def blocks(self, total: int):
        if self.counters is None:
            yield range(total)
            return
        while True:
            with self.counters.get_lock():
                start = self.counters[NEXT]
                size = min(MAX_BLOCK, max(1, (total - start) // (4 * self.processes)))
                self.counters[NEXT] = start + size
            if start >= total:
                return
            yield range(start, min(total, start + size))


def list_folder(job: dict, listing: Path) -> str | None:
    """A folder source listed once for the shard, into ``listing`` (JSON), which every process of
    the shard reads (a folder still filling up must not give them different lists to deal from);
    returns the listing's digest, which a shard's part carries: shards that listed a changed folder
    do not merge. None for other sources."""
    kind, path = source_kind(job["source"])
    if kind != "folder":
        return None
    files = sources.folder_files(path, job["data_dir"], job["selection"]["max_images"])
    listing.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(listing, json.dumps(files))
    names = "\n".join(os.path.relpath(f, path) for f in files)
    return hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def own_inputs(job: dict, k: int, m: int, dealer: Dealer, resume: dict | None = None, table=None):
    """(iterable of (index, Input) read by process ``k`` of ``m`` of this shard, their count or
    None, how): ``dealer`` deals a listing's or a table's inputs; a stream is split by files.
    ``table``: a table source this process opened already (``sources.check_table``)."""
    sel, source, n, s = job["selection"], job["source"], job["num_shards"], job["shard_index"]
    kind, path = source_kind(source)
    if kind == "folder":  # the shard's one listing (``list_folder``), stat'ed only where dealt
        files = json.loads(Path(job["listing"]).read_text())
        mine = _shard_part(len(files), n, s)
        return _dealt(mine, dealer, lambda i: sources.folder_input(path, files[i])), len(mine), "dealt"
    if kind == "builtin":
        inputs, _ = sources.iter_inputs(source, job["source_split"], job["image_column"],
                                        sel["max_images"], sel["art_count"], sel["seed"])
        mine = _shard_part(len(inputs), n, s)
        return _dealt(mine, dealer, inputs.__getitem__), len(mine), "dealt"
    ds, prefix, stamp = _open(kind, path, job, table)
    if hasattr(ds, "__len__"):  # memory-mapped: select the rows dealt, read nothing else
        mine = _shard_part(min(len(ds), sel["max_images"]) if sel["max_images"] else len(ds), n, s)
        rows = _dealt_rows(ds, mine, dealer, prefix, job["image_column"], stamp)
        return table_sources.beside_table(rows, path), len(mine), "dealt"
    w, workers = s + n * k, n * m
    resume = resume if resume and resume.get("stamp") == stamp else None
    by_files = workers > 1 and ds.n_shards % workers == 0 and not sel["max_images"]
    rows = _stream_rows(ds, prefix, job["image_column"], stamp, w, workers, by_files,
                        sel["max_images"], resume)
    if kind == "hub":
        rows = table_sources._guarded(rows, str(source), job["source_split"])
    else:
        rows = table_sources.beside_table(rows, path)
    return rows, None, "files" if by_files or workers == 1 else "row filter"


def _open(kind: str, path, job: dict, table=None):
    """(dataset of one undecoded image column, id prefix, version stamp) of a table or Hub source;
    ``table``: the table source as this process opened it already."""
    import datasets

    source, split, column = job["source"], job["source_split"], job["image_column"]
    if kind == "table":
        ds = table_sources.open_table(path, split) if table is None else table
        prefix, stamp = path.name, table_sources.fingerprint(path)
    else:
        offline = table_sources.hub_offline()
        if not offline and (why := table_sources.hub_unreachable()):  # fail in ms, not after retries
            raise table_sources._hub_error(str(source), split, ConnectionError(why))
        try:
            ds, commit = table_sources._open_hub(str(source), split, job["selection"]["source_revision"])
        except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one clear error
            raise table_sources._hub_error(str(source), split, e) from None
        prefix, stamp = f"{source}:{split}", f"hub:{commit}"
    if ds.column_names is not None and column not in ds.column_names:
        raise table_sources._ColumnError(f"image_column={column!r} is not a column of {prefix}: {ds.column_names}")
    if ds.features is not None and isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds.select_columns([column]), prefix, stamp


def row_value(row: dict, column: str):
    """What ``load_rgb`` accepts from one undecoded row: bytes or a path."""
    value = row[column]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    return Path(value) if isinstance(value, str) else value


def _shard_part(count: int, num_shards: int, shard: int) -> list:
    """The indices of ``count`` inputs that belong to ``shard``."""
    return [i for i in range(count) if shard_of(i, num_shards) == shard]


def _dealt(mine: list, dealer: Dealer, make):
    """(index, ``make(index)``) for the inputs of ``mine`` dealt to this process, one at a time."""
    return ((mine[j], make(mine[j])) for block in dealer.blocks(len(mine)) for j in block)


def _dealt_rows(ds, mine: list, dealer: Dealer, prefix: str, column: str, stamp):
    for block in dealer.blocks(len(mine)):
        chosen = [mine[j] for j in block]
        for i, row in zip(chosen, ds.select(chosen).to_iterable_dataset()):
            yield i, Input(f"{prefix}/{i}", row_value(row, column), stamp)


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
