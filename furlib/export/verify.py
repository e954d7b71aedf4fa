"""Stage 04's check of its files: each reloaded by a loader that shares no code with the writer.

Every file of the staging folder is reloaded (diffusers ``from_pretrained``, ``from_single_file``
and furlib's own loader); all its weights must equal the in-memory model's (fp16 files: those
rounded to fp16) and fixed seeded latents (``latent_nchw``, unscaled) must decode into the same
``rgb_m11``, within ``FP32_TOL`` or ``FP16_TOL``. Decodes run in fp32, TF32 off. Also the
notebook's picture of the same check: val images reconstructed by the base and the export.
Nothing here unpickles: weights are read from safetensors only.
"""

import contextlib
import json
import math
import warnings
from pathlib import Path

import torch

from furlib.export.release_files import EXPORT
from furlib.ldm_keys import diffusers_to_ldm
from furlib.models import load_vae

FP32_TOL = 1e-5  # same weights, same maths: anything above this is a broken file
# fp16 files lose ~3 decimal digits per weight (relative step 2**-11); decoded in fp32 that moves
# pixels by ~1e-3 typically. A wrong key or layout moves them by ~0.1-1, so 3e-2 (about four
# 8-bit levels in [-1, 1]) separates the two. The fp16 weights must also equal w.half() exactly.
FP16_TOL = 3e-2


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
