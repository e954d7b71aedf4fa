import torch

from furlib.oklab import M1, M2, rgb_to_oklab, safe_cbrt, srgb_to_linear


def _px(r, g, b):  # one sRGB [0,1] pixel as a 1x3x1x1 [-1,1] tensor
    return torch.tensor([r, g, b], dtype=torch.float64).view(1, 3, 1, 1) * 2 - 1


def test_reference_colours():
    # Ottosson's published values: white (1,0,0), black (0,0,0), sRGB red/green/blue.
    cases = {(1, 1, 1): (1.0, 0.0, 0.0), (0, 0, 0): (0.0, 0.0, 0.0),
             (1, 0, 0): (0.627955, 0.224863, 0.125846), (0, 1, 0): (0.866440, -0.233888, 0.179498),
             (0, 0, 1): (0.452014, -0.032457, -0.311528)}
    for rgb, lab in cases.items():
        got = rgb_to_oklab(_px(*rgb)).flatten()
        assert torch.allclose(got, torch.tensor(lab, dtype=torch.float64), atol=2e-4), (rgb, got)


def test_not_transposed():
    # The bug this project must not repeat: transposed matrices map white to (2.48, -1.35, -0.24).
    white = rgb_to_oklab(_px(1, 1, 1)).flatten()
    assert abs(white[0] - 1) < 1e-4 and white[1:].abs().max() < 1e-4


def oklab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse, written here from the same matrices: only this test needs it."""
    inv = lambda m, x: torch.einsum("oc,nchw->nohw", torch.linalg.inv(torch.tensor(m, dtype=x.dtype)), x)  # noqa: E731
    lin = inv(M1, inv(M2, lab).pow(3))
    a = lin.abs()
    srgb = torch.where(a <= 0.0031308, lin * 12.92, lin.sign() * (1.055 * a.clamp_min(0.0031308).pow(1 / 2.4) - 0.055))
    return srgb * 2.0 - 1.0


def test_roundtrip_and_srgb_curve():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    assert torch.allclose(oklab_to_rgb(rgb_to_oklab(x)), x, atol=1e-6)
    assert torch.allclose(srgb_to_linear(torch.tensor([0.5], dtype=torch.float64)),
                          torch.tensor([0.214041], dtype=torch.float64), atol=1e-6)


def test_gradients_finite_at_black_and_out_of_range():
    x = torch.tensor([[-1.0, -1.0, -1.0], [-1.05, 0.0, 1.02]]).view(2, 3, 1, 1).requires_grad_(True)
    rgb_to_oklab(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    z = torch.zeros(3, requires_grad=True)
    safe_cbrt(z).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad > 0).all()


def test_half_precision_input_computed_in_fp32():
    x = (torch.rand(1, 3, 4, 4) * 2 - 1)
    out = rgb_to_oklab(x.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, rgb_to_oklab(x.bfloat16().float()))


def test_srgb_gradient_at_exactly_zero_is_the_linear_segments():
    """d linear / d c at c = 0 is 1/12.92 (the linear segment), not 0: black pixels (rgb_m11
    exactly -1, common under bf16) must still be pulled by the Oklab terms."""
    c = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(srgb_to_linear(c).sum(), c)
    assert torch.allclose(grad, torch.full_like(grad, 1 / 12.92))
    black = _px(0, 0, 0).requires_grad_(True)
    (grad,) = torch.autograd.grad(rgb_to_oklab(black)[:, 0].sum(), black)  # lightness at black
    assert torch.isfinite(grad).all() and (grad > 0).all()
