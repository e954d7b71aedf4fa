"""What the adaptive weight's last-layer gradients in bf16 (``Tuning.last_layer_bf16``) change.

    python benchmarks/last_layer_precision.py --device cpu --res 128
    python benchmarks/last_layer_precision.py --device cuda --out last_layer_precision.json

LDM's adaptive weight is ||d rec / d W|| / ||d gan / d W|| x disc_weight at the decoder's last
conv W (``losses.adaptive_weight``). The step takes both gradients from the layer's input features
and the two gradients at the reconstruction in one weight-gradient convolution
(``losses.last_layer_grads``): today in fp32, which on CUDA is TF32 (torch's default for
convolutions) after copying the features to fp32 (1 GB at 256 px x 32). In bf16 the convolution
reads bf16 features and gradients and writes a bf16 result (fp32 accumulation): how the decoder's
own backward computes this layer's update under the step's autocast.

Measured on what the step feeds it: bundled photographs, the shipped tiny base's decoder under
bf16 autocast (its real features), the whole reconstruction loss (Oklab MAE + MSE + LPIPS) and the
critic's generator term (the critic at its seeded start, untrained: said in the output). Against
fp64 (the same features and gradients, widened exactly), per precision: each gradient's relative
error ||g - g64|| / ||g64|| and the adaptive weight's. On CUDA the TF32 row is the yardstick: an
error no larger than TF32's is one the recipe already accepts.
"""

import torch

from furlib.builtin import pretrain_photos
from furlib.images import preprocess
from furlib.models import load_vae
from furlib.runinfo import print_and_save
from furlib.training.losses import adaptive_weight, last_layer_grads
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer, step_generator
from lpips_precision import arguments, vgg_lpips  # beside this script (run as a script: on sys.path)

PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def step_inputs(res: int, batch: int, device: torch.device) -> tuple[Trainer, torch.Tensor, list]:
    """(a bf16 trainer on the tiny base, the decoder's last-conv features, [d rec, d gan] at the
    reconstruction), for ``batch`` bundled photographs at ``res`` px."""
    s = TrainSettings(batch_size=batch, resolution=res, mixed_precision="bf16", torch_compile="no",
                      phase_upsample="no", channels_last="no")
    t = Trainer(load_vae("tiny"), s, device, vgg_lpips())
    x = torch.stack([preprocess(path, res) for _, path in pretrain_photos()[:batch]]).to(device)
    z = t.encode(x, step_generator(t.device, s.seed, 0, 0))
    with torch.no_grad(), t.autocast():
        recon = t.vae.decode(z).sample
    features = t.tap.features
    grads, _ = t.leaf_grads(recon.detach().float().requires_grad_(True), x, gan_on=True)
    return t, features, grads


def main() -> None:
    args = arguments(__doc__)
    device = torch.device(args.device)
    t, features, grads = step_inputs(args.res, args.batch, device)
    conv = t.vae.decoder.conv_out
    ref = last_layer_grads(features.double(), [g.double() for g in grads], conv, torch.float64)  # conv: its shape
    w_ref = float(adaptive_weight(*ref, 1.0))
    rows = {}
    for mode in ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]:
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = mode != "fp32"
        got = last_layer_grads(features, grads, conv, PRECISIONS[mode])
        rows[mode] = {f"{name}_grad_rel_err": float((g.double() - r).norm() / r.norm())
                      for name, g, r in zip(("rec", "gan"), got, ref)}
        rows[mode]["weight_rel_err"] = abs(float(adaptive_weight(*got, 1.0)) - w_ref) / w_ref
    torch.backends.cudnn.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "trunk": t.rec_loss.lpips.source, "critic": "seeded start (untrained)", "images": len(features),
              "res": args.res, "features_dtype": str(features.dtype).removeprefix("torch."),
              "adaptive_weight_fp64": w_ref, "rows": rows}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
