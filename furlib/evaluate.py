"""Stage 03: evaluate VAEs side by side on one image set, sd-vae-ft-mse style.

Protocol: each image's short side is resized to ``resolution`` (Lanczos) and centre-cropped to a
square; every VAE encodes with its own encoder, takes the posterior *mode* (deterministic) and
decodes. Batches run under ``torch.inference_mode``, in bf16 autocast on CUDA and fp32 on the
CPU. Only per-image metrics (``furlib.metrics``) and a few 8-bit images for pictures stay in
memory, so the set can be large. Images are ``rgb_m11`` NCHW; kept pictures are uint8 HWC.
Outputs under ``outputs/<run>/eval/``: ``per_image.csv``, ``metrics.{json,csv,md}``.
Also here: the tiled-decoding and fp16-decoding checks of a decoder.
"""

import contextlib
import copy
import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from furlib import checkpoint, metrics
from furlib.models import is_pretrained, load_vae, with_decoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FP16_MAX = 65504.0
# Table columns: metric key -> (header, decimals, signed); arrows say which way is better.
TABLE = {"psnr": ("PSNR ↑", 2, False), "ssim": ("SSIM ↑", 3, False), "lpips": ("LPIPS ↓", 3, False),
         "delta_e_ok": ("ΔE_ok ↓", 4, False), "d_a": ("Δa", 4, True), "d_b": ("Δb", 4, True),
         "ab_shift": ("‖Δab‖ ↓", 4, False), "hf_ratio": ("HF ratio (1 = orig.)", 3, False)}


@dataclass(frozen=True)
class EvalModel:
    """One VAE to evaluate: ``base_model`` as ``load_vae`` reads it, optionally with the decoder
    side of a training checkpoint (``weights`` 'ema' or 'raw') loaded over it."""
    name: str
    base_model: str
    base_config: str = ""
    checkpoint: str = ""
    weights: str = ""
    seed: int = 0  # only for 'tiny' / 'random:sd', whose weights come from it

    @property
    def pretrained(self) -> bool:
        return is_pretrained(self.base_model)

    def source(self) -> str:
        extra = f" + {self.weights} decoder of {Path(self.checkpoint).name}" if self.checkpoint else ""
        return f"{self.base_model}{extra}"

    def load(self):
        vae = load_vae(self.base_model, self.base_config, self.seed)
        if self.checkpoint:
            with_decoder(vae, checkpoint.load_decoder_weights(Path(self.checkpoint), self.weights))
        return vae.eval()


def run_models(run_dir, base_model: str = "", base_config: str = "", compare: str = "",
               seed: int = 0) -> list:
    """base, finetuned-ema, finetuned-raw (latest checkpoint), export (if written), extras."""
    ckpt = checkpoint.find_run_checkpoint(Path(run_dir))
    state = checkpoint.read_state(ckpt)
    if not base_model:  # the base the run trained from, with the architecture it used
        base_model, base_config = state.get("base_model", ""), state.get("base_config", "")
    if not base_model:
        raise ValueError(f"base_model: {ckpt}/state.json names no base model; pass base_model")
    seed = state.get("settings", {}).get("seed", seed)  # 'tiny' bases: the encoder 02 trained with
    specs = [EvalModel("base", base_model, base_config, seed=seed)]
    for which, stem in checkpoint.WEIGHT_FILES.items():
        if (ckpt / stem).exists():
            specs.append(EvalModel(f"finetuned-{which}", base_model, base_config, str(ckpt), which, seed))
    export = Path(run_dir) / "export" / "diffusers"
    if (export / "config.json").exists():
        specs.append(EvalModel("export", str(export)))
    for item in filter(None, (s.strip() for s in compare.split(","))):
        specs.append(EvalModel(_unique(_short_name(item), specs), item))
    return specs


def _short_name(item: str) -> str:
    path = Path(item.split("@")[0])
    return path.stem if path.suffix == ".safetensors" else path.name


def _unique(name: str, specs: list) -> str:
    taken = {s.name for s in specs}
    return name if name not in taken else next(f"{name}-{i}" for i in range(2, 99) if f"{name}-{i}" not in taken)


def load_models(specs: list, device) -> dict:
    return {s.name: s.load().to(device) for s in specs}


@dataclass
class ImageSet:
    """``items``: a re-iterable of (image id, PIL image or bytes or path); ``total`` may be None."""
    name: str
    items: object
    total: int | None


def image_set(eval_source: str, run_dir, split: str = "validation", image_column: str = "image",
              max_images: int = 0) -> ImageSet:
    """'val' (the run's ``data/val/*.png``), a folder of images, or a Hugging Face dataset id."""
    limit = max_images or None
    if eval_source == "val" or Path(eval_source).expanduser().is_dir():
        folder = Path(run_dir) / "data" / "val" if eval_source == "val" else Path(eval_source).expanduser()
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not paths:
            raise ValueError(f"eval_source {eval_source!r}: no images in {folder}")
        name = f"{Path(run_dir).name} val split" if eval_source == "val" else f"folder {folder.name}"
        return ImageSet(name, [(str(p.relative_to(folder)), p) for p in paths], len(paths))
    if eval_source.startswith((".", "/", "~")):
        raise ValueError(f"eval_source {eval_source!r}: no such folder")
    return _hub_images(eval_source, split, image_column, limit)


def _hub_images(dataset_id: str, split: str, image_column: str, limit) -> ImageSet:
    import datasets

    try:  # streaming: a 5000-image slice must not download a whole dataset
        ds = datasets.load_dataset(dataset_id, split=split, streaming=True)
        columns = ds.column_names or list(next(iter(ds)).keys())
    except Exception as err:  # ConnectionError offline, DatasetNotFoundError, bad split ...
        raise RuntimeError(f"eval_source {dataset_id!r} (eval_split {split!r}): could not load the "
                           f"Hugging Face dataset ({type(err).__name__}: {err}). Offline, use "
                           f"eval_source='val' or a folder of images.") from err
    if image_column not in columns:
        raise ValueError(f"image_column {image_column!r} is not in {dataset_id}: columns {columns}")
    ds = ds.select_columns([image_column]).take(limit) if limit else ds.select_columns([image_column])

    class _Items:  # re-iterable: each pass streams again
        def __iter__(self):
            for i, row in enumerate(ds):
                img = row[image_column]
                yield f"{split}/{i:06d}", (img.get("bytes") or img.get("path")) if isinstance(img, dict) else img

    return ImageSet(f"{dataset_id} ({split})", _Items(), limit)


def preprocess(src, resolution: int) -> torch.Tensor:
    """Image -> (3, R, R) ``rgb_m11``: short side to R with Lanczos, then the centre square."""
    from PIL import Image

    from furlib.images import load_rgb  # EXIF orientation, ICC -> sRGB, alpha over white

    img = load_rgb(src)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.LANCZOS)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def batches(images: ImageSet, resolution: int, batch_size: int):
    """Yields (ids, ``rgb_m11`` (B, 3, R, R))."""
    ids, xs = [], []
    for image_id, src in images.items:
        ids.append(image_id)
        xs.append(preprocess(src, resolution))
        if len(ids) == batch_size:
            yield ids, torch.stack(xs)
            ids, xs = [], []
    if ids:
        yield ids, torch.stack(xs)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp32 on the CPU


def reconstruct(vae, rgb_m11: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mode) and decode; fp32 ``rgb_m11`` out, not clamped."""
    with torch.inference_mode(), _autocast(rgb_m11.device):
        return vae.decode(vae.encode(rgb_m11).latent_dist.mode()).sample.float()


def _u8(rgb_m11: torch.Tensor) -> np.ndarray:
    return (metrics.to01(rgb_m11) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


class _Keeper:
    """The images pictures need: the first ``n``, and the ``n`` largest and smallest deltas."""

    def __init__(self, n: int, delta_label: str = "Δ"):
        self.n, self.label, self.seq, self.chosen, self.best, self.worst = n, delta_label, 0, [], [], []

    def offer(self, ids, x, recons: dict, delta) -> None:
        for i, image_id in enumerate(ids):
            d = float(delta[i]) if delta is not None else math.nan
            make = lambda: {"id": image_id, "delta": d, "delta_label": self.label, "original": _u8(x[i]),  # noqa: E731
                            "recons": {k: _u8(r[i]) for k, r in recons.items()}}
            if len(self.chosen) < self.n:
                self.chosen.append(make())
            if math.isfinite(d):
                self._push(self.best, d, make)
                self._push(self.worst, -d, make)

    def _push(self, heap: list, key: float, make) -> None:
        self.seq += 1  # tie-breaker, so the dicts are never compared
        if len(heap) < self.n:
            heapq.heappush(heap, (key, self.seq, make()))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, self.seq, make()))

    def examples(self) -> dict:
        """Improved lists only images that improved (delta > 0), regressed only those that regressed."""
        ordered = lambda heap: [e for k, _, e in sorted(heap, key=lambda t: -t[0]) if k > 0]  # noqa: E731
        return {"chosen": self.chosen, "most_improved": ordered(self.best),
                "most_regressed": ordered(self.worst)}


@dataclass
class EvalResult:
    per_image: pd.DataFrame          # one row per (image, model)
    rfid: dict                       # model -> float, or "n/a"
    notes: dict                      # image_set, n_images, resolution, lpips, rfid, models ...
    examples: dict = field(default_factory=dict)  # chosen / most_improved / most_regressed


def evaluate(vaes: dict, images: ImageSet, *, resolution: int = 256, batch_size: int = 8,
             device="cpu", lpips_backbone: str = "pretrained", rfid: bool = True, n_show: int = 4,
             base: str = "base", finetuned: str = "", rank_by: str = "psnr", seed: int = 0) -> EvalResult:
    """Evaluate every VAE in ``vaes`` ({name: AutoencoderKL on ``device``}) on ``images``.

    Images are ranked by ``rank_by`` ('psnr' or 'lpips') of ``finetuned`` (default: the first
    model after ``base``) against ``base``, to keep the most improved and regressed ones.
    """
    from tqdm.auto import tqdm

    if rank_by not in ("psnr", "lpips"):
        raise ValueError(f"rank_by must be 'psnr' or 'lpips', got {rank_by!r}")
    device = torch.device(device)
    lpips, lpips_text = metrics.load_lpips(lpips_backbone, device, seed)
    if rank_by == "lpips" and lpips is None:
        raise ValueError(f"rank_by='lpips' but LPIPS is unavailable: {lpips_text}")
    fid, rfid_note = _make_rfid(rfid, device)
    lpips_note = (lpips_text, "") if lpips is not None else \
        ("LPIPS n/a (pretrained AlexNet weights unavailable)", lpips_text)
    finetuned = finetuned or next((n for n in vaes if n != base), "")
    label = "ΔPSNR (dB)" if rank_by == "psnr" else "−ΔLPIPS"
    keeper, rows, n = _Keeper(n_show, label), [], 0
    total = math.ceil(images.total / batch_size) if images.total else None
    for ids, x in tqdm(batches(images, resolution, batch_size), total=total, desc="evaluate", unit="batch"):
        x, per_model = x.to(device), {}
        recons = {name: reconstruct(vae, x) for name, vae in vaes.items()}
        for name, recon in recons.items():
            per_model[name] = metrics.per_image_metrics(x, recon, lpips)
            rows += [{"image": i, "model": name, **{k: float(v[j]) for k, v in per_model[name].items()}}
                     for j, i in enumerate(ids)]
            if fid:
                fid.update(name, recon)
        if fid:
            fid.update("real", x)
        keeper.offer(ids, x, recons, _delta(per_model, base, finetuned, rank_by))
        n += len(ids)
    if n == 0:
        raise ValueError("eval_source: the image set is empty")
    rfid_values, rfid_note = _finish_rfid(fid, rfid_note, list(vaes), n)
    notes = {"image_set": images.name, "n_images": n, "resolution": resolution,
             "lpips": lpips_note[0], "lpips_detail": lpips_note[1], "rfid": rfid_note[0],
             "rfid_detail": rfid_note[1], "rank_by": f"{rank_by}: {finetuned} vs {base}"}
    return EvalResult(pd.DataFrame(rows), rfid_values, notes, keeper.examples())


def _delta(per_model: dict, base: str, finetuned: str, rank_by: str):
    if base not in per_model or finetuned not in per_model:
        return None
    d = per_model[finetuned][rank_by] - per_model[base][rank_by]
    return -d if rank_by == "lpips" else d  # positive = the finetune is better


def _make_rfid(enabled: bool, device):
    """(RFID or None, (short note, detail)); the short note goes into metrics.md."""
    if not enabled:
        return None, ("rFID not computed (rfid=False)", "")
    try:
        return metrics.RFID(device), ("", "")
    except metrics.RFIDUnavailable as err:
        return None, ("rFID n/a (FID Inception weights unavailable)", str(err))


def _finish_rfid(fid, note: tuple, names: list, n: int):
    if fid is None:
        return {k: "n/a" for k in names}, note
    if n < 2:
        return {k: "n/a" for k in names}, ("rFID n/a (it needs at least 2 images)", "")
    small = " (under 2048 images the covariance is rank-deficient: compare on the same set only)"
    return fid.compute(), (f"rFID over {n} images, FID Inception-v3 pool3{small if n < 2048 else ''}", "")


def summarize(result: EvalResult) -> pd.DataFrame:
    """Index: model (evaluation order); columns n_images, rFID, then <metric> and <metric>_std."""
    df = result.per_image
    order = list(dict.fromkeys(df["model"]))
    stats = df.groupby("model", sort=False)[list(metrics.PER_IMAGE)].agg(["mean", "std"]).loc[order]
    stats.columns = [k if agg == "mean" else f"{k}_std" for k, agg in stats.columns]
    stats.insert(0, "rFID", [result.rfid.get(m, "n/a") for m in order])
    stats.insert(0, "n_images", df.groupby("model", sort=False).size().loc[order])
    return stats


def _cell(mean, std, decimals: int, signed: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{decimals}f}}"
    return fmt.format(mean) + ("" if std is None or math.isnan(std) else f" ± {std:.{decimals}f}")


def summary_table(result: EvalResult) -> pd.DataFrame:
    """The card-shaped table as strings: rFID / PSNR / SSIM / LPIPS / Oklab metrics, mean ± std."""
    s = summarize(result)
    out = pd.DataFrame(index=s.index)
    out["rFID ↓"] = [f"{v:.2f}" if isinstance(v, float) else "n/a" for v in s["rFID"]]
    for key, (head, dec, signed) in TABLE.items():
        out[head] = [_cell(m, sd, dec, signed) for m, sd in zip(s[key], s[f"{key}_std"])]
    return out


def markdown(result: EvalResult, model_notes: dict | None = None) -> str:
    """Self-contained Markdown table plus a note line (included verbatim by the model card)."""
    t = summary_table(result)
    lines = ["| model | " + " | ".join(t.columns) + " |", "|---" * (len(t.columns) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(row) + " |" for m, row in zip(t.index, t.values.tolist())]
    n = result.notes
    note = (f"_{n['n_images']} images of {n['image_set']}, {n['resolution']}×{n['resolution']} (short side "
            f"Lanczos-resized, centre crop; posterior mode); mean ± std over images. {n['lpips']}. "
            f"{n['rfid']}. Oklab: ΔE_ok mean distance, Δa/Δb mean tint of reconstruction − original, "
            f"HF ratio = Laplacian energy reconstruction / original (> 1 adds noise, < 1 blurs)._")
    untrained = [k for k, v in (model_notes or {}).items() if not v.get("pretrained", True)]
    if untrained:
        note += f"\n\n_Not pretrained (test weights, numbers mean nothing): {', '.join(untrained)}._"
    return "\n".join(lines) + "\n\n" + note + "\n"


def summary_json(result: EvalResult, model_notes: dict | None = None) -> dict:
    s = summarize(result)
    clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else (None if math.isnan(v) else str(v))  # noqa: E731
    models = {m: {"rFID": clean(row["rFID"]), "n_images": int(row["n_images"]), **(model_notes or {}).get(m, {}),
                  **{k: {"mean": clean(float(row[k])), "std": clean(float(row[f"{k}_std"]))} for k in metrics.PER_IMAGE}}
              for m, row in s.iterrows()}
    return {"notes": result.notes, "models": models}


def write_outputs(result: EvalResult, eval_dir, model_notes: dict | None = None) -> dict:
    """per_image.csv, metrics.csv (numeric summary), metrics.json, metrics.md; returns their paths."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: eval_dir / f for k, f in (("per_image", "per_image.csv"), ("csv", "metrics.csv"),
                                          ("json", "metrics.json"), ("md", "metrics.md"))}
    result.per_image.to_csv(paths["per_image"], index=False)
    summarize(result).to_csv(paths["csv"], index_label="model")
    paths["json"].write_text(json.dumps(summary_json(result, model_notes), indent=1, ensure_ascii=False))
    paths["md"].write_text(markdown(result, model_notes))
    return paths


# ---- decode checks: tiled decoding and fp16 ------------------------------------------------

def check_latent(vae, rgb_m11: torch.Tensor) -> torch.Tensor:
    """The latent of one image (bicubic-resized) large enough for 2x2 decoder tiles."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = vae.tile_latent_min_size * 3 // 2  # tiles start every 3/4 tile: two per side
    x = F.interpolate(rgb_m11[:1].float(), size=(side * factor,) * 2, mode="bicubic",
                      antialias=True, align_corners=False).clamp(-1, 1)
    with torch.inference_mode():
        return vae.encode(x.to(vae.device)).latent_dist.mode().float()


def _seam_bands(vae, size: int) -> list:
    """Pixel ranges [start, end) where diffusers blends neighbouring decoder tiles."""
    tile = vae.tile_sample_min_size
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile
    blend = int(tile * vae.tile_overlap_factor)
    stride = tile - blend  # each tile keeps this many pixels
    return [(k, min(k + blend, size)) for k in range(stride, size, stride)]


def tiled_decode_check(vae, latent_nchw: torch.Tensor) -> dict:
    """Decode with and without ``vae.enable_tiling()``; differences in [0, 1] units.

    seam_score = mean |tiled - full| inside the tile blend bands / mean outside them:
    1 means the tiling error is spread evenly, > 1 that it sits on the tile borders (seams).
    """
    with torch.inference_mode():
        vae.disable_tiling()
        full = vae.decode(latent_nchw).sample.float()
        vae.enable_tiling()
        try:
            tiled = vae.decode(latent_nchw).sample.float()
        finally:
            vae.disable_tiling()
    diff = ((tiled - full).abs() / 2).mean(1)[0].cpu()  # (H, W), channel mean
    bands = _seam_bands(vae, diff.shape[-1])
    mask = torch.zeros(diff.shape, dtype=torch.bool)
    for a, b in bands:
        mask[a:b, :] = mask[:, a:b] = True
    seam = diff[mask].mean() / diff[~mask].mean().clamp_min(1e-12) if bands else math.nan
    return {"image_px": list(diff.shape), "tiles_per_side": len(bands) + 1,
            "max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "seam_score": float(seam),
            "bands": bands, "col_profile": diff.mean(0).tolist(), "row_profile": diff.mean(1).tolist()}


def _decoder_blocks(vae) -> list:
    """(name, module) of the decoder stages whose outputs are worth watching for overflow."""
    kinds = ("ResnetBlock2D", "Attention", "Upsample2D")
    return [(n, m) for n, m in vae.decoder.named_modules()
            if type(m).__name__ in kinds or n in ("conv_in", "conv_norm_out", "conv_out")]


def fp16_decode_check(vae, latent_nchw: torch.Tensor) -> dict:
    """Decode in float16 (a copy of the VAE); peak |activation| per decoder block via hooks.

    On the CPU this runs where torch has fp16 kernels; if it has none, status says so.
    max_abs_diff_vs_fp32 is in [0, 1] units over the finite pixels.
    """
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its "cast with torch_dtype instead" warning: we cast on purpose
    vae16 = copy.deepcopy(vae).to(torch.float16)
    dlog.set_verbosity(verbosity)
    peaks: dict = {}

    def hook(name):
        def record(_module, _inputs, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            peaks[name] = max(peaks.get(name, 0.0), float(t.float().abs().nan_to_num(math.inf).max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _decoder_blocks(vae16)]
    try:
        with torch.inference_mode():
            out = vae16.decode(latent_nchw.to(torch.float16)).sample.float()
            ref = vae.decode(latent_nchw.float()).sample.float()
    except (RuntimeError, NotImplementedError) as err:  # no fp16 kernel on this device
        return {"status": f"not run on {vae.device.type}: {type(err).__name__}: {err}"}
    finally:
        for h in handles:
            h.remove()
        del vae16
    finite = torch.isfinite(out)
    first_bad = next((n for n, p in peaks.items() if not math.isfinite(p)), None)
    peak = max((p for p in peaks.values() if math.isfinite(p)), default=math.nan)
    diff = ((out - ref).abs() / 2)[finite]
    return {"status": "overflow" if first_bad or not finite.all() else "ok",
            "nonfinite_values": int((~finite).sum()), "first_nonfinite_block": first_bad,
            "peak_abs": peak, "fp16_max": FP16_MAX, "headroom": FP16_MAX / peak if peak else math.inf,
            "max_abs_diff_vs_fp32": float(diff.max()) if diff.numel() else math.nan, "peaks": peaks}


def decode_checks(vaes: dict, rgb_m11: torch.Tensor) -> tuple:
    """Both checks for every VAE on one image: (summary DataFrame, {name: details})."""
    rows, details = [], {}
    for name, vae in vaes.items():
        z = check_latent(vae, rgb_m11)
        tiled, half = tiled_decode_check(vae, z), fp16_decode_check(vae, z)
        details[name] = {"latent": list(z.shape), "tiled": tiled, "fp16": half}
        rows.append({"model": name, "image_px": "×".join(map(str, tiled["image_px"])),
                     "tiled max |Δ|": tiled["max_abs"], "tiled mean |Δ|": tiled["mean_abs"],
                     "seam score": tiled["seam_score"], "fp16": half["status"],
                     "fp16 peak |act|": half.get("peak_abs"), "fp16 first non-finite": half.get("first_nonfinite_block"),
                     "fp16 max |Δ| vs fp32": half.get("max_abs_diff_vs_fp32")})
    return pd.DataFrame(rows).set_index("model"), details
