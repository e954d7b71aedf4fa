"""Stage 04's model card: Hugging Face YAML front matter and Markdown for ``export/README.md``.

It reads what the run left behind: ``data/report.json`` (01) for the training data,
``02_train.record.json`` for the training parameters and ``eval/metrics.md`` (written by
``furlib.evaluation.eval_report``) for the evaluation; a missing one is said, never guessed.
"""

import json
from pathlib import Path

from furlib.export.release_files import EXPORT, Release, release_stem
from furlib.models import is_pretrained

# (latent channels, downscale factor, scaling factor) -> the models that read such latents.
# SD 1.x/2.x and SDXL VAEs share the kl-f8 architecture; only the scaling factor tells them apart.
_LATENT_FAMILIES = {
    (4, 8, 0.18215): ("Stable Diffusion 1.x and 2.x (and models finetuned from them)",
                      "SDXL, whose VAE has another latent space (scaling factor 0.13025), nor "
                      "SD 3 / Flux (16 latent channels)"),
    (4, 8, 0.13025): ("SDXL (and models finetuned from it)",
                      "SD 1.x/2.x, whose VAE has another latent space (scaling factor 0.18215), nor "
                      "SD 3 / Flux (16 latent channels)"),
}


def _hub_base(base_model: str) -> str:
    """The base model's hub id for the card's metadata, or '' when it is local or not pretrained."""
    repo = base_model.partition("@")[0]
    local = Path(base_model).expanduser().exists()
    return repo if is_pretrained(base_model) and not local and repo.count("/") == 1 else ""


def compatibility(base_model: str, vae_config) -> str:
    """Which diffusion models can use the release, from the shipped encoder's latent layout."""
    channels = vae_config["latent_channels"]
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    scale = round(float(vae_config.get("scaling_factor", 0.18215)), 5)
    layout = f"kl-f{factor} latents, {channels} channels, scaling factor {scale}"
    if not is_pretrained(base_model):
        return f"None: `{base_model}` is a random test VAE ({layout}); no diffusion model reads its latents."
    family = _LATENT_FAMILIES.get((channels, factor, scale))
    if family is None:
        return (f"The encoder is `{base_model}`'s ({layout}): use it only with diffusion models "
                "trained on that VAE's latents.")
    return (f"The encoder is `{base_model}`'s, so latents are unchanged ({layout}): a drop-in decoder "
            f"for **{family[0]}**. Not for {family[1]}.")


def _data_section(run_dir: Path, training_data: str) -> str:
    said = training_data.strip() or ("*Not described: say here what the images are, where they come "
                                     "from and under which licence, before publishing.*")
    report_path = Path(run_dir) / "data" / "report.json"
    if not report_path.exists():
        return said + "\n\nNo `data/report.json` was found: the prepared data is not recorded."
    report = json.loads(report_path.read_text())
    counts, settings = report.get("counts", {}), report.get("settings", {})
    source = report.get("source", "?")
    builtin = " (the project's drawn flat-colour sample images, not real artwork)" if source == "builtin" else ""
    return "\n".join([said, "", f"- source: `{source}`{builtin}",
                      f"- {counts.get('train', '?')} training and {counts.get('val', '?')} held-out "
                      f"images (split by content hash; the held-out ones were never trained on), "
                      f"from {counts.get('inputs', '?')} inputs: {counts.get('rejected', '?')} rejected, "
                      f"{counts.get('duplicates', '?')} duplicates (each listed in `data/report.json`)",
                      f"- stored with the long side at most {settings.get('max_side', '?')} px; trained "
                      f"on random square crops of {settings.get('resolution', '?')} px"])


def _training_section(run_dir: Path, release: Release) -> str:
    record = Path(run_dir) / "02_train.record.json"
    kind = "EMA of the decoder" if release.weights == "ema" else "raw, not the EMA"
    lines = [f"- steps: {release.step} (checkpoint `{Path(release.checkpoint).name}`)",
             f"- released weights: {release.weights} ({kind})"]
    if not record.exists():
        return "\n".join(lines + ["- no `02_train.record.json` was found: parameters unknown"])
    params = json.loads(record.read_text()).get("parameters", {})
    rows = [f"| `{k}` | `{json.dumps(v)}` |" for k, v in params.items()]
    return "\n".join(lines + ["", "| parameter | value |", "|---|---|"] + rows)


def _metrics_section(run_dir: Path, step: int) -> str:
    """03's table, labelled when it evaluated another step than this release's (a resumed run)."""
    metrics = Path(run_dir) / "eval" / "metrics.md"
    if not metrics.exists():
        return "Evaluation (stage 03) was not run for this export: no metrics are claimed."
    summary = Path(run_dir) / "eval" / "metrics.json"
    models = json.loads(summary.read_text()).get("models", {}) if summary.exists() else {}
    steps = {m.get("step") for m in models.values()} - {None}
    if steps != {step}:
        evaluated = ", ".join(map(str, sorted(steps))) or "an unrecorded step"
        return (f"**These numbers are of step {evaluated}, not of this release (step {step}): re-run "
                f"03_eval for this release's own.**\n\n" + metrics.read_text().strip())
    return metrics.read_text().strip()


_CARD = """---
license: {license}
{base_line}tags:
- stable-diffusion
- vae
- autoencoder
- diffusers
{test_tag}library_name: diffusers
---

# {model_name} v{version}

A Stable Diffusion VAE whose **decoder** was finetuned from `{base_model}` with the Furception
v1.0 recipe (this is a new model trained with that recipe, not the Furception release). The
encoder and `quant_conv` are the base model's.
{test_note}
## Compatibility

{compatibility}
{picture}
## Training data

{data}

## Recipe

The Furception v1.0 recipe as implemented by this project (the parameters below say what this
run used): MAE + MSE in Oklab plus LPIPS, weighted in plain-mean units (the card's MAE 1 :
MSE 5 : LPIPS 1 is the author's MSE 10 on half the squared error); a PatchGAN critic with layer
norms (`critic_norm`: `pixel_layer` normalises the channels at each pixel, as Flax's
`nn.LayerNorm` in the card's model; `sample_layer` each sample over C, H, W) trained as a
WGAN-GP critic, weighted each step so its gradient norm is half the reconstruction's; EMA weights.

{training}

## Evaluation

{metrics}

## Files

| file | use |
|---|---|
| `{stem}.safetensors` | single file, original LDM key names, encoder included, fp32 (A1111, ComfyUI) |
{fp16_row}| `config.json`, `diffusion_pytorch_model.safetensors` | diffusers files at the root{fp16_variant} |
| `manifest.json` | sizes, SHA-256 and the reload checks every file passed |

## Use

- **AUTOMATIC1111**: copy `{stem}.safetensors` into `stable-diffusion-webui/models/VAE/` and
  choose it under Settings → Stable Diffusion → SD VAE. If images come out black in half
  precision, start with `--no-half-vae`.
- **ComfyUI**: copy it into `ComfyUI/models/vae/` and load it with a *Load VAE* node wired into
  *VAE Decode*.
- **diffusers**:

```python
from diffusers import AutoencoderKL, StableDiffusionPipeline

vae = AutoencoderKL.from_pretrained("{where}")
pipe = StableDiffusionPipeline.from_pretrained("<an SD 1.x model>", vae=vae)
```

## Licence

{license}. The base model's licence (`{base_model}`) and the licences of the training images
may constrain how this model can be used and shared; check both before publishing.
"""


def model_card(run_dir: Path, release: Release, vae_config, model_name: str, version: str, license: str,
               fp16_copy: bool = True, hub_repo: str = "", training_data: str = "", picture: str = "") -> str:
    """The model card (Hugging Face YAML front matter + markdown) for ``export/README.md``.

    ``vae_config``: the released VAE's config (its latent layout decides compatibility);
    ``training_data``: the user's words on the images; ``picture``: an image file beside the card.
    """
    base, hub_base = release.base_model, _hub_base(release.base_model)
    test_only = not is_pretrained(base)
    stem = release_stem(model_name, version, release.step)
    return _CARD.format(
        license=license, base_model=base, model_name=model_name, version=version, stem=stem,
        base_line=f"base_model: {hub_base}\n" if hub_base else "",
        test_tag="- test-only\n" if test_only else "",
        test_note=(f"\n**Testing only:** `{base}` is a randomly initialised model, not a pretrained "
                   "VAE; these files exercise the pipeline and are useless for images.\n")
        if test_only else "",
        compatibility=compatibility(base, vae_config),
        picture=f"\n![input, base decoder, this decoder on held-out images]({picture})\n" if picture else "",
        data=_data_section(run_dir, training_data),
        training=_training_section(run_dir, release), metrics=_metrics_section(run_dir, release.step),
        fp16_row=f"| `{stem}-fp16.safetensors` | the same in fp16 (half the size) |\n" if fp16_copy else "",
        fp16_variant=" (`variant=\"fp16\"`: `diffusion_pytorch_model.fp16.safetensors`)" if fp16_copy else "",
        where=hub_repo or f"<path to>/{EXPORT}")
