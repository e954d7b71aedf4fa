"""Stage 04: a run's release files: what is released, written, then moved into place with a manifest.

Layout under ``outputs/<run_name>/export/``, the layout of the Hub's VAE repositories (e.g.
``stabilityai/sd-vae-ft-mse``: diffusers files at the root, the single file beside them), so
``AutoencoderKL.from_pretrained(export_dir or repo)`` needs no ``subfolder``::

    config.json, diffusion_pytorch_model.safetensors (+ .fp16.safetensors)   diffusers
    <model>-v<version>-step<N>.safetensors        single file, LDM keys, encoder included, fp32
    <model>-v<version>-step<N>-fp16.safetensors   the same in fp16
    README.md         the model card (``furlib.export.model_card``)
    manifest.json     every file's size and SHA-256, and the verification results

Everything is written to ``.export-staging/`` first and moved to ``export/`` only once every
check passed (``furlib.export.verify``), so a failed verification never leaves shippable-looking
files behind; the manifest and the upload are ``furlib.export.hub``'s. Nothing here unpickles:
weights are read from safetensors only.
"""

import copy
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from furlib.checkpoint import load_decoder_weights, run_base
from furlib.checkpoint_pick import find_run_checkpoint
from furlib.atomic import recover_folder, replace_folder
from furlib.export.hub import check_export_is_ours, file_table, hub_repo_problem
from furlib.ldm_keys import diffusers_to_ldm
from furlib.models import load_vae, with_decoder
from furlib.parameters import strict_bool
from furlib.runinfo import file_sha256
from furlib.training.runlock import training_note


def check_parameters(p: dict) -> None:
    """04's values that need no run or model (the pipeline checks them before 01 starts): one
    ValueError listing every problem."""
    from furlib.evaluation.eval_inputs import run_reader_problems

    found = []
    if p["weights"] not in ("ema", "raw"):
        found.append(f"weights must be 'ema' or 'raw', got {p['weights']!r}")
    for label, value in (("model_name (empty: the run_name)", p["model_name"] or p["run_name"]),
                         ("version", p["version"])):
        if not value or any(c in value for c in "/\\ "):
            found.append(f"{label} must be non-empty without slashes or spaces, got {value!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", p["license"]):  # it goes into the card's YAML header
        found.append(f"license must be a Hugging Face licence id such as 'cc-by-nc-sa-4.0', 'mit' or 'other' "
                     f"(no spaces, colons or line breaks), got {p['license']!r}")
    if p["push_to_hub"] and (problem := hub_repo_problem(p["hub_repo"])):
        found.append(problem)
    if p["push_to_hub"] and not os.environ.get("HF_TOKEN"):  # said before training, not after it
        found.append("push_to_hub needs a Hugging Face write token in the environment variable HF_TOKEN "
                     "(on Colab: a secret named HF_TOKEN)")
    found += run_reader_problems(p)
    if found:
        raise ValueError("invalid 04_export parameter(s):\n  " + "\n  ".join(found))


STAGING, EXPORT = ".export-staging", "export"


@dataclass(frozen=True)
class Release:
    """What stage 04 releases from a run; ``release_source`` builds it."""

    checkpoint: str           # the checkpoint folder the weights come from
    step: int                 # its optimizer step
    base_model: str           # the VAE whose encoder and quant_conv ship (the run's own unless given)
    base_config: str          # diffusers folder giving a single-file base its architecture, or ''
    base_family: str          # the base's family when given (furlib.families), or '': its config says
    trained_base_model: str   # the base the run trained from (its checkpoint's state.json)
    weights: str              # "ema" (the release) or "raw"
    base_seed: int            # seed of a random test base ('tiny-random', 'random:sd'): 02's own
    decoder_weights: dict = field(repr=False)  # decoder + post_quant_conv tensors, diffusers keys

    def record(self) -> dict:
        """JSON-able fields for the manifest, without local paths: the tensors left out, the
        checkpoint relative to the run, local bases by ``public_name``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "decoder_weights"}
        ckpt = Path(self.checkpoint)
        out["checkpoint"] = f"{ckpt.parent.name}/{ckpt.name}"
        for key in ("base_model", "base_config", "trained_base_model"):
            out[key] = public_name(out[key])
        return out


def public_name(value: str) -> str:
    """What a release may say about a base or input: hub ids and names as they are, a local file
    as its name and SHA-256, a local folder as its name; an absolute path would publish the
    trainer's folder names."""
    path = Path(value).expanduser()
    if not value or not (path.is_absolute() or value.startswith((".", "~")) or path.exists()):
        return value
    if path.is_file():
        return f"{path.name} (sha256 {file_sha256(path)})"
    return path.name


def release_source(run_dir: Path, weights: str = "ema", base_model: str = "", base_config: str = "",
                   base_family: str = "", on_bad_checkpoint: str = "refuse") -> Release:
    """What a run releases: checkpoint, step, base model (the run's own unless given), weights. Of a
    run still training, its latest complete checkpoint (written whole), with a note saying so."""
    restored = recover_folder(Path(run_dir) / EXPORT)  # the last good release, if a 04 died mid-swap
    if restored:
        warnings.warn(restored, stacklevel=2)
    check_export_is_ours(Path(run_dir) / EXPORT)
    ckpt = find_run_checkpoint(run_dir, on_bad_checkpoint)
    base_model, base_config, base_family, state = run_base(ckpt, base_model, base_config, base_family)
    if note := training_note(run_dir, int(state["step"]), "exporting"):
        print(note, flush=True)
    return Release(checkpoint=str(ckpt), step=int(state["step"]), base_model=base_model,
                   base_config=base_config or "", base_family=base_family,
                   trained_base_model=state.get("base_model", ""),
                   weights=weights, base_seed=state.get("settings", {}).get("seed", 0),
                   decoder_weights=load_decoder_weights(ckpt, weights))


def build_release_vae(base_model: str, base_config: str, decoder_weights: dict, seed: int = 0,
                      base_family: str = ""):
    """The base VAE's encoder and quant_conv with the finetuned decoder and post_quant_conv;
    ``seed`` builds a random test base (``tiny-random``, ``random:sd``): pass the run's (``base_seed``)."""
    return with_decoder(load_vae(base_model, base_config, seed, base_family), decoder_weights).eval()


def release_stem(model_name: str, version: str, step: int) -> str:
    return f"{model_name}-v{version}-step{step}"


def write_release_files(vae, stage_dir: Path, stem: str, metadata: dict, fp16_copy: bool = True) -> dict:
    """Diffusers files and single files, side by side in ``stage_dir`` (emptied first); {role: path}."""
    from safetensors.torch import save_file

    strict_bool("fp16_copy", fp16_copy)
    stage_dir, out = Path(stage_dir), {}
    shutil.rmtree(stage_dir, ignore_errors=True)  # leftovers of a failed export must not ship
    folder = stage_dir  # the repository root: from_pretrained(repo) without a subfolder
    vae.save_pretrained(folder, safe_serialization=True)
    out["diffusers"] = folder / "diffusion_pytorch_model.safetensors"
    ldm = {k: v.detach().cpu().contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    out["single"] = stage_dir / f"{stem}.safetensors"
    save_file(ldm, out["single"], metadata=dict(metadata, dtype="float32"))
    _sort_header(out["single"])
    if fp16_copy:
        copy.deepcopy(vae).half().save_pretrained(folder, safe_serialization=True, variant="fp16")
        out["diffusers_fp16"] = folder / "diffusion_pytorch_model.fp16.safetensors"
        out["single_fp16"] = stage_dir / f"{stem}-fp16.safetensors"
        save_file({k: v.half() for k, v in ldm.items()}, out["single_fp16"],
                  metadata=dict(metadata, dtype="float16"))
        _sort_header(out["single_fp16"])
    _drop_source_path(folder / "config.json")
    return out


def _sort_header(path: Path) -> None:
    """safetensors writes metadata in hash order, another in every call: the same weights got a new
    SHA-256 at each export (a re-push uploaded them again). Sorted keys, same length and offsets;
    no library call does this."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.dumps(json.loads(f.read(size)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(header) <= size:  # padded with spaces, as the format allows; else left as written
            f.seek(8)
            f.write(header.ljust(size))


def _drop_source_path(config_json: Path) -> None:
    """diffusers writes the folder the base was loaded from as ``_name_or_path``: a local path."""
    config = json.loads(config_json.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def file_metadata(model_name: str, version: str, step: int, base_model: str, weights: str,
                  vae_config=None) -> dict:
    """Safetensors header metadata (strings only); ``format: pt`` is what loaders look for.
    ``family`` (from ``vae_config``) lets furlib reload the file without asking for its family;
    the base is named by ``public_name``, never by a local path."""
    from furlib import __version__, families

    fam = families.of_config(vae_config) if vae_config is not None else None
    meta = {"format": "pt", "model_name": model_name, "version": version, "step": str(step),
            "base_model": public_name(base_model), "weights": weights, "layout": "ldm",
            "written_by": f"furlib {__version__}"}
    if fam is not None:
        meta.update(family=fam.name, scaling_factor=str(fam.scaling_factor), shift_factor=str(fam.shift_factor))
    return meta


def finalize_export(stage_dir: Path, export_dir: Path, release: Release, checks: list[dict]) -> dict:
    """Write ``manifest.json`` into the staging folder, then swap it in as ``export_dir``."""
    if not checks or not all(c["passed"] for c in checks):
        raise RuntimeError("finalize_export needs passing verification results (run verify_export)")
    stage_dir, export_dir = Path(stage_dir), Path(export_dir)
    manifest = {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "release": release.record(),
                "files": file_table(stage_dir), "verification": checks, "passed": True}
    (stage_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    replace_folder(stage_dir, export_dir)  # the older export is deleted only once this one is in
    return manifest
