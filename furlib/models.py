"""Loading Stable Diffusion VAEs (diffusers ``AutoencoderKL``) and splitting what trains.

``base_model`` names a VAE in one of these forms:
- a Hugging Face Hub id (``stabilityai/sd-vae-ft-mse``) or ``id@subfolder`` (``repo@vae``);
- a local diffusers folder (``config.json`` + weights);
- a single-file ``.safetensors`` (or ``.sft``), LDM or diffusers layout: ``furlib.single_file``;
- ``tiny``: the project's own small *pretrained* VAE (5.3 M parameters, SD's latent interface:
  KL, factor 8, 4 latents), shipped in ``furlib/assets/tiny_base`` as fp16 safetensors and made
  by ``scripts/pretrain_base.py`` on the built-in set; accurate but smooth, for offline CPU runs;
- ``tiny-random``: a small seeded random ``AutoencoderKL`` for timing and unit tests, with the
  latent interface of ``base_family`` (default ``sd``);
- ``random:sd``, ``random:sdxl``, ``random:sd3``, ``random:flux``: that family's architecture with
  random weights, for offline GPU timing.
``tiny-random`` and ``random:*`` are not pretrained: reports of runs on them say so.
``base_family``, when given, must agree with what the base is; a config is never rewritten.
"""

import os
from pathlib import Path

import torch

from furlib import families
from furlib.single_file import (SAFETENSORS_SUFFIXES, check_weights, load_single_file, mismatch_advice, named,
                                single_file_config)

SD_VAE_CONFIG = Path(__file__).parent / "configs" / "sd_vae"
TINY_BASE_DIR = Path(__file__).parent / "assets" / "tiny_base"
TINY_BASE_WEIGHTS = "diffusion_pytorch_model.fp16.safetensors"
# The shipped base's architecture (scripts/pretrain_base.py builds it from this).
TINY_BASE_CONFIG = dict(
    block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=16, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=96,
)
RANDOM_BASES = ("tiny-random", *(f"random:{name}" for name in families.CHOICES))
TINY_CONFIG = dict(  # tiny-random's
    block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
)
OFFLINE_HINT = (
    "Without the Hub, use instead: a local diffusers folder, a single-file .safetensors VAE, 'tiny' "
    "(the small pretrained VAE shipped here, for CPU runs), 'tiny-random' (small, random, for timing "
    "and tests) or 'random:sd' (SD architecture, random weights, for timing; also random:sdxl, "
    "random:sd3, random:flux). "
    "With internet (Colab/Kaggle) the hub id works as given."
)
TRAINABLE_PREFIXES = ("decoder.", "post_quant_conv.")  # the rest (encoder, quant_conv) stays frozen


def is_pretrained(base_model: str) -> bool:
    return base_model not in RANDOM_BASES


def load_vae(base_model: str, base_config: str = "", seed: int = 0, base_family: str = "",
             what: str = "base_model"):
    """Return an fp32 ``AutoencoderKL`` in eval mode on the CPU; raises with a clear message.

    ``base_family`` ('sd', 'sdxl', 'sd3', 'flux' or ''): a single file's family, a random base's
    layout, and for every other base a check that its config is that family's. ``what``: the
    parameter ``base_model`` was given as, which the errors name (03's 'compare entry')."""

    where = f"{what} {base_model!r}"
    if base_family:
        families.get(base_family)  # a misspelt family fails before any loading
    if base_model in RANDOM_BASES:
        return _random_vae(base_model, seed, base_family, where)
    path = Path(base_model).expanduser()
    if path.suffix in (*SAFETENSORS_SUFFIXES, ".ckpt", ".pt", ".bin"):
        return load_single_file(path, base_config, base_family, where)
    if base_model == "tiny":
        vae = load_tiny_base()
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{where}: the folder has no config.json, so it is not a diffusers VAE folder")
        if not list(path.glob("*.safetensors")):  # diffusers would torch.load a .bin: refuse, never unpickle
            raise ValueError(f"{where}: the folder has no .safetensors weights (only "
                             f"{sorted(p.name for p in path.iterdir() if p.name != 'config.json')}): pickled "
                             "weights are not loaded; convert them to safetensors first")
        for weights in path.glob("diffusion_pytorch_model.safetensors"):  # what diffusers reads
            check_file_dtypes(weights)
        vae = check_loaded(_from_pretrained(path, use_safetensors=True), path)
    elif path.exists() or base_model.startswith((".", "/", "~")):
        raise ValueError(f"{where}: no such diffusers folder or .safetensors file")
    else:
        vae = _load_from_hub(base_model, where)
    families.check_config(base_family, vae.config, where)
    return vae


def _random_vae(base_model: str, seed: int, base_family: str, where: str):
    """``tiny-random`` in ``base_family``'s latent interface, or ``random:<family>``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    if base_model == "tiny-random":
        fam = families.get(base_family or "sd")
        return AutoencoderKL(**{**TINY_CONFIG, **family_settings(fam)}).eval()
    fam = families.get(base_model.split(":", 1)[1])
    if base_family and base_family != fam.name:
        raise ValueError(f"base_family={base_family!r} contradicts {where}: leave it empty")
    return AutoencoderKL.from_config(AutoencoderKL.load_config(fam.config_dir)).eval()


def family_settings(fam) -> dict:
    """The ``AutoencoderKL`` arguments that make a family's latent interface (any architecture)."""
    return dict(latent_channels=fam.latent_channels, use_quant_conv=fam.quant_conv,
                use_post_quant_conv=fam.quant_conv, scaling_factor=fam.scaling_factor,
                shift_factor=fam.shift_factor or None)


def load_tiny_base(folder: Path = TINY_BASE_DIR):
    """The shipped pretrained base: config.json + fp16 safetensors, loaded as fp32, no network."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    weights = Path(folder) / TINY_BASE_WEIGHTS
    if not weights.exists():
        raise ValueError(f"the shipped 'tiny' base lacks {weights}; remake it with "
                         "scripts/pretrain_base.py (benchmarks/RESULTS.md has the command) or reinstall furlib")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(Path(folder)))
    tensors = load_file(weights)
    check_weights(tensors, weights)
    vae.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return vae.eval()


def check_file_dtypes(path: Path) -> None:
    """The dtypes in a safetensors header (no tensor is read): floating point only."""
    from safetensors import safe_open

    with named(path), safe_open(str(path), "pt") as f:
        ints = [f"{k} ({f.get_slice(k).get_dtype()})" for k in f.keys()
                if not f.get_slice(k).get_dtype().startswith(("F", "BF"))]
    if ints:
        raise ValueError(f"{path}: {len(ints)} tensor(s) are not floating point, e.g. {ints[:3]}: not VAE "
                         "weights, or a damaged conversion; use the original fp32/fp16 file")


def check_loaded(vae, source):
    """``vae`` back when every weight it loaded from ``source`` is finite."""
    check_weights(vae.state_dict(), source)
    return vae.eval()


def _load_from_hub(base_model: str, where: str):
    from diffusers import AutoencoderKL

    from furlib.runinfo import hub_unreachable

    repo, _, subfolder = base_model.partition("@")
    unreachable = hub_unreachable() or ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "")
    try:  # with the Hub out of reach, only the local cache: fail in ms, not after retries
        vae = AutoencoderKL.from_pretrained(repo, subfolder=subfolder or None, use_safetensors=True,
                                            local_files_only=bool(unreachable))
    except OSError as err:  # diffusers reports both "offline" and "no such repo" as OSError
        ours = (f"{where} is a Hugging Face Hub id, but the Hub cannot be reached "
                f"({unreachable}) and it is not in the local cache. {OFFLINE_HINT}") if unreachable else \
            (f"{where}: the Hugging Face Hub has no such VAE (or refused it): check "
             f"the id, e.g. 'stabilityai/sd-vae-ft-mse' or 'repo@subfolder'. {OFFLINE_HINT}")
        raise RuntimeError(f"{ours}\n(diffusers said: {err})") from err
    return check_loaded(vae, where)


def base_vae_config(base_model: str, base_config: str = "", base_family: str = "") -> dict | None:
    """The config ``load_vae`` would build, without loading weights (a hub config is a small
    download). None where loading itself would fail and say why (a bad path, the Hub out of reach)."""
    from diffusers import AutoencoderKL

    from furlib.runinfo import hub_unreachable

    path = Path(base_model).expanduser()
    try:
        if base_model == "tiny-random":
            return {**TINY_CONFIG, **family_settings(families.get(base_family or "sd"))}
        if base_model.startswith("random:") or base_model == "tiny":
            where = TINY_BASE_DIR if base_model == "tiny" else families.get(base_model.split(":", 1)[1]).config_dir
            return dict(AutoencoderKL.load_config(where))
        if path.suffix in SAFETENSORS_SUFFIXES and path.is_file():
            return dict(single_file_config(path, base_config, base_family)[0])
        if path.is_dir() and (path / "config.json").exists():
            return dict(AutoencoderKL.load_config(path))
        if path.exists() or base_model.startswith((".", "/", "~")) or path.suffix in (*SAFETENSORS_SUFFIXES, ".ckpt"):
            return None
        repo, _, subfolder = base_model.partition("@")
        return dict(AutoencoderKL.load_config(repo, subfolder=subfolder or None,
                                              local_files_only=bool(hub_unreachable())))
    except (OSError, ValueError):  # load_vae raises the same, with the project's words
        return None


def _from_pretrained(path: Path, **kwargs):
    """diffusers' folder load, with its mismatch advice (ignore_mismatched_sizes) replaced by ours."""
    from diffusers import AutoencoderKL

    try:
        with named(path):
            return AutoencoderKL.from_pretrained(path, **kwargs)
    except (RuntimeError, ValueError) as err:
        if "size" not in str(err) and "shape" not in str(err):
            raise
        raise ValueError(mismatch_advice(path / "diffusion_pytorch_model.safetensors", path / "config.json", err)) from err


def split_trainable(vae) -> list:
    """Freeze encoder and quant_conv; return the named parameters that train (decoder side)."""
    trainable = []
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE_PREFIXES))
        if p.requires_grad:
            trainable.append((name, p))
    return trainable


def decoder_state(vae) -> dict:
    """The decoder side of the state dict (decoder.*, post_quant_conv.*), detached fp32 copies."""
    return {k: v.detach().float().clone() for k, v in vae.state_dict().items()
            if k.startswith(TRAINABLE_PREFIXES)}


def with_decoder(vae, decoder_weights: dict):
    """Load decoder-side weights into ``vae`` in place; the key set must match exactly."""
    from furlib.checkpoint import mismatch

    missing, extra, shapes = mismatch(decoder_weights, decoder_state(vae))
    if missing or extra or shapes:  # one short line, not torch's hundred lines of size mismatches
        raise ValueError(f"the run's decoder does not fit this VAE ({len(missing)} missing, e.g. {missing[:3]}; "
                         f"{len(extra)} unexpected, e.g. {extra[:3]}; {len(shapes)} of other shapes, e.g. "
                         f"{shapes[:2]}): it was trained from another base; leave base_model empty for the run's own")
    vae.load_state_dict(decoder_weights, strict=False)
    return vae


def describe(vae) -> dict:
    cfg = dict(vae.config)
    n_dec = sum(v.numel() for k, v in vae.state_dict().items() if k.startswith(TRAINABLE_PREFIXES))
    fam = families.of_config(cfg)
    return {"family": fam.name if fam else "none of the known", "block_out_channels": list(cfg["block_out_channels"]),
            "latent_channels": cfg["latent_channels"], "scaling_factor": cfg.get("scaling_factor"),
            "shift_factor": cfg.get("shift_factor"),
            "decoder_parameters": n_dec, "parameters": sum(p.numel() for p in vae.parameters())}
