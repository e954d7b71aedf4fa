"""Stage 01: turn a source of images (``furlib.sources``) into prepared training data.

Each input becomes one journal entry (``furlib.data.input_entry``: decoded, hashed by its pixels,
stored once per hash in the folder layout of ``furlib.data.store``, or rejected with a reason).
The split is a function of the hash alone, so it is stable when inputs are added: val iff
``int(hash[:8], 16) / 2**32 < val_fraction``, then only the ``val_max`` smallest val hashes stay
in val and the others go to train.

Settings that only filter (``resolution``, ``max_pixels``) never rebuild: the report filters the
journal, files that drop out move to ``unused/``, inputs they had rejected are decoded again.
Another ``source`` on the same folder moves the earlier source's files to ``unused/`` too, with
a NOTE; running that source again brings them back from the journal.
Settings that change stored pixels (``max_side``, ``background``, the version) refuse to run on
data prepared otherwise unless ``rebuild=True`` (which deletes it all, explicitly).

In parallel: ``shard_index`` of ``num_shards`` machines (or runs) takes a fixed part of the inputs,
and its ``num_proc`` processes take blocks of that part as they free up; each reads only its own
where the source allows it (``furlib.data.shares``). Each process journals to its own file, each
shard writes its part, and whichever run finds all parts finished merges them into one
``report.json`` and one train/val set (the same as an unsharded run). Re-running
reuses every journal, whatever the split into processes and shards (a stream of several files
names its rows by file and row, so this holds for it too). In the report, ``path`` is the input id.
An interrupt (Ctrl-C, Jupyter's stop button) or one process's error stops every process after
the inputs it has in flight, and a process whose parent was killed stops by itself: none goes on
with its share unseen.
"""

import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image

from furlib import atomic
from furlib.data import store
from furlib.data import shares
from furlib.data.input_entry import process_input, reusable
from furlib.data.prep_report import build_report
from furlib.inputs import RESUMED
from furlib.sources import check_revision, check_table, source_key
from furlib.images import DEFAULT_MAX_PIXELS, reusing_pixel_memory
from furlib.parameters import strict_bool
from furlib.runinfo import read_json, usable_cores

PREPARE_VERSION = 1  # bump when decoding or storage changes: older data then needs rebuild=True
DEFAULT_MAX_SIDE = 16384  # px: native resolution kept; only beyond this is an image downscaled
PIXEL_SETTINGS = ("version", "max_side", "background")  # a change means other stored pixels
STREAM_SAVE_S = 10.0  # how often a stream's position is saved (s)


def prepare(source, data_dir, resolution: int = 256, max_side: int = DEFAULT_MAX_SIDE,
            max_pixels: int = DEFAULT_MAX_PIXELS, val_fraction: float = 0.05, val_max: int = 500,
            background=(255, 255, 255), max_images: int = 0, seed: int = 0,
            source_split: str = "train", image_column: str = "image", art_count: int = 24,
            source_revision: str = "", num_proc: int = 1, num_shards: int = 1,
            shard_index: int = 0, rebuild: bool = False, workers: int = 0,
            progress: bool = True) -> dict:
    """Decode, deduplicate, split and store every input of ``source``; write and return the report.

    ``resolution``: the training crop side (px); a shorter side is rejected as ``too_small``.
    ``max_side``: stored long side cap (px, Lanczos). ``max_images``, ``val_max``: 0 = no limit.
    ``seed`` only seeds the built-in drawings. ``source_revision``: a Hub dataset's commit, tag
    or branch. ``num_proc``: processes (0 = one per core). ``workers``: decoding threads per
    process (0 = cores / num_proc). The report of a shard whose siblings are not finished yet
    has ``complete: False`` and ``missing_shards``.
    """
    data_dir = Path(data_dir)
    strict_bool("rebuild", rebuild)  # the string 'False' must never wipe prepared data
    _check_parallel(num_proc, num_shards, shard_index)
    if Image.MAX_IMAGE_PIXELS and max_pixels > Image.MAX_IMAGE_PIXELS:  # (its warning zone is ours to reject)
        raise ValueError(f"max_pixels={max_pixels:,} is over Pillow's own limit ({Image.MAX_IMAGE_PIXELS:,} px), "
                         "which every later reader of a stored image (training crops, evaluation) meets too: "
                         f"use at most {Image.MAX_IMAGE_PIXELS:,}")
    num_proc = num_proc or usable_cores()
    check_revision(source, source_revision)
    table = check_table(source, source_split)  # before the lock: a wrong split leaves the report be
    folder = Path(str(source)).expanduser().resolve()
    if folder.is_dir() and (folder == data_dir.resolve() or data_dir.resolve() in folder.parents):
        raise ValueError(f"source {str(source)!r} is inside the run's data folder {data_dir}: 01 would read (and "
                         "move) its own output; point source at the original images")
    settings = {"version": PREPARE_VERSION, "max_side": max_side,
                "background": [int(c) for c in background]}
    selection = dict(scope=source_key(source, source_split, image_column), max_images=max_images,
                     art_count=art_count, seed=seed, source_revision=source_revision)
    rebuilt = _check_settings(data_dir, settings, rebuild)
    job = dict(source=str(source), data_dir=str(data_dir), settings=settings, selection=selection,
               filters=dict(resolution=resolution, max_pixels=max_pixels), num_shards=num_shards,
               shard_index=shard_index, source_split=source_split, image_column=image_column,
               val_fraction=val_fraction, val_max=val_max,
               workers=workers or max(1, (os.cpu_count() or 1) // num_proc))
    shard = f"shard-{shard_index:05d}-of-{num_shards:05d}"
    header = dict(selection, settings=settings, filters=job["filters"], num_shards=num_shards)  # parts merge if equal
    with store.locked(data_dir / ".lock", True, "prepare"), \
            store.locked(data_dir / "parts" / f"{shard}.lock", False, f"prepare {shard}"):
        with store.locked(data_dir / ".merge.lock", False, "merge", wait=True):
            store.drop_part(data_dir, shard)  # not complete again until this run finishes
        job["listing"] = str(data_dir / "parts" / f"{shard}.listing.json")
        header["listing"] = shares.list_folder(job, Path(job["listing"]))
        entries, decoded = _run_shard(job, num_proc, progress, table)
        store.write_part(data_dir, shard, header, entries)
        Path(job["listing"]).unlink(missing_ok=True)  # its digest is in the part; each run lists anew
    report = _finish(data_dir, job, header, entries, decoded)
    report.update(source=str(source), rebuilt_because=rebuilt, settings=dict(
        settings, **job["filters"], val_fraction=val_fraction, val_max=val_max,
        max_images=max_images, source_split=source_split, image_column=image_column,
        art_count=art_count, seed=seed, source_revision=source_revision, num_proc=num_proc,
        num_shards=num_shards, shard_index=shard_index))
    for scope, count in report["set_aside"].items():  # printed here: no notebook should miss it
        print(_set_aside_note(data_dir, scope, count))
    if report["complete"]:  # renamed into place whole: 02 never reads half a report
        atomic.write_text(data_dir / "report.json", json.dumps(report, indent=1))
    return report


def _finish(data_dir: Path, job: dict, header: dict, entries: list, decoded: int) -> dict:
    """The merged report once every shard's part is there (files placed), else this shard's."""
    n = job["num_shards"]
    with store.locked(data_dir / ".merge.lock", False, "merge", wait=True):
        shards = [f"shard-{i:05d}-of-{n:05d}" for i in range(n)]
        merged, missing = store.read_parts(data_dir, shards, header)
        if missing:
            report = build_report(entries, job["val_fraction"], job["val_max"], job["filters"])
            report["set_aside"] = {}
        else:
            merged.sort(key=lambda e: e["index"])
            report = build_report(merged, job["val_fraction"], job["val_max"], job["filters"])
            aside = store.place_files(data_dir, report["accepted"], store.index_store(data_dir))
            report["set_aside"] = store.other_sources(data_dir, aside, merged, job["selection"]["scope"])
    report["counts"].update(decoded_this_run=decoded, reused=len(entries) - decoded)
    return dict(report, complete=not missing, missing_shards=missing)


def _set_aside_note(data_dir: Path, scope: str, count: int) -> str:
    """What a person reads when another source's images left train/ and val/ (``source_key``'s
    ``scope``: the folder, or ``table|split|column``): the earlier run's data is kept, not lost."""
    where, *rest = scope.rsplit("|", 2) if scope.count("|") >= 2 else [scope]
    words = f"source={where.removeprefix('hub:')!r}" + (
        f", source_split={rest[0]!r}, image_column={rest[1]!r}" if rest else "")
    images, were = (f"{count} images", "were") if count != 1 else ("1 image", "was")
    return (f"NOTE: {images} of the previous run ({words}) {were} set aside into {data_dir / 'unused'}: not "
            "in this source. Running 01 again with that source brings them back to train/ and val/ (its "
            "unchanged inputs from the journal, not decoded again).")


def _check_parallel(num_proc: int, num_shards: int, shard_index: int) -> None:
    if num_proc < 0:
        raise ValueError(f"num_proc must be >= 0 (processes on this machine; 0: one per core), "
                         f"got {num_proc}")
    if num_proc > 4 * usable_cores():  # each holds its own decoders and ~40 MB: 1000 would not fit
        raise ValueError(f"num_proc={num_proc} is over 4x this machine's {usable_cores()} usable cores: "
                         "use 0 (one process per core), or fewer")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards) and num_shards >= 1, got "
                         f"shard_index={shard_index}, num_shards={num_shards}")


def _run_shard(job: dict, num_proc: int, progress: bool, table=None) -> tuple[list, int]:
    """(this shard's entries in input order, how many were decoded now), over num_proc processes.
    ``table``: the table source ``check_table`` opened, which one process reads (spawned ones open
    their own)."""
    if num_proc == 1:
        results = [_run_proc(job, progress, 0, 1, table)]
    else:
        results = shares.run_processes(partial(_run_proc, job, progress), num_proc, progress)
    entries = sorted((e for part, _ in results for e in part), key=lambda e: e["index"])
    return entries, sum(n for _, n in results)


def _run_proc(job: dict, progress: bool, k: int, m: int, table=None) -> tuple[list, int]:
    """Process ``k`` of ``m`` of one shard: decode its inputs (journal first), return entries."""
    data_dir, sel = Path(job["data_dir"]), job["selection"]
    name = f"shard-{job['shard_index']:05d}-of-{job['num_shards']:05d}.proc-{k:03d}-of-{m:03d}"
    position_file = data_dir / "streams" / f"{name}.json"
    resume = read_json(position_file, "delete it: this process then reads its share of the stream from the start")
    here = dict(scope=sel["scope"], filters=job["filters"],  # a position is valid only for these
                share=[job["shard_index"], job["num_shards"], k, m])
    resume = resume if resume and all(resume.get(key) == v for key, v in here.items()) else None
    journal, files = store.read_journal(data_dir), store.index_store(data_dir)
    counters = shares.shared_counters() if m > 1 else None  # the shard's, shared by its processes
    own, share, how = shares.own_inputs(job, k, m, shares.Dealer(m, counters), resume, table)
    own = own if counters is None else shares.until_stopped(own)
    if counters is not None and how == "dealt":  # the shard's count, the same in every process
        counters[shares.TOTAL] = share
    if how == "row filter" and k == 0 and progress:
        n = job["num_shards"]
        print(f"NOTE: {job['source']} streams as {n * m} readers over files that do not divide "
              f"among them (or max_images needs the stream's order): every reader reads every row "
              f"and keeps its own. Choose num_shards x num_proc dividing the number of files.")

    def work(indexed):  # -> (journal key, entry, whether it was decoded now)
        index, item = indexed
        key = json.dumps([sel["scope"], item.input_id, item.stamp])
        old = journal.get(key)
        if item.src is RESUMED:  # the stream resumed past it: only its journal entry can answer
            if old is None:
                raise RuntimeError(f"{item.input_id} was passed by a resumed stream but is not in "
                                   f"the journal under {data_dir}; delete {position_file}, re-run")
            return key, old, False
        if old is not None and reusable(old, job["filters"], files, item.input_id):
            return key, old, False
        return key, process_input(item, job, data_dir, files), True

    with reusing_pixel_memory(job["workers"]):
        done = _journalled(work, own, share, data_dir / "journal" / f"{name}.jsonl", position_file,
                           here, job["workers"], progress and m == 1, counters)
    if counters is not None and shares.orphaned():
        os._exit(0)  # nobody to return to, and the pool's queue would keep this process waiting
    return done


def _journalled(work, inputs, total, journal_file: Path, position_file: Path, here: dict,
                workers: int, progress: bool, counters=None):
    """(entries in input order, how many were decoded now); each new entry is journalled at once,
    and a stream's position after the last journalled row is saved every STREAM_SAVE_S and at
    the end (``here``: the scope and filters it is valid for). ``counters[DONE]``: inputs done by
    all processes of the shard (the parent's bar), when there are several."""
    from furlib.progress import tqdm  # text bars headless and in saved notebooks

    entries, decoded, saved, position = [], 0, time.monotonic(), None
    journal_file.parent.mkdir(exist_ok=True)
    with open(journal_file, "a") as log, \
            tqdm(total=total, desc="prepare", unit="img", disable=not progress) as bar:
        for (index, item), (key, entry, new) in _ordered_map(work, inputs, workers):
            if new:
                log.write(json.dumps(dict(entry, key=key)) + "\n")
                log.flush()  # a kill leaves at most a partial last line, which is skipped
                decoded += 1
            entries.append(dict(entry, id=item.input_id, index=index))
            if isinstance(item.stamp, str):  # a dataset's version: fingerprint or Hub commit
                entries[-1]["version"] = item.stamp
            position = item.position or position
            if position is not None and time.monotonic() - saved > STREAM_SAVE_S:
                _save_position(position_file, dict(position, **here))
                saved, position = time.monotonic(), None
            bar.update()
            if counters is not None:
                with counters.get_lock():
                    counters[shares.DONE] += 1
    if position is not None:
        _save_position(position_file, dict(position, **here))
    return entries, decoded


def _save_position(path: Path, position: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    atomic.write_text(path, json.dumps(position))


def _ordered_map(fn, items, workers: int):
    """Yield ``(item, fn(item))`` in input order, at most ``2 * workers`` in flight (threads:
    PIL and hashlib release the GIL while decoding, resizing, encoding and hashing)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _check_settings(data_dir: Path, settings: dict, rebuild: bool) -> str:
    """Refuse data prepared with other pixel settings unless ``rebuild``; then wipe it, say why.
    Under .merge.lock: runs starting together read and write settings.json one at a time."""
    path = data_dir / "settings.json"
    with store.locked(data_dir / ".merge.lock", False, "settings", wait=True):
        old = read_json(path, "prepare with rebuild=True (the stored images cannot be matched to their settings)")
        changed = [f"{k} {old.get(k)} -> {settings[k]}" for k in PIXEL_SETTINGS
                   if old is not None and old.get(k) != settings[k]]
        if changed and not rebuild:
            raise ValueError(
                f"{data_dir} was prepared with other settings that change stored pixels "
                f"({', '.join(changed)}). Keep the old values to use it (incremental, nothing is "
                "lost), or set rebuild=True to delete its images and prepare again (hours at scale).")
        if changed:
            with store.locked(data_dir / ".lock", False, "rebuild"):  # not while another run works
                store.wipe(data_dir)
        for name in store.SPLITS:
            (data_dir / name).mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(settings, indent=1))  # renamed into place whole
    return "settings changed: " + ", ".join(changed) if changed else ""
