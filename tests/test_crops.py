"""furlib.crops: crop geometry, ranges, RGB order, augmentation coverage, reproducibility."""

import numpy as np
import pytest
import torch
from PIL import Image

from furlib import crops


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
    assert min(sides) < 90 and max(sides) == 200  # sqrt(0.08 * 6e4) = 69 .. clipped to 200
    box, *_ = crops.crop_params(300, 200, 64, rng, min_crop_scale=1.0)
    assert box[2] - box[0] == 200
    with pytest.raises(ValueError):
        crops.crop_params(50, 200, 64, rng)


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
    red = crops.to_rgb_m11(crops.random_crop(Image.new("RGB", (40, 40), (255, 0, 0)), 32,
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
    dataset = crops.CropDataset(crops.list_images(noise_dir), 32, seed=0)
    n = len(dataset)
    for epoch in range(3):
        assert sorted(dataset.image_index(epoch * n + i) for i in range(n)) == list(range(n))
    orders = [[dataset.image_index(e * n + i) for i in range(n)] for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def test_center_crops(noise_dir, tmp_path):
    source = np.random.default_rng(4).integers(0, 256, (40, 60, 3), np.uint8)
    save(tmp_path, "exact.png", source)
    exact = crops.center_crops([tmp_path / "exact.png"], 40)
    assert torch.equal(exact[0], crops.to_rgb_m11(source[:, 10:50]))  # short side == resolution
    batch = crops.center_crops(crops.list_images(noise_dir), 32)
    assert batch.shape == (5, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    assert crops.center_crops([], 32).shape == (0, 3, 32, 32)


def test_empty_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="01_data_prep"):
        crops.make_loader(tmp_path, 32, 4)


def test_decoding_only_the_top_rows_changes_nothing(tmp_path):
    """The loader decodes a PNG only down to the rows its crop (and Lanczos support) reads."""
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(160, 120), (120, 200)]):
        save(tmp_path, f"{i}.png", rng.integers(0, 256, (h, w, 3)))
    paths = crops.list_images(tmp_path)
    for resolution in (32, 48):
        dataset = crops.CropDataset(paths, resolution, seed=1)
        for g in range(60):
            whole = crops.open_rgb(paths[dataset.image_index(g)])
            expected = crops.random_crop(whole, resolution, crops.sample_rng(1, g))
            assert torch.equal(dataset[g], crops.to_rgb_m11(expected))
    top = crops.open_top_rows(paths[0], 10)
    assert np.asarray(top)[10:].max() == 0 and np.asarray(top)[:10].any()  # really partial
