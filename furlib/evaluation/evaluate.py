"""Stage 03: score VAEs side by side on one image set, sd-vae-ft-mse style.

Protocol: every VAE encodes each image (``furlib.evaluation.eval_inputs`` reads and crops them to
``resolution``) with its own encoder, takes the posterior *mode* (deterministic) and decodes.
Batches run under ``torch.inference_mode``, in bf16 autocast on CUDA and fp32 on the CPU. Only
per-image metrics (``furlib.evaluation.metrics``), pool3 features for rFID / KID
(``furlib.evaluation.fid_kid``, 8 KiB an image) and a few 8-bit images for pictures stay in
memory, so the set can be large. Images are ``rgb_m11`` NCHW; kept pictures are uint8 HWC.
Report tables and files: ``furlib.evaluation.eval_report``; tiled and fp16 decode checks: ``furlib.evaluation.decode_checks``.
"""

import contextlib
import heapq
import math
from dataclasses import dataclass, field

import pandas as pd
import torch

from furlib.evaluation import fid_kid, metrics
from furlib.evaluation.eval_inputs import ImageSet, batches
from furlib.images import to_uint8
from furlib.parameters import strict_bool


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp32 on the CPU


def reconstruct(vae, rgb_m11: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mode) and decode; fp32 ``rgb_m11`` out, not clamped."""
    with torch.inference_mode(), _autocast(rgb_m11.device):
        return vae.decode(vae.encode(rgb_m11).latent_dist.mode()).sample.float()



class _Keeper:
    """The images pictures need: the first ``n``, and the ``n`` largest and smallest deltas."""

    def __init__(self, n: int, delta_label: str = "Δ"):
        self.n, self.label, self.seq, self.chosen, self.best, self.worst = n, delta_label, 0, [], [], []

    def offer(self, ids, x, recons: dict, delta) -> None:
        for i, image_id in enumerate(ids):
            d = float(delta[i]) if delta is not None else math.nan
            make = lambda: {"id": image_id, "delta": d, "delta_label": self.label, "original": to_uint8(x[i]),  # noqa: E731
                            "recons": {k: to_uint8(r[i]) for k, r in recons.items()}}
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
    kid: dict = field(default_factory=dict)       # model -> float (unbiased KID), or "n/a"


def evaluate(vaes: dict, images: ImageSet, *, resolution: int = 256, batch_size: int = 8,
             device="cpu", lpips_backbone: str = "pretrained", rfid: bool = True, n_show: int = 4,
             base: str = "base", finetuned: str = "", rank_by: str = "psnr", seed: int = 0) -> EvalResult:
    """Evaluate every VAE in ``vaes`` ({name: AutoencoderKL on ``device``}) on ``images``.

    Images are ranked by ``rank_by`` ('psnr' or 'lpips') of ``finetuned`` (default: the first
    model after ``base``) against ``base``, to keep the most improved and regressed ones.
    """
    from furlib.progress import tqdm

    strict_bool("rfid", rfid)
    if rank_by not in ("psnr", "lpips"):
        raise ValueError(f"rank_by must be 'psnr' or 'lpips', got {rank_by!r}")
    device = torch.device(device)
    lpips, lpips_note = _load_lpips(lpips_backbone, device, seed, rank_by)
    fid, rfid_note = _make_rfid(rfid, device, seed)
    finetuned = finetuned or next((n for n in vaes if n != base), "")
    label = "ΔPSNR (dB)" if rank_by == "psnr" else "−ΔLPIPS"
    keeper, rows, n, upscaled = _Keeper(n_show, label), [], 0, []
    total = math.ceil(images.total / batch_size) if images.total else None
    for ids, x in tqdm(batches(images, resolution, batch_size, upscaled), total=total, desc="evaluate", unit="batch"):
        x = x.to(device)
        batch_rows, per_model, recons = _score_batch(vaes, ids, x, lpips, fid)
        rows += batch_rows
        keeper.offer(ids, x, recons, _delta(per_model, base, finetuned, rank_by))
        n += len(ids)
    if n == 0:
        raise ValueError("eval_source: the image set is empty")
    (rfid_values, kid_values), rfid_note = _finish_rfid(fid, rfid_note, list(vaes), n)
    notes = {"image_set": images.name, "n_images": n, "resolution": resolution,
             "lpips": lpips_note[0], "lpips_detail": lpips_note[1], "rfid": rfid_note[0],
             "rfid_detail": rfid_note[1], "rank_by": f"{rank_by}: {finetuned} vs {base}",
             "upscaled": len(upscaled), "upscaled_examples": upscaled[:5]}
    return EvalResult(pd.DataFrame(rows), rfid_values, notes, keeper.examples(), kid_values)


def _load_lpips(lpips_backbone: str, device, seed: int, rank_by: str):
    """((AlexNet LPIPS, VGG LPIPS), each or None; (short note, detail)); ranking by LPIPS needs
    AlexNet's (sd-vae-ft-mse's table); VGG's is the recipe's loss network."""
    alex, alex_text = metrics.load_lpips(lpips_backbone, device, seed, "alex")
    vgg, vgg_text = metrics.load_lpips(lpips_backbone, device, seed, "vgg")
    if rank_by == "lpips" and alex is None:
        raise ValueError(f"rank_by='lpips' but LPIPS is unavailable: {alex_text}")
    if alex is not None and vgg is not None:
        note = (f"{alex_text}; {vgg_text}", "")
    else:
        note = ("LPIPS n/a where its pretrained weights are not installed", "; ".join((alex_text, vgg_text)))
    return (alex, vgg), note


def _score_batch(vaes: dict, ids: list, x: torch.Tensor, lpips, fid) -> tuple:
    """(per-image rows, {model: per-image metrics}, {model: reconstruction}); feeds rFID too."""
    rows, per_model = [], {}
    recons = {name: reconstruct(vae, x) for name, vae in vaes.items()}
    for name, recon in recons.items():
        _check_finite(name, ids, recon)
        per_model[name] = metrics.per_image_metrics(x, recon, *lpips)
        rows += [{"image": i, "model": name, **{k: float(v[j]) for k, v in per_model[name].items()}}
                 for j, i in enumerate(ids)]
        if fid:
            fid.update(name, recon)
    if fid:
        fid.update("real", x)
    return rows, per_model, recons


def _check_finite(name: str, ids: list, recon: torch.Tensor) -> None:
    """NaN pixels would drop the image from that model's means (``n_images`` still counting it)
    and reach rFID as black: an error naming the model and images, not a quietly better score."""
    bad = [i for i, ok in zip(ids, recon.isfinite().flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise ValueError(f"model {name!r} decoded NaN or inf pixels for {len(bad)} of {len(ids)} images "
                         f"({', '.join(map(str, bad[:5]))}) of a batch: its decoder diverged or overflowed; "
                         "its scores would leave those images out")


def _delta(per_model: dict, base: str, finetuned: str, rank_by: str):
    if base not in per_model or finetuned not in per_model:
        return None
    d = per_model[finetuned][rank_by] - per_model[base][rank_by]
    return -d if rank_by == "lpips" else d  # positive = the finetune is better


def _make_rfid(enabled: bool, device, seed: int):
    """(RFID or None, (short note, detail)); the short note goes into metrics.md."""
    if not enabled:
        return None, ("rFID and KID not computed (rfid=False)", "")
    try:
        return fid_kid.RFID(device, seed=seed), ("", "")
    except fid_kid.RFIDUnavailable as err:
        return None, ("rFID and KID n/a (FID Inception weights not installed)", str(err))


def _finish_rfid(fid, note: tuple, names: list, n: int):
    """(({model: rFID}, {model: KID}), (short note, detail)); "n/a" where not computed."""
    na = {k: "n/a" for k in names}
    if fid is None:
        return (na, na), note
    if n < 2:
        return (na, na), ("rFID and KID n/a (they need at least 2 images)", "")
    scores = fid.compute()
    small = " (FID is biased upwards below ~2048 images: compare models on the same set only)"
    text = (f"rFID and KID (unbiased, cubic kernel, {fid_kid.kid_protocol(n)}) of each model's {n} "
            f"reconstructions vs the {n} originals, FID Inception-v3 pool3{small if n < 2048 else ''}")
    return ({k: v["rfid"] for k, v in scores.items()}, {k: v["kid"] for k, v in scores.items()}), (text, "")

