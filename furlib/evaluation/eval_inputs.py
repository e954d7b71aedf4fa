"""Stage 03's inputs, what is evaluated: its parameter checks, the VAEs and the image set.

Models: the run's base, the base with its latest checkpoint's EMA and raw decoders, and the
``compare`` entries (``EvalModel``; what 03 knows of a ``compare`` entry: ``furlib.evaluation.compared``).
Images: the run's val split or any source 01 reads, in ``rgb_m11`` NCHW batches; each image's short
side is resized to ``resolution`` (Lanczos) and centre-cropped to a square.
Scoring them: ``furlib.evaluation.evaluate``.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from furlib import checkpoint, checkpoint_pick, families
from furlib.evaluation import compared
from furlib.images import center_crop, load_rgb, to_rgb_m11
from furlib.models import is_pretrained, load_vae, with_decoder
from furlib.parameters import SEED_LIMIT
from furlib.single_file import SAFETENSORS_SUFFIXES
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
