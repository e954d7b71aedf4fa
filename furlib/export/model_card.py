"""Stage 04's model card: Hugging Face YAML front matter and Markdown for ``export/README.md``.

It reads what the run left behind: ``02_train.record.json`` for the training parameters and
``eval/metrics.md`` (written by ``furlib.evaluation.report``) for the evaluation; a missing one is said.
"""

import json
from pathlib import Path

from furlib.export.release import EXPORT, release_stem
from furlib.models import is_pretrained


def _hub_base(base_model: str) -> str:
    """The base model's hub id for the card's metadata, or '' when it is local or not pretrained."""
    repo = base_model.partition("@")[0]
    local = Path(base_model).expanduser().exists()
    return repo if is_pretrained(base_model) and not local and repo.count("/") == 1 else ""


def _training_section(run_dir: Path, release: dict) -> str:
    record = Path(run_dir) / "02_train.record.json"
    kind = "EMA of the decoder" if release["weights"] == "ema" else "raw, not the EMA"
    lines = [f"- steps: {release['step']} (checkpoint `{Path(release['checkpoint']).name}`)",
             f"- released weights: {release['weights']} ({kind})"]
    if not record.exists():
        return "\n".join(lines + ["- no `02_train.record.json` was found: parameters unknown"])
    params = json.loads(record.read_text()).get("parameters", {})
    rows = [f"| `{k}` | `{json.dumps(v)}` |" for k, v in params.items()]
    return "\n".join(lines + ["", "| parameter | value |", "|---|---|"] + rows)


def _metrics_section(run_dir: Path) -> str:
    metrics = Path(run_dir) / "eval" / "metrics.md"
    return metrics.read_text().strip() if metrics.exists() else \
        "Evaluation (stage 03) was not run for this export: no metrics are claimed."


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

A Stable Diffusion VAE whose **decoder** was finetuned from `{base_model}`; the encoder and
`quant_conv` are the base model's, so latents are unchanged and it drops into pipelines that
use the base VAE.
{test_note}
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
{fp16_row}| `diffusers/` | diffusers folder (`config.json` + safetensors{fp16_variant}) |
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

vae = AutoencoderKL.from_pretrained("{where}", subfolder="diffusers")
pipe = StableDiffusionPipeline.from_pretrained("<an SD 1.x model>", vae=vae)
```

## Licence

{license}. The base model's licence (`{base_model}`) and the licences of the training images
may constrain how this model can be used and shared; check both before publishing.
"""


def model_card(run_dir: Path, release: dict, model_name: str, version: str, license: str,
               fp16_copy: bool = True, hub_repo: str = "") -> str:
    """The model card (Hugging Face YAML front matter + markdown) for ``export/README.md``."""
    base, hub_base = release["base_model"], _hub_base(release["base_model"])
    test_only = not is_pretrained(base)
    stem = release_stem(model_name, version, release["step"])
    return _CARD.format(
        license=license, base_model=base, model_name=model_name, version=version, stem=stem,
        base_line=f"base_model: {hub_base}\n" if hub_base else "",
        test_tag="- test-only\n" if test_only else "",
        test_note=(f"\n**Testing only:** `{base}` is a randomly initialised model, not a pretrained "
                   "VAE; these files exercise the pipeline and are useless for images.\n")
        if test_only else "",
        training=_training_section(run_dir, release), metrics=_metrics_section(run_dir),
        fp16_row=f"| `{stem}-fp16.safetensors` | the same in fp16 (half the size) |\n" if fp16_copy else "",
        fp16_variant=", plus the `fp16` variant" if fp16_copy else "",
        where=hub_repo or f"<path to>/{EXPORT}")
