"""Stage 04: a run's release files, each verified by reloading it independently.

Layout under ``outputs/<run_name>/export/``, the layout of the Hub's VAE repositories (e.g.
``stabilityai/sd-vae-ft-mse``: diffusers files at the root, the single file beside them), so
``AutoencoderKL.from_pretrained(export_dir or repo)`` needs no ``subfolder``::

    config.json, diffusion_pytorch_model.safetensors (+ .fp16.safetensors)   diffusers
    <model>-v<version>-step<N>.safetensors        single file, LDM keys, encoder included, fp32
    <model>-v<version>-step<N>-fp16.safetensors   the same in fp16
    README.md         the model card (``furlib.export.model_card``)
    manifest.json     every file's size and SHA-256, and the verification results

Everything is written to ``.export-staging/`` first and moved to ``export/`` only once every
check passed, so a failed verification never leaves shippable-looking files behind.
Verification decodes fixed seeded latents (``latent_nchw``, unscaled) into ``rgb_m11``.
Nothing here unpickles: weights are read from safetensors only.
"""

import contextlib
import copy
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from furlib.checkpoint import find_run_checkpoint, load_decoder_weights, run_base
from furlib.atomic import recover_folder, replace_folder
from furlib.ldm_keys import diffusers_to_ldm
from furlib.models import load_vae, with_decoder
from furlib.parameters import strict_bool
from furlib.runinfo import check_folders, file_sha256
from furlib.training.runlock import training_note


def check_parameters(p: dict) -> None:
    """04's values that need no run or model (the pipeline checks them before 01 starts): one
    ValueError listing every problem."""
    from furlib.evaluation.evaluate import run_reader_problems

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


def hub_repo_problem(repo_id: str) -> str:
    """'' if ``repo_id`` is a repository id the Hub accepts; else why not (before any training:
    the Hub's own check ran only at the upload, after the training and the export)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") == 1:
            return ""
    except HFValidationError:
        pass
    return (f"hub_repo must be 'owner/name' (letters, digits, '-', '_' and '.', neither part starting or "
            f"ending with '-' or '.'), got {repo_id!r}")


FP32_TOL = 1e-5  # same weights, same maths: anything above this is a broken file
# fp16 files lose ~3 decimal digits per weight (relative step 2**-11); decoded in fp32 that moves
# pixels by ~1e-3 typically. A wrong key or layout moves them by ~0.1-1, so 3e-2 (about four
# 8-bit levels in [-1, 1]) separates the two. The fp16 weights must also equal w.half() exactly.
FP16_TOL = 3e-2
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


def seeded_latents(vae, seed: int = 0, n: int = 2, size: int = 8) -> torch.Tensor:
    """Fixed unscaled latents, ``(n, latent_channels, size, size)``, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, vae.config.latent_channels, size, size, generator=gen)


@contextlib.contextmanager
def _strict_fp32():
    """No TF32 while comparing: it alone can move GPU outputs by more than FP32_TOL."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def decode(vae, latent_nchw: torch.Tensor, device="cpu") -> torch.Tensor:
    """``rgb_m11`` on the CPU, decoded in fp32 on ``device``; the model goes back to the CPU."""
    vae = vae.float().to(device)
    try:
        with _strict_fp32():
            return vae.decode(latent_nchw.to(device)).sample.float().cpu()
    finally:
        vae.to("cpu")


def _reload(role: str, path: Path, stage_dir: Path):
    """Each file through a loader that shares no code with the writer (except our own loader)."""
    from diffusers import AutoencoderKL

    folder = str(stage_dir)  # config.json at the export's root
    if role == "diffusers":
        return [("diffusers from_pretrained", AutoencoderKL.from_pretrained(folder))]
    if role == "diffusers_fp16":
        return [("diffusers from_pretrained fp16", AutoencoderKL.from_pretrained(folder, variant="fp16"))]
    return [("diffusers from_single_file",
             AutoencoderKL.from_single_file(str(path), config=folder, local_files_only=True)),
            ("furlib load_single_file", load_vae(str(path), base_config=folder))]


def _weights_diff(model, expected: dict) -> float:
    """Max abs difference over every tensor, encoder included; missing or meta tensors fail."""
    got = model.state_dict()
    if set(got) != set(expected) or any(v.is_meta for v in got.values()):
        return math.inf
    flat = [(got[k].float().cpu() - expected[k].float()).flatten() for k in expected]
    return torch.cat(flat).abs().max().item()  # one reduction: hundreds of tiny ones are slow


def check_single_file_layout(path: Path, vae, dtype: torch.dtype) -> str:
    """'' if the file's keys, shapes, dtype and format match our conversion of ``vae``."""
    from safetensors import safe_open

    reference = {k: tuple(v.shape) for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != "pt":
            return "metadata lacks format=pt"
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    if found != reference:
        bad = sorted(set(found) ^ set(reference)) or [k for k in found if found[k] != reference[k]]
        return f"keys/shapes differ from the reference conversion: {bad[:5]}"
    want = {torch.float32: "F32", torch.float16: "F16"}[dtype]
    return "" if dtypes == {want} else f"dtypes {sorted(dtypes)}, expected {want}"


def verify_export(vae, files: dict, stage_dir: Path, seed: int = 0, device="cpu") -> list[dict]:
    """Reload every file, compare all weights and a decode with ``vae``; raise if any fails."""
    from furlib.progress import tqdm

    latents = seeded_latents(vae, seed)
    reference = decode(vae, latents, device)
    exact = {k: v.detach().cpu().float() for k, v in vae.state_dict().items()}
    results = []
    for role, path in tqdm(files.items(), desc="verify", unit="file"):
        fp16 = role.endswith("fp16")
        expected = {k: v.half() for k, v in exact.items()} if fp16 else exact
        layout = check_single_file_layout(path, vae, torch.float16 if fp16 else torch.float32) \
            if role.startswith("single") else ""
        try:
            reloaded = _reload(role, path, stage_dir)
        except Exception as err:  # any loader's refusal is a failed verification, said as such
            raise RuntimeError(f"export verification failed: {path} does not reload: {err}") from err
        for loader, model in reloaded:
            weights = _weights_diff(model, expected)
            diff = math.inf if math.isinf(weights) else \
                (decode(model.float(), latents, device) - reference).abs().max().item()
            tol = FP16_TOL if fp16 else FP32_TOL
            results.append({"file": str(Path(path).relative_to(stage_dir)), "loader": loader,
                            "weights_max_abs_diff": weights, "decode_max_abs_diff": diff,
                            "tolerance": tol, "layout_problem": layout,
                            "passed": weights == 0.0 and diff <= tol and not layout})
    failed = [r for r in results if not r["passed"]]
    if failed:
        raise RuntimeError(f"export verification failed; nothing was moved to {EXPORT}/ "
                           f"(inspect {stage_dir}):\n" + "\n".join(json.dumps(r) for r in failed))
    fp16_files = {str(Path(path).relative_to(stage_dir)) for role, path in files.items() if role.endswith("fp16")}
    if fp16_files:
        _note_fp16_decode(vae, latents, [r for r in results if r["file"] in fp16_files])
    return results


def _note_fp16_decode(vae, latent_nchw: torch.Tensor, fp16_rows: list[dict]) -> None:
    """The checks above decode fp16 files in fp32: they prove the rounding, not that the files decode
    in fp16. Decoded in fp16 too, each fp16 row gets ``fp16_decode`` ('ok', 'overflow' or why it did
    not run), and an overflow is warned (SDXL's own VAE does so: not a failed release)."""
    from furlib.evaluation.decode_checks import fp16_decode_check

    status = fp16_decode_check(vae, latent_nchw)["status"]
    for r in fp16_rows:
        r["fp16_decode"] = status
    if status == "overflow":
        warnings.warn("the fp16 files decode to non-finite values (black images) when run in float16: "
                      "they need fp32 decoding (--no-half-vae, diffusers' force_upcast); the model card says "
                      "so. fp16_copy=False leaves them out", stacklevel=2)



def file_table(root: Path) -> list[dict]:
    """Every file under ``root`` but the manifest: relative path, size in bytes, SHA-256."""
    root = Path(root)
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"]


DESKTOP_JUNK = {".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"}  # replaced with export/
_JUNK_PATTERNS = [p for j in sorted(DESKTOP_JUNK) for p in (j, f"*/{j}", f"{j}/*", f"*/{j}/*")]  # never uploaded


def manifest_differences(export_dir: Path) -> tuple[list, list]:
    """(files added or edited since ``manifest.json`` listed them, files it lists that are gone);
    desktop junk is neither, a clone's ``.git/`` is added."""
    try:
        listed = {f["path"]: f["sha256"] for f in json.loads((Path(export_dir) / "manifest.json").read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    found = [f for f in file_table(export_dir) if not set(f["path"].split("/")) & DESKTOP_JUNK]
    return ([f["path"] for f in found if listed.get(f["path"]) != f["sha256"]],
            sorted(set(listed) - {f["path"] for f in found}))


def check_export_is_ours(export_dir: Path) -> None:
    """04 replaces ``export/`` whole: before any work, refuse when it holds what 04 did not write
    (a file a user added or edited since, by its manifest), or is a file, instead of deleting it."""
    export_dir = Path(export_dir)
    if export_dir.is_symlink():  # the swap would replace the link and leave its target stale
        raise ValueError(f"{export_dir} is a link (to {os.readlink(export_dir)}); 04 replaces the folder whole: "
                         "remove the link and copy export/ where you want it after 04, or set outputs_dir there")
    check_folders(export_dir.parent, [export_dir.name])
    if not export_dir.is_dir() or not any(export_dir.iterdir()):
        return
    foreign, _ = manifest_differences(export_dir)
    if foreign:
        raise ValueError(f"{export_dir} holds files 04 did not write, or edited since it did: {foreign[:5]}"
                         f"{' ...' if len(foreign) > 5 else ''}. 04 replaces export/ whole: move them out "
                         "(a card's words belong in 04's training_data and license parameters), then run 04 again")


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


def push_to_hub(export_dir: Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Upload the verified export folder to ``repo_id`` with the token in ``HF_TOKEN``."""
    if problem := hub_repo_problem(repo_id):
        raise ValueError(problem)
    recover_folder(export_dir)  # a release left aside by a killed 04 is the one to upload
    if not (Path(export_dir) / "manifest.json").exists():
        raise RuntimeError(f"{export_dir} has no manifest.json: only a verified export is uploaded")
    changed, missing = manifest_differences(export_dir)  # the manifest would vouch for files it never saw
    if changed or missing:
        raise RuntimeError(f"{export_dir} is not the export 04 verified (added or edited since: {changed[:5]}, "
                           f"gone: {missing[:5]}); nothing was uploaded. Run 04 again to rebuild and verify it "
                           "(a card's words belong in 04's training_data and license parameters)")
    token = os.environ.get("HF_TOKEN", "")
    if not token:
        raise RuntimeError("push_to_hub needs a Hugging Face write token in the environment "
                           "variable HF_TOKEN (on Colab: a secret named HF_TOKEN)")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, ignore_patterns=_JUNK_PATTERNS,
                          commit_message=f"Upload {Path(export_dir).parent.name} export")
    except Exception as err:  # offline, auth and HTTP errors differ across huggingface_hub versions
        raise RuntimeError(f"upload to the Hugging Face Hub ({repo_id}) failed: {err}. The export in {export_dir} "
                           "is complete and unchanged: upload it again with push_to_hub once the cause is fixed "
                           "(no need to run 04 again)") from err
    return f"https://huggingface.co/{repo_id}"


def val_images(run_dir: Path, n: int = 4, size: int = 256) -> torch.Tensor | None:
    """Up to ``n`` of the run's ``data/val`` images, as 03 evaluates them, as ``rgb_m11``."""
    from furlib.images import preprocess
    from furlib.prepared import list_images

    paths = list_images(Path(run_dir) / "data" / "val")[:n]  # stored JPEG/PNG/WebP, as 02 lists them
    return torch.stack([preprocess(p, size) for p in paths]) if paths else None


@torch.no_grad()
def reconstructions(rgb_m11: torch.Tensor, decoders: dict, encoder_vae, device="cpu") -> dict:
    """Columns for ``reconstructions.reconstruction_strip``: the input, then its decode by each named VAE.

    ``encoder_vae`` encodes once (posterior mode), so the columns differ only by decoder.
    """
    latents = encoder_vae.float().to(device).encode(rgb_m11.to(device)).latent_dist.mode().cpu()
    encoder_vae.to("cpu")
    return {"input": rgb_m11} | {name: decode(v, latents, device) for name, v in decoders.items()}
