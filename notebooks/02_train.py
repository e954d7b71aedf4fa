# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Train
# Finetune the VAE decoder with the Furception recipe: Oklab L1/L2 + LPIPS, a layer-norm
# PatchGAN trained as a WGAN-GP critic with LDM's adaptive weight, and EMA weights.

# %%
# Setup: run from the repository root; on Colab, fetch the project and install it once.
import os, sys
if not os.path.isdir("furlib") and os.path.isdir("../furlib"):
    os.chdir("..")
if "google.colab" in sys.modules and not os.path.isdir("furlib"):
    raise RuntimeError("Clone the project first: !git clone <this repo> && %cd <repo> && %pip install -r requirements.txt")

# %%
import dataclasses
import json

import torch
from IPython.display import Image, display

from furlib.training import fit
from furlib import perceptual, runinfo
from furlib.training.settings import TrainSettings

# %% tags=["parameters"]
run_name = "demo"                         # outputs go to outputs_dir/run_name
outputs_dir = "outputs"
base_model = "stabilityai/sd-vae-ft-mse"  # hub id, diffusers folder, .safetensors, "tiny", "tiny-random" or "random:sd"
base_config = ""                          # diffusers folder with the config of a .safetensors base
device = "auto"                           # "auto", "cuda", "cpu"
num_gpus = 1                              # processes, one GPU each (accelerate); batch_size is per GPU
resolution = 256                          # training crop side, px (multiple of 8)
min_crop_scale = 0.08                     # smallest crop, as a fraction of the image area
num_workers = 4                           # data loader processes
pixel_cache = "auto"                      # decoded-PNG cache in data/pixel_cache: "auto" (fits half the free disk), "yes", "no"
batch_size = 32                           # images per optimizer step
grad_accum = 1                            # micro-batches per step (batch_size / grad_accum each)
max_steps = 150_000                       # optimizer steps
seed = 0
latent_mode = "sample"                    # "sample" the posterior or use its "mode"
color_space = "oklab"                     # pixel losses in "oklab" or "rgb"
mae_weight = 1.0                          # L1 weight at step 0
mae_weight_end = 1.0                      # L1 weight after loss_schedule_steps (cosine)
mse_weight = 1.0                          # L2 weight at step 0
mse_weight_end = 1.0                      # L2 weight after loss_schedule_steps
loss_schedule_steps = 0                   # 0: constant pixel-loss weights
lpips_weight = 1.0                        # LPIPS(VGG) weight
lpips_backbone = "pretrained"             # "pretrained", or "random" (offline opt-in, not perceptual)
disc_weight = 0.5                         # critic term's grad norm relative to the reconstruction's
gan_loss = "wgan-gp"                      # "wgan-gp", "hinge" (LDM) or "ns-r1"
gp_weight = 10.0                          # WGAN-GP lambda
r1_gamma = 10.0                           # R1 gamma for ns-r1
drift_weight = 0.0                        # WGAN drift term on real scores
critic_norm = "layer"                     # "layer", "channel", "batch" (LDM) or "none"
critic_input = "rgb"                      # critic reads "rgb" or "oklab"
critic_layers = 3                         # PatchGAN depth (3: 30x30 patches at 256 px)
critic_channels = 64                      # PatchGAN base width
critic_start = 0                          # step the critic starts training
gan_start = 0                             # step the decoder starts receiving the critic term
lr = 5e-7                                 # decoder learning rate after warm-up
critic_lr = 5e-7                          # critic learning rate after warm-up
adam_beta1 = 0.5
adam_beta2 = 0.9
weight_decay = 0.01                       # AdamW decoupled weight decay
warmup_steps = 5000                       # linear learning-rate warm-up, steps
lr_schedule = "constant"                  # "constant" or "cosine" after warm-up
grad_clip = 0.0                           # max decoder grad norm, 0: off
ema_decay = 0.0                           # 0: 0.999 at batch 192 scaled to batch_size
ema_ref_decay = 0.999
ema_ref_batch = 192
mixed_precision = "bf16"                  # "bf16", "fp16" (grad scaling, e.g. T4) or "no"
gradient_checkpointing = False            # trade compute for decoder activation memory
max_bad_steps = 20                        # consecutive non-finite steps before stopping
channels_last = "auto"                    # NHWC convolutions: "auto" (on CUDA when not compiled), "yes", "no"
torch_compile = "auto"                    # compile encoder, decoder, LPIPS, critic: "auto" (on CUDA), "yes", "no"
phase_upsample = "auto"                   # upsampling convs as 2x2 phase convs, same maths: "auto" (on CUDA), "yes", "no"
resume = True                             # continue the run's latest checkpoint (False: refuse to overwrite one)
checkpoint_every = 2000                   # steps between checkpoints
keep_checkpoints = 3                      # newest checkpoints kept
log_every = 10                            # steps between log rows
plot_every = 5000                         # steps between inline dashboards (0: only at the end)
preview_images = 4                        # fixed val images in the reconstruction strip

# %%
settings = TrainSettings(**{f.name: globals()[f.name] for f in dataclasses.fields(TrainSettings)})
settings.validate()
if resolution % 8 or resolution < 32:
    raise ValueError(f"resolution must be a multiple of 8 and at least 32, got {resolution}")
if min(checkpoint_every, log_every, num_gpus) < 1 or plot_every < 0:
    raise ValueError("checkpoint_every, log_every and num_gpus must be >= 1, plot_every >= 0")
if num_gpus > 1 and torch.cuda.device_count() < num_gpus:
    raise ValueError(f"num_gpus={num_gpus} but {torch.cuda.device_count()} CUDA GPUs are visible")
if settings.lpips_weight and lpips_backbone not in perceptual.BACKBONES:
    raise ValueError(f"lpips_backbone must be one of {perceptual.BACKBONES}")
dev = runinfo.pick_device(device)
run_path = runinfo.run_dir(outputs_dir, run_name)
params = runinfo.notebook_parameters("02_train", globals())
print(f"{num_gpus} x {dev}; images per step {batch_size * num_gpus}; "
      f"EMA decay {settings.ema_decay_for(batch_size * num_gpus):.6f}; run folder {run_path}")

# %% [markdown]
# ## 1. Train
# `furlib.training.fit` runs the loop: the frozen encoder gives latents, the decoder reconstructs, the
# Oklab/LPIPS gradients and the critic's are combined with LDM's adaptive weight, AdamW and the
# EMA step, then the critic's WGAN-GP step. Every `plot_every` steps it shows the loss curves and
# a strip original | base decoder | current | EMA on fixed val images. Checkpoints are atomic:
# interrupting this cell loses at most `checkpoint_every` steps, and running it again with
# `resume=True` continues exactly where the last checkpoint stopped.

# %%
def show(fig):
    display(fig)


if num_gpus == 1:
    fit.fit(params, show=show)
else:  # one process per GPU; figures are saved under train/ and shown below
    from accelerate import notebook_launcher

    notebook_launcher(fit.fit, (params,), num_processes=num_gpus)

# %% [markdown]
# ## 2. Where it ended
# Mean Oklab L1 to the originals on the preview images: base decoder, current weights, EMA.

# %%
results = json.loads((run_path / "train" / "results.json").read_text())
if num_gpus > 1:
    display(Image(filename=str(run_path / "train" / "dashboard.png")), Image(filename=str(run_path / "train" / "strip.png")))
print(f"step {results['step']}, {results['images_per_s']:.1f} images/s, {results['skipped_steps']} skipped steps",
      *results["notes"], sep="\n")
display(results["held_out_oklab_l1"])

# %%
runinfo.write_record(run_path / "02_train.record.json", params, results, dev)
