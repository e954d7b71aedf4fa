"""Stable Diffusion VAE families: which diffusion models read a VAE's latents, and how to tell.

A family is a latent interface: latent channels, whether the 1x1 ``quant_conv`` /
``post_quant_conv`` exist, and the factors a diffusion model applies to the unscaled latent z,
``(z - shift_factor) * scaling_factor``. All four are kl-f8 VAEs of one architecture
(128-256-512-512 channels, 2 resnets a block); the shipped ``configs/<family>_vae/config.json``
are diffusers' own settings for each:

- ``sd``   Stable Diffusion 1.x/2.x: 4 channels, quant convs, scaling 0.18215
- ``sdxl`` SDXL: 4 channels, quant convs, scaling 0.13025 (``force_upcast``: fp16 overflows)
- ``sd3``  Stable Diffusion 3/3.5: 16 channels, no quant convs, scaling 1.5305, shift 0.0609
- ``flux`` FLUX.1: 16 channels, no quant convs, scaling 0.3611, shift 0.1159

A diffusers config names its family through these numbers (``of_config``). A single LDM file
does not: its keys give the channels and the quant convs only, so ``sd``/``sdxl`` and
``sd3``/``flux`` look the same (``candidates_of_file``), and ``base_family`` must say which.
"""

import math
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Family:
    name: str              # the base_family value
    title: str             # for people: "SDXL"
    latent_channels: int
    quant_conv: bool       # quant_conv and post_quant_conv present
    scaling_factor: float
    shift_factor: float    # 0.0 where the family has none
    models: str            # the diffusion models that read these latents
    pipeline: str          # the diffusers pipeline class
    example: str           # a hub id of that pipeline, for the card's usage example
    tags: tuple            # Hugging Face tags for the model card
    dtype: str             # torch dtype the family's pipelines are usually run in ('' : default)

    @property
    def config_dir(self) -> Path:
        return CONFIGS / f"{self.name}_vae"

    def factors(self) -> str:
        shift = f", shift factor {self.shift_factor}" if self.shift_factor else ", no shift factor"
        return f"scaling factor {self.scaling_factor}{shift}"

    def layout(self) -> str:
        quant = "with quant convs" if self.quant_conv else "without quant convs"
        return f"{self.latent_channels} latent channels {quant}"


FAMILIES = {f.name: f for f in (
    Family("sd", "Stable Diffusion 1.x/2.x", 4, True, 0.18215, 0.0,
           "Stable Diffusion 1.x and 2.x (and models finetuned from them)", "StableDiffusionPipeline",
           "stable-diffusion-v1-5/stable-diffusion-v1-5", ("stable-diffusion", "stable-diffusion-diffusers"), ""),
    Family("sdxl", "SDXL", 4, True, 0.13025, 0.0,
           "SDXL 1.0 base and refiner (and models finetuned from SDXL)", "StableDiffusionXLPipeline",
           "stabilityai/stable-diffusion-xl-base-1.0", ("stable-diffusion-xl", "sdxl"), ""),
    Family("sd3", "Stable Diffusion 3", 16, False, 1.5305, 0.0609,
           "Stable Diffusion 3 and 3.5 (and models finetuned from them)", "StableDiffusion3Pipeline",
           "stabilityai/stable-diffusion-3.5-medium", ("stable-diffusion-3", "sd3"), "bfloat16"),
    Family("flux", "FLUX.1", 16, False, 0.3611, 0.1159,
           "FLUX.1 [dev] and [schnell] (and models finetuned from them; not FLUX.2, whose VAE differs)",
           "FluxPipeline", "black-forest-labs/FLUX.1-dev", ("flux", "flux.1"), "bfloat16"),
)}
CHOICES = tuple(FAMILIES)


def get(name: str) -> Family:
    """The family called ``name``; a ValueError naming ``base_family`` and its choices otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"base_family={name!r}: must be one of {', '.join(CHOICES)} "
                         "(or empty to infer it from the base's config)")
    return FAMILIES[name]


def _close(a, b) -> bool:
    return math.isclose(float(a or 0.0), float(b or 0.0), rel_tol=0, abs_tol=5e-5)


def of_config(config) -> Family | None:
    """The family whose latent interface ``config`` (an ``AutoencoderKL`` config) has, or None."""
    c = dict(config)
    quant = (c.get("use_quant_conv", True), c.get("use_post_quant_conv", True))
    if len(c.get("block_out_channels", ())) != 4:  # kl-f8: three downsamplings
        return None
    for fam in FAMILIES.values():
        if (c.get("latent_channels") == fam.latent_channels and quant == (fam.quant_conv, fam.quant_conv)
                and _close(c.get("scaling_factor", 0.18215), fam.scaling_factor)
                and _close(c.get("shift_factor"), fam.shift_factor)):
            return fam
    return None


def describe_config(config) -> str:
    """A config's latent interface in words, for errors and cards."""
    c = dict(config)
    quant = c.get("use_quant_conv", True) and c.get("use_post_quant_conv", True)
    shift = c.get("shift_factor") or 0.0
    return (f"{c.get('latent_channels')} latent channels {'with' if quant else 'without'} quant convs, "
            f"scaling factor {c.get('scaling_factor', 0.18215)}" + (f", shift factor {shift}" if shift else ""))


def file_layout(shapes: dict) -> tuple[int, bool]:
    """(latent channels, quant convs present) of a single LDM file, from its {key: shape}.

    The latent channels are ``decoder.conv_in``'s inputs, as ComfyUI reads them; the quant convs
    count as present only when both are (a file with one of them is broken).
    """
    if "decoder.conv_in.weight" not in shapes:
        raise ValueError("no decoder.conv_in.weight: not a VAE in the LDM layout (or a decoder-less file)")
    quant = {"quant_conv.weight", "post_quant_conv.weight"} & set(shapes)
    if len(quant) == 1:
        raise ValueError(f"only {quant.pop()} of the two quant convs is present: the file is incomplete")
    return int(shapes["decoder.conv_in.weight"][1]), bool(quant)


def candidates_of_file(shapes: dict) -> list[Family]:
    """The families a single LDM file's keys fit (two, or none: the keys cannot tell more)."""
    channels, quant = file_layout(shapes)
    return [f for f in FAMILIES.values() if (f.latent_channels, f.quant_conv) == (channels, quant)]


def single_file_family(where: str, shapes: dict, base_family: str, stated: str = "") -> Family:
    """The family of a single file (``where``: what errors call it, e.g. "base_model 'ae.sft'"):
    ``base_family``, else the family its metadata
    ``stated`` (files this project exported say it), checked against the keys; a clear question
    when the keys fit two families and nothing says which."""
    channels, quant = file_layout(shapes)
    fits = candidates_of_file(shapes)
    layout = f"{channels} latent channels {'with' if quant else 'without'} quant convs"
    if not fits:
        raise ValueError(f"{where}: {layout} fits none of the known families "
                         f"({', '.join(CHOICES)}): pass base_config, a diffusers folder with its config.json")
    chosen = base_family or stated
    if chosen:
        fam = get(chosen)
        if fam not in fits:
            raise ValueError(f"base_family={chosen!r} ({fam.layout()}) does not fit {where}, "
                             f"which has {layout}: it is one of {', '.join(repr(f.name) for f in fits)}")
        return fam
    options = " or ".join(f"'{f.name}' ({f.title}: {f.factors()})" for f in fits)
    raise ValueError(f"{where} is a single LDM file with {layout}: its keys fit "
                     f"{' and '.join(f.title for f in fits)} alike, which differ only in their scaling/shift "
                     f"factors. Set base_family to {options}, or base_config to a diffusers folder with its config.json.")


def of_base(base_model: str, base_config: str = "", base_family: str = "") -> Family | None:
    """A base's family: ``base_family`` when given, else its config's; None where neither tells
    (a VAE of none of them, or a config that cannot be read: loading the base then says why)."""
    if base_family:
        return get(base_family)
    from furlib.models import base_vae_config  # (models imports this module)

    config = base_vae_config(base_model, base_config)
    return of_config(config) if config else None


def check_same_family(state: dict, base_model: str, base_config: str = "", base_family: str = "") -> None:
    """A base given to score or release a run (03's and 04's ``base_model``) must be of the family
    the run trained on (``state``: its checkpoint's). SD and SDXL VAEs have the same shapes, as have
    SD3 and FLUX.1's: another family's encoder would load, and its latents meet a decoder that never
    learnt to read them (scored as a bad finetune, or shipped under a card naming the wrong models)."""
    trained = of_base(state.get("base_model", ""), state.get("base_config", ""), state.get("base_family", ""))
    given = of_base(base_model, base_config, base_family)
    if trained and given and trained is not given:
        raise ValueError(f"base_model {base_model!r} is a {given.title} VAE ({given.factors()}), but the run's decoder "
                         f"trained on {trained.title} latents ({trained.factors()}, from {state.get('base_model', '')!r}): "
                         f"it cannot decode another family's latents. Leave base_model empty for the run's own "
                         f"base, or give a {trained.title} one")


def check_config(base_family: str, config, where: str) -> None:
    """``base_family``, when given, must be the family the loaded config has; never rewritten."""
    if not base_family:
        return
    fam, found = get(base_family), of_config(config)
    if found is not fam:
        what = f"{found.title}'s" if found else "no known family's"
        raise ValueError(f"base_family={base_family!r} ({fam.layout()}, {fam.factors()}) but {where} has "
                         f"{describe_config(config)}: {what} latents. Leave base_family empty to use the "
                         "config as it is, or pick a base of that family")
