"""Stage 01: turn a source of images (``furlib.data.sources``) into prepared training data.

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
import shutil
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from furlib.images import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb
from furlib.data.sources import Input, iter_inputs, source_key

PREPARE_VERSION = 1  # bump when decoding or storage changes: older journals are then rebuilt
SPLITS = ("train", "val", "unused")


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
    data_dir = Path(data_dir)
    settings = {"version": PREPARE_VERSION, "resolution": resolution, "max_side": max_side,
                "max_pixels": max_pixels, "background": [int(c) for c in background]}
    rebuilt = _check_settings(data_dir, settings)
    journal, store = _read_journal(data_dir), _index_store(data_dir)
    inputs, total = iter_inputs(source, source_split, image_column, max_images, art_count, seed,
                                exclude=data_dir)
    scope = source_key(source, source_split, image_column)

    def work(item):  # -> (journal key, entry, whether it was decoded now)
        key = json.dumps([scope, item.input_id, item.stamp])
        old = journal.get(key)
        reusable = old is not None and old.get("reason") != "error"  # unexpected errors: retry
        if reusable and (old["status"] != "ok" or old["file"] in store):
            return key, old, False
        return key, _process(item, settings, data_dir, val_fraction, store), True

    entries, decoded = _journalled(work, inputs, total, data_dir, workers, progress)
    report = _build_report(entries, val_fraction, val_max)
    _place_files(data_dir, report["accepted"], store)
    report["counts"].update(decoded_this_run=decoded, reused=len(entries) - decoded)
    report.update(source=str(source), rebuilt_because=rebuilt, settings=dict(
        settings, val_fraction=val_fraction, val_max=val_max, max_images=max_images,
        source_split=source_split, image_column=image_column, art_count=art_count, seed=seed))
    (data_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _journalled(work, inputs, total, data_dir: Path, workers: int, progress: bool):
    """(entries in input order, how many were decoded now); each new entry is journalled at once."""
    from tqdm.auto import tqdm

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
    return entries, decoded


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


def _process(item: Input, settings: dict, data_dir: Path, val_fraction: float, store: dict) -> dict:
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

