"""The ablation's data and what the device hands back (issue 20): the art corpus, the held-out
sets, the held-out curves at checkpoints, the device's scores, and the bundle of EMA decoders.

Conventions: held-out images are uint8 NCHW centre crops (03's protocol: short side to the
resolution, Lanczos, centre square); models see them as ``rgb_m11`` through ``to_rgb_m11``.
The encoder is frozen in every variant, so held-out latents are encoded once with the base and
shared by all decoders (posterior mode, fp32). Drawings are ``furlib.builtin.draw_art``: the
training corpus is seed ``TRAIN_SEED``, the held-out art seed ``HELD_OUT_SEED``; disjointness
is checked by the pixel hash of every full-size drawing (as tests/test_base.py does for the base).
"""

import hashlib
import json
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

TRAIN_SEED, HELD_OUT_SEED = 0, 1
BUNDLE_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20}  # what a device call returns
PACK_BYTES = 15 * 2**20  # decoders per bundle file, below the per-file limit with room for the header
BUNDLE_STEM = "decoders"
SCORE_KEYS = ("psnr", "ssim", "lpips", "lpips_vgg", "delta_e_ok", "ab_shift", "d_chroma", "hf_ratio", "hf_error")


def _draw_one(job: tuple) -> str:
    """Draw, cap the long side (stage 01's Lanczos cap), write a PNG; the full drawing's pixel hash."""
    from furlib.data.input_entry import pixel_hash
    from furlib.images import cap_long_side
    from furlib import builtin

    index, seed, max_side, folder = job
    image = builtin.draw_art(index, seed)
    digest = pixel_hash(image)
    cap_long_side(image, max_side, 1).save(Path(folder) / f"art_{seed}_{index:05d}.png", compress_level=3)
    return digest


def draw_corpus(folder: Path, count: int, max_side: int, procs: int) -> list[str]:
    """``count`` drawings of ``TRAIN_SEED`` as PNGs in ``folder`` (long side <= ``max_side``), in
    ``procs`` processes (PIL drawing holds the GIL, so stage 01's threads would not scale)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, TRAIN_SEED, max_side, str(folder)) for i in range(count)]
    return _map(_draw_one, jobs, procs)


def _map(fn, jobs: list, procs: int) -> list:
    """``[fn(j) for j in jobs]``, in ``procs`` processes when there are enough jobs to pay for them."""
    if procs <= 1 or len(jobs) < 8 * procs:
        return [fn(j) for j in jobs]
    with get_context("spawn").Pool(procs) as pool:
        return pool.map(fn, jobs, chunksize=8)


def prepare_corpus(work: Path, count: int, max_side: int, resolution: int, procs: int) -> dict:
    """Stage 01 (``furlib.data.prepare``) on the drawn corpus, once: a later call finds
    ``work/corpus.json`` and reuses it. All images go to train (val_fraction 0)."""
    from furlib.data.prepare import prepare

    record = work / "corpus.json"
    wanted = {"count": count, "max_side": max_side, "seed": TRAIN_SEED}
    if record.exists():
        saved = json.loads(record.read_text())
        if {k: saved[k] for k in wanted} != wanted:
            raise ValueError(f"{work} holds a corpus of {saved}, not {wanted}: use another --work")
        return saved
    hashes = draw_corpus(work / "drawn", count, max_side, procs)
    report = prepare(str(work / "drawn"), work / "data", resolution=resolution, max_side=max_side,
                     val_fraction=0.0, val_max=0, progress=False, num_proc=1, workers=procs)
    saved = dict(wanted, counts=report["counts"], pixel_hashes=hashes)
    record.write_text(json.dumps(saved))
    return saved


def _held_out_art(job: tuple) -> tuple:
    from furlib.data.input_entry import pixel_hash
    from furlib.images import center_crop
    from furlib import builtin

    index, resolution = job
    image = builtin.draw_art(index, HELD_OUT_SEED)
    return pixel_hash(image), center_crop(image, resolution)


def held_out_art(count: int, resolution: int, procs: int = 1) -> tuple[torch.Tensor, list]:
    """(uint8 NCHW crops, full-drawing pixel hashes) of ``count`` drawings of ``HELD_OUT_SEED``."""
    out = _map(_held_out_art, [(i, resolution) for i in range(count)], procs)
    return torch.from_numpy(np.stack([c for _, c in out])).permute(0, 3, 1, 2).contiguous(), [h for h, _ in out]


def held_out_photos(resolution: int) -> tuple[torch.Tensor, list]:
    """(uint8 NCHW crops, names) of ``builtin-photos``: the photographs the base never trained on."""
    from furlib.builtin import builtin_sources
    from furlib.images import center_crop, load_rgb

    found = [(name.rsplit("/", 1)[-1], src) for name, src in builtin_sources(source="builtin-photos") if Path(src).is_file()]
    if not found:  # scikit-image not installed: the drawings' scores still come back, the report says so
        print("held-out photos: none found (scikit-image absent?): no photo scores", flush=True)
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), []
    crops = [center_crop(load_rgb(src), resolution) for _, src in found]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), [n for n, _ in found]


def check_disjoint(train_hashes, held_hashes) -> None:
    """Raise unless the held-out drawings are distinct from each other and from every training one."""
    overlap = set(train_hashes) & set(held_hashes)
    if overlap or len(set(held_hashes)) != len(held_hashes):
        raise RuntimeError(f"held-out art is not disjoint: {len(overlap)} drawings also in training, "
                           f"{len(held_hashes) - len(set(held_hashes))} repeated")


def digest(u8: torch.Tensor) -> str:
    """SHA-256 of a uint8 image batch: the local phase redraws the set and must get these bytes."""
    return hashlib.sha256(u8.contiguous().numpy().tobytes()).hexdigest()


def held_out_sets(work: Path, art: int, resolution: int, train_hashes, procs: int) -> dict:
    """{"art", "photos": uint8 NCHW, "photo_names", "art_digest"}, cached in ``work/held_out.pt``."""
    path = work / "held_out.pt"
    if path.exists():
        sets = torch.load(path)
        if len(sets["art"]) == art and sets["art"].shape[-1] == resolution:
            return sets
    x, hashes = held_out_art(art, resolution, procs)
    check_disjoint(train_hashes, hashes)
    photos, names = held_out_photos(resolution)
    sets = {"art": x, "photos": photos, "photo_names": names, "art_digest": digest(x)}
    torch.save(sets, path)
    return sets


def m11(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


@torch.no_grad()
def encode(vae, u8: torch.Tensor, device, batch: int = 32) -> torch.Tensor:
    """Posterior-mode latents of a uint8 batch (fp32), on ``device``."""
    side = u8.shape[-1] // 8
    return torch.cat([vae.encode(m11(u8[i:i + batch]).to(device)).latent_dist.mode()
                      for i in range(0, len(u8), batch)] or [torch.zeros(0, 4, side, side, device=device)])


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """fp32 reconstructions in [-1, 1] (clamped: what an 8-bit image keeps), on z's device."""
    side = z.shape[-1] * 8
    return torch.cat([vae.decode(z[i:i + batch]).sample.float().clamp(-1, 1) for i in range(0, len(z), batch)]
                     or [torch.zeros(0, 3, side, side, device=z.device)])


def scores(u8: torch.Tensor, recon: torch.Tensor, lpips_alex, lpips_vgg, per_image: bool = False) -> dict:
    """Means of 03's per-image metrics (LPIPS both trunks); with ``per_image`` also PSNR per image."""
    from furlib.evaluation.metrics import per_image_metrics

    if not len(u8):
        return {"n": 0}
    x = m11(u8).to(recon.device)
    parts = [per_image_metrics(x[i:i + 32], recon[i:i + 32], lpips_alex, lpips_vgg) for i in range(0, len(x), 32)]
    m = {k: torch.cat([p[k] for p in parts]) for k in SCORE_KEYS}
    out = {k: float(v.mean()) for k, v in m.items()}
    if per_image:
        out["psnr_per_image"] = [round(float(v), 5) for v in m["psnr"]]
    return dict(out, n=len(x))


def decoder_of(base, weights: dict, device):
    """A copy of the base VAE with ``weights`` (decoder side) loaded, fp32, on ``device``."""
    import copy

    from furlib.models import with_decoder

    return with_decoder(copy.deepcopy(base), {k: v.float() for k, v in weights.items()}).to(device).eval()


def update_curves(work: Path, names: list, base, z_curve, x_curve_u8, lpips_vgg, device) -> dict:
    """Held-out ΔE_ok, LPIPS(vgg) and PSNR of every variant's EMA at each checkpoint not yet
    scored (step 0: the base), kept in ``work/curves.json``; returns {variant: [{step, ...}]}."""
    from furlib import checkpoint, checkpoint_pick
    from furlib.evaluation.metrics import per_image_metrics

    path = work / "curves.json"
    curves = json.loads(path.read_text()) if path.exists() else {}
    x = m11(x_curve_u8).to(device)

    def point(vae, step):
        m = per_image_metrics(x, decode(vae, z_curve), None, lpips_vgg)
        return {"step": step, **{k: float(m[k].mean()) for k in ("delta_e_ok", "lpips_vgg", "psnr")}}

    base_point = point(base.to(device), 0)
    for name in names:
        rows = curves.setdefault(name, [base_point])
        done = {r["step"] for r in rows}
        for d in reversed(checkpoint_pick.step_folders(work / name / "checkpoints")):  # oldest first
            if (d / "state.json").exists():
                step = checkpoint.read_state(d)["step"]
                if step not in done:
                    rows.append(point(decoder_of(base, checkpoint.load_decoder_weights(d, "ema"), device), step))
        rows.sort(key=lambda r: r["step"])
    path.write_text(json.dumps(curves, indent=1))
    return curves


def write_bundle(out: Path, decoders: dict, step: int) -> list[Path]:
    """EMA decoders as fp16 safetensors, packed into as few files as fit ``PACK_BYTES`` each
    (keys ``<variant>/<tensor>``); returns the files. Raises if they cannot fit the limits."""
    from safetensors.torch import save_file

    files, pack, size = [], {}, 0
    for name, weights in decoders.items():
        half = {f"{name}/{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in weights.items()}
        nbytes = sum(t.numel() * 2 for t in half.values())
        if pack and size + nbytes > PACK_BYTES:
            files.append(pack)
            pack, size = {}, 0
        pack.update(half)
        size += nbytes
    files.append(pack) if pack else None
    paths = []
    for i, tensors in enumerate(files):
        path = out / f"{BUNDLE_STEM}_{i}.safetensors"
        save_file(tensors, str(path), metadata={"step": str(step), "dtype": "float16 (trained in fp32)"})
        paths.append(path)
    return paths


def read_bundle(folder: Path) -> dict:
    """{variant: {tensor: fp32}} from ``write_bundle``'s files."""
    from safetensors.torch import load_file

    out: dict = {}
    for path in sorted(Path(folder).glob(f"{BUNDLE_STEM}_*.safetensors")):
        for key, t in load_file(str(path)).items():
            name, tensor = key.split("/", 1)
            out.setdefault(name, {})[tensor] = t.float()
    return out


def check_limits(folder: Path, limits: dict = BUNDLE_LIMITS) -> dict:
    """{"files", "largest", "total"} of what ``folder`` returns; raises past a device call's limits."""
    sizes = [p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()]
    found = {"files": len(sizes), "largest": max(sizes, default=0), "total": sum(sizes)}
    if found["files"] > limits["files"] or found["largest"] > limits["file_bytes"] or found["total"] > limits["total_bytes"]:
        raise RuntimeError(f"{folder} would not come back from the device: {found} against {limits}")
    return found

