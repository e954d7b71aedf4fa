"""The built-in offline sample set: real photographs bundled with installed packages, plus
deterministic flat-colour "artwork" drawn with PIL, and the synthetic natural images
(``draw_natural``) that, with most of the photographs, are all the shipped base ever trained on.

Nothing is downloaded: the photos are read straight from the package folders (scikit-image's
bundled ``data/`` files, matplotlib's ``mpl-data/sample_data``, scikit-learn's sample images), never
through ``skimage.data`` fetchers, which may call pooch. The artwork imitates the target domain
(flat fills, dark outlines, gradients, strokes): the domain the demo adapts a photo-trained decoder to.

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
# The shipped pretrained base (``base_model: tiny``, scripts/pretrain_base.py) never sees these
# (nor any drawing): the demo scores them as ``builtin-photos``, the base's own domain.
HELD_OUT_PHOTOS = ("astronaut", "camera", "coffee", "rocket")
ART_VERSION = 1  # bump when the drawing code changes, so prepared data is rebuilt
OUTLINE = (24, 18, 32)  # near-black ink
SUPERSAMPLE = 2  # drawn at 2x, then Lanczos-downscaled: anti-aliased edges like real artwork


def photo_path(package: str, folder: str, name: str) -> Path:
    """Where a bundled file lives, found without importing the package (no fetchers run)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<{package} not installed>") / name
    return Path(list(spec.submodule_search_locations)[0]) / folder / name


BUILTIN_SOURCES = {  # source name -> what it yields
    "builtin": "the bundled photographs, then the drawings",
    "builtin-art": "the drawings only (the demo's domain: what it finetunes on)",
    "builtin-photos": "the photographs the shipped base never trained on (HELD_OUT_PHOTOS)",
}


def builtin_sources(art_count: int = 24, seed: int = 0, source: str = "builtin") -> list[tuple[str, object]]:
    """``[(input_id, src)]`` of one of ``BUILTIN_SOURCES``: a ``Path`` per photo, then a
    zero-argument function per drawing (call it for the PIL image), so a caller that skips an
    input does not pay for drawing it."""
    photos = [(f"builtin/photo/{name}", photo_path(package, folder, filename))
              for name, package, folder, filename in PHOTOS
              if source == "builtin" or (source == "builtin-photos" and name in HELD_OUT_PHOTOS)]
    art = [(f"builtin/art/{index:03d}", partial(draw_art, index, seed)) for index in range(art_count)]
    return photos + (art if source != "builtin-photos" else [])


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


# ---- natural-image-like synthetic images: what the shipped base pretrains on beside photos ----
NATURAL_SEED = 1  # scripts/pretrain_base.py's images; nothing else draws with this generator


def draw_natural(index: int, seed: int = NATURAL_SEED) -> Image.Image:
    """One deterministic "dead leaves" image with natural statistics, RGB, sides 512-1024 px.

    Occluding ellipses with power-law sizes (the scale invariance of natural scenes), muted
    colours (low saturation, as photographs have), each leaf shaded by a smooth gradient; then
    1/f texture, uneven light, a random defocus blur and sensor noise. No outlines, no flat
    saturated fills: nothing of the drawings the demo adapts the decoder to."""
    rng = np.random.default_rng([seed, index, 7])
    width, height = (int(v) for v in rng.integers(512, 1025, 2))
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = _muted_colour(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(600, 1500))):
        _leaf(canvas, rng, xx, yy)
    canvas *= 1 + rng.uniform(0.05, 0.25) * _pink_noise(rng, height, width)[..., None]
    angle, light = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    canvas *= 1 - light * (ramp - ramp.min())[..., None] / max(float(np.ptp(ramp)), 1e-6)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    blur = float(rng.choice([0.0, rng.uniform(0.3, 1.6)], p=[0.4, 0.6]))
    if blur:
        from PIL import ImageFilter
        image = image.filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 4), (height, width, 3))
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


def _muted_colour(rng) -> np.ndarray:
    """A colour as photographs hold them: mostly low saturation, any brightness (HSV 0-255)."""
    hsv = np.array([[[rng.integers(0, 256), 255 * rng.beta(1.3, 3.5), rng.integers(25, 246)]]], np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32)[0, 0]


def _leaf(canvas, rng, xx, yy) -> None:
    """An ellipse of radius ~ r^-3 between 0.8 % and 40 % of the short side, painted over
    ``canvas`` (float RGB, HWC) with a shading gradient across it."""
    height, width = canvas.shape[:2]
    low, high = 0.008 * min(height, width), 0.4 * min(height, width)
    r = low / np.sqrt(1 - rng.random() * (1 - (low / high) ** 2))  # p(r) ∝ r^-3 on [low, high]
    cx, cy = rng.uniform(-r, width + r), rng.uniform(-r, height + r)
    aspect, theta = rng.uniform(0.4, 1.0), rng.uniform(0, np.pi)
    x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, width))
    y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, height))
    if x0 >= x1 or y0 >= y1:
        return
    dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / r
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (r * aspect)
    inside = u * u + v * v <= 1
    shade = 1 + rng.uniform(-0.25, 0.25) * u  # light falling across the leaf
    canvas[y0:y1, x0:x1][inside] = (_muted_colour(rng)[None] * shade[inside][:, None])


def _pink_noise(rng, height: int, width: int) -> np.ndarray:
    """Zero-mean, unit-peak noise with a 1/f^beta amplitude spectrum, beta in [1, 2]."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** rng.uniform(1.0, 2.0)
    spectrum[0, 0] = 0
    noise = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
    return noise / max(float(np.abs(noise).max()), 1e-6)
