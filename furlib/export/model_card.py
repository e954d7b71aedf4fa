"""Stage 04's model card: Hugging Face YAML front matter and Markdown for ``export/README.md``.

It reads what the run left behind: ``data/report.json`` (01) for the training data,
``02_train.record.json`` for the training parameters and ``eval/metrics.md`` (written by
``furlib.evaluation.eval_report``) for the evaluation; a missing one is said, never guessed.
"""

import json
from pathlib import Path

from furlib import families
from furlib.export.release_files import EXPORT, Release, public_name, release_stem
from furlib.models import is_pretrained
from furlib.runinfo import read_json

# Where each family's single file goes: (apps for the files table, the card's "Use" bullets).
_A1111 = ("- **AUTOMATIC1111**: copy `{stem}.safetensors` into `stable-diffusion-webui/models/VAE/` and\n"
          "  choose it under Settings → Stable Diffusion → SD VAE.{half}")
_COMFY = ("- **ComfyUI**: copy `{stem}.safetensors` into `ComfyUI/models/vae/` and load it with a *Load VAE*\n"
          "  node wired into *VAE Decode*.")
_FORGE = ("- **Stable Diffusion WebUI Forge**: copy `{stem}.safetensors` into `models/VAE/` and pick it in the\n"
          "  *VAE / Text Encoder* selector.")
_APPS = {"sd": ("A1111, ComfyUI", (_A1111, _COMFY)), "sdxl": ("A1111, ComfyUI", (_A1111, _COMFY)),
         "sd3": ("ComfyUI", (_COMFY,)), "flux": ("ComfyUI, Forge", (_COMFY, _FORGE))}
_HALF = {"sd": " If images come out black in half precision, start it with `--no-half-vae`.",
         "sdxl": " SDXL's VAE overflows in fp16 (black images) unless it is an fp16-fixed one: start it "
                 "with `--no-half-vae` if you see that."}


def _hub_base(base_model: str) -> str:
    """The base model's hub id for the card's metadata, or '' when it is local or not pretrained."""
    repo = base_model.partition("@")[0]
    local = Path(base_model).expanduser().exists()
    return repo if is_pretrained(base_model) and not local and repo.count("/") == 1 else ""


def _layout(vae_config) -> str:
    c = dict(vae_config)
    factor = 2 ** (len(c["block_out_channels"]) - 1)
    shift = c.get("shift_factor") or 0.0
    return (f"kl-f{factor} latents, {c['latent_channels']} channels, scaling factor "
            f"{round(float(c.get('scaling_factor', 0.18215)), 5)}" + (f", shift factor {shift}" if shift else ""))


def compatibility(base_model: str, vae_config) -> str:
    """Which diffusion models can use the release, from the shipped encoder's latent interface."""
    layout, base = _layout(vae_config), public_name(base_model)
    if not is_pretrained(base_model):
        return f"None: `{base}` is a random test VAE ({layout}); no diffusion model reads its latents."
    fam = families.of_config(vae_config)
    if fam is None:
        return (f"The encoder is `{base}`'s ({layout}), a latent interface of none of the known families "
                f"({', '.join(f.title for f in families.FAMILIES.values())}): use it only with diffusion "
                "models trained on that VAE's latents.")
    others = "; ".join(f"{f.title} ({f.layout()}, {f.factors()})" for f in families.FAMILIES.values() if f is not fam)
    return (f"Family: **{fam.title}** (`{fam.name}`): {fam.layout()}, {fam.factors()}.\n\n"
            f"The encoder is `{base}`'s, so latents are unchanged ({layout}): a drop-in decoder "
            f"for **{fam.models}**. Not for {others}: their latents differ.")


def _diffusers_code(fam, where: str) -> str:
    """The family's pipeline with this VAE, or plain ``AutoencoderKL`` for an unknown family."""
    dtype = f", torch_dtype=torch.{fam.dtype}" if fam and fam.dtype else ""
    imports = "import torch\n" if dtype else ""
    vae = f'vae = AutoencoderKL.from_pretrained("{where}"{dtype})'
    decode = "image = vae.decode(latents / vae.config.scaling_factor{shift}).sample  # latents as the model made them"
    if fam is None:
        return "\n".join(["from diffusers import AutoencoderKL", "", vae,
                          decode.format(shift=" + (vae.config.shift_factor or 0)")])
    shift = " + vae.config.shift_factor" if fam.shift_factor else ""
    return "\n".join([f"{imports}from diffusers import AutoencoderKL, {fam.pipeline}", "", vae,
                      f'pipe = {fam.pipeline}.from_pretrained("{fam.example}", vae=vae{dtype})', "",
                      f"# decoding latents yourself: {fam.factors()}", "# " + decode.format(shift=shift)])


def _use_section(fam, stem: str, where: str, force_upcast: bool) -> str:
    bullets = _APPS[fam.name][1] if fam else ()
    half = _HALF.get(fam.name, "") if fam else ""
    lines = [b.format(stem=stem, half=half) for b in bullets]
    if not fam:
        lines.append(f"- **UIs**: `{stem}.safetensors` loads where the base VAE's single file loads.")
    upcast = " (its config sets `force_upcast`: diffusers decodes in fp32 whatever the pipeline's dtype)" \
        if force_upcast and fam and fam.name == "sdxl" else ""
    lines.append(f"- **diffusers**{upcast}:\n\n```python\n{_diffusers_code(fam, where)}\n```")
    return "\n".join(lines)


def _data_section(run_dir: Path, training_data: str) -> str:
    said = training_data.strip() or ("*Not described: say here what the images are, where they come "
                                     "from and under which licence, before publishing.*")
    report_path = Path(run_dir) / "data" / "report.json"
    if not report_path.exists():
        return said + "\n\nNo `data/report.json` was found: the prepared data is not recorded."
    report = read_json(report_path, "run 01_data_prep again with this run_name (it rewrites report.json)")
    counts, settings = report.get("counts", {}), report.get("settings", {})
    source = public_name(str(report.get("source", "?")))
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
    params = read_json(record, "run 02_train again with this run_name (it resumes and rewrites it)").get("parameters", {})
    rows = [f"| `{k}` | `{json.dumps(public_name(v) if isinstance(v, str) else v)}` |" for k, v in params.items()]
    return "\n".join(lines + ["", "| parameter | value |", "|---|---|"] + rows)


def _metrics_section(run_dir: Path, step: int) -> str:
    """03's table, labelled when it evaluated another step than this release's (a resumed run)."""
    metrics = Path(run_dir) / "eval" / "metrics.md"
    if not metrics.exists():
        return "Evaluation (stage 03) was not run for this export: no metrics are claimed."
    summary = Path(run_dir) / "eval" / "metrics.json"
    models = read_json(summary, "run 03_eval again with this run_name", {}).get("models", {})
    steps = {m.get("step") for m in models.values()} - {None}
    if steps != {step}:
        evaluated = ", ".join(map(str, sorted(steps))) or "an unrecorded step"
        return (f"**These numbers are of step {evaluated}, not of this release (step {step}): re-run "
                f"03_eval for this release's own.**\n\n" + metrics.read_text().strip())
    return metrics.read_text().strip()


_CARD = """---
license: {license}
{base_line}tags:
{tags}library_name: diffusers
---

# {model_name} v{version}

A {family} VAE whose **decoder** was finetuned from `{base_model}` with the Furception
v1.0 recipe (this is a new model trained with that recipe, not the Furception release). The
{encoder_side} the base model's.
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
| `{stem}.safetensors` | single file, original LDM key names, encoder included, fp32 ({apps}) |
{fp16_row}| `config.json`, `diffusion_pytorch_model.safetensors` | diffusers files at the root{fp16_variant} |
| `manifest.json` | sizes, SHA-256 and the reload checks every file passed |

## Use

{use}

## Licence

{license}. The base model's licence (`{base_model}`) and the licences of the training images
may constrain how this model can be used and shared; check both before publishing.
"""


def model_card(run_dir: Path, release: Release, vae_config, model_name: str, version: str, license: str,
               fp16_copy: bool = True, hub_repo: str = "", training_data: str = "", picture: str = "",
               checks: list | tuple = ()) -> str:
    """The model card (Hugging Face YAML front matter + markdown) for ``export/README.md``.

    ``vae_config``: the released VAE's config (its latent interface decides the family and the
    compatibility); ``training_data``: the user's words on the images; ``picture``: an image file
    beside the card; ``checks``: ``verify_export``'s results (an fp16 overflow is said).
    No local path reaches the card (``public_name``).
    """
    overflow = any(c.get("fp16_decode") == "overflow" for c in checks)
    half = ("**decodes to non-finite values (black images) in float16**: load it in fp32 (`--no-half-vae`, "
            "`torch_dtype=torch.float32`); it only halves the download" if overflow else "half the size")
    base, hub_base = public_name(release.base_model), _hub_base(release.base_model)
    test_only = not is_pretrained(release.base_model)
    fam = families.of_config(vae_config)  # a random test base has a family's layout too: not its tags
    stem = release_stem(model_name, version, release.step)
    quant = dict(vae_config).get("use_quant_conv", True)
    tags = ["vae", "autoencoder", "diffusers", *(fam.tags if fam and not test_only else ()), *(["test-only"] if test_only else [])]
    return _CARD.format(
        license=license, base_model=base, model_name=model_name, version=version, stem=stem,
        base_line=f"base_model: {hub_base}\n" if hub_base else "",
        tags="".join(f"- {t}\n" for t in tags), family=fam.title if fam else "latent-diffusion",
        encoder_side="encoder and `quant_conv` are" if quant else "encoder is",
        test_note=(f"\n**Testing only:** `{base}` is a randomly initialised model, not a pretrained "
                   "VAE; these files exercise the pipeline and are useless for images.\n")
        if test_only else "",
        compatibility=compatibility(release.base_model, vae_config),
        picture=f"\n![input, base decoder, this decoder on held-out images]({picture})\n" if picture else "",
        data=_data_section(run_dir, training_data),
        training=_training_section(run_dir, release), metrics=_metrics_section(run_dir, release.step),
        fp16_row=f"| `{stem}-fp16.safetensors` | the same in fp16 ({half}) |\n" if fp16_copy else "",
        fp16_variant=" (`variant=\"fp16\"`: `diffusion_pytorch_model.fp16.safetensors`)" if fp16_copy else "",
        apps=_APPS[fam.name][0] if fam else "loaders of the base's single file",
        use=_use_section(fam, stem, hub_repo or f"<path to>/{EXPORT}", bool(dict(vae_config).get("force_upcast"))))
