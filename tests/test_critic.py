import copy

import pytest
import torch

from furlib.training.losses import GAN_LOSSES, NORMS, PatchCritic, critic_loss, generator_loss, gradient_penalty


@pytest.mark.parametrize("norm", NORMS)
def test_patch_map_shape_each_norm(norm):
    c = PatchCritic(layers=3, channels=8, norm=norm)
    assert c(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # LDM: 30x30 at 256 px


@pytest.mark.parametrize("norm", ["pixel_layer", "sample_layer"])
def test_layer_norms_are_per_sample(norm):
    # WGAN-GP needs a per-sample critic: a sample's score must not depend on the batch.
    c = PatchCritic(channels=8, norm=norm)
    x = torch.randn(3, 3, 64, 64)
    assert torch.allclose(c(x)[:1], c(x[:1]), atol=1e-5)


def _norm_layer(norm: str) -> torch.nn.Module:
    layer = PatchCritic(layers=2, channels=4, norm=norm).net[3]  # conv, LReLU, conv, *norm*
    affine = getattr(layer, "norm", layer)  # identity affine: the normalisation alone
    torch.nn.init.ones_(affine.weight)
    torch.nn.init.zeros_(affine.bias)
    return layer


def test_pixel_layer_is_flax_layernorm_over_channels_at_each_pixel():
    """The card's norm: Flax nn.LayerNorm() on NHWC normalises the last axis (channels) at each
    pixel, with epsilon 1e-6; written out here, independently of torch's LayerNorm."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64) * 3 + 1
    layer = _norm_layer("pixel_layer").double()
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    assert torch.allclose(layer(x), (x - mean) / torch.sqrt(var + 1e-6), atol=1e-10)


def test_sample_layer_normalises_each_sample_over_chw():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64) * 3 + 1
    out = _norm_layer("sample_layer").double()(x)
    assert torch.allclose(out.mean((1, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    per_pixel_mean = out.mean(1)  # not zero at each pixel: a different layer from pixel_layer
    assert per_pixel_mean.abs().max() > 0.1


@pytest.mark.parametrize("old, new", [("layer", "sample_layer"), ("channel", "pixel_layer")])
def test_old_norm_names_are_errors_naming_the_new_ones(old, new):
    from furlib.training.settings import TrainSettings

    with pytest.raises(ValueError, match=f"renamed to '{new}'"):
        PatchCritic(norm=old)
    with pytest.raises(ValueError, match=f"renamed to '{new}'"):
        TrainSettings(critic_norm=old)


def test_gradient_penalty_matches_definition():
    torch.manual_seed(0)
    c = PatchCritic(layers=2, channels=4, norm="sample_layer").double()
    real, fake = torch.randn(3, 3, 32, 32).double(), torch.randn(3, 3, 32, 32).double()
    alpha = torch.rand(3, 1, 1, 1).double()
    expected = []
    for i in range(3):  # one sample at a time, straight from Gulrajani et al.
        xi = (real[i:i + 1] + alpha[i] * (fake[i:i + 1] - real[i:i + 1])).requires_grad_(True)
        (g,) = torch.autograd.grad(c(xi).mean(), xi)
        expected.append((g.norm() - 1) ** 2)
    got = gradient_penalty(c, real, fake, alpha).double()
    assert torch.allclose(got, torch.stack(expected).mean(), rtol=1e-5)


@pytest.mark.parametrize("gan_loss", GAN_LOSSES)
def test_losses_finite_and_critic_learns_direction(gan_loss):
    torch.manual_seed(0)
    c = PatchCritic(layers=2, channels=8, norm="sample_layer")
    real, fake = torch.rand(4, 3, 32, 32), -torch.rand(4, 3, 32, 32)
    opt = torch.optim.Adam(c.parameters(), 1e-3)
    for _ in range(30):
        loss, logs = critic_loss(c, real, fake, gan_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert logs["critic/real"] > logs["critic/fake"]  # it tells reals from fakes
    assert torch.isfinite(generator_loss(c(fake), gan_loss))


def test_oklab_input_and_bad_names():
    c = PatchCritic(channels=8, input_space="oklab")
    white = torch.ones(1, 3, 8, 8)
    assert torch.allclose(c.prepare(white)[0, 0], torch.ones(8, 8), atol=1e-4)
    with pytest.raises(ValueError, match="critic_norm"):
        PatchCritic(norm="instance")
    with pytest.raises(ValueError, match="gan_loss"):
        critic_loss(c, white, white, "lsgan")


@pytest.mark.parametrize("gan_loss", GAN_LOSSES)
def test_first_order_passes_use_the_scores_twin(gan_loss):
    """The trainer passes a compiled twin as ``scores``: same loss and gradients, and the
    penalties' double backward still runs the critic itself."""
    torch.manual_seed(0)
    critic, calls = PatchCritic(2, 8), []

    class Twin(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return critic(x)

    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    losses = [critic_loss(critic, real, fake, gan_loss, generator=torch.Generator().manual_seed(3), scores=s)[0]
              for s in (None, Twin())]
    grads = [torch.autograd.grad(loss, list(critic.parameters())) for loss in losses]
    assert torch.allclose(losses[0], losses[1])
    assert all(torch.allclose(a, b) for a, b in zip(*grads))
    assert len(calls) == {"wgan-gp": 2, "hinge": 2, "ns-r1": 1}[gan_loss]


@pytest.mark.parametrize("grad_scale,norm", [(1.0, "pixel_layer"), (torch.tensor(1024.0), "pixel_layer"),
                                             (1.0, "batch")])
def test_functional_penalty_is_the_penalty(grad_scale, norm):
    """``functional=True`` (torch.func's inner gradient, the compilable form) gives the penalty
    and its gradient in the critic's weights of the autograd form, fp16's loss scale included;
    with batch norm (running statistics updated in the forward) too, and the same statistics."""
    torch.manual_seed(0)
    critics = [PatchCritic(layers=2, channels=8, norm=norm).double()]
    critics.append(copy.deepcopy(critics[0]))
    real, fake = torch.randn(3, 3, 32, 32).double(), torch.randn(3, 3, 32, 32).double()
    alpha = torch.rand(3, 1, 1, 1).double()
    gps = [gradient_penalty(c, real, fake, alpha, grad_scale, functional=f) for c, f in zip(critics, (False, True))]
    grads = [torch.autograd.grad(gp, list(c.parameters()), allow_unused=True, materialize_grads=True)
             for c, gp in zip(critics, gps)]
    assert torch.allclose(gps[0], gps[1], rtol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads))
    stats = [c.state_dict() for c in critics]
    assert all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])
