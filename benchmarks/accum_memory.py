"""What keeping the whole step's adaptive weight under gradient accumulation costs (issue 26).

The step holds, from its first pass until each micro-batch's decoder backward, every
micro-batch's latents and its two gradients at the reconstruction (``trainer.MicroBatch``), and
decodes all but the last micro-batch twice. This script measures, on the CPU:
- the bytes held at the end of the first pass, at the Colab profile's layout (``params/colab_t4.yaml``:
  batch 32 as 4 micro-batches of 8, 256 px), by running that pass's own function
  (``Trainer.reconstruction_grads``) on each micro-batch; the shapes are SD's latent interface, so the
  bytes are the same for SD's VAE and on a GPU (fp32 tensors on the device), apart from the
  last conv's weight (given for SD too);
- what the step held before (per micro-batch: one micro-batch's records at a time), for the
  difference.
The compute cost is not timed here (two shared CPU cores time nothing reliably): it is one extra
decoder forward, without a graph, for every micro-batch but the last.

    PYTHONPATH=$PWD python benchmarks/accum_memory.py
"""

import argparse
import json

import torch

from furlib.models import load_vae
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer, step_generator

SD_CONV_OUT = (3, 128, 3, 3)  # sd-vae-ft-mse's decoder.conv_out.weight


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trainer(batch: int, accum: int) -> Trainer:
    s = TrainSettings(batch_size=batch, grad_accum=accum, warmup_steps=0, mixed_precision="no", lpips_weight=0.0,
                      latent_mode="mode", base_model="tiny")
    torch.manual_seed(0)
    return Trainer(load_vae("tiny"), s, "cpu")


@torch.no_grad()
def held_bytes(batch: int, accum: int, resolution: int) -> dict:
    """Bytes of the MicroBatch records after the first pass (the graph of the last one aside)."""
    t = trainer(batch, accum)
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    parts = []
    for micro in x.chunk(accum):
        z = t.encode(micro, step_generator(t.device, 0, 0, 0))
        with torch.enable_grad():
            parts.append(t.reconstruction_grads(micro, z, gan_on=True, keep_graph=False)[0])
    out = {"latents": nbytes(p.z for p in parts), "leaf_grads": nbytes(g for p in parts for g in p.leaf_grads),
           "last_layer_tiny": nbytes(parts[0].last_layer), "last_layer_sd": 2 * 4 * torch.Size(SD_CONV_OUT).numel()}
    out["total_sd_MiB"] = (out["latents"] + out["leaf_grads"] + out["last_layer_sd"]) / 2**20
    return out


def main(argv=None) -> dict:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    out = held_bytes(32, 4, 256)
    out["before_MiB"] = out["total_sd_MiB"] / 4  # the per-micro-batch step held one micro-batch's at a time
    out["extra_MiB"] = out["total_sd_MiB"] - out["before_MiB"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
