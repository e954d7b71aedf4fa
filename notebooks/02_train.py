# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
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
sys.path.insert(0, os.getcwd())

# %%
import dataclasses
import time

import matplotlib.pyplot as plt
import torch
from IPython.display import display
from tqdm.auto import tqdm

from furlib import checkpoint, crops, models, perceptual, plots, runinfo
from furlib.logbook import Logbook
from furlib.train import TrainSettings
from furlib.trainer import Trainer

# %% tags=["parameters"]
run_name = "demo"                         # outputs go to outputs_dir/run_name
outputs_dir = "outputs"
base_model = "stabilityai/sd-vae-ft-mse"  # hub id, diffusers folder, .safetensors, "tiny" or "random:sd"
base_config = ""                          # diffusers folder with the config of a .safetensors base
device = "auto"                           # "auto", "cuda", "cpu"
resolution = 256                          # training crop side, px (multiple of 8)
min_crop_scale = 0.08                     # smallest crop, as a fraction of the image area
num_workers = 4                           # data loader processes
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
channels_last = "auto"                    # NHWC convolutions: "auto" (on CUDA), "yes", "no"
torch_compile = "auto"                    # compile encoder, decoder, LPIPS: "auto" (on CUDA), "yes", "no"
resume = True                             # continue from the run's latest checkpoint
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
if min(checkpoint_every, log_every) < 1 or plot_every < 0:
    raise ValueError("checkpoint_every and log_every must be >= 1, plot_every >= 0")
if settings.lpips_weight and lpips_backbone not in perceptual.BACKBONES:
    raise ValueError(f"lpips_backbone must be one of {perceptual.BACKBONES}")
dev = runinfo.pick_device(device)
run_path = runinfo.run_dir(outputs_dir, run_name)
data_dir = run_path / "data"
train_dir, val_dir = data_dir / "train", data_dir / "val"
if not crops.list_images(train_dir):
    raise ValueError(f"no training images in {train_dir}: run 01_data_prep with run_name={run_name!r} first")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
print(f"device {dev}; effective EMA decay {settings.effective_ema_decay:.6f}; run folder {run_path}")

# %% [markdown]
# ## 1. Model and perceptual loss
# The encoder and `quant_conv` stay frozen; the decoder and `post_quant_conv` train.

# %%
vae = models.load_vae(base_model, base_config, seed)
lpips = perceptual.LPIPS("vgg", lpips_backbone, seed) if lpips_weight else None
notes = [] if models.is_pretrained(base_model) else [f"base_model={base_model!r} is randomly initialised, not pretrained"]
if lpips is not None:
    notes.append(perceptual.lpips_note(lpips_backbone))
print(models.describe(vae), *notes, sep="\n")

# %% [markdown]
# ## 2. Trainer, resume, and the fixed preview images

# %%
trainer = Trainer(vae, settings, dev, lpips)
preview = crops.center_crops(crops.list_images(val_dir)[:preview_images] or crops.list_images(train_dir)[:preview_images], resolution)
base_preview = trainer.reconstruct(preview)  # before any checkpoint is loaded: the base decoder
latest = checkpoint.latest_checkpoint(run_path) if resume else None
if latest is not None:
    trainer.load(latest)
    print(f"resumed from {latest} at step {trainer.step_count}")
logbook = Logbook(run_path / "logs", resume_step=trainer.step_count)


def show_progress(title):
    columns = {"original": preview, "base": base_preview, "current": trainer.reconstruct(preview),
               "EMA": trainer.reconstruct(preview, ema=True)}
    logbook.image("preview", plots.strip_grid(columns), trainer.step_count)
    for fig in (plots.training_dashboard(logbook.history), plots.reconstruction_strip(columns, title)):
        display(fig)
        plt.close(fig)


# %% [markdown]
# ## 3. Train
# Checkpoints are atomic; interrupting this cell loses at most `checkpoint_every` steps, and
# re-running the notebook with `resume=True` continues exactly where the last one stopped.

# %%
loader = crops.make_loader(train_dir, resolution, batch_size, seed=seed, start_step=trainer.step_count,
                           num_workers=num_workers, min_crop_scale=min_crop_scale, pin_memory=dev.type == "cuda")
ckpt_root, t_start, start_step = run_path / "checkpoints", time.time(), trainer.step_count
bar = tqdm(total=max_steps * batch_size, initial=start_step * batch_size, unit="img", unit_scale=True, desc="train")
for batch in loader:
    if trainer.step_count >= max_steps:
        break
    logs = trainer.step(batch)
    bar.update(batch_size)
    if trainer.step_count % log_every == 0 or trainer.step_count == max_steps:
        row = logbook.log(trainer.step_count, logs)
        bar.set_postfix(rec=f"{row['rec/total']:.4f}", w=f"{row.get('gan/weight', 0):.3g}", skipped=trainer.skipped)
    if trainer.step_count % checkpoint_every == 0:
        trainer.save(ckpt_root, keep_checkpoints, base_model=base_model, base_config=base_config)
    if plot_every and trainer.step_count % plot_every == 0:
        show_progress(f"step {trainer.step_count}")
bar.close()
final_ckpt = trainer.save(ckpt_root, keep_checkpoints, base_model=base_model, base_config=base_config)
images_per_s = (trainer.step_count - start_step) * batch_size / max(time.time() - t_start, 1e-9)
print(f"saved {final_ckpt}; {images_per_s:.1f} images/s; {trainer.skipped} skipped steps")

# %% [markdown]
# ## 4. Where it ended
# Loss curves, and the preview strip: original | base decoder | current weights | EMA weights.

# %%
show_progress(f"after {trainer.step_count} steps")
held_out = trainer.held_out_errors(preview, base_preview)
display(held_out)

# %%
results = dict(step=trainer.step_count, skipped_steps=trainer.skipped, images_per_s=images_per_s,
               checkpoint=str(final_ckpt), effective_ema_decay=settings.effective_ema_decay,
               held_out_oklab_l1=held_out, notes=notes, last_log=logbook.history[-1] if logbook.history else {})
logbook.close()
runinfo.write_record(run_path / "02_train.record.json", runinfo.notebook_parameters("02_train", globals()), results, dev)
