"""Single-file VAEs: one ``.safetensors`` (or ``.sft``) holding a whole VAE, and the checks that
every safetensors weights file passes, a folder's and the Hub's too.

A single file is in the original LDM layout (A1111/ComfyUI files, FLUX.1's ``ae.safetensors``;
a full checkpoint's VAE under its ``first_stage_model.``/``vae.`` prefix, its other tensors never
read) or in diffusers' own (a folder's weights file alone); ``furlib.ldm_keys`` renames the keys.
A file holds no config, so the architecture and factors come from ``base_config`` (a diffusers
folder) or from the shipped config of its ``base_family`` (``furlib.families``: its keys alone
cannot tell SD 1.x from SDXL, nor SD3 from FLUX.1, so without either, or a family its metadata
states as this project's exports do, it is a clear error, never a guess).

Conventions: safetensors only, never unpickled (a ``.ckpt``/``.pt``/``.bin`` is refused with advice
to convert it); weights are floating point and finite (``check_weights``); safetensors' own errors
are re-raised naming the file (``named``); weights that do not fit a config fail with advice
(``mismatch_advice``), never loaded with mismatched sizes ignored. A VAE comes back fp32, in eval
mode, on the CPU. ``furlib.models.load_vae`` sends single files here; this module imports nothing
from it.
"""

import contextlib
from pathlib import Path

import torch

from furlib import families

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # .sft: FLUX.1's ae.sft, safetensors as ComfyUI reads it


def load_single_file(path: Path, base_config: str = "", base_family: str = "", where: str = ""):
    """A single-file VAE, LDM or diffusers layout; never unpickles (safetensors only). The architecture and
    factors: ``base_config``'s, else the shipped config of the file's family (see ``families``).
    ``where``: what the errors call it (``load_vae``'s key and value)."""
    from diffusers import AutoencoderKL

    from furlib.ldm_keys import ldm_to_diffusers

    where = where or f"base_model {str(path)!r}"
    if not path.exists():
        raise ValueError(f"{where} does not exist")
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{path.name}: only .safetensors single files load (pickled "
                         f"{path.suffix} files can run arbitrary code); convert it first")
    with named(path):
        config, fam = single_file_config(path, base_config, base_family, where)
        tensors = _vae_tensors(path)
    vae = AutoencoderKL.from_config(config)
    check_weights(tensors, path)
    try:
        vae.load_state_dict(ldm_to_diffusers(tensors, vae.state_dict()), strict=True)
    except (RuntimeError, ValueError, KeyError) as err:
        where = base_config or f"the shipped {fam.title} config ({fam.config_dir})"
        raise ValueError(mismatch_advice(path, where, err)) from err
    return vae.eval()


def _vae_tensors(path: Path) -> dict:
    """A single file's VAE tensors under their bare names; a full checkpoint's others (a UNet, text
    encoders, FLUX.1's fp8 transformer: gigabytes, and no isfinite for fp8) are never read."""
    from safetensors import safe_open

    from furlib.ldm_keys import strip_prefix

    with safe_open(str(path), "pt") as f:
        stored = strip_prefix({k: k for k in f.keys()})  # bare name -> name in the file
        return {bare: f.get_tensor(name) for bare, name in stored.items()}


def single_file_config(path: Path, base_config: str = "", base_family: str = "",
                       where: str = "") -> tuple[dict, object]:
    """(config, family or None) of a single file: ``base_config``'s, else its family's shipped one."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    from furlib.ldm_keys import strip_prefix

    if base_config:
        config = AutoencoderKL.load_config(Path(base_config))
        families.check_config(base_family, config, f"base_config {base_config!r}")
        return config, None
    with named(path), safe_open(str(path), "pt") as f:  # the header only: shapes and metadata, no tensors
        shapes = strip_prefix({k: f.get_slice(k).get_shape() for k in f.keys()})
        stated = (f.metadata() or {}).get("family", "")
    fam = families.single_file_family(where or f"base_model {path.name}", shapes, base_family, stated)
    return AutoencoderKL.load_config(fam.config_dir), fam


def check_weights(tensors: dict, source) -> None:
    """Weights read from ``source`` must be floating point and finite: an integer tensor would be
    cast silently and a NaN one would train NaNs; either means a damaged or a wrong file."""
    ints = [f"{k} ({v.dtype})" for k, v in tensors.items() if not v.is_floating_point()]
    if ints:
        raise ValueError(f"{source}: {len(ints)} tensor(s) are not floating point, e.g. {ints[:3]}: not VAE "
                         "weights, or a damaged conversion; use the original fp32/fp16 file")
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensor(s) hold NaN or infinity, e.g. {bad[:3]}: the file is "
                         "damaged or comes from a diverged training; use another VAE")


def mismatch_advice(weights, config, err) -> str:
    """The advice on one line, then the first lines of what did not fit (the keys and shapes)."""
    said = [line.strip()[:300] for line in str(err).strip().splitlines() if line.strip()][:6]
    return (f"{weights} does not fit the architecture in {config}. The weights are another VAE's "
            "than the config describes: give base_config the diffusers folder whose config.json came with "
            "these weights (do not ignore the mismatched sizes: that would train from random layers):\n  "
            + "\n  ".join(said or [type(err).__name__]))


@contextlib.contextmanager
def named(path: Path):
    """safetensors' own errors (a pickle renamed .safetensors, a truncated header) name no file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): a pickled checkpoint renamed "
                         ".safetensors, or a truncated download. Download it again, or convert the original "
                         "with safetensors.torch.save_file") from err
