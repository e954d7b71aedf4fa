"""The training input, which 01 previews and 02 trains on: random square crops of the prepared
images (stored JPEG, PNG or WebP originals and converted lossless WebPs), as ``rgb_m11`` NCHW batches.

One sample (the author's crops): a crop area of ``U[min_crop_scale, 1]`` times the image area,
taken as a square never below ``resolution`` (so nothing is upsampled); a square that does not fit
the image is drawn again (``crop_side``); at a uniform position; resized to ``resolution`` with
Lanczos (antialiased); then rot90 by 0/90/180/270 and independent horizontal and vertical flips.
Output float32 in [-1, 1], RGB.

Reproducibility: sample ``g`` (``g = step * batch_size + i``) draws all its randomness from
``(seed, g)`` alone, and the image it crops is ``permutation(seed, epoch)[g % n]`` with
``epoch = g // n``. Batches are therefore the same for any ``num_workers``, and a loader started at
``start_step=k`` yields exactly batches k, k+1, ... of an uninterrupted run.

Decoded-pixel cache ("decode once, crop many", ``furlib.pixelcache``): with a ``cache_dir``, each
PNG is decoded whole on first use and stored uncompressed; later samples memory-map it and copy
only the pixels their crop reads (``crop_region``). Crops are bit-identical to the PNG path (tested).

A file 01 never stores (put in data/train by hand: smaller than ``resolution``, alpha, 16-bit,
CMYK, over Pillow's bomb limit) is named in a ValueError with the fix, never cropped (``check_stored``).
"""

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from furlib import pixelcache
from furlib.images import to_rgb_m11
from furlib.prepared import list_images, open_rgb, open_stored

_CROP_STREAM, _ORDER_STREAM = 1, 2  # keep the two random streams of one seed apart
# PIL's reducing_gap: crops >= 4x the output are first box-averaged by an integer factor (leaving
# >= 2x for Lanczos). Measured on 1-2 MP PNGs: 2.4x faster on those crops, 52 dB PSNR from plain
# Lanczos (8-bit rounding alone is ~59 dB); smaller crops get plain Lanczos. 3.0 would act only
# at a 6x downscale, which 1536 px sources and 256 px crops barely reach.
REDUCING_GAP = 2.0
PIXEL_CACHE_CHOICES = ("auto", "yes", "no")  # 02's pixel_cache
CROP_ATTEMPTS = 10  # draws of a crop size before the fallback (torchvision's RandomResizedCrop: 10)
# Modes whose convert("RGB") keeps the colours (01 stores only RGB; grey or palette files put in
# data/train by hand still crop right). Others (alpha, 16-bit, CMYK) would crop wrong: refused.
EXACT_RGB_MODES = ("RGB", "L", "P", "1")


def sample_rng(seed: int, g: int) -> np.random.Generator:
    """The random stream of global sample ``g``: a function of (seed, g) only."""
    return np.random.default_rng([seed, _CROP_STREAM, g])


def crop_side(width: int, height: int, resolution: int, rng: np.random.Generator,
              min_crop_scale: float = 0.08) -> int:
    """A square crop's side, px: area ``U[min_crop_scale, 1]`` x the image's, at least ``resolution``.

    A side longer than the short side is drawn again, up to ``CROP_ATTEMPTS`` draws (as the author's
    code and torchvision's RandomResizedCrop do); clipping it instead would put a third to a half of
    the crops of a 2:1 image at the largest downscale. After that many misses the crop is the short
    side, the same fallback as torchvision's; a draw fits with p = (short/long - min_crop_scale) /
    (1 - min_crop_scale), so the fallback takes (1 - p)^10 of the crops: 0.2% at 2:1, 4% at 3:1.
    """
    short = min(width, height)
    for _ in range(CROP_ATTEMPTS):
        side = max(round(np.sqrt(rng.uniform(min_crop_scale, 1.0) * width * height)), resolution)
        if side <= short:
            return int(side)
    return short


def crop_params(width: int, height: int, resolution: int, rng: np.random.Generator,
                min_crop_scale: float = 0.08) -> tuple[tuple[int, int, int, int], int, bool, bool]:
    """(crop box (left, top, right, bottom) in px, quarter turns 0-3, hflip, vflip); all drawn from
    ``rng`` alone (one sample's stream), so a sample's crop is a function of (seed, index)."""
    if min(width, height) < resolution:
        raise ValueError(f"image {width}x{height} is smaller than resolution={resolution}")
    side = crop_side(width, height, resolution, rng, min_crop_scale)
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    turns = int(rng.integers(0, 4))
    hflip, vflip = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    return (left, top, left + side, top + side), turns, hflip, vflip


def random_crop(image: Image.Image, resolution: int, rng: np.random.Generator,
                min_crop_scale: float = 0.08) -> np.ndarray:
    """One augmented crop of an RGB image as uint8 HWC (RGB order)."""
    params = crop_params(image.width, image.height, resolution, rng, min_crop_scale)
    return apply_crop(image, resolution, *params)


def apply_crop(image: Image.Image, resolution: int, box, turns: int, hflip: bool,
               vflip: bool) -> np.ndarray:
    """Crop ``box``, resize to ``resolution`` (Lanczos), rotate and flip; uint8 HWC RGB."""
    if box[2] - box[0] == resolution:  # already the output size: the source pixels, untouched
        crop = image.crop(box)
    else:  # resize only the box: no full-image copy, and the filter sees pixels around the box
        crop = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box,
                            reducing_gap=REDUCING_GAP)
    pixels = np.rot90(np.asarray(crop), k=turns, axes=(0, 1))  # axes (H, W): channels untouched
    if hflip:
        pixels = pixels[:, ::-1]
    if vflip:
        pixels = pixels[::-1]
    return pixels


def crop_region(box, width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """The source pixels ``apply_crop`` reads for ``box``: (left, top, right, bottom), px.

    A plain crop reads the box. A resize (scale = side / resolution source px per output px) reads
    around it: Lanczos taps reach 3 output px = 3 * scale source px past each output pixel's
    centre, i.e. at most 2.5 * scale + 0.5 px past the box, rounded to whole pixels; PIL's
    reducing_gap step first box-reduces the box widened by 2.5 * scale (``Image._get_safe_box``)
    and the Lanczos after it reads only that reduced image. A margin of ceil(3 * scale) + 2 px
    covers both with room for float rounding; everything is clipped to the image.
    """
    side = box[2] - box[0]
    if side == resolution:
        return tuple(box)
    margin = math.ceil(3 * side / resolution) + 2
    return (max(0, box[0] - margin), max(0, box[1] - margin),
            min(width, box[2] + margin), min(height, box[3] + margin))


def crop_from_array(pixels_hwc: np.ndarray, resolution: int, box, turns: int, hflip: bool,
                    vflip: bool) -> np.ndarray:
    """``apply_crop`` of a uint8 HWC RGB array (e.g. a memory-mapped cache entry) that copies only
    ``crop_region``: bit-identical to ``apply_crop`` on the whole image.

    The region goes to its own place in an image of the whole size, so PIL runs exactly the same
    resize: same box coordinates and float rounding (a box shifted into a cut-out would round
    differently where the scale is not a power of two), same image size (Pillow 13 picks the
    order of its two Lanczos passes from it), and the same values in every pixel it reads. The
    pixels outside the region are never read; they are left unset, which costs nothing.
    """
    height, width = pixels_hwc.shape[:2]
    left, top, right, bottom = crop_region(box, width, height, resolution)
    canvas = Image.new("RGB", (width, height), None)  # None: no fill, untouched memory stays unused
    canvas.paste(Image.fromarray(np.ascontiguousarray(pixels_hwc[top:bottom, left:right])), (left, top))
    return apply_crop(canvas, resolution, box, turns, hflip, vflip)


def check_stored(header: Image.Image, path, resolution: int) -> None:
    """Raise a ValueError naming ``path`` and the fix unless the opened (not decoded) image is one
    the loader crops right: at least ``resolution`` on its short side and of an ``EXACT_RGB_MODES``
    mode without a transparency key. 01 stores only such files; another was put in data/train by
    hand (or replaced there), skipping 01's conversion and its size filter."""
    width, height = header.size
    if min(width, height) < resolution:
        problem = f"is {width}x{height}, smaller than resolution={resolution} (01 rejects it as too_small)"
    elif header.mode not in EXACT_RGB_MODES or "transparency" in header.info:
        key = " with a transparency key" if "transparency" in header.info else ""
        problem = (f"is a mode-{header.mode} {header.format}{key}, which 01_data_prep never stores (it "
                   "converts alpha, 16-bit and CMYK images to 8-bit RGB); cropped as it is, its pixels are wrong")
    else:
        return
    raise ValueError(f"training image {path} {problem}. It was copied into data/train by hand or replaced "
                     "there: put it in 01's source and run 01_data_prep again, or delete it")


def open_top_rows(path, rows: int) -> Image.Image:
    """Open a PNG and decode only its first ``rows`` rows (rows below stay black).

    PNG rows are compressed in order, so stopping early saves decoding time in proportion (about
    15% for average crops). Only for plain non-interlaced PNGs (what stage 01 writes); any other
    file is decoded whole.
    """
    image = Image.open(path)
    tile = image.tile
    if (image.format == "PNG" and len(tile) == 1 and not image.info.get("interlace")
            and rows < image.height):
        name, extents, offset, args = tile[0]
        extents = (0, 0, image.width, rows)
        image.tile = [tile[0]._replace(extents=extents) if hasattr(tile[0], "_replace")
                      else (name, extents, offset, args)]
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")



class CropDataset(torch.utils.data.Dataset):
    """Index = global sample index ``g`` (any int >= 0) -> one ``rgb_m11`` CHW crop.

    ``cache_dir``: the decoded-pixel cache (see the module docstring), or None to decode PNGs.
    """

    def __init__(self, paths, resolution: int, seed: int = 0, min_crop_scale: float = 0.08,
                 cache_dir=None):
        self.paths, self.resolution, self.seed = list(paths), resolution, seed
        self.min_crop_scale = min_crop_scale
        self._order = (None, None)  # (epoch, permutation): one epoch cached per worker
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._cache_writes = cache_dir is not None  # off in this process after a failed write

    def image_index(self, g: int) -> int:
        epoch, position = divmod(g, len(self.paths))
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
            self._order = (epoch, rng.permutation(len(self.paths)))
        return int(self._order[1][position])

    def __len__(self) -> int:
        return len(self.paths)  # one epoch; the sampler asks for indices beyond it

    def __getitem__(self, g: int) -> torch.Tensor:
        path = self.paths[self.image_index(g)]
        try:
            return self._crop(g, path)
        except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL's and numpy's words name no file
            if str(path) in str(err) or (self.cache_dir and str(self.cache_dir) in str(err)):
                raise  # already names its file (the pixel cache's errors do)
            raise ValueError(f"training image {path} cannot be read ({type(err).__name__}: {err}): it was "
                             "damaged on disk after 01 stored it. Delete it, or run 01_data_prep again "
                             "(it stores it again from the source)") from err

    def _crop(self, g: int, path: Path) -> torch.Tensor:
        rng = sample_rng(self.seed, g)
        pixels = None if self.cache_dir is None else self._cached_pixels(path)
        if pixels is not None:
            params = crop_params(pixels.shape[1], pixels.shape[0], self.resolution, rng,
                                 self.min_crop_scale)
            return to_rgb_m11(crop_from_array(pixels, self.resolution, *params))
        with open_stored(path) as header:  # the size only; no pixels decoded yet
            size = header.size
            check_stored(header, path, self.resolution)
        params = crop_params(*size, self.resolution, rng, self.min_crop_scale)
        rows = crop_region(params[0], *size, self.resolution)[3]
        with open_top_rows(path, rows) as image:
            return to_rgb_m11(apply_crop(image, self.resolution, *params))

    def _cached_pixels(self, path: Path) -> np.ndarray | None:
        """The image's uint8 HWC pixels from the cache, else decoded whole and stored there; None
        once a write has failed in this process (the PNG path then decodes only the rows needed)."""
        entry = pixelcache.entry_path(self.cache_dir, path)
        try:
            pixels = pixelcache.read(entry, path)  # None too when older than the image: 01 rebuilt it
        except ValueError as damage:  # outside damage to a derived file: rebuilt from its PNG, said
            warnings.warn(f"{damage}: rebuilt from its PNG", RuntimeWarning, stacklevel=2)
            entry.unlink(missing_ok=True)
            pixels = None
        if pixels is not None or not self._cache_writes:
            return pixels
        with open_stored(path) as image:
            check_stored(image, path, self.resolution)
            pixels = np.asarray(open_rgb(image))
        try:
            pixelcache.write(entry, pixels)
        except OSError as error:  # e.g. disk full: train on from the PNGs, but say so once
            self._cache_writes = False
            warnings.warn(f"pixel cache: could not write {entry} ({error}); this image and every "
                          f"image not yet cached are decoded from their PNGs in this process from "
                          f"now on (same crops, slower). Free space under {self.cache_dir} or set "
                          "pixel_cache='no'.", RuntimeWarning, stacklevel=2)
        return pixels


def check_cache_setting(setting: str) -> None:
    if setting not in PIXEL_CACHE_CHOICES:
        hint = " (YAML reads a bare yes/no as a boolean: quote it)" if isinstance(setting, bool) else ""
        raise ValueError(f"pixel_cache must be one of {PIXEL_CACHE_CHOICES}, got {setting!r}{hint}")


def cache_plan(split_dir, cache_dir, setting: str) -> tuple[bool, str]:
    """Whether to use the decoded-pixel cache for ``split_dir``, and one line saying why.

    ``setting``: "yes", "no", or "auto": on when what is still to cache (images already in
    ``cache_dir`` count as done) fits in half the free space of ``cache_dir``'s filesystem, leaving
    room for checkpoints and exports.
    """
    check_cache_setting(setting)
    if setting == "no":
        return False, "pixel cache: off (pixel_cache='no')"
    paths = list_images(split_dir)
    todo, done = pixelcache.sizes(paths, cache_dir)
    free = pixelcache.free_bytes(cache_dir)
    if setting == "yes" or todo <= free / 2:
        forced = " (forced)" if setting == "yes" and todo > free / 2 else ""
        return True, (f"pixel cache: on{forced}, {_gb(todo + done)} for {len(paths)} images in "
                      f"{cache_dir} ({_gb(done)} already cached, {_gb(free)} free)")
    return False, (f"pixel cache: off (needs {_gb(todo)} more, {_gb(free)} free; set "
                   "pixel_cache='yes' to force)")


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB"


class StepBatches(torch.utils.data.Sampler):
    """Endless batches of global indices: ``[step * batch_size + i for i in range(batch_size)]``."""

    def __init__(self, batch_size: int, start_step: int = 0):
        self.batch_size, self.start_step = batch_size, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            yield list(range(step * self.batch_size, (step + 1) * self.batch_size))
            step += 1


def make_loader(split_dir, resolution: int, batch_size: int, seed: int = 0, start_step: int = 0,
                num_workers: int = 0, min_crop_scale: float = 0.08, pin_memory: bool = False,
                cache_dir=None):
    """An endless DataLoader of ``(batch_size, 3, resolution, resolution)`` float32 ``rgb_m11``
    batches; each ``iter()`` starts again at batch ``start_step``. ``cache_dir``: see
    ``CropDataset`` (same batches with or without it)."""
    paths = list_images(split_dir)
    if not paths:
        raise ValueError(f"no prepared images in {split_dir}: run notebooks/01_data_prep first")
    dataset = CropDataset(paths, resolution, seed, min_crop_scale, cache_dir)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(batch_size, start_step), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None)
