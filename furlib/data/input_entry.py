"""One input of stage 01 (``furlib.data.prepare``) as its journal entry: decoded, hashed, capped
and stored (``process_input``), or rejected with the limit of its day (``_rejection``); and whether an
entry journalled by an earlier run still stands (``reusable``).

Stored images (``furlib.data.store`` has the folder layout and its locking): ``<split>/<hash16>``
+ ``.jpg``/``.png``/``.webp``. A source file that already decodes to 8-bit sRGB RGB with nothing to
convert and fits ``max_side`` is stored as its own bytes (``furlib.images.load_for_storage``);
anything else is converted once, as lossless WebP (``store.converted_suffix``), long side capped
at ``max_side`` (Lanczos).
Either way the stored file decodes to exactly the pixels training uses.

``hash`` is the sha256 of the decoded pixels (mode, size and bytes, before the long-side cap;
``pixel_hash``): equal hashes are exact duplicates, kept once.
"""

import hashlib
from pathlib import Path

from PIL import Image

from furlib.data import store
from furlib.data.prep_report import is_val
from furlib.images import ImageRejected, cap_long_side, decode_input
from furlib.inputs import Input
from furlib.sources import file_stamp

# A decoding fix that touches few inputs re-decodes only those, instead of a whole rebuild:
# 2 (2026-12-06): a PNG's colour key (tRNS on RGB or grey) is transparency; converted PNGs of
# older entries are decoded again (one whose pixels did not change keeps its stored file)
DECODER_VERSION = 2
PNG_COLOUR_KEY_FIX = 2  # the version above: entries decoded before it may hold a wrong converted PNG


def pixel_hash(image: Image.Image) -> str:
    """sha256 hex of mode, size and raw pixel bytes: equal iff the decoded images are identical."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def process_input(item: Input, job: dict, data_dir: Path, files: dict) -> dict:
    """Decode, hash, cap and store one input; return its journal entry."""
    settings, filters = job["settings"], job["filters"]
    if item.reason:
        return {"status": "rejected", "reason": item.reason, "detail": item.detail}
    try:
        src = item.src() if callable(item.src) else item.src  # a built-in drawing is drawn now
        decoded, suffix = decode_input(src, settings["background"], filters["max_pixels"],
                                       min_side=filters["resolution"])
        digest, source_size = pixel_hash(decoded), decoded.size
        image = cap_long_side(decoded, settings["max_side"], filters["resolution"])
        suffix = suffix if image is decoded else ""  # capped: converted, not the source's bytes
    except ImageRejected as e:
        return _rejection(e, filters)
    except Exception as e:  # noqa: BLE001 - one odd input must not end a long run; it is reported
        return {"status": "rejected", "reason": "error", "detail": f"{type(e).__name__}: {e}"}
    name = store.stored_name(files, digest[:16], suffix or store.converted_suffix(image))
    if name not in files:
        split = "val" if is_val(digest, job["val_fraction"]) else "train"
        if suffix:
            try:
                store.save_original(src, data_dir / split / name)
            except FileNotFoundError:  # deleted between the decode and the copy
                return {"status": "rejected", "reason": "missing", "detail": "deleted while 01 read it"}
            if _changed(src, item.stamp):  # the bytes copied may not be the pixels hashed
                (data_dir / split / name).unlink(missing_ok=True)
                return {"status": "rejected", "reason": "error", "detail": "changed while 01 read it (read again next run)"}
        else:
            store.save_converted(image, data_dir / split / name)
        files[name] = split
    return {"status": "ok", "decoder": DECODER_VERSION, "hash": digest, "file": name, "width": image.width,
            "height": image.height, "source_width": source_size[0], "source_height": source_size[1],
            "stored": "original" if suffix and name.endswith(suffix) else "converted"}


def _changed(src, stamp) -> bool:
    """A source file whose size or mtime is no longer its listing's (``folder_input``'s stamp)."""
    return isinstance(src, Path) and isinstance(stamp, list) and file_stamp(src) != stamp


def _rejection(e: ImageRejected, filters: dict) -> dict:
    """A journal entry; a filter's rejection records the limit of its day (see ``reusable``)."""
    entry = {"status": "rejected", "reason": e.reason, "detail": e.detail}
    if e.reason in ("too_small", "too_small_after_cap"):
        entry["min_side"] = filters["resolution"]
    elif e.reason == "too_many_pixels":
        entry["max_pixels"] = filters["max_pixels"]
    return entry


def reusable(old: dict, filters: dict, files: dict, input_id: str = "") -> bool:
    """A journal entry still stands: no unexpected error, its file is there, no decoding fix since
    applies to it (``DECODER_VERSION``), and a filter that rejected it then would still reject it
    now (a lower resolution may accept it)."""
    if old["status"] == "ok":
        refixed = (old.get("decoder", 1) < PNG_COLOUR_KEY_FIX and old.get("stored") == "converted"
                   and input_id.lower().endswith(".png"))
        return old["file"] in files and not refixed
    if old.get("reason") in ("error", "unreadable", "missing"):
        return False  # unexpected errors, and files that may have become readable since: retry
    if "min_side" in old:  # too_small at the resolution of its day
        return filters["resolution"] >= old["min_side"]
    if "max_pixels" in old:
        return filters["max_pixels"] <= old["max_pixels"]
    return True
