"""furlib.crops: crop geometry, ranges, RGB order, augmentation coverage, reproducibility."""

import numpy as np
import pytest
import torch
from PIL import Image

from furlib import prepared
from furlib.images import to_rgb_m11
from furlib import crops, pixelcache


def save(folder, name, pixels) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(folder / name)


def quadrants(side: int) -> np.ndarray:
    """Red, green / blue, white quadrants: every rotation and flip of it looks different."""
    q = side // 2
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[:q, :q] = (255, 0, 0)
    pixels[:q, q:] = (0, 255, 0)
    pixels[q:, :q] = (0, 0, 255)
    pixels[q:, q:] = (255, 255, 255)
    return pixels


def dihedral(pixels: np.ndarray) -> list[np.ndarray]:
    rotations = [np.rot90(pixels, k) for k in range(4)]
    return rotations + [r[:, ::-1] for r in rotations]


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(96, 128), (80, 80), (120, 90), (64, 100), (100, 70)]):
        save(folder, f"{i}.png", rng.integers(0, 256, (h, w, 3)))
    return folder


def test_crop_params_stay_inside_and_never_upsample():
    rng = np.random.default_rng(1)
    sides = []
    for _ in range(500):
        (left, top, right, bottom), turns, hflip, vflip = crops.crop_params(300, 200, 64, rng)
        side = right - left
        assert bottom - top == side and 64 <= side <= 200
        assert 0 <= left and right <= 300 and 0 <= top and bottom <= 200
        sides.append(side)
    assert min(sides) < 90 and max(sides) > 190  # sqrt(0.08 * 6e4) = 69 .. 200 (larger: drawn again)
    box, *_ = crops.crop_params(300, 200, 64, rng, min_crop_scale=1.0)
    assert box[2] - box[0] == 200
    with pytest.raises(ValueError):
        crops.crop_params(50, 200, 64, rng)


@pytest.mark.parametrize("width, height", [(512, 256), (256, 512), (600, 200)])
def test_crop_sizes_of_non_square_images_are_redrawn_not_piled_on_the_short_side(width, height):
    """A crop larger than the short side is drawn again: the crop's area fraction is then uniform
    on [0.08, short/long] (rejection sampling), and the largest downscale (side = short side)
    gets only the fallback's (1 - p)^10 share and the draws that round to it: seen 1.1% at 2:1 and
    5.5% at 3:1, where clipping gave 54% and 72%."""
    rng, n, short, ratio = np.random.default_rng(0), 4000, min(width, height), min(width, height) / max(width, height)
    boxes = [crops.crop_params(width, height, 64, rng)[0] for _ in range(n)]
    sides = np.array([right - left for left, _, right, _ in boxes])
    area = width * height
    u_fit, u_round = min(1.0, (short + 0.5) ** 2 / area), (short - 0.5) ** 2 / area  # side rounds to short
    fallback = (1 - (u_fit - 0.08) / 0.92) ** 10  # 10 attempts, then the short side: 0.2% at 2:1, 4% at 3:1
    expected = fallback + (1 - fallback) * (u_fit - u_round) / (u_fit - 0.08)
    assert abs(np.mean(sides == short) - expected) < 4 * np.sqrt(expected / n) + 0.002  # seen 1.1% at 2:1
    drawn = sides[sides < short] ** 2 / (width * height)  # the fractions that fitted
    assert abs(np.median(drawn) - (0.08 + ratio) / 2) < 0.02  # uniform on [0.08, short/long]
    assert drawn.max() <= u_fit


def test_crop_draws_depend_only_on_seed_and_sample_index():
    """Redrawing consumes a sample's own stream: the same (seed, g) gives the same crop, in any order."""
    forward = [crops.crop_params(600, 200, 64, crops.sample_rng(3, g)) for g in range(50)]
    backward = [crops.crop_params(600, 200, 64, crops.sample_rng(3, g)) for g in reversed(range(50))]
    assert forward == backward[::-1]
    assert len({p[0] for p in forward}) > 40  # and they differ between samples


def test_output_shape_range_and_dtype(noise_dir):
    batch = next(iter(crops.make_loader(noise_dir, 32, batch_size=6, seed=3)))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1 and batch.min() < -0.9 and batch.max() > 0.9


def test_short_side_equal_to_resolution_gives_unscaled_pixels():
    source = np.random.default_rng(2).integers(0, 256, (48, 80, 3), np.uint8)  # short side 48
    windows = [source[:, x:x + 48] for x in range(80 - 48 + 1)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = crops.random_crop(Image.fromarray(source), 48, rng)
        assert any(np.array_equal(out, t) for w in windows for t in dihedral(w))


def test_rgb_order_and_every_rotation_and_flip_appear():
    source = quadrants(32)
    outs = [crops.random_crop(Image.fromarray(source), 32, np.random.default_rng(k))
            for k in range(200)]
    seen = [next(i for i, t in enumerate(dihedral(source)) if np.array_equal(o, t)) for o in outs]
    assert set(seen) == set(range(8))  # all 8 symmetries of the square, each fairly often
    assert min(np.bincount(seen, minlength=8)) >= 10
    red = to_rgb_m11(crops.random_crop(Image.new("RGB", (40, 40), (255, 0, 0)), 32,
                                             np.random.default_rng(0)))
    assert torch.equal(red[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))  # RGB, never BGR


def test_downscaling_is_antialiased():
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    image = Image.fromarray(np.stack([checker] * 3, -1))
    out = crops.random_crop(image, 32, np.random.default_rng(0), min_crop_scale=1.0)
    assert abs(out.mean() - 127.5) < 4 and out.std() < 8  # grey, not aliased stripes


def test_same_batches_for_any_number_of_workers(noise_dir):
    def first(n, **kw):
        loader = crops.make_loader(noise_dir, 32, batch_size=4, seed=7, **kw)
        return [b for _, b in zip(range(n), loader)]
    single, multi = first(5, num_workers=0), first(5, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(single, multi))
    resumed = first(2, num_workers=2, start_step=3)
    assert torch.equal(resumed[0], single[3]) and torch.equal(resumed[1], single[4])
    other_seed = next(iter(crops.make_loader(noise_dir, 32, batch_size=4, seed=8)))
    assert not torch.equal(other_seed, single[0])


def test_each_epoch_visits_every_image_once(noise_dir):
    dataset = crops.CropDataset(prepared.list_images(noise_dir), 32, seed=0)
    n = len(dataset)
    for epoch in range(3):
        assert sorted(dataset.image_index(epoch * n + i) for i in range(n)) == list(range(n))
    orders = [[dataset.image_index(e * n + i) for i in range(n)] for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def test_center_crops(noise_dir, tmp_path):
    source = np.random.default_rng(4).integers(0, 256, (40, 60, 3), np.uint8)
    save(tmp_path, "exact.png", source)
    exact = prepared.center_crops([tmp_path / "exact.png"], 40)
    assert torch.equal(exact[0], to_rgb_m11(source[:, 10:50]))  # short side == resolution
    batch = prepared.center_crops(prepared.list_images(noise_dir), 32)
    assert batch.shape == (5, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    assert prepared.center_crops([], 32).shape == (0, 3, 32, 32)


def test_empty_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="01_data_prep"):
        crops.make_loader(tmp_path, 32, 4)


def test_decoding_only_the_top_rows_changes_nothing(tmp_path):
    """The loader decodes a PNG only down to the rows its crop (and Lanczos support) reads."""
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(160, 120), (120, 200)]):
        save(tmp_path, f"{i}.png", rng.integers(0, 256, (h, w, 3)))
    paths = prepared.list_images(tmp_path)
    for resolution in (32, 48):
        dataset = crops.CropDataset(paths, resolution, seed=1)
        for g in range(60):
            whole = prepared.open_rgb(paths[dataset.image_index(g)])
            expected = crops.random_crop(whole, resolution, crops.sample_rng(1, g))
            assert torch.equal(dataset[g], to_rgb_m11(expected))
    top = crops.open_top_rows(paths[0], 10)
    assert np.asarray(top)[10:].max() == 0 and np.asarray(top)[:10].any()  # really partial


# Decoded-pixel cache -----------------------------------------------------------------------------

def _boxes(width: int, height: int, resolution: int, rng) -> list[tuple[int, int, int, int]]:
    """Square boxes: side == resolution (no resize), the largest downscale, random sides; each at
    every edge and corner of the image and at random positions."""
    short = min(width, height)
    sides = {resolution, resolution + 1, short, *rng.integers(resolution, short + 1, 4).tolist()}
    boxes = []
    for side in sorted(sides):
        lefts = {0, width - side, int(rng.integers(0, width - side + 1))}
        tops = {0, height - side, int(rng.integers(0, height - side + 1))}
        boxes += [(x, y, x + side, y + side) for x in lefts for y in tops]
    return boxes


def _random_crop_cases(seed: int):
    """(pixels, resolution, crop params) over sizes, non-power-of-two scales and reducing_gap."""
    rng = np.random.default_rng(seed)
    for h, w in [(97, 131), (150, 64), (120, 120)]:
        pixels = rng.integers(0, 256, (h, w, 3), np.uint8)
        for resolution in (16, 20, 24, 32):
            for box in _boxes(w, h, resolution, rng):
                flips = rng.integers(0, 2, 2)
                yield pixels, resolution, (box, int(rng.integers(0, 4)), bool(flips[0]), bool(flips[1]))


def test_pixels_outside_crop_region_never_change_a_crop():
    """The margin proof: poison every pixel outside ``crop_region`` and the crop stays the same."""
    reduced = 0
    for pixels, resolution, params in _random_crop_cases(12):
        box = params[0]
        left, top, right, bottom = crops.crop_region(box, pixels.shape[1], pixels.shape[0], resolution)
        poisoned = 255 - pixels
        poisoned[top:bottom, left:right] = pixels[top:bottom, left:right]
        expected = crops.apply_crop(Image.fromarray(pixels), resolution, *params)
        got = crops.apply_crop(Image.fromarray(poisoned), resolution, *params)
        assert np.array_equal(got, expected), params
        reduced += (box[2] - box[0]) / resolution >= 2 * crops.REDUCING_GAP  # PIL box-reduces first
    assert reduced > 50


def test_crops_from_an_array_are_bit_identical(monkeypatch):
    new_image = Image.new  # the canvas's unset pixels: magenta, so reading one shows
    monkeypatch.setattr(Image, "new", lambda mode, size, color=None: new_image(mode, size, "#f0f"))
    cases = list(_random_crop_cases(13))
    for pixels, resolution, params in cases:
        expected = crops.apply_crop(Image.fromarray(pixels), resolution, *params)
        assert np.array_equal(crops.crop_from_array(pixels, resolution, *params), expected), params
    assert len(cases) > 500


@pytest.fixture
def split(tmp_path):
    """Three noise PNGs (noise: any misplaced pixel changes the crop) of unlike sizes."""
    rng = np.random.default_rng(14)
    for i, (h, w) in enumerate([(160, 120), (96, 200), (130, 130)]):
        save(tmp_path / "train", f"{i:016x}.png", rng.integers(0, 256, (h, w, 3)))
    return tmp_path / "train"


def _samples(split, n=40, **kw):
    dataset = crops.CropDataset(prepared.list_images(split), 24, seed=5, **kw)  # 24: up to 6.7x down
    return [dataset[g] for g in range(n)]


def test_cache_is_written_once_then_read_without_decoding(split, tmp_path, monkeypatch):
    cache = tmp_path / "pixel_cache"
    expected = _samples(split)
    cold = _samples(split, cache_dir=cache)
    assert all(torch.equal(a, b) for a, b in zip(cold, expected))
    pngs = prepared.list_images(split)
    assert sorted(p.name for p in cache.iterdir()) == [f"{p.stem}.npy" for p in pngs]  # no temporaries
    for png in pngs:
        assert np.array_equal(np.load(cache / f"{png.stem}.npy"), np.asarray(prepared.open_rgb(png)))
    written = {p: p.stat().st_mtime_ns for p in cache.iterdir()}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached image was opened from its PNG")
    monkeypatch.setattr(Image, "open", no_decoding)
    warm = _samples(split, cache_dir=cache)
    assert all(torch.equal(a, b) for a, b in zip(warm, expected))
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == written


def test_racing_writers_of_one_entry_are_harmless(tmp_path):
    import threading

    pixels = np.random.default_rng(15).integers(0, 256, (64, 48, 3), np.uint8)
    entry = tmp_path / "cache" / "abc.npy"
    start = threading.Barrier(8)

    def writer():
        start.wait()
        pixelcache.write(entry, pixels)
    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(pixelcache.read(entry), pixels)
    assert [p.name for p in entry.parent.iterdir()] == ["abc.npy"]


def test_loader_workers_with_a_cache_give_the_same_batches(split, tmp_path):
    def batches(**kw):
        loader = crops.make_loader(split, 24, batch_size=8, seed=2, **kw)
        return [b for _, b in zip(range(4), loader)]
    expected = batches()
    for _ in range(2):  # cold (both workers race to write the same 3 entries), then warm
        cached = batches(num_workers=2, cache_dir=tmp_path / "cache")
        assert all(torch.equal(a, b) for a, b in zip(cached, expected))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def _one_cache_warning(split, cache_dir) -> None:
    expected = _samples(split, 12)
    with pytest.warns(RuntimeWarning, match="could not write") as caught:
        got = _samples(split, 12, cache_dir=cache_dir)
    assert len([w for w in caught if "pixel cache" in str(w.message)]) == 1  # once, not per image
    assert "decoded from their PNGs" in str(caught[0].message)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_unwritable_cache_warns_once_and_trains_on_from_pngs(split, tmp_path):
    (tmp_path / "a_file").write_text("")  # a folder under a regular file: fails even for root
    _one_cache_warning(split, tmp_path / "a_file" / "pixel_cache")


def test_disk_full_while_writing_leaves_no_partial_entry(split, tmp_path, monkeypatch):
    import errno

    def half_then_full(f, array):
        f.write(b"\x93NUMPY half an entry")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pixelcache.np, "save", half_then_full)
    _one_cache_warning(split, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_entry_is_named_and_rebuilt(split, tmp_path):
    (tmp_path / "cache").mkdir()
    for png in prepared.list_images(split):
        (tmp_path / "cache" / f"{png.stem}.npy").write_bytes(b"not an array")
    with pytest.warns(RuntimeWarning, match="pixel cache entry .* is unreadable .*rebuilt from its PNG"):
        rebuilt = _samples(split, 6, cache_dir=tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, _samples(split, 6)))  # the PNGs' own crops


def test_cache_plan(split, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    cache = tmp_path / "pixel_cache"
    full = sum(w * h * 3 + 128 for w, h in [(120, 160), (200, 96), (130, 130)])  # bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 2 * full))
    use, note = crops.cache_plan(split, cache, "auto")
    assert use and note.startswith("pixel cache: on") and "3 images" in note and str(cache) in note
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 2 * full - 2))
    use, note = crops.cache_plan(split, cache, "auto")
    assert not use and "pixel_cache='yes'" in note
    assert crops.cache_plan(split, cache, "yes")[0] and not crops.cache_plan(split, cache, "no")[0]
    _samples(split, 1, cache_dir=cache)  # caches one image: it counts as done
    assert crops.cache_plan(split, cache, "auto")[0]
    with pytest.raises(ValueError, match="'auto', 'yes', 'no'"):
        crops.cache_plan(split, cache, "on")


def test_data_prep_ignores_the_pixel_cache(split, tmp_path):
    from furlib.data.prepare import prepare

    data = tmp_path / "run" / "data"
    first = prepare(split, data, resolution=24, progress=False, workers=1)
    _samples(data / "train", 4, cache_dir=data / "pixel_cache")
    again = prepare(split, data, resolution=24, progress=False, workers=1)
    assert again["accepted"] == first["accepted"] and len(first["accepted"]) == 3
    assert len(list((data / "pixel_cache").glob("*.npy"))) >= 1



def test_cache_entries_never_outlive_their_image(split, tmp_path):
    """01 names a file by the hash of its pixels before the max_side cap: rebuilt with another
    max_side, a file keeps its name and gets other pixels; a file replaced by hand does too. The
    cache served the old pixels (and sizes) for them, silently."""
    from furlib.data.prepare import prepare

    data, cache = tmp_path / "run" / "data", tmp_path / "run" / "pixel_cache"
    prep = lambda side, **kw: prepare("builtin", data, resolution=24, max_side=side, max_images=3,  # noqa: E731
                                      art_count=3, val_fraction=0.0, progress=False, workers=1, **kw)
    prep(128)
    names = [p.name for p in prepared.list_images(data / "train")]
    _samples(data / "train", 6, cache_dir=cache)
    prep(96, rebuild=True)
    assert [p.name for p in prepared.list_images(data / "train")] == names  # same names, other pixels
    assert all(torch.equal(a, b) for a, b in zip(_samples(data / "train", 6, cache_dir=cache),
                                                 _samples(data / "train", 6)))
    _samples(split, 6, cache_dir=cache)
    victim = prepared.list_images(split)[0]
    save(split, victim.name, np.random.default_rng(16).integers(0, 256, (100, 90, 3)))  # by hand
    assert pixelcache.sizes([victim], cache) == (90 * 100 * 3 + 128, 0)  # to cache again, not done
    assert all(torch.equal(a, b) for a, b in zip(_samples(split, 6, cache_dir=cache), _samples(split, 6)))


def _hand_made(folder, kind: str) -> None:
    rng = np.random.default_rng(17)
    if kind == "alpha":  # fully transparent red: 01 composites it over white
        Image.fromarray(np.dstack([np.full((64, 64, 3), (255, 0, 0), np.uint8), np.zeros((64, 64), np.uint8)]),
                        "RGBA").save(folder / "hand.png")
    elif kind == "grey_alpha":
        Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).convert("LA").save(folder / "hand.png")
    elif kind == "16bit":  # a ramp over 0..65535: convert("RGB") clips it to white
        Image.fromarray(np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)).save(folder / "hand.png")
    elif kind == "palette_key":
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).convert("P").save(folder / "hand.png",
                                                                                      transparency=0)
    elif kind == "cmyk":
        Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(folder / "hand.jpg")
    elif kind == "small":
        save(folder, "hand.png", rng.integers(0, 256, (20, 400, 3)))  # 20 px < resolution=24


@pytest.mark.parametrize("kind", ["alpha", "grey_alpha", "16bit", "palette_key", "cmyk", "small"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_file_01_never_stores_is_named_not_cropped(split, tmp_path, kind, cached):
    """A file copied into data/train by hand skips 01's conversion: its crops were silently wrong
    (alpha dropped, 16 bits clipped to white, CMYK unconverted), and one smaller than the crops
    was called 'damaged on disk after 01 stored it'."""
    _hand_made(split, kind)
    dataset = crops.CropDataset(prepared.list_images(split), 24, seed=5,
                                cache_dir=tmp_path / "cache" if cached else None)
    hand = next(g for g in range(4) if dataset.paths[dataset.image_index(g)].stem == "hand")
    words = "smaller than resolution=24" if kind == "small" else "01_data_prep never stores"
    with pytest.raises(ValueError, match=f"training image {dataset.paths[0].parent}/hand.* {words}") as caught:
        dataset[hand]
    assert "damaged" not in str(caught.value) and "run 01_data_prep again" in str(caught.value)
    assert not (tmp_path / "cache" / "hand.npy").exists()


@pytest.mark.parametrize("mode", ["L", "P"])
def test_grey_and_palette_files_without_alpha_still_train(split, mode):
    """Their conversion to RGB is exact: refusing them would stop a run for nothing."""
    pixels = np.random.default_rng(18).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(pixels).convert(mode).save(split / "hand.png")
    dataset = crops.CropDataset(prepared.list_images(split), 24, seed=5)
    hand = next(g for g in range(4) if dataset.paths[dataset.image_index(g)].stem == "hand")
    assert dataset[hand].shape == (3, 24, 24)


def test_a_worker_names_the_file_smaller_than_the_crops(split):
    _hand_made(split, "small")
    loader = crops.make_loader(split, 24, batch_size=4, num_workers=2)
    loader.timeout = 60  # s: a deadline for the workers, never an unbounded wait
    with pytest.raises(ValueError, match=f"training image {split}/hand.png is 400x20, smaller than"):
        next(iter(loader))


def test_an_image_over_pillows_bomb_limit_is_named(split, tmp_path):
    """Pillow's DecompressionBombError names no file: it ended 02 in the plan or a worker with
    'Image size (180000000 pixels) exceeds limit', leaving the user to find which file."""
    Image.new("1", (20000, 9000)).save(split / "huge.png")  # 180 MP > 2 x Image.MAX_IMAGE_PIXELS
    words = f"training image {split}/huge.png: Image size .* 01_data_prep never stores"
    with pytest.raises(ValueError, match=words):
        crops.cache_plan(split, tmp_path / "cache", "auto")
    dataset = crops.CropDataset(prepared.list_images(split), 24, seed=5)
    huge = next(g for g in range(4) if dataset.paths[dataset.image_index(g)].stem == "huge")
    with pytest.raises(ValueError, match=words):
        dataset[huge]
