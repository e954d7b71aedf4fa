"""The training run that 02 executes, on one device or many: ``fit(params)``.

``params`` is the 02 notebook's parameter dict (``runinfo.notebook_parameters``). One process
trains on one device; several (``accelerate launch``, ``torchrun``, or 02's ``num_gpus`` through
accelerate's notebook launcher) each train on their own GPU with a per-process ``batch_size``,
gradients averaged every step (see ``Trainer``). Rank 0 logs, previews and checkpoints.

From a shell, with the notebook's defaults and a profile's values for the keys 02 declares::

    accelerate launch --num_processes 4 -m furlib.training.fit params/furception_v1.yaml -p max_steps=1000
"""

import argparse
import ast
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from furlib.training import checkpoint, crops, pixelcache, plots
from furlib import models, perceptual, runinfo
from furlib.training.logbook import Logbook
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer


def _process(device: str):
    """(rank, world size, device) from accelerate's view of the launch."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes == 1:
        return 0, 1, runinfo.pick_device(device)
    return state.process_index, state.num_processes, state.device


def _build(params: dict, rank: int, world: int, dev):
    settings = TrainSettings(**{f.name: params[f.name] for f in dataclasses.fields(TrainSettings)})
    vae = models.load_vae(params["base_model"], params["base_config"], params["seed"])
    lpips = perceptual.LPIPS("vgg", params["lpips_backbone"], params["seed"]) if settings.lpips_weight else None
    notes = [] if models.is_pretrained(params["base_model"]) else \
        [f"base_model={params['base_model']!r} is randomly initialised, not pretrained"]
    if lpips is not None:
        notes.append(perceptual.lpips_note(params["lpips_backbone"]))
    return Trainer(vae, settings, dev, lpips, rank, world), notes


class Preview:
    """Fixed val images, their base reconstructions, and the figures shown every plot_every."""

    def __init__(self, trainer: Trainer, data_dir: Path, params: dict, logbook: Logbook, show=None):
        val = crops.list_images(data_dir / "val")
        self.held_out = bool(val)  # without a val split the strip shows training images: say so
        paths = val or crops.list_images(data_dir / "train")
        self.images = crops.center_crops(paths[:params["preview_images"]], params["resolution"])
        self.base = trainer.reconstruct(self.images)  # before any checkpoint is loaded
        self.trainer, self.logbook, self.show = trainer, logbook, show
        self.folder = logbook.log_dir.parent / "train"
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, title: str) -> None:
        import matplotlib.pyplot as plt

        t = self.trainer
        columns = {"original": self.images, "base": self.base, "current": t.reconstruct(self.images),
                   "EMA": t.reconstruct(self.images, ema=True)}
        self.logbook.image("preview", plots.strip_grid(columns), t.step_count)
        figures = {"dashboard": plots.training_dashboard(self.logbook.history),
                   "strip": plots.reconstruction_strip(columns, title)}
        for name, fig in figures.items():
            fig.savefig(self.folder / f"{name}.png", dpi=80)
            if self.show:
                self.show(fig)
            plt.close(fig)


def fit(params: dict, show=None) -> dict:
    """Train until ``max_steps``; returns (on rank 0) the results also saved as train/results.json."""
    crops.check_cache_setting(params["pixel_cache"])  # before minutes of model loading
    rank, world, dev = _process(params["device"])
    if dev.type == "cuda":  # here, so `accelerate launch -m furlib.training.fit` gets them as 02 does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    run_path = runinfo.run_dir(params["outputs_dir"], params["run_name"])
    if not crops.list_images(run_path / "data" / "train"):  # before minutes of model loading
        raise ValueError(f"no training images in {run_path / 'data' / 'train'}: run 01_data_prep with "
                         f"run_name={params['run_name']!r} first")
    latest = checkpoint.latest_checkpoint(run_path)
    if latest is not None and not params["resume"]:  # never overwrite a run's work silently
        raise ValueError(f"resume=False but {run_path} already has checkpoints (latest {latest.name}): "
                         "set resume=True to continue it, or choose a new run_name")
    trainer, notes = _build(params, rank, world, dev)
    logbook = preview = None
    if rank == 0:
        print(models.describe(trainer.vae), *notes, f"{world} process(es) on {dev}", sep="\n", flush=True)
        logbook = Logbook(run_path / "logs", resume_step=latest and checkpoint.read_state(latest)["step"] or 0)
        preview = Preview(trainer, run_path / "data", params, logbook, show)
    if latest is not None:
        trainer.load(latest)
        if rank == 0:
            print(f"resumed from {latest} at step {trainer.step_count}", flush=True)
    t0, first = time.time(), trainer.step_count
    final = _loop(trainer, params, run_path, rank, logbook, preview)
    if rank != 0:
        return {}
    preview(f"after {trainer.step_count} steps")
    images_per_s = (trainer.step_count - first) * params["batch_size"] * world / max(time.time() - t0, 1e-9)
    results = dict(step=trainer.step_count, skipped_steps=trainer.skipped, images_per_s=images_per_s,
                   processes=world, checkpoint=str(final), notes=notes,
                   effective_ema_decay=trainer.ema.decay,
                   preview_split="val" if preview.held_out else "train (no val split)",
                   preview_oklab_l1=trainer.held_out_errors(preview.images, preview.base),
                   last_log=logbook.history[-1] if logbook.history else {})
    logbook.close()
    (run_path / "train" / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _loop(trainer: Trainer, params: dict, run_path: Path, rank: int, logbook, preview) -> Path:
    """The visible outer loop: step, log, checkpoint, preview; returns the final checkpoint."""
    from tqdm.auto import tqdm

    p, world = params, trainer.world_size
    loader = _train_loader(trainer, p, run_path, rank)
    save = lambda: trainer.save(run_path / "checkpoints", p["keep_checkpoints"], base_model=p["base_model"],  # noqa: E731
                                base_config=p["base_config"]) if rank == 0 else None
    per_step = p["batch_size"] * world
    bar = tqdm(total=p["max_steps"] * per_step, initial=trainer.step_count * per_step, unit="img",
               unit_scale=True, desc="train", disable=rank != 0)
    for batch in loader:
        if trainer.step_count >= p["max_steps"]:
            break
        logs = trainer.step(batch)
        bar.update(per_step)
        step = trainer.step_count
        if logbook and (step % p["log_every"] == 0 or step == p["max_steps"]):
            row = logbook.log(step, logs)
            bar.set_postfix(rec=f"{row['rec/total']:.4f}", w=f"{row.get('gan/weight', 0):.3g}", skipped=trainer.skipped)
        if step % p["checkpoint_every"] == 0:
            trainer.check_in_sync()
            save()
        if preview and p["plot_every"] and step % p["plot_every"] == 0:
            preview(f"step {step}")
    bar.close()
    trainer.check_in_sync()
    return save()


def _train_loader(trainer: Trainer, p: dict, run_path: Path, rank: int):
    """This process's training batches; rank 0 prints the pixel-cache decision. Every rank decides
    for itself (the crops are the same either way) and all share one cache folder."""
    cache_dir = run_path / "pixel_cache"  # 02's own folder: 01's data/ is 01's alone
    use_cache, note = crops.cache_plan(run_path / "data" / "train", cache_dir, p["pixel_cache"])
    if rank == 0:
        swept = pixelcache.sweep_stale(cache_dir)
        print(note + (f"; removed {swept} temporaries of interrupted writes" if swept else ""), flush=True)
    return crops.make_loader(run_path / "data" / "train", p["resolution"], p["batch_size"],
                             seed=p["seed"] + 7919 * rank, start_step=trainer.step_count,
                             num_workers=p["num_workers"], min_crop_scale=p["min_crop_scale"],
                             pin_memory=trainer.device.type == "cuda",
                             cache_dir=cache_dir if use_cache else None)


def notebook_defaults(stage: str = "02_train") -> dict:
    """The notebook's parameter defaults, evaluated: one source of defaults for the CLI too."""
    from furlib.pipeline import declared_parameters

    return {k: ast.literal_eval(v) for k, v in declared_parameters(stage).items()}


def main(argv=None) -> int:
    from furlib.pipeline import load_profile, parse_override

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("-p", "--param", action="append", default=[], help="override: key=value")
    args = ap.parse_args(argv)
    params = notebook_defaults()
    profile = load_profile(args.profile, dict(parse_override(x) for x in args.param))
    params.update({k: v for k, v in profile.items() if k in params})
    fit(params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
