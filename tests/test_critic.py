import pytest
import torch

from furlib.training.critic import GAN_LOSSES, NORMS, PatchCritic, critic_loss, generator_loss, gradient_penalty


@pytest.mark.parametrize("norm", NORMS)
def test_patch_map_shape_each_norm(norm):
    c = PatchCritic(layers=3, channels=8, norm=norm)
    assert c(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # LDM: 30x30 at 256 px


def test_layer_norm_is_per_sample():
    # WGAN-GP needs a per-sample critic: a sample's score must not depend on the batch.
    c = PatchCritic(channels=8, norm="layer")
    x = torch.randn(3, 3, 64, 64)
    assert torch.allclose(c(x)[:1], c(x[:1]), atol=1e-5)


def test_gradient_penalty_matches_definition():
    torch.manual_seed(0)
    c = PatchCritic(layers=2, channels=4, norm="layer").double()
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
    c = PatchCritic(layers=2, channels=8, norm="layer")
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
