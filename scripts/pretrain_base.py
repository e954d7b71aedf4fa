"""Pretrain the shipped base VAE (``base_model: tiny``) from scratch on natural images only.

The base plays ``sd-vae-ft-mse``'s part: a decoder trained on photographs that has never seen
the demo's domain (flat colours, dark outlines, saturated hues), so the demo's finetune has
Furception's job to do: adapt the decoder to art. Objective of sd-vae-ft-mse's kind:
MSE-weighted reconstruction (MSE + 0.1 L1 in RGB) plus a small KL term, no critic, no LPIPS.
Encoder and decoder both train. The result is accurate but smooth on photographs.

Data: the built-in photographs except ``builtin.HELD_OUT_PHOTOS``, and ``--natural-images``
synthetic "dead leaves" images with natural statistics (``builtin.draw_natural``: occluding
shapes of power-law sizes, muted colours, 1/f texture, blur, noise). No procedural drawing of
the demo's kind is ever seen. CPU workers draw and crop while the GPU trains (random
crops at random downscales with the project's own crop code, ``furlib.crops``); the
crops stay on the GPU as uint8 and batches sample from all crops made so far.
The SHA-256 pixel hashes of every training image go to ``training_set.json`` beside the weights,
and a test checks them against the demo's val split and the held-out photographs.

Measured at the end, on images it never saw, with 03's protocol (short side to 96 px, centre
square, posterior mode): PSNR on the demo's 24 drawings (seed 0): the domain gap the demo closes; and on the held-out photos.

    python scripts/pretrain_base.py --out furlib/assets/tiny_base --seconds 420   # GPU, ~9 min
    python scripts/pretrain_base.py --out /tmp/t --device cpu --steps 3 --natural-images 4 \
        --batch 2 --resolution 64 --photo-crops 4                              # a CPU check
"""

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = dict(
    seed=0,                # crops, batches and initial weights
    natural_images=3000,   # synthetic natural images (builtin.draw_natural) to train on
    crops_per_natural=12,  # random crops per synthetic image, plus its centre square
    photo_crops=1200,      # random crops per training photograph
    photo_fraction=0.3,    # share of each batch drawn from the photographs
    resolution=128,        # crop side, px
    min_crop_scale=0.08,   # crop area as a fraction of the image, as the recipe's crops
    batch=64,              # images per step
    lr=8e-4,               # AdamW peak; linear warm-up, then cosine to 5 %
    warmup_steps=200,
    weight_decay=0.0,
    grad_clip=1.0,         # max global grad norm
    mse_weight=1.0,        # per-pixel means, RGB in [-1, 1]
    l1_weight=0.1,
    kl_weight=1e-5,        # x KL summed over the latent / pixel values (LDM sums both; ~10x its 1e-6)
    seconds=420.0,         # training budget when --steps is 0: steps are set from a timed start
    steps=0,               # fixed step count (0: from --seconds)
    workers=0,             # data processes (0: cores - 2)
    eval_resolution=96,    # params/demo.yaml's eval_resolution
)


def parse(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for config.json, weights, metrics")
    ap.add_argument("--device", default="cuda")
    for key, value in SETTINGS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    return vars(ap.parse_args(argv))


# ---- data (runs in worker processes: PIL and numpy only) ----

def _image_crops(task) -> tuple[str, str, np.ndarray]:
    """(kind, sha256 pixel hash, uint8 (K, R, R, 3) crops) of one synthetic or photo task."""
    from furlib.builtin import draw_natural
    from furlib.data.input_entry import pixel_hash
    from furlib.images import center_crop, load_rgb
    from furlib import crops

    kind, key, count, resolution, min_scale, seed = task
    image = load_rgb(draw_natural(key) if kind == "natural" else Path(key))
    rng = np.random.default_rng([seed, hash_int(f"{kind}/{key}/{count}")])
    out = [center_crop(image, resolution)] if kind == "natural" else []
    for _ in range(count):
        box, turns, hflip, vflip = crops.crop_params(image.width, image.height, resolution, rng, min_scale)
        out.append(crops.apply_crop(image, resolution, box, turns, hflip, vflip))
    return kind, pixel_hash(image), np.stack(out)


def hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def tasks(s: dict) -> list:
    from furlib.builtin import pretrain_photos

    r, m, seed = s["resolution"], s["min_crop_scale"], s["seed"]
    photo_parts = max(1, s["photo_crops"] // 50)  # photos in parts of ~50 crops, spread over the run
    per_part = max(1, s["photo_crops"] // photo_parts)
    photos = [("photo", str(path), per_part, r, m, seed + part) for part in range(photo_parts)
              for _, path in pretrain_photos()]
    synthetic = [("natural", i, s["crops_per_natural"], r, m, seed) for i in range(s["natural_images"])]
    # interleave so the first finished tasks already hold both kinds
    step = max(1, len(synthetic) // max(1, len(photos)))
    order = []
    for i, p in enumerate(photos):
        order += synthetic[i * step:(i + 1) * step] + [p]
    return order + synthetic[len(photos) * step:]


class CropBank:
    """Crops arriving from the workers, moved to ``device`` as uint8 NHWC by the main thread."""

    def __init__(self, device):
        self.device, self.lock = device, threading.Lock()
        self.pending, self.banks, self.hashes = [], {"natural": [], "photo": []}, {"natural": set(), "photo": set()}
        self.done, self.failed = 0, None

    def receive(self, result) -> None:  # pool's result thread
        with self.lock:
            self.pending.append(result)

    def error(self, err) -> None:
        self.failed = err

    def drain(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"a data worker failed: {self.failed!r}") from self.failed
        with self.lock:
            items, self.pending = self.pending, []
        for kind, digest, arr in items:
            self.banks[kind].append(torch.from_numpy(arr).to(self.device))
            self.hashes[kind].add(digest)
            self.done += 1
        for kind in self.banks:
            if len(self.banks[kind]) > 1:
                self.banks[kind] = [torch.cat(self.banks[kind])]

    def count(self, kind: str) -> int:
        return sum(len(b) for b in self.banks[kind])

    def batch(self, n: int, photo_fraction: float, gen: torch.Generator) -> torch.Tensor:
        """``rgb_m11`` NCHW float: ``round(n * photo_fraction)`` photo crops, the rest synthetic."""
        n_photo = round(n * photo_fraction) if self.count("photo") else 0
        parts = []
        for kind, k in (("photo", n_photo), ("natural", n - n_photo)):
            if k:
                bank = self.banks[kind][0]
                idx = torch.randint(len(bank), (k,), generator=gen, device="cpu").to(self.device)
                parts.append(bank[idx])
        x = torch.cat(parts).permute(0, 3, 1, 2).float()
        return (x / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


# ---- model, loss, schedule ----

def build_vae(seed: int):
    from diffusers import AutoencoderKL

    from furlib.models import TINY_BASE_CONFIG

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_BASE_CONFIG)


def loss_fn(vae, x_m11: torch.Tensor, s: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """MSE-weighted reconstruction + small KL, from a posterior sample (as LDM trains)."""
    post = vae.encode(x_m11).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=x_m11.device)
    diff = vae.decode(z).sample.float() - x_m11
    mse, l1 = diff.pow(2).mean(), diff.abs().mean()
    kl = post.kl().float().mean() / x_m11[0].numel()  # summed over the latent, per pixel value
    total = s["mse_weight"] * mse + s["l1_weight"] * l1 + s["kl_weight"] * kl
    return total, {"mse": mse.detach(), "l1": l1.detach(), "kl": kl.detach()}  # floats only when logged


def lr_at(step: int, total: int, s: dict) -> float:
    if step < s["warmup_steps"]:
        return s["lr"] * (step + 1) / s["warmup_steps"]
    t = min(1.0, (step - s["warmup_steps"]) / max(1, total - s["warmup_steps"]))
    return s["lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(vae, bank: CropBank, s: dict, device) -> dict:
    """The loop; the step count is fixed (``steps``) or set once from steps 20-60's pace."""
    opt = torch.optim.AdamW(vae.parameters(), lr=s["lr"], betas=(0.9, 0.99), weight_decay=s["weight_decay"])
    gen_cpu = torch.Generator().manual_seed(s["seed"])
    gen_dev = torch.Generator(device=device).manual_seed(s["seed"] + 1)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    total, step, history, t0 = s["steps"] or 10**9, 0, [], time.time()
    while step < total:
        bank.drain()
        x = bank.batch(s["batch"], s["photo_fraction"], gen_cpu)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, s)
        with amp:
            loss, logs = loss_fn(vae, x, s, gen_dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), s["grad_clip"])
        opt.step()
        step += 1
        if step == 20:
            t20 = _sync_time(device)
        if step == 60 and not s["steps"]:
            pace = (_sync_time(device) - t20) / 40
            total = max(61, int((s["seconds"] - (time.time() - t0)) / pace) + 60)
            print(f"{pace * 1000:.1f} ms/step: {total} steps", flush=True)
        if step % 100 == 0 or step == total:
            logs = {k: float(v) for k, v in logs.items()}
            logs.update(step=step, lr=lr_at(step - 1, total, s), grad_norm=float(norm),
                        seconds=round(time.time() - t0, 1), crops=bank.count("natural") + bank.count("photo"))
            history.append(logs)
            print(json.dumps(logs), flush=True)
    return {"steps": total, "train_seconds": round(time.time() - t0, 1), "history": history}


def _sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time()


# ---- measure, save ----

def held_out_sets(eval_resolution: int) -> dict:
    """{name: (ids, hashes, rgb_m11 NCHW)}: the demo's drawings (seed 0) and the held-out photos,
    preprocessed as 03 does."""
    from furlib.builtin import HELD_OUT_PHOTOS, PHOTOS, draw_art, photo_path
    from furlib.data.input_entry import pixel_hash
    from furlib.images import preprocess
    from furlib.images import load_rgb

    art = [load_rgb(draw_art(i, 0)) for i in range(24)]
    photos = [load_rgb(photo_path(p, f, n)) for name, p, f, n in PHOTOS if name in HELD_OUT_PHOTOS]
    sets = {"demo_art_seed0": ([f"builtin/art/{i:03d}" for i in range(24)], art),
            "held_out_photos": (list(HELD_OUT_PHOTOS), photos)}
    return {k: (ids, [pixel_hash(im) for im in ims], torch.stack([preprocess(im, eval_resolution) for im in ims]))
            for k, (ids, ims) in sets.items()}


@torch.no_grad()
def measure(vae, sets: dict, device) -> dict:
    """PSNR (dB, mean over images) with the posterior mode, fp32."""
    from furlib.data.prep_report import is_val
    from furlib.evaluation.metrics import psnr

    out = {}
    for name, (ids, hashes, x) in sets.items():
        x = x.to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        values = psnr(x, recon).cpu()
        out[name] = {"psnr_db": round(float(values.mean()), 2), "n_images": len(ids),
                     "per_image": {i: round(float(v), 2) for i, v in zip(ids, values)}}
        val = [float(v) for h, v in zip(hashes, values) if is_val(h, 0.15)]  # demo.yaml's val_fraction
        if val:
            out[name]["demo_val_split_psnr_db"] = round(sum(val) / len(val), 2)
    return out


@torch.no_grad()
def latent_std(vae, bank: CropBank, gen: torch.Generator) -> float:
    x = bank.batch(256, 0.3, gen)
    return float(vae.encode(x.float()).latent_dist.mode().std())


def save(vae, folder: Path, train_hashes: dict) -> str:
    """config.json, fp16 safetensors and training_set.json; returns the weights' SHA-256."""
    from safetensors.torch import save_file

    from furlib.models import TINY_BASE_WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    vae.save_config(folder)
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, folder / TINY_BASE_WEIGHTS, metadata={"format": "pt"})
    (folder / "training_set.json").write_text(json.dumps(
        {k: sorted(v) for k, v in train_hashes.items()}, indent=0))
    return hashlib.sha256((folder / TINY_BASE_WEIGHTS).read_bytes()).hexdigest()


def main(argv=None) -> int:
    s = parse(argv)
    out, workers = Path(s.pop("out")), s["workers"] or max(1, mp.cpu_count() - 2)
    pool = mp.get_context("fork").Pool(workers)  # before CUDA starts in this process
    device = torch.device(s.pop("device"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    bank = CropBank(device)
    for task in tasks(s):
        pool.apply_async(_image_crops, (task,), callback=bank.receive, error_callback=bank.error)
    pool.close()
    vae = build_vae(s["seed"]).to(device, memory_format=torch.channels_last).train()
    while bank.count("natural") < s["batch"] or bank.count("photo") < 1:  # a first batch of both kinds
        time.sleep(0.2)
        bank.drain()
    result = train(vae, bank, s, device)
    pool.join()
    bank.drain()
    vae.eval().float()
    vae.register_to_config(scaling_factor=round(1.0 / latent_std(vae, bank, torch.Generator().manual_seed(1)), 5))
    sha = save(vae, out, bank.hashes)
    from furlib.models import load_tiny_base  # what users load: the fp16 file, as fp32
    metrics = measure(load_tiny_base(out).to(device), held_out_sets(s["eval_resolution"]), device)
    record = dict(settings=s, weights_sha256=sha, images_seen={k: len(v) for k, v in bank.hashes.items()},
                  crops={k: bank.count(k) for k in bank.banks}, parameters=sum(p.numel() for p in vae.parameters()),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, held_out=metrics, **result)
    (out / "pretrain_metrics.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("weights_sha256", "images_seen", "steps", "train_seconds")}))
    print({k: {kk: vv for kk, vv in v.items() if kk != "per_image"} for k, v in metrics.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
