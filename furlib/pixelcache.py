"""Decoded-pixel cache entries: a prepared image's pixels, decoded once, as an uncompressed ``.npy``.

Layout: ``<cache_dir>/<png stem>.npy``, uint8 HWC RGB (``np.save`` format: a 128-byte header, then
width * height * 3 bytes). Prepared images are named by a hash of their pixels before the
``max_side`` cap (``furlib.data.input_entry``), so a file 01 rebuilt with another ``max_side``, or
one replaced by hand, keeps its name and gets other pixels: an entry older than its image is stale
and counts as none (``read``, ``sizes``). The 02 run keeps its cache in its own ``<run>/pixel_cache/``,
beside 01's ``data/``. ``furlib.crops`` decides when to use the cache and crops from it.
"""

import shutil
from pathlib import Path

import numpy as np

from furlib import atomic, prepared

NPY_HEADER_BYTES = 128  # np.save's header for a 3-D uint8 array


def entry_path(cache_dir, png_path) -> Path:
    """Where the decoded pixels of ``png_path`` are cached."""
    return Path(cache_dir) / f"{Path(png_path).stem}.npy"


def is_fresh(entry: Path, image_path) -> bool:
    """Whether ``entry`` exists and was written after ``image_path`` (a later image has other pixels).

    Equal times count as stale: a filesystem that keeps whole seconds gives an image rewritten in
    the second its entry was written the same time (the entry is then written once more)."""
    try:
        written = entry.stat().st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        return written > Path(image_path).stat().st_mtime_ns
    except FileNotFoundError:  # deleted since 02 listed it: its entry is all that is left of it
        return True


def read(entry: Path, image_path=None) -> np.ndarray | None:
    """An entry memory-mapped read-only (uint8 HWC RGB), or None when there is none yet, or none
    written after ``image_path`` (its image; see ``is_fresh``)."""
    if image_path is not None and not is_fresh(entry, image_path):
        return None
    try:
        pixels = np.load(entry, mmap_mode="r")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, EOFError) as error:  # entries are renamed into place whole: outside damage
        raise ValueError(f"pixel cache entry {entry} is unreadable ({error})") from error
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixel cache entry {entry} holds {pixels.dtype} {pixels.shape}, not uint8 HWC RGB")
    return pixels


def write(entry: Path, pixels_hwc: np.ndarray) -> None:
    """Store ``pixels_hwc`` as ``entry`` atomically (``furlib.atomic``). Racing writers of one entry
    write the same bytes and the last rename wins; a writer that fails or is killed leaves no
    partial entry (a killed one may leave a temporary, which ``atomic.sweep`` removes at the next
    run). Raises OSError (disk full, unwritable folder) for the caller to report."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(entry) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(pixels_hwc, dtype=np.uint8))


def sizes(png_paths, cache_dir) -> tuple[int, int]:
    """(bytes still to cache, bytes already cached) for ``png_paths``, in bytes on disk.

    An image not cached yet (or cached before its image changed: ``is_fresh``) counts width *
    height * 3 plus the header, read from its PNG header only (about 40 us a file, no pixels
    decoded); a cached one counts its entry's file size.
    """
    todo = done = 0
    for path in png_paths:
        entry = entry_path(cache_dir, path)
        if is_fresh(entry, path):
            done += entry.stat().st_size
            continue
        with prepared.open_stored(path) as header:
            todo += header.width * header.height * 3 + NPY_HEADER_BYTES
    return todo, done


def free_bytes(cache_dir) -> int:
    """Free space of the filesystem that holds (or will hold) ``cache_dir``."""
    path = Path(cache_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free
