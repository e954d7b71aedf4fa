"""LPIPS with an honest backbone: pretrained, or random only when asked for by name.

The ``lpips`` package ships its learned linear heads, but the VGG/AlexNet backbone comes from
torchvision's download server. ``backbone='pretrained'`` loads it (from the torch hub cache if
it is there, e.g. ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``) and fails with a clear
message when it cannot; ``backbone='random'`` builds a randomly initialised backbone for
offline tests and smoke runs, and ``lpips_note`` says so in every report.
Inputs to the returned module are ``rgb_m11`` NCHW in [-1, 1]; output is per-image (N,).
"""

import contextlib
import io
import warnings

import torch

BACKBONES = ("pretrained", "random")
NETS = ("vgg", "alex", "squeeze")


class LPIPSUnavailable(RuntimeError):
    pass


class LPIPS(torch.nn.Module):
    """Frozen LPIPS; ``forward(a_m11, b_m11) -> (N,)`` distances, computed in fp32."""

    def __init__(self, net: str = "vgg", backbone: str = "pretrained", seed: int = 0):
        super().__init__()
        import lpips

        if net not in NETS:
            raise ValueError(f"lpips net must be one of {NETS}, got {net!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"lpips_backbone must be one of {BACKBONES}, got {backbone!r}")
        torch.manual_seed(seed)
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lpips prints its set-up; torchvision warns
                self.net = lpips.LPIPS(net=net, pretrained=True, pnet_rand=backbone == "random")
        except Exception as err:  # torchvision raises URLError/RuntimeError/OSError offline
            raise LPIPSUnavailable(
                f"LPIPS needs torchvision's pretrained {net} weights, which could not be loaded "
                f"({type(err).__name__}: {err}). With internet they download once; offline, put "
                f"the file in the torch hub cache, or set lpips_backbone='random' to run with a "
                f"random backbone (then LPIPS is not a perceptual measure, and reports say so)."
            ) from err
        self.backbone, self.net_name = backbone, net
        self.net.eval().requires_grad_(False)

    def forward(self, a_m11: torch.Tensor, b_m11: torch.Tensor) -> torch.Tensor:
        return self.net(a_m11.float(), b_m11.float()).flatten()

    def train(self, mode: bool = True):  # always frozen, eval mode (dropout off)
        return super().train(False)


def lpips_note(backbone: str, net: str = "vgg") -> str:
    if backbone == "random":
        return f"LPIPS({net}) ran with a RANDOM backbone (offline opt-in): not a perceptual measure"
    return f"LPIPS({net}) with the pretrained torchvision backbone"
