"""The files of a prepared-data folder, safe for many writers at once (processes and machines).

Layout under ``data_dir`` (see ``furlib.data.input_entry`` for what the images are)::

    train/, val/, unused/        <hash16>.jpg|.png|.webp: stored originals, or converted
                                 images as lossless WebP (PNG beyond WebP's size limit)
    journal/<part>.jsonl         one JSON line per processed input, one file per writing process
    journal.jsonl                the single journal of older versions (still read)
    parts/<shard>.jsonl          a finished shard's entries in input order (a header line first)
    streams/<part>.json          where a table or Hub stream stopped, to resume it there
    settings.json, report.json   decoding settings; the merged report
    .lock, .merge.lock           flock files: every run holds .lock shared, a rebuild exclusively;
                                 merging the shards' parts into report.json holds .merge.lock

No writer ever deletes what another may still be writing: temporaries (``furlib.atomic``) carry
the writer's host, pid and thread and are swept only when over an hour old; each process appends to its own journal
file; stored files are renamed into place whole (same name = same pixels, so racing writers of one
name are harmless); only an explicit rebuild deletes, and only while no other run holds the lock.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections import Counter
from pathlib import Path

from furlib import atomic

SPLITS = ("train", "val", "unused")
IMAGE_GLOBS = ("[!.]*.jpg", "[!.]*.png", "[!.]*.webp")  # what 01 stores; hidden = temporaries


@contextlib.contextmanager
def locked(path: Path, shared: bool, what: str, wait: bool = False):
    """Hold an flock on ``path`` (released when the process dies, too); busy -> RuntimeError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            raise RuntimeError(f"{what}: another prepare run holds {path} (see its pid in "
                               f"{path}.owner); wait for it to finish, or use another data folder "
                               "or shard_index") from None
        (path.parent / f"{path.name}.owner").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


JOURNAL_FIELDS = {"ok": {"hash", "file", "width", "height", "source_width", "source_height"},
                  "rejected": {"reason"}}  # what an entry of each status must hold to be reused


def read_journal(data_dir: Path) -> dict:
    """key -> latest entry over every journal file; unparsable or incomplete lines (a killed
    write, damage on disk) are skipped: those inputs are decoded again."""
    out = {}
    files = [data_dir / "journal.jsonl", *sorted((data_dir / "journal").glob("*.jsonl"))]
    for path in files:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            try:
                entry = json.loads(line)
                if JOURNAL_FIELDS[entry["status"]] <= set(entry):
                    out[entry.pop("key")] = entry
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                continue
    return out


def index_store(data_dir: Path) -> dict:
    """Stored file name -> the split folder it is in now; sweeps temporaries over an hour old."""
    for name in SPLITS:
        atomic.sweep(data_dir / name)  # a store write takes well under a second
    return {p.name: name for name in SPLITS for pattern in IMAGE_GLOBS
            for p in (data_dir / name).glob(pattern)}


WEBP_MAX_SIDE = 16383  # px: libwebp's limit; a longer side is stored as PNG


def converted_suffix(image) -> str:
    """How converted pixels are stored: lossless WebP, else (a side over 16,383 px) PNG.

    Lossless WebP at its fastest setting against PNG (zlib level 3, this project's earlier
    choice), per megapixel on photographs (benchmarks/RESULTS.md, issue 22): 1.7-4x faster to
    write, 1.4-2.1x faster to decode in the loader, 14-30% smaller; both give back exactly the
    pixels written."""
    return ".webp" if max(image.size) <= WEBP_MAX_SIDE else ".png"


def stored_name(files: dict, stem: str, suffix: str) -> str:
    """``stem + suffix``, or the name under which the same pixels (``stem``: their hash) are
    stored already in another format (an exact duplicate: a BMP of a stored PNG), so none is
    stored twice."""
    return next((stem + s for s in (suffix, ".jpg", ".png", ".webp") if stem + s in files),
                stem + suffix)


def save_converted(image, path: Path) -> None:
    """Lossless, in the format of ``path``'s suffix (``converted_suffix``); written under a
    temporary name and renamed, so a kill never leaves half a file."""
    with atomic.replacing(path) as tmp:
        if path.suffix == ".webp":  # exact: keep every RGB value as it is (no alpha here anyway)
            image.save(tmp, "WEBP", lossless=True, quality=0, method=0, exact=True)
        else:
            image.save(tmp, "PNG", compress_level=1)


def save_original(src, path: Path) -> None:
    """Store a source's own bytes (``src``: its bytes or its file), atomically as ``save_converted``."""
    with atomic.replacing(path) as tmp:
        if isinstance(src, (bytes, bytearray, memoryview)):
            tmp.write_bytes(bytes(src))
        else:
            shutil.copyfile(src, tmp)


def place_files(data_dir: Path, accepted: list, store: dict) -> list:
    """Move files so train/ and val/ hold exactly the report's images; the rest go to unused/.
    Returns the names this moved from train/ or val/ to unused/."""
    wanted, aside = {Path(a["file"]).name: a["split"] for a in accepted}, []
    for name, where in list(store.items()):
        target = wanted.get(name, "unused")
        if where != target:
            with contextlib.suppress(FileNotFoundError):  # another merge moved it already
                os.replace(data_dir / where / name, data_dir / target / name)
            store[name] = target
            aside += [name] if target == "unused" else []
    return aside


def other_sources(data_dir: Path, names: list, entries: list, scope: str) -> dict:
    """{scope: count} of the ``names`` set aside because they came from another source (scope)
    than this run's: no input of ``entries`` has their pixels and no journal entry of ``scope``
    stored them (a filter, or an input of this source replaced or removed, sets files aside too)."""
    gone = set(names) - {e["file"] for e in entries if "file" in e}
    if not gone:  # the usual case: the journal is not read again
        return {}
    scopes = {}
    for key, entry in read_journal(data_dir).items():
        if entry.get("file") in gone:
            scopes.setdefault(entry["file"], set()).add(json.loads(key)[0])
    return dict(Counter(min(found) for found in scopes.values() if scope not in found))


def write_part(data_dir: Path, shard: str, header: dict, entries: list) -> None:
    """A finished shard's entries, renamed into place whole: present = complete."""
    path = data_dir / "parts" / f"{shard}.jsonl"
    path.parent.mkdir(exist_ok=True)
    with atomic.replacing(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(json.dumps(e) + "\n" for e in entries)


def read_parts(data_dir: Path, shards: list, header: dict) -> tuple[list, list]:
    """(entries of every finished shard whose header matches, names of the shards still missing)."""
    entries, missing = [], []
    for shard in shards:
        path = data_dir / "parts" / f"{shard}.jsonl"
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        except (UnicodeDecodeError, json.JSONDecodeError):  # damaged on disk: that shard runs again
            lines = []  # (quickly: its journal holds every input it decoded)
        if not lines or lines[0] != header:
            changed = lines and isinstance(lines[0], dict) and lines[0].get("listing") != header.get("listing")
            why = "it listed the source folder before it changed" if changed else "it ran with other settings"
            missing.append(shard + (f" ({why}: run it again)" if lines else ""))
            continue
        entries += lines[1:]
    return entries, missing


def drop_part(data_dir: Path, shard: str) -> None:
    """A shard starts again: its part, and the merged report, are gone until it finishes (the
    folders change as it runs: 02 must not take the old report for them)."""
    (data_dir / "parts" / f"{shard}.jsonl").unlink(missing_ok=True)
    (data_dir / "report.json").unlink(missing_ok=True)


def wipe(data_dir: Path) -> None:
    """What an explicit rebuild deletes: every stored image, journal, part and stream position."""
    for name in (*SPLITS, "journal", "parts", "streams"):
        shutil.rmtree(data_dir / name, ignore_errors=True)
    for name in ("journal.jsonl", "report.json"):
        (data_dir / name).unlink(missing_ok=True)
