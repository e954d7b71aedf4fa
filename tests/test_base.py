"""The shipped pretrained base (``base_model: tiny``): what it is, what it never saw, and that
the recipe improves it (the learning test)."""

import json

import numpy as np
import pytest
import torch

from furlib import builtin, models, prepared
from furlib.data.prepare import pixel_hash, prepare
from furlib.evaluation.metrics import psnr
from furlib.images import load_rgb
from furlib.training import crops
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


def test_base_never_saw_the_demo_or_the_held_out_photos(tmp_path):
    """By content: no pixel hash of the demo's images (its 01 split, train and val) nor of the
    held-out photographs is among the hashes the base trained on."""
    seen = json.loads((models.TINY_BASE_DIR / "training_set.json").read_text())
    trained = set(seen["art"]) | set(seen["photo"])
    assert len(seen["art"]) >= 1000 and len(seen["photo"]) == len(builtin.PHOTOS) - len(builtin.HELD_OUT_PHOTOS)
    report = prepare("builtin", tmp_path / "data", resolution=96, val_fraction=0.15, art_count=24,
                     workers=2, progress=False)  # params/demo.yaml's 01 values
    demo = {a["hash"]: a for a in report["accepted"]}
    assert any(a["split"] == "val" for a in demo.values())
    assert not trained & {h for h, a in demo.items() if a["split"] == "val" or a["id"].startswith("builtin/art/")}
    held_out = {pixel_hash(load_rgb(builtin.photo_path(p, f, n)))
                for name, p, f, n in builtin.PHOTOS if name in builtin.HELD_OUT_PHOTOS}
    assert len(held_out) == len(builtin.HELD_OUT_PHOTOS) and not trained & held_out


def test_base_reconstructs_unseen_drawings(base, drawings):
    x = prepared.center_crops(drawings[8:], RES)
    with torch.no_grad():
        recon = base.decode(base.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    assert float(psnr(x, recon).mean()) > 20.0  # a random VAE gives ~11 dB


def _batches(images, steps: int, batch: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    picks = [[crops.random_crop(images[int(rng.integers(len(images)))], RES, rng) for _ in range(batch)]
             for _ in range(steps)]
    return [crops.to_rgb_m11(np.stack(p)) for p in picks]


def learn(drawings, steps: int = 40, break_grad: bool = False) -> dict:
    """The recipe's step (Oklab MAE 1 : MSE 5, critic term from half-way, no LPIPS: CPU time) from
    the pretrained base; held-out Oklab L1 of base and current weights."""
    s = TrainSettings(batch_size=4, max_steps=steps, mae_weight=1.0, mae_weight_end=1.0, mse_weight=5.0,
                      mse_weight_end=5.0, lpips_weight=0.0, lr=2e-5, critic_lr=2e-5, warmup_steps=5,
                      gan_start=steps // 2, ema_decay=0.9, mixed_precision="no")
    trainer = Trainer(models.load_vae("tiny"), s, "cpu")
    if break_grad:  # the decoder's gradient never arrives: nothing may improve
        for _, p in trainer.trainable:
            p.register_hook(torch.zeros_like)
    held_out = prepared.center_crops(drawings[8:], RES)
    base_recon = trainer.reconstruct(held_out)
    for batch in _batches(drawings[:8], steps, s.batch_size):
        trainer.step(batch)
    return trainer.held_out_errors(held_out, base_recon)


def test_recipe_lowers_held_out_oklab_error(drawings):
    err = learn(drawings)
    assert err["current"] < 0.98 * err["base"], err


def test_learning_test_fails_when_the_gradient_is_cut(drawings):
    err = learn(drawings, steps=10, break_grad=True)
    assert err["current"] >= 0.999 * err["base"], err
