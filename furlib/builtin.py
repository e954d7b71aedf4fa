"""The built-in offline sample set: real photographs bundled with installed packages, plus
deterministic flat-colour "artwork" drawn with PIL.

Nothing is downloaded: the photos are read straight from the package folders (scikit-image's
bundled ``data/`` files, matplotlib's ``mpl-data/sample_data``, scikit-learn's sample images), never
through ``skimage.data`` fetchers, which may call pooch. The artwork imitates the target domain
(flat fills, dark outlines, gradients, strokes) so that a CPU smoke run trains on something like it.

``builtin_sources`` lists ``(input_id, src)``: ``src`` is a ``Path`` for a photo (a path that does not
exist when a package or file is absent, so the loader records it as ``missing``) or a function
that draws the RGB PIL image. Photos smaller than the training crop are the caller's to reject.
"""

import importlib.util
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (id, package, folder inside the package, file name). All are photographs of real scenes.
PHOTOS = (
    ("astronaut", "skimage", "data", "astronaut.png"),
    ("camera", "skimage", "data", "camera.png"),
    ("chelsea", "skimage", "data", "chelsea.png"),
    ("coffee", "skimage", "data", "coffee.png"),
    ("hubble_deep_field", "skimage", "data", "hubble_deep_field.jpg"),
    ("motorcycle", "skimage", "data", "motorcycle_left.png"),
    ("retina", "skimage", "data", "retina.jpg"),
    ("rocket", "skimage", "data", "rocket.jpg"),
    ("grace_hopper", "matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
    ("china", "sklearn", "datasets/images", "china.jpg"),
    ("flower", "sklearn", "datasets/images", "flower.jpg"),
)
# The shipped pretrained base (``base_model: tiny``, scripts/pretrain_base.py) never sees these:
# measured on them, and on every drawing of the demo's seed. ``camera`` is the demo's val photo.
HELD_OUT_PHOTOS = ("astronaut", "camera", "coffee", "rocket")
PRETRAIN_ART_SEED = 1  # the base's drawings; the demo and tests draw with seed 0
ART_VERSION = 1  # bump when the drawing code changes, so prepared data is rebuilt
OUTLINE = (24, 18, 32)  # near-black ink
SUPERSAMPLE = 2  # drawn at 2x, then Lanczos-downscaled: anti-aliased edges like real artwork


def photo_path(package: str, folder: str, name: str) -> Path:
    """Where a bundled file lives, found without importing the package (no fetchers run)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<{package} not installed>") / name
    return Path(list(spec.submodule_search_locations)[0]) / folder / name


def builtin_sources(art_count: int = 24, seed: int = 0) -> list[tuple[str, object]]:
    """``[(input_id, src)]``: a ``Path`` per photo, then a zero-argument function per drawing
    (call it for the PIL image), so a caller that skips an input does not pay for drawing it."""
    photos = [(f"builtin/photo/{name}", photo_path(package, folder, filename))
              for name, package, folder, filename in PHOTOS]
    art = [(f"builtin/art/{index:03d}", partial(draw_art, index, seed)) for index in range(art_count)]
    return photos + art


def pretrain_photos() -> list[tuple[str, Path]]:
    """``[(name, path)]`` of the photographs the pretrained base trains on (all but the held-out)."""
    return [(name, photo_path(package, folder, filename)) for name, package, folder, filename in PHOTOS
            if name not in HELD_OUT_PHOTOS]



def draw_art(index: int, seed: int = 0) -> Image.Image:
    """One deterministic drawing: sides 512-1536 px, varied aspect, RGB."""
    rng = np.random.default_rng([seed, index, ART_VERSION])
    width, height = _art_size(rng)
    palette = _palette(rng)
    canvas = _gradient(rng, (width * SUPERSAMPLE, height * SUPERSAMPLE), palette)
    draw = ImageDraw.Draw(canvas)
    ink = int(rng.integers(3, 7)) * SUPERSAMPLE  # outline width in drawn pixels
    for _ in range(int(rng.integers(6, 14))):
        shape = rng.choice(["ellipse", "box", "blob", "stroke", "pie"], p=[.25, .2, .25, .15, .15])
        _SHAPES[shape](draw, rng, canvas.size, palette, ink)
    _sparkles(draw, rng, canvas.size, palette)
    return canvas.resize((width, height), Image.Resampling.LANCZOS)


def _art_size(rng) -> tuple[int, int]:
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 5 / 4]))
    long_side = int(rng.integers(768, 1537))
    short_side = int(np.clip(round(long_side / aspect), 512, 1536))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _palette(rng) -> list[tuple[int, int, int]]:
    """5-7 saturated flat colours from random hues (HSV, 0-255 per channel)."""
    count = int(rng.integers(5, 8))
    hsv = np.stack([rng.integers(0, 256, count), rng.integers(120, 256, count),
                    rng.integers(140, 256, count)], axis=1).astype(np.uint8)
    rgb = Image.fromarray(hsv[None], "HSV").convert("RGB")
    return [tuple(int(c) for c in px) for px in np.asarray(rgb)[0]]


def _gradient(rng, size, palette) -> Image.Image:
    """A linear two-colour background gradient at a random angle (drawn small, then enlarged:
    a linear ramp survives bilinear enlargement exactly)."""
    small = (max(size[0] // 16, 2), max(size[1] // 16, 2))
    start, end = (np.array(palette[i], np.float32) for i in rng.choice(len(palette), 2, replace=False))
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:small[1], 0:small[0]].astype(np.float32)
    t = xx / small[0] * np.cos(angle) + yy / small[1] * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    pixels = np.clip((start + (end - start) * t[..., None]) * 0.9 + 20, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB").resize(size, Image.Resampling.BILINEAR)


def _box(rng, size, min_frac=0.1, max_frac=0.5) -> list[int]:
    width, height = size
    w = int(width * rng.uniform(min_frac, max_frac))
    h = int(height * rng.uniform(min_frac, max_frac))
    x, y = int(rng.integers(-w // 4, width - w // 2)), int(rng.integers(-h // 4, height - h // 2))
    return [x, y, x + w, y + h]


def _pick(rng, palette) -> tuple[int, int, int]:
    return palette[int(rng.integers(len(palette)))]


def _shade(colour, factor: float = 0.65) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in colour)


def _ellipse(draw, rng, size, palette, ink):
    box, fill = _box(rng, size), _pick(rng, palette)
    draw.ellipse(box, fill=fill)
    shadow = [box[0] + (box[2] - box[0]) // 3, box[1] + (box[3] - box[1]) // 3, box[2], box[3]]
    draw.chord(shadow, 300, 120, fill=_shade(fill))  # a cel-shaded crescent
    draw.ellipse(box, outline=OUTLINE, width=ink)


def _rounded_box(draw, rng, size, palette, ink):
    box = _box(rng, size)
    radius = int(min(box[2] - box[0], box[3] - box[1]) * rng.uniform(0.05, 0.3))
    draw.rounded_rectangle(box, radius, fill=_pick(rng, palette), outline=OUTLINE, width=ink)


def _blob(draw, rng, size, palette, ink):
    """A star or blob polygon: points around a centre at random radii."""
    x0, y0, x1, y1 = _box(rng, size, 0.15, 0.45)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    count = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = r * rng.uniform(0.45, 1.0, count)
    points = [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]
    draw.polygon(points, fill=_pick(rng, palette), outline=OUTLINE, width=ink)


def _stroke(draw, rng, size, palette, ink):
    """A thick brush-like polyline, inked, with a coloured core."""
    width, height = size
    points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height)))
              for _ in range(int(rng.integers(3, 7)))]
    core = int(rng.integers(4, 16)) * SUPERSAMPLE
    draw.line(points, fill=OUTLINE, width=core + 2 * ink, joint="curve")
    draw.line(points, fill=_pick(rng, palette), width=core, joint="curve")


def _pie(draw, rng, size, palette, ink):
    start = float(rng.uniform(0, 360))
    draw.pieslice(_box(rng, size), start, start + float(rng.uniform(60, 300)),
                  fill=_pick(rng, palette), outline=OUTLINE, width=ink)


def _sparkles(draw, rng, size, palette):
    """Small highlight dots, the detail that makes decoders' fine texture matter."""
    width, height = size
    for _ in range(int(rng.integers(10, 40))):
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        r = float(rng.uniform(2, 8)) * SUPERSAMPLE
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 250), outline=_pick(rng, palette))


_SHAPES = {"ellipse": _ellipse, "box": _rounded_box, "blob": _blob, "stroke": _stroke, "pie": _pie}
