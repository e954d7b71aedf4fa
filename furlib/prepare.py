"""Stage 01: turn a source of images into prepared training data.

Layout under ``data_dir`` (``outputs/<run_name>/data/``)::

    train/<hash16>.png, val/<hash16>.png   lossless PNG, 8-bit sRGB RGB, long side <= max_side
    unused/<hash16>.png                    stored by an earlier run, not in the current report
    journal.jsonl                          one JSON line per processed input (the resume cache)
    settings.json                          the decoding settings the journal is valid for
    report.json                            what ``prepare`` returns

``hash`` is the sha256 of the decoded pixels (mode, size and bytes, before the long-side cap):
equal hashes are exact duplicates, kept once. The split is a function of the hash alone, so it is
stable when inputs are added: val iff ``int(hash[:8], 16) / 2**32 < val_fraction``, then only the
``val_max`` smallest val hashes stay in val and the others go to train.

Re-running reads the journal and decodes only inputs it has not seen (a local file's key holds
its size and mtime), so an interrupted run resumes. In the report, ``path`` is the input id.
"""

import hashlib
import json
import os
import re
import shutil
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from furlib.builtin import ART_VERSION, builtin_sources
from furlib.images import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb

PREPARE_VERSION = 1  # bump when decoding or storage changes: older journals are then rebuilt
SPLITS = ("train", "val", "unused")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
TABLE_SUFFIXES = (".parquet", ".arrow")
FOLDER_METADATA = {"metadata.jsonl", "metadata.csv", "metadata.parquet"}  # imagefolder's, not inputs
OFFLINE_HELP = ("Offline, use source='builtin', a local folder of images, a local .parquet/.arrow "
                "file, or a folder written by datasets' save_to_disk.")


class _Input(NamedTuple):
    input_id: str
    src: object  # what load_rgb accepts, or a zero-argument function returning a PIL image
    stamp: object = None  # [size, mtime_ns] of the local file it came from; None otherwise
    reason: str = ""  # set when the input is rejected without reading it


def prepare(source, data_dir, resolution: int = 256, max_side: int = 1536,
            max_pixels: int = DEFAULT_MAX_PIXELS, val_fraction: float = 0.05, val_max: int = 500,
            background=(255, 255, 255), max_images: int = 0, seed: int = 0,
            source_split: str = "train", image_column: str = "image", art_count: int = 24,
            workers: int = 0, progress: bool = True) -> dict:
    """Decode, deduplicate, split and store every input of ``source``; write and return the report.

    ``resolution``: the training crop side (px); a shorter side is rejected as ``too_small``.
    ``max_side``: stored long side cap (px, Lanczos). ``max_images``, ``val_max``: 0 = no limit.
    ``seed`` only seeds the built-in drawings. ``workers``: decoding threads (0 = one per core).
    """
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    settings = {"version": PREPARE_VERSION, "resolution": resolution, "max_side": max_side,
                "max_pixels": max_pixels, "background": [int(c) for c in background]}
    rebuilt = _check_settings(data_dir, settings)
    journal, store = _read_journal(data_dir), _index_store(data_dir)
    inputs, total = _iter_inputs(source, source_split, image_column, max_images, art_count, seed,
                                 exclude=data_dir)
    scope = _source_key(source, source_split, image_column)

    def work(item):  # -> (journal key, entry, whether it was decoded now)
        key = json.dumps([scope, item.input_id, item.stamp])
        old = journal.get(key)
        reusable = old is not None and old.get("reason") != "error"  # unexpected errors: retry
        if reusable and (old["status"] != "ok" or old["file"] in store):
            return key, old, False
        return key, _process(item, settings, data_dir, val_fraction, store), True

    entries, decoded = [], 0
    with open(data_dir / "journal.jsonl", "a") as log, \
            tqdm(total=total, desc="prepare", unit="img", disable=not progress) as bar:
        for item, (key, entry, new) in _ordered_map(work, inputs, workers or os.cpu_count() or 1):
            if new:
                log.write(json.dumps(dict(entry, key=key)) + "\n")
                log.flush()  # a kill leaves at most a partial last line, which is skipped
                decoded += 1
            entries.append(dict(entry, id=item.input_id))
            bar.update()
    report = _build_report(entries, val_fraction, val_max)
    _place_files(data_dir, report["accepted"], store)
    report["counts"].update(decoded_this_run=decoded, reused=len(entries) - decoded)
    report.update(source=str(source), rebuilt_because=rebuilt, settings=dict(
        settings, val_fraction=val_fraction, val_max=val_max, max_images=max_images,
        source_split=source_split, image_column=image_column, art_count=art_count, seed=seed))
    (data_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def pixel_hash(image: Image.Image) -> str:
    """sha256 hex of mode, size and raw pixel bytes: equal iff the decoded images are identical."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def is_val(digest: str, val_fraction: float) -> bool:
    return int(digest[:8], 16) / 2**32 < val_fraction


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


def _check_settings(data_dir: Path, settings: dict) -> str:
    """Start over (empty journal and stores) when the decoding settings changed; say why."""
    path = data_dir / "settings.json"
    old = json.loads(path.read_text()) if path.exists() else None
    reason = ""
    if old is not None and old != settings:
        reason = "settings changed: " + ", ".join(
            f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
        for name in SPLITS:
            shutil.rmtree(data_dir / name, ignore_errors=True)
        (data_dir / "journal.jsonl").unlink(missing_ok=True)
    for name in SPLITS:
        (data_dir / name).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))
    return reason


def _read_journal(data_dir: Path) -> dict:
    """key -> latest entry; unparsable lines (an interrupted write) are skipped."""
    out = {}
    path = data_dir / "journal.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
            out[entry.pop("key")] = entry
        except (json.JSONDecodeError, KeyError, AttributeError):
            continue
    return out


def _index_store(data_dir: Path) -> dict:
    """Stored file name -> the split folder it is in now; a killed run's temporary files go."""
    for tmp in (p for name in SPLITS for p in (data_dir / name).glob(".tmp-*")):
        tmp.unlink()
    return {p.name: name for name in SPLITS for p in (data_dir / name).glob("[!.]*.png")}


def _process(item: _Input, settings: dict, data_dir: Path, val_fraction: float, store: dict) -> dict:
    """Decode, hash, cap and store one input; return its journal entry."""
    if item.reason:
        return {"status": "rejected", "reason": item.reason, "detail": ""}
    try:
        src = item.src() if callable(item.src) else item.src  # a built-in drawing is drawn now
        image = load_rgb(src, settings["background"], settings["max_pixels"],
                         min_side=settings["resolution"])
        digest, source_size = pixel_hash(image), image.size
        image = _cap_long_side(image, settings["max_side"])
        if min(image.size) < settings["resolution"]:
            raise ImageRejected("too_small_after_cap", f"{source_size} -> {image.size}")
    except ImageRejected as e:
        return {"status": "rejected", "reason": e.reason, "detail": e.detail}
    except Exception as e:  # noqa: BLE001 - one odd input must not end a long run; it is reported
        return {"status": "rejected", "reason": "error", "detail": f"{type(e).__name__}: {e}"}
    name = digest[:16] + ".png"
    if name not in store:
        split = "val" if is_val(digest, val_fraction) else "train"
        _save_png(image, data_dir / split / name)
        store[name] = split
    return {"status": "ok", "hash": digest, "file": name, "width": image.width,
            "height": image.height, "source_width": source_size[0], "source_height": source_size[1]}


def _cap_long_side(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _save_png(image: Image.Image, path: Path) -> None:
    """Lossless; written under a temporary name and renamed, so a kill never leaves half a file."""
    tmp = path.with_name(f".tmp-{threading.get_ident()}-{path.name}")
    image.save(tmp, "PNG", compress_level=3)  # level 3: ~3x faster to write than 6, ~10% larger
    os.replace(tmp, path)


def _build_report(entries: list, val_fraction: float, val_max: int) -> dict:
    """Every input once: accepted (first of its hash), duplicate (later ones) or rejected."""
    first, accepted, duplicates, rejected = {}, [], [], []
    for e in entries:
        if e["status"] != "ok":
            rejected.append({"path": e["id"], "reason": e["reason"], "detail": e.get("detail", "")})
        elif e["hash"] in first:
            duplicates.append({"path": e["id"], "duplicate_of": first[e["hash"]], "hash": e["hash"]})
        else:
            first[e["hash"]] = e["id"]
            accepted.append({k: e[k] for k in ("id", "file", "width", "height", "source_width",
                                               "source_height", "hash")})
    val = sorted(a["hash"] for a in accepted if is_val(a["hash"], val_fraction))
    keep = set(val[:val_max] if val_max > 0 else val)
    for a in accepted:
        a["split"] = "val" if a["hash"] in keep else "train"
        a["file"] = f"{a['split']}/{a['file']}"
    counts = {"inputs": len(entries), "accepted": len(accepted), "train": len(accepted) - len(keep),
              "val": len(keep), "val_over_cap": len(val) - len(keep), "rejected": len(rejected),
              "rejected_by_reason": dict(Counter(r["reason"] for r in rejected).most_common()),
              "duplicates": len(duplicates)}
    return {"counts": counts, "accepted": accepted, "rejected": rejected, "duplicates": duplicates}


def _place_files(data_dir: Path, accepted: list, store: dict) -> None:
    """Move files so train/ and val/ hold exactly the report's images; the rest go to unused/."""
    wanted = {Path(a["file"]).name: a["split"] for a in accepted}
    for name, where in list(store.items()):
        target = wanted.get(name, "unused")
        if where != target:
            os.replace(data_dir / where / name, data_dir / target / name)
            store[name] = target


# --- Sources ------------------------------------------------------------------------------------

def iter_source(source, source_split: str = "train", image_column: str = "image",
                max_images: int = 0, *, art_count: int = 24, seed: int = 0):
    """Yield ``(input_id, src)`` for each image of a source (``src`` is what load_rgb accepts).

    ``source``: "builtin"; a local folder (recursive, by extension; hidden files skipped); a local
    .parquet/.arrow file; a ``save_to_disk`` folder or a folder of parquet/arrow files; else a
    Hugging Face Hub dataset id, streamed. ``max_images``: 0 = all.
    """
    inputs, _ = _iter_inputs(source, source_split, image_column, max_images, art_count, seed)
    for item in inputs:
        if not item.reason:
            yield item.input_id, item.src() if callable(item.src) else item.src


def _kind(source) -> tuple[str, Path]:
    """builtin, folder (of images), table (parquet/arrow/save_to_disk) or hub."""
    path = Path(str(source)).expanduser()
    if source == "builtin":
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
    raise FileNotFoundError(f"source {source!r}: no such file or folder, and not a Hub dataset id")


def _source_key(source, source_split: str, image_column: str) -> str:
    """What journal keys are scoped to: the same input id from another source is another input."""
    kind, path = _kind(source)
    where = {"builtin": "builtin", "hub": f"hub:{source}"}.get(kind) or str(path.resolve())
    return where if kind in ("builtin", "folder") else f"{where}|{source_split}|{image_column}"


def _iter_inputs(source, source_split, image_column, max_images, art_count=24, seed=0,
                 exclude=None):
    """(iterable of _Input, total count or None) for any kind of source."""
    kind, path = _kind(source)
    if kind == "builtin":
        art_stamp = f"art{ART_VERSION}-seed{seed}"
        items = [_Input(i, s, _stamp(s) if isinstance(s, Path) else art_stamp)
                 for i, s in builtin_sources(art_count, seed)]
    elif kind == "folder":
        items = [_Input(f.relative_to(path).as_posix(), f, _stamp(f),
                        "" if f.suffix.lower() in IMAGE_SUFFIXES else "not_an_image")
                 for f in _walk(path, exclude)]
    else:
        rows, total = _table_rows(path, source_split, image_column) if kind == "table" else \
            _hub_rows(str(source), source_split, image_column)
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


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _walk(root: Path, exclude=None) -> list[Path]:
    """Every non-hidden file below ``root`` (sorted), except imagefolder metadata and ``exclude``."""
    skip = Path(exclude).resolve() if exclude else None
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip is None or (Path(folder) / d).resolve() != skip))
        out += [Path(folder) / f for f in sorted(files)
                if not f.startswith(".") and f not in FOLDER_METADATA]
    return out


def _table_rows(path: Path, source_split: str, image_column: str):
    """Rows of a parquet/arrow file, a save_to_disk folder, or a folder of parquet/arrow files."""
    import datasets

    if path.is_file() and path.suffix.lower() == ".arrow":
        ds = datasets.Dataset.from_file(str(path))  # memory-mapped, no copy
    elif path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:
        fmt = "parquet" if any(path.rglob("*.parquet")) else "arrow"
        ds = datasets.load_dataset(fmt, data_dir=str(path), streaming=True)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if source_split not in ds:
            raise ValueError(f"source_split={source_split!r} not in {path}; splits: {list(ds)}")
        ds = ds[source_split]
    total = len(ds) if isinstance(ds, datasets.Dataset) else None
    return _dataset_rows(ds, path.name, image_column, _stamp(path) if path.is_file() else None), total


class _ColumnError(ValueError):
    pass


def _dataset_rows(ds, prefix: str, image_column: str, stamp):
    """One _Input per row; the image column is read undecoded (bytes or a path) for load_rgb."""
    import datasets

    columns = ds.column_names
    if columns is not None and image_column not in columns:
        raise _ColumnError(f"image_column={image_column!r} is not a column of {prefix}: {columns}")
    if ds.features is not None and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    for index, row in enumerate(ds.select_columns([image_column])):
        value = row[image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        value = Path(value) if isinstance(value, str) else value
        ok = isinstance(value, (bytes, Path, Image.Image))
        reason = "" if ok else ("empty" if value is None else "not_an_image")
        yield _Input(f"{prefix}/{index}", value if ok else None, stamp, reason)


def _hub_rows(source: str, source_split: str, image_column: str):
    """Stream a Hub dataset; any failure to reach or read it becomes one clear RuntimeError."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and (why := _hub_unreachable()):  # fail in ms, not after minutes of retries
        raise _hub_error(source, source_split, ConnectionError(why))
    try:
        import datasets

        ds = datasets.load_dataset(source, split=source_split, streaming=True)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end the same way
        raise _hub_error(source, source_split, e) from None
    return _guarded(_dataset_rows(ds, f"{source}:{source_split}", image_column, None),
                    source, source_split), None


def _hub_unreachable() -> str:
    """Why the Hub's host cannot be resolved ('' when it can, or when a proxy does the lookup)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host}: {e}"
    return ""


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
        f"A copy already in the datasets cache is used with HF_DATASETS_OFFLINE=1. "
        f"Re-running resumes an interrupted run.")
