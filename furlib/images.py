"""Images in, and the project's image conventions: decoding, the one centre crop, range conversions.

Decoding: defensive decoding of one image into the project's on-disk form, an 8-bit sRGB ``RGB``
PIL image.

``load_rgb`` accepts a path, the encoded bytes, or an already opened PIL image, and either returns
a fresh ``RGB`` image (EXIF orientation applied, embedded ICC profile converted to sRGB, alpha
composited over ``background``, first frame of an animation) or raises ``ImageRejected`` whose
``reason`` is a short code that a data report can count:

    missing, unreadable, empty, not_an_image, too_many_pixels, too_small, truncated, corrupt,
    bad_icc_profile, unsupported_mode

``load_for_storage`` decodes the same way and also says whether the source's own bytes may be
stored as they are: a JPEG, PNG or WebP that already decodes to 8-bit sRGB RGB with nothing to
undo (``STORED_SUFFIXES``: no alpha or transparency key, no palette, not 16-bit, no EXIF rotation, a
single frame, no ICC profile or one whose conversion to sRGB changes no colour, such as LCMS's own
sRGB). Decoding that file later with PIL gives exactly the pixels ``load_rgb`` returned.

Sizes are checked from the header before any pixel is decoded, so a decompression bomb costs a
few hundred bytes of reading. PIL's own global limit (``Image.MAX_IMAGE_PIXELS``) still applies:
the effective limit is the smaller of it and ``max_pixels`` (01 refuses a larger ``max_pixels``:
every later reader of a stored image meets Pillow's limit too); its warning and error are turned
into ``too_many_pixels`` rejections instead of passing through.

Conventions (the only place they are converted): ``uint8`` HWC RGB arrays <-> ``rgb_m11`` float
CHW/NCHW tensors in [-1, 1] (``to_rgb_m11``, ``to_uint8``), and ``rgb_01`` in [0, 1] for metrics and
plots (``to_rgb_01``). ``center_crop`` is the one fixed crop: 02's preview strip, 03's evaluation
and 04's previews all see the same pixels.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from furlib import srgb
from furlib.rejection import ImageRejected  # callers import it from here too

if TYPE_CHECKING:  # imported where used: stage 01's worker processes need no torch
    import torch

# What Pillow's decoders raise, besides OSError, on a malformed file (a PGM's zero maxval, a PNG's
# unknown interlace method or oversized text chunk, a short TIFF table): each is a ``corrupt`` input
DECODER_FAULTS = (SyntaxError, ValueError, TypeError, EOFError, IndexError, struct.error, MemoryError)
DEFAULT_MAX_PIXELS = 89_000_000  # just under PIL's default bomb limit (89,478,485)
STORED_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # formats stored as they are

# EXIF tag 0x0112 (Orientation) -> the transpose that displays the image upright.
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}

POOL_BLOCK = 1 << 20  # bytes: Pillow's pixel memory block while reusing it (its default: 16 MB)
POOL_PER_THREAD = 64  # freed blocks Pillow keeps for reuse per decoding thread (64 MB)


@contextlib.contextmanager
def reusing_pixel_memory(threads: int):
    """Within: Pillow keeps up to ``POOL_PER_THREAD x threads`` freed 1 MB blocks of pixel memory
    for the next image (its block allocator's pool: ``PILLOW_BLOCKS_MAX``, ``PILLOW_BLOCK_SIZE``;
    off by default) instead of handing them back and faulting fresh pages in for every decode,
    copy and hash. Small blocks fit images of any size, where a 16 MB one is resized on reuse.
    Stage 01: about a third less CPU per plain JPEG (46.0 -> 30.4 ms, ``benchmarks/RESULTS.md``). The pool never holds
    more than the threads' images used at once, and is emptied on the way out."""
    before = Image.core.get_block_size(), Image.core.get_blocks_max()
    Image.core.set_block_size(POOL_BLOCK)
    Image.core.set_blocks_max(max(before[1], POOL_PER_THREAD * threads))
    try:
        yield
    finally:
        Image.core.set_blocks_max(before[1])  # frees the blocks kept beyond it
        Image.core.set_block_size(before[0])


def load_rgb(src, background=(255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS,
             min_side: int = 1) -> Image.Image:
    """Decode ``src`` (path, bytes or PIL image) into a new 8-bit sRGB RGB image.

    ``background`` is the RGB colour (0-255) transparent pixels are composited over.
    ``min_side``: a shorter side than this is rejected as ``too_small`` before decoding pixels.
    """
    return load_for_storage(src, background, max_pixels, min_side)[0]


def load_for_storage(src, background=(255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS,
                     min_side: int = 1) -> tuple[Image.Image, str]:
    """``(load_rgb(src, ...), suffix)``: ``suffix`` (".jpg", ".png", ".webp") when ``src``'s own
    bytes decode to exactly that image and may be stored as they are, else "" (convert them)."""
    background = tuple(int(c) for c in background)
    if isinstance(src, Image.Image):  # no encoded bytes to keep
        return _decode(src, background, max_pixels, min_side), ""
    with _open(src) as im:
        suffix = _stored_suffix(im)  # header facts only; read before decoding changes them
        return _decode(im, background, max_pixels, min_side), suffix


def decode_input(src, background=(255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = 1) -> tuple[Image.Image, str]:
    """One input of a data set as 01 decodes it, and as training from a stream does: ``src`` is
    image bytes, a path or a PIL image, anything else is rejected (``empty``, ``not_an_image``);
    returns ``load_for_storage``'s ``(image, suffix)``. Then ``cap_long_side``."""
    if src is None or isinstance(src, (bytes, bytearray)) and not src:
        raise ImageRejected("empty", "no image in this row")
    if not isinstance(src, (bytes, bytearray, str, Path, Image.Image)):
        raise ImageRejected("not_an_image", f"a {type(src).__name__}, not image bytes or a path")
    return load_for_storage(src, background, max_pixels, min_side)


def cap_long_side(image: Image.Image, max_side: int, min_side: int) -> Image.Image:
    """``image`` with its long side at most ``max_side`` px (Lanczos; the same object when it fits);
    rejected (``too_small_after_cap``) when the cap takes its short side below ``min_side``."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    capped = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                          Image.Resampling.LANCZOS)
    if min(capped.size) < min_side:
        raise ImageRejected("too_small_after_cap", f"{image.size} -> {capped.size}")
    return capped


def _stored_suffix(im: Image.Image) -> str:
    """The file suffix if ``im`` (opened, not decoded) needs no conversion at all, else ""."""
    suffix = STORED_SUFFIXES.get(im.format or "", "")
    if not suffix or im.mode != "RGB" or getattr(im, "n_frames", 1) != 1:
        return ""
    if im.format == "PNG" and any(tile[3] != "RGB" for tile in im.tile):  # e.g. "RGB;16B": 16-bit
        return ""  # (before getexif, which decodes a PNG and so empties its tile list)
    if "transparency" in im.info or _orientation(im) not in (0, 1):
        return ""
    icc = im.info.get("icc_profile") or None
    return suffix if icc is None or srgb.is_identity(bytes(icc)) else ""


def _open(src) -> Image.Image:
    """Open lazily (header only); every failure becomes an ImageRejected."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageRejected("empty", "zero bytes")
        fp = io.BytesIO(bytes(src))
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageRejected("missing", str(path))
        if path.stat().st_size == 0:
            raise ImageRejected("empty", "zero-byte file")
        fp = path
    else:
        raise TypeError(f"load_rgb takes a path, bytes or a PIL image, not {type(src).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_many_pixels", str(e)) from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not_an_image", "no image format recognised") from None
    except OSError as e:  # includes a header cut short ("Truncated File Read")
        raise ImageRejected("truncated" if "truncated" in str(e).lower() else "unreadable",
                            str(e)) from None
    except DECODER_FAULTS as e:
        raise ImageRejected("corrupt", f"{type(e).__name__}: {e}") from None


def _decode(im: Image.Image, background, max_pixels: int, min_side: int) -> Image.Image:
    width, height = im.size
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels}")
    if min(width, height) < 1:
        raise ImageRejected("empty", f"{width}x{height}")
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}, short side < {min_side}")
    if im.mode == "RGB" and "transparency" in im.info and any(t[3] == "RGB;16B" for t in getattr(im, "tile", [])):
        raise ImageRejected("unsupported_mode", "a 16-bit RGB PNG with a colour key: Pillow decodes it to 8 bits, "
                                                "where the 16-bit key can no longer be matched")
    _load_first_frame(im)
    orientation = _orientation(im)
    icc = im.info.get("icc_profile") or None
    colour, alpha = srgb.to_8bit(im)
    if icc:
        colour = srgb.to_srgb(colour, icc)
    if colour.mode != "RGB":
        colour = colour.convert("RGB")
    if alpha is not None:
        out = Image.new("RGB", colour.size, background)
        out.paste(colour, (0, 0), alpha)
    else:
        out = colour.copy()  # a fresh image: no file handle, no stale metadata
    out.info = {}
    if orientation in _ORIENTATION:
        out = out.transpose(_ORIENTATION[orientation])
    return out


def _load_first_frame(im: Image.Image) -> None:
    """Decode frame 0 (an animation's first frame); classify decoder failures."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if getattr(im, "tell", lambda: 0)() != 0:
                im.seek(0)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_many_pixels", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageRejected(reason, str(e)) from None
    except DECODER_FAULTS as e:
        raise ImageRejected("corrupt", f"{type(e).__name__}: {e}") from None


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8; a malformed EXIF block counts as 'no rotation' (it is metadata only)."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - any EXIF parser failure; the pixels are still fine
        return 1


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """The centre square of the short side, Lanczos-resized to ``resolution`` (sd-vae-ft-mse's
    protocol: short side to R, centre crop); uint8 HWC RGB. Only the square is resampled."""
    short = min(image.size)
    left, top = (image.width - short) // 2, (image.height - short) // 2
    box = (left, top, left + short, top + short)
    if short == resolution:
        return np.asarray(image.crop(box))
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box))


def preprocess(src, resolution: int) -> torch.Tensor:
    """Any image ``load_rgb`` reads -> (3, R, R) ``rgb_m11`` through ``center_crop`` (03's protocol,
    what 02's previews and 04's pictures show)."""
    return to_rgb_m11(center_crop(load_rgb(src), resolution))


def to_rgb_m11(pixels_hwc: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or NHWC) RGB -> float32 CHW (or NCHW) ``rgb_m11`` in [-1, 1].

    Done in numpy: torch's intra-op thread pool makes this tiny op ~100x slower on a busy CPU.
    """
    import torch

    chw = np.moveaxis(pixels_hwc, -1, -3).astype(np.float32)  # a fresh, writable copy
    chw *= 1.0 / 127.5
    chw -= 1.0
    return torch.from_numpy(np.ascontiguousarray(chw))


def to_rgb_01(rgb_m11: torch.Tensor) -> torch.Tensor:
    """``rgb_m11`` -> float32 in [0, 1], clamped (a decoder's output can overshoot)."""
    return ((rgb_m11.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def to_uint8(rgb_m11) -> np.ndarray:
    """``rgb_m11`` CHW / NCHW (tensor or array) -> uint8 HWC / NHWC for saving and display."""
    import torch

    x = torch.as_tensor(rgb_m11).detach().cpu()
    return (to_rgb_01(x) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()
