"""01's prepared image folders as every later stage reads them: the listing, opening a file, and
the fixed centre crops that 02's preview strip, 03 and 04 show.

``data/train`` and ``data/val`` hold the source's own JPEG/PNG/WebP files where they needed no
conversion, else lossless WebP (PNG for a side over 16,383 px; ``furlib.data.prepare`` writes
them); hidden files are temporaries of an interrupted write and never listed. Crops are
``rgb_m11`` NCHW float32.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from furlib.images import center_crop, to_rgb_m11

STORED_GLOBS = ("[!.]*.jpg", "[!.]*.png", "[!.]*.webp")  # what 01 stores; hidden: temporaries


def list_images(split_dir) -> list[Path]:
    """The prepared images of one split folder (``data/train`` or ``data/val``): stored originals
    (JPEG, PNG, WebP) and converted images, sorted by name."""
    return sorted(p for pattern in STORED_GLOBS for p in Path(split_dir).glob(pattern))


def open_stored(path) -> Image.Image:
    """``Image.open`` of a prepared image (header only, not decoded); Pillow's decompression-bomb
    error, which names no file, becomes a ValueError naming it."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise ValueError(f"training image {path}: {err}. 01_data_prep never stores an image so large (its "
                         "max_pixels): it was copied there by hand; delete it, or put it in 01's source and "
                         "run 01_data_prep again") from err


def open_rgb(path) -> Image.Image:
    """A prepared image, fully read into memory (the file is closed on return); a PIL image passes."""
    if isinstance(path, Image.Image):
        return path if path.mode == "RGB" else path.convert("RGB")
    with Image.open(path) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def center_crops(paths, resolution: int) -> torch.Tensor:
    """Fixed crops for val strips and evaluation: ``rgb_m11`` NCHW float32, one per path (or RGB
    PIL image)."""
    crops = [center_crop(open_rgb(p), resolution) for p in paths]
    if not crops:
        return torch.empty(0, 3, resolution, resolution)
    return to_rgb_m11(np.stack(crops))
