"""Stage 03: evaluate VAEs side by side on one image set, sd-vae-ft-mse style.

Protocol: each image's short side is resized to ``resolution`` (Lanczos) and centre-cropped to a
square; every VAE encodes with its own encoder, takes the posterior *mode* (deterministic) and
decodes. Batches run under ``torch.inference_mode``, in bf16 autocast on CUDA and fp32 on the
CPU. Only per-image metrics (``furlib.evaluation.metrics``), pool3 features for rFID / KID
(``furlib.evaluation.fid_kid``, 8 KiB an image) and a few 8-bit images for pictures stay in
memory, so the set can be large. Images are ``rgb_m11`` NCHW; kept pictures are uint8 HWC.
Report tables and files: ``furlib.evaluation.eval_report``; tiled and fp16 decode checks: ``furlib.evaluation.decode_checks``.
What 03 knows of a ``compare`` entry (its errors, whether it is pretrained): ``furlib.evaluation.compared``.
"""

import contextlib
import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from furlib import checkpoint, checkpoint_pick, families
from furlib.evaluation import compared, fid_kid, metrics
from furlib.images import center_crop, load_rgb, to_rgb_m11, to_uint8
from furlib.models import SAFETENSORS_SUFFIXES, is_pretrained, load_vae, with_decoder
from furlib.parameters import SEED_LIMIT, strict_bool
from furlib.training.runlock import training_note

MIN_RESOLUTION = 32  # LPIPS(AlexNet)'s trunk pools a smaller crop away ("Output size is too small")


def check_parameters(p: dict) -> None:
    """03's values that need no run or model (the pipeline checks them before 01 starts): one
    ValueError listing every problem."""
    from furlib.perceptual import BACKBONES

    found = []
    if p["eval_resolution"] < MIN_RESOLUTION or p["eval_resolution"] % 8:
        found.append(f"eval_resolution must be a multiple of 8, at least {MIN_RESOLUTION}, got {p['eval_resolution']}")
    for name, low in (("eval_max_images", 0), ("eval_batch_size", 1), ("show_images", 0)):
        if p[name] < low:
            found.append(f"{name} must be an integer >= {low}, got {p[name]!r}")
    if p["lpips_backbone"] not in BACKBONES:
        found.append(f"lpips_backbone must be one of {BACKBONES}, got {p['lpips_backbone']!r}")
    found += run_reader_problems(p)
    if found:
        raise ValueError("invalid 03_eval parameter(s):\n  " + "\n  ".join(found))


def run_reader_problems(p: dict) -> list[str]:
    """The checks 03 and 04 share (both read a run's checkpoint and base): ``seed`` in 02's range,
    ``on_bad_checkpoint``, and base_config / base_family only with an explicit base_model."""
    found = [] if 0 <= p["seed"] < SEED_LIMIT else [f"seed must be an integer in [0, 2**32), got {p['seed']!r}"]
    if p["on_bad_checkpoint"] not in ("refuse", "fallback"):
        found.append(f"on_bad_checkpoint must be 'refuse' or 'fallback', got {p['on_bad_checkpoint']!r}")
    if (p["base_config"] or p["base_family"]) and not p["base_model"]:
        found.append("base_config and base_family are only used with an explicit base_model; leave them empty "
                     "for the run's own")
    return found


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
    step: int | None = None  # the training step of its decoder (None: not from this run)
    base_family: str = ""  # a single-file base's family (furlib.families)
    entry_of: str = ""  # the parameter listing it beside the run's own ('compare'): its errors name it
    made_from: tuple = ()  # the bases a release of 04 records (furlib.evaluation.compared)

    @property
    def pretrained(self) -> bool:
        return all(is_pretrained(b) for b in (self.base_model, *self.made_from))

    def source(self) -> str:
        extra = f" + {self.weights} decoder of {Path(self.checkpoint).name}" if self.checkpoint else ""
        made = f" (a release of 04, made from {', '.join(self.made_from)})" if self.made_from else ""
        return f"{self.base_model}{extra}{made}"

    def load(self):
        with compared.named_entry(self.entry_of, self.base_model):
            vae = load_vae(self.base_model, self.base_config, self.seed, self.base_family,
                           what=compared.loader_key(self.entry_of))
        if self.checkpoint:
            with_decoder(vae, checkpoint.load_decoder_weights(Path(self.checkpoint), self.weights))
        return vae.eval()


def run_models(run_dir, base_model: str = "", base_config: str = "", compare: str = "",
               seed: int = 0, base_family: str = "", on_bad_checkpoint: str = "refuse") -> list:
    """base, finetuned-ema, finetuned-raw (latest checkpoint), extras (``compare``). 03 evaluates
    checkpoints; 04 verifies its own export."""
    ckpt = checkpoint_pick.find_run_checkpoint(Path(run_dir), on_bad_checkpoint)
    base_model, base_config, base_family, state = checkpoint.run_base(ckpt, base_model, base_config, base_family)
    seed = state.get("settings", {}).get("seed", seed)  # 'tiny' bases: the encoder 02 trained with
    step = int(state["step"])
    if note := training_note(run_dir, step, "evaluating"):
        print(note, flush=True)
    specs = [EvalModel("base", base_model, base_config, seed=seed, base_family=base_family)]
    for which, stem in checkpoint.WEIGHT_FILES.items():
        if (ckpt / stem).exists():
            specs.append(EvalModel(f"finetuned-{which}", base_model, base_config, str(ckpt), which, seed, step,
                                   base_family))
    items = [s.strip() for s in compare.split(",") if s.strip()]
    files = [i for i in items if i.endswith(SAFETENSORS_SUFFIXES)]
    run_family = families.of_base(base_model, base_config, base_family) if files else None
    for item in items:  # a single file cannot say its family: it is compared as one of the run's
        specs.append(EvalModel(_unique(_short_name(item), specs), item,
                               base_family=run_family.name if run_family and item in files else "",
                               entry_of="compare", made_from=compared.release_bases(item)))
    return specs


def _short_name(item: str) -> str:
    path = Path(item.split("@")[0])
    return path.stem if path.suffix in SAFETENSORS_SUFFIXES else path.name


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
              max_images: int = 0, key: str = "eval_source") -> ImageSet:
    """'val' (the run's ``data/val`` images), or any source 01 reads (``sources.iter_source``):
    a built-in set (e.g. 'builtin-photos'), a folder, a parquet/arrow file or saved dataset, or a
    Hugging Face dataset id (streamed). ``key``: the parameter an error names."""
    from furlib.builtin import BUILTIN_SOURCES

    source = str(Path(run_dir) / "data" / "val") if eval_source == "val" else eval_source
    name = f"{Path(run_dir).name} val split" if eval_source == "val" else eval_source
    items = _SourceItems(source, split, image_column, max_images)
    if source in BUILTIN_SOURCES or Path(source).expanduser().exists():  # local: list once (a known total)
        items = list(items)
        if not items:
            raise ValueError(f"{key} {eval_source!r}: no images in {source}")
    elif eval_source.startswith((".", "/", "~")):
        raise ValueError(f"{key} {eval_source!r}: no such folder or file")
    else:
        next(iter(items), None)  # a hub dataset that cannot be read fails here, clearly
    return ImageSet(name, items, len(items) if isinstance(items, list) else (max_images or None))


@dataclass
class _SourceItems:
    """Re-iterable (each pass streams a hub dataset again) over ``sources.iter_source``."""
    source: str
    split: str
    image_column: str
    max_images: int

    def __iter__(self):
        from furlib.sources import iter_source

        return iter_source(self.source, self.split, self.image_column, self.max_images)


def batches(images: ImageSet, resolution: int, batch_size: int, upscaled: list | None = None):
    """Yields (ids, ``rgb_m11`` (B, 3, R, R)); appends to ``upscaled`` the ids of images whose short
    side was below ``resolution`` (enlarged: smooth, so they flatter every score)."""
    ids, xs = [], []
    for image_id, src in images.items:
        image = load_rgb(src)
        if upscaled is not None and min(image.size) < resolution:
            upscaled.append(image_id)
        ids.append(image_id)
        xs.append(to_rgb_m11(center_crop(image, resolution)))
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

