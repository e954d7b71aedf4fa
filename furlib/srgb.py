"""Decoded pixels to 8-bit sRGB: PIL modes and bit depths (``to_8bit``) and embedded ICC profiles
(``to_srgb``, ``is_identity``: whether a profile changes no colour, so the source's bytes may be
stored as they are). Used by ``furlib.images``' decoding."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

from furlib.rejection import ImageRejected

# Colour space of an ICC profile (header field, 4 chars) -> the PIL mode its pixels must be in.
_PROFILE_MODE = {"RGB ": "RGB", "CMYK": "CMYK", "GRAY": "L"}


def to_8bit(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Split into (colour image in L, RGB, CMYK or LAB, 8-bit; alpha 'L' or None). A colour key
    (a PNG's ``tRNS`` on a grey or RGB image: pixels of one value are transparent) becomes alpha."""
    mode, key = im.mode, im.info.get("transparency")
    if key is not None and mode in ("L", "RGB"):
        mode = "LA" if mode == "L" else "RGBA"
        im = im.convert(mode)
    elif key is not None and mode.startswith("I") and isinstance(key, int):  # 16-bit grey: keep its depth
        grey = np.asarray(im)
        alpha = np.where(grey == key, 0, 255).astype(np.uint8)
        return Image.fromarray(_grey_to_uint8(grey, mode)), Image.fromarray(alpha)
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        im, mode = im.convert("RGBA" if has_alpha else "RGB"), ("RGBA" if has_alpha else "RGB")
    if mode in ("RGBA", "RGBa", "LA", "La"):
        if mode.endswith("a"):  # premultiplied alpha
            im, mode = im.convert(mode[:-1] + "A"), mode[:-1] + "A"
        alpha = im.getchannel("A")
        return im.convert("RGB" if mode == "RGBA" else "L"), alpha
    if mode in ("RGB", "L", "CMYK", "LAB"):
        return im, None
    if mode == "1":
        return im.convert("L"), None
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(im), mode)), None
    if mode in ("RGBX", "YCbCr", "HSV"):
        return im.convert("RGB"), None
    raise ImageRejected("unsupported_mode", mode)


def _grey_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grey levels -> uint8.

    I;16* is 0-65535. 'I' (32-bit) is what PIL gives for 16-bit PNG/TIFF in some versions, so it is
    read as 16-bit when any value exceeds 255, else as 8-bit. 'F' is read as [0, 1] when its
    maximum is <= 1, else as [0, 255]; NaN becomes 0.
    """
    a = a.astype(np.float64)
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
    elif mode.startswith("I;16") or a.max(initial=0) > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def to_srgb(colour: Image.Image, icc: bytes) -> Image.Image:
    """Convert pixels described by an embedded ICC profile to sRGB (perceptual intent).

    A profile whose colour space does not match the pixels (e.g. an RGB profile on a grey JPEG)
    does not describe them and is not applied; an unparsable or unusable profile is a rejection.
    """
    try:
        space = _profile(bytes(icc)).profile.xcolor_space
    except (OSError, ImageCms.PyCMSError, TypeError) as e:
        raise ImageRejected("bad_icc_profile", str(e)) from None
    if _PROFILE_MODE.get(space) != colour.mode:
        return colour
    try:
        return ImageCms.applyTransform(colour, _transform(bytes(icc), colour.mode))
    except (OSError, ImageCms.PyCMSError, ValueError) as e:
        raise ImageRejected("bad_icc_profile", str(e)) from None


@lru_cache(maxsize=4096)
def is_identity(icc: bytes) -> bool:
    """Whether converting from this profile to sRGB changes no 8-bit RGB colour at all: tried on
    4096 colours first (most other profiles fail there in ms), then on all 2**24 (~3 s, once per
    profile and process): exact where a profile's name could lie."""
    try:
        if _profile(icc).profile.xcolor_space != "RGB ":
            return False
        for step in (17, 1):  # 0, 17, ..., 255 in each channel; then every value
            levels = np.arange(0, 256, step, dtype=np.uint8)
            rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 4096, 3)
            out = ImageCms.applyTransform(Image.fromarray(rgb), _transform(icc, "RGB"))
            if not np.array_equal(np.asarray(out), rgb):
                return False
        return True
    except (OSError, ImageCms.PyCMSError, TypeError, ValueError):
        return False  # _to_srgb rejects it with the reason


@lru_cache(maxsize=32)
def _profile(icc: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(icc))


@lru_cache(maxsize=32)
def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """Cached: most images of a data set share a handful of profiles."""
    srgb = ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(_profile(icc), srgb, mode, "RGB",
                                   renderingIntent=ImageCms.Intent.PERCEPTUAL)
