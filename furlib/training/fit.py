"""The training run that 02 executes, on one device or many: ``fit(settings)``.

``settings`` is a ``TrainSettings`` (or a dict of 02's parameters, checked by
``TrainSettings.from_params``). One process trains on one device; several (``accelerate
launch``, ``torchrun``, or 02's ``num_gpus`` through accelerate's notebook launcher) each train on
their own GPU with a per-process ``batch_size``, gradients averaged every step (see ``Trainer``).
Rank 0 holds the run lock, logs, previews and checkpoints.

From a shell, with TrainSettings' defaults and a profile's values for the keys 02 declares::

    accelerate launch --num_processes 4 -m furlib.training.fit params/furception_v1.yaml -p max_steps=1000
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from furlib import atomic, checkpoint, crops, models, perceptual, prepared, reconstructions, runinfo
from furlib.training import dashboard, resume
from furlib.training.interrupt import StopAfterStep
from furlib.training.launch import single_process_warning
from furlib.training.logbook import Logbook
from furlib.training.plan import make_plan
from furlib.training.runlock import RunLock
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer


def _process(device: str):
    """(rank, world size, device) from accelerate's view of the launch."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes == 1:
        return 0, 1, runinfo.pick_device(device)
    return state.process_index, state.num_processes, state.device


def _build(s: TrainSettings, rank: int, world: int, dev):
    vae = models.load_vae(s.base_model, s.base_config, s.seed, s.base_family)
    base_print = resume.weights_fingerprint(vae)  # as loaded, before anything trains
    lpips = perceptual.LPIPS("vgg", s.lpips_backbone, s.seed) if s.lpips_weight else None
    notes = [] if models.is_pretrained(s.base_model) else [f"base_model={s.base_model!r} is randomly initialised, not pretrained"]
    if lpips is not None:
        notes.append(perceptual.lpips_note(s.lpips_backbone, "vgg", lpips.source))
    return Trainer(vae, s, dev, lpips, rank, world), notes, base_print


class Preview:
    """Fixed val images, their base reconstructions, and the figures shown every plot_every."""

    def __init__(self, trainer: Trainer, data_dir: Path, s: TrainSettings, logbook: Logbook, show=None):
        val = prepared.list_images(data_dir / "val")
        self.held_out = bool(val)  # without a val split the strip shows training images: say so
        paths = val or prepared.list_images(data_dir / "train")
        self.images = prepared.center_crops(paths[:s.preview_images], s.resolution)
        self.base = trainer.reconstruct(self.images)  # before any checkpoint is loaded
        self.trainer, self.logbook, self.show = trainer, logbook, show
        self.folder = logbook.log_dir.parent / "train"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_step = None

    def __call__(self, title: str) -> None:
        import matplotlib.pyplot as plt

        t = self.trainer
        if self.last_step == t.step_count:  # the loop's last preview was this step: show it once
            return
        self.last_step = t.step_count
        columns = {"original": self.images, "base": self.base, "current": t.reconstruct(self.images),
                   "EMA": t.reconstruct(self.images, ema=True)}
        self.logbook.image("preview", reconstructions.strip_grid(columns), t.step_count)
        figures = {"dashboard": dashboard.training_dashboard(self.logbook.history),
                   "strip": reconstructions.reconstruction_strip(columns, title)}
        for name, fig in figures.items():
            fig.savefig(self.folder / f"{name}.png", dpi=80)
            if self.show:
                self.show(fig)
            plt.close(fig)


def fit(settings: TrainSettings | dict, show=None) -> dict:
    """Train until ``max_steps``; returns (on rank 0) the results also saved as train/results.json.
    First, under the run lock and before any model loads, rank 0 prints what will run (the plan)."""
    s = settings if isinstance(settings, TrainSettings) else TrainSettings.from_params(settings)
    rank, world, dev = _process(s.device)
    alone = single_process_warning(s.device, world)
    if alone:
        print(alone, flush=True)
    if dev.type == "cuda":  # here, so `accelerate launch -m furlib.training.fit` gets them as 02 does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
    lock = RunLock(runinfo.run_dir(s.outputs_dir, s.run_name))
    _take_lock(lock, rank, world)
    try:
        p = make_plan(s, world, dev)  # data, checkpoint and resume checks before minutes of loading
        if rank == 0:
            print(p.describe(), flush=True)
        return _train(s, p, rank, world, dev, show, [n for n in (lock.note, alone) if n])
    finally:
        lock.release()


def fit_on_gpus(settings: TrainSettings) -> dict:
    """02 with ``num_gpus`` > 1: one process per GPU through accelerate's notebook launcher. The
    launcher returns nothing, so rank 0's results come back through train/results.json."""
    from accelerate import notebook_launcher

    notebook_launcher(fit, (settings,), num_processes=settings.num_gpus)
    run_path = runinfo.run_dir(settings.outputs_dir, settings.run_name)
    return json.loads((run_path / "train" / "results.json").read_text())


def _take_lock(lock: RunLock, rank: int, world: int) -> None:
    """Rank 0 takes the run lock; every rank learns whether it did, so all stop together."""
    error = None
    if rank == 0:
        try:
            lock.acquire()
        except RuntimeError as err:
            error = str(err)
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(error)


def _train(s: TrainSettings, p, rank: int, world: int, dev, show, notes: list) -> dict:
    trainer, build_notes, p.fingerprints["base"] = _build(s, rank, world, dev)
    if p.checkpoint is not None:  # another base under the same name refuses; changed data is noted
        build_notes += resume.compare_fingerprints(checkpoint.read_state(p.checkpoint), p.fingerprints,
                                                   s.resume_with_changes, str(p.checkpoint))
    notes = notes + p.notes + build_notes
    logbook = preview = None
    if rank == 0:
        swept = atomic.sweep(p.run_path / "checkpoints", older_than_s=0)  # we hold the run lock
        logbook = Logbook(p.run_path / "logs", resume_step=p.start_step)
        late = logbook.notes + ([f"removed {swept} folder(s) of an interrupted checkpoint save"] if swept else [])
        if p.stale:  # the plan counted their room as free: a lowered keep_checkpoints takes effect now
            removed = checkpoint.prune(p.run_path / "checkpoints", p.checkpoint, s.keep_checkpoints)
            late.append(f"removed {', '.join(f.name for f in removed)}: older than the keep_checkpoints="
                        f"{s.keep_checkpoints} newest")
        print(models.describe(trainer.vae), *build_notes, *late, sep="\n", flush=True)
        notes += late
        preview = Preview(trainer, p.run_path / "data", s, logbook, show)
    if p.checkpoint is not None:
        trainer.load(p.checkpoint)
        if rank == 0:
            print(f"resumed from {p.checkpoint} at step {trainer.step_count}", flush=True)
    t0, first = time.time(), trainer.step_count
    final = _loop(trainer, s, p, rank, logbook, preview)
    if rank != 0:
        return {}
    preview(f"after {trainer.step_count} steps")
    images_per_s = (trainer.step_count - first) * p.global_batch / max(time.time() - t0, 1e-9)
    results = dict(step=trainer.step_count, skipped_steps=trainer.skipped, images_per_s=images_per_s,
                   processes=world, global_batch=p.global_batch, checkpoint=str(final), notes=notes,
                   effective_ema_decay=trainer.ema.decay,
                   preview_split="val" if preview.held_out else "train (no val split)",
                   preview_oklab_l1=trainer.held_out_errors(preview.images, preview.base),
                   last_log=logbook.history[-1] if logbook.history else {})
    logbook.close()
    (p.run_path / "train" / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _loop(trainer: Trainer, s: TrainSettings, p, rank: int, logbook, preview) -> Path:
    """The visible outer loop: step, log, checkpoint, preview; returns the final checkpoint."""
    from furlib.progress import tqdm  # text bars headless and in saved notebooks

    loader = _train_loader(trainer, s, p, rank)
    saved = {}  # step -> folder: a step is saved once (a second save could only cost the first)

    def save():
        trainer.check_in_sync()
        if rank == 0 and trainer.step_count not in saved:
            saved[trainer.step_count] = trainer.save(p.run_path / "checkpoints", s.keep_checkpoints,
                                                     base_model=s.base_model, base_config=s.base_config,
                                                     base_family=s.base_family, fingerprints=p.fingerprints)
        return saved.get(trainer.step_count)

    bar = tqdm(total=s.max_steps * p.global_batch, initial=trainer.step_count * p.global_batch, unit="img",
               unit_scale=True, desc="train", disable=rank != 0)
    t_first = time.time()
    with StopAfterStep(trainer.world_size == 1) as stop:
        for batch in _saving_on_data_errors(_started(loader, trainer, s), trainer, p, save):
            if trainer.step_count >= s.max_steps:
                break
            logs = trainer.step(batch)
            bar.update(p.global_batch)
            step = trainer.step_count
            if rank == 0 and step == p.start_step + 1 and trainer.device.type == "cpu":
                print(f"first step on the CPU: {time.time() - t_first:.1f} s; {s.max_steps - step} to go", flush=True)
            if logbook and (step % s.log_every == 0 or step == s.max_steps):
                row = logbook.log(step, logs)
                bar.set_postfix(rec=f"{row['rec/total']:.4f}", w=f"{row.get('gan/weight', 0):.3g}", skipped=trainer.skipped)
            if step % s.checkpoint_every == 0:
                save()
            if preview and s.plot_every and step % s.plot_every == 0:
                preview(f"step {step}")
            if stop.requested and step < s.max_steps:
                bar.close()
                raise KeyboardInterrupt(f"stopped by hand after step {trainer.step_count}, saved as "
                                        f"{save()}; run 02 again (same run_name) to resume from it")
    bar.close()
    return save() if trainer.step_count > p.start_step or p.checkpoint is None else p.checkpoint


def _started(loader, trainer: Trainer, s: TrainSettings):
    """The loader's batches, once every process has its first. A rank whose share of a stream is
    empty (fewer rows than processes) or unusable ended or failed alone, while the others waited for
    it in the first step's collective, for ever: now every rank stops here, before the first step,
    with the cause. The loaders are endless: one that ends later is an error, not a rank that stops
    training early."""
    rank, world = trainer.rank, trainer.world_size
    batches, first, failure = iter(loader), None, None
    try:
        first = next(batches)
    except StopIteration:
        failure = RuntimeError(_no_rows(s, rank, world))
    except Exception as err:  # noqa: BLE001 - the other ranks hear of it, then it is raised as it was
        failure = err
    why = None if failure is None else f"{type(failure).__name__}: {runinfo.first_line(failure)}"
    said = _from_every_rank(why, world)
    if failure is not None:
        raise failure
    stopped = [f"rank {r} ({m})" for r, m in enumerate(said) if m]
    if stopped:
        raise RuntimeError(f"rank {rank} of {world} stops before the first step: no batch from {', '.join(stopped)}")
    yield first
    yield from batches
    raise RuntimeError(f"rank {rank} of {world}: its training data ended after step {trainer.step_count}, in a pass "
                       "over its share that found no rows (a file without rows in train_source?); remove such files")


def _no_rows(s: TrainSettings, rank: int, world: int) -> str:
    if not s.train_source:  # (a prepared folder's loader never ends)
        return f"rank {rank} of {world}: the training loader gave no batch"
    return (f"rank {rank} of {world} has no rows of train_source {s.train_source!r}: a stream is split between the "
            "processes by rows (or whole files) and this one's share is empty; use at most as many processes as "
            "the source has rows, or a larger source")


def _from_every_rank(message, world: int) -> list:
    """Every rank's ``message`` (None: nothing to say), in rank order (a collective call)."""
    if world == 1:
        return [message]
    import torch.distributed as dist

    every = [None] * world
    dist.all_gather_object(every, message)
    return every


def _saving_on_data_errors(loader, trainer: Trainer, p, save):
    """The loader's batches; when one cannot be made (an image that cannot be read, a file gone),
    the steps trained since the last checkpoint are saved before the error stops the run, and
    the error says where. One process only: ``save`` is collective, and the other ranks' loaders
    did not fail with this one."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:
            if trainer.world_size == 1 and trainer.step_count > p.start_step:
                add_note(err, f"02 saved the {trainer.step_count - p.start_step} step(s) trained in this run as "
                              f"{save()}: run 02 again (same run_name) to resume from it once the data is fixed")
            raise
        yield batch


def add_note(err: Exception, note: str) -> None:
    """``err.add_note`` (Python 3.11+; 3.10 keeps the error as it is and prints the note)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:
        print(note, flush=True)


def _train_loader(trainer: Trainer, s: TrainSettings, p, rank: int):
    """This process's training batches. Every rank decides the cache for itself (the crops are
    the same either way) and all share one cache folder."""
    if s.train_source:  # never prepared: each rank and worker streams its own share
        from furlib.training import streaming

        return streaming.make_stream_loader(
            s.train_source, s.resolution, s.batch_size, seed=s.seed + 7919 * rank, rank=rank, start_step=trainer.step_count,
            world=trainer.world_size, num_workers=p.num_workers, pin_memory=trainer.device.type == "cuda",
            log_dir=p.run_path / "logs" / "stream_rejected", min_crop_scale=s.min_crop_scale,
            source_split=s.source_split, image_column=s.image_column)
    cache_dir = p.run_path / "pixel_cache"
    if rank == 0:
        swept = atomic.sweep(cache_dir)
        if swept:
            print(f"pixel cache: removed {swept} temporaries of interrupted writes", flush=True)
    return crops.make_loader(p.run_path / "data" / "train", s.resolution, s.batch_size,
                             seed=s.seed + 7919 * rank, start_step=trainer.step_count,
                             num_workers=p.num_workers, min_crop_scale=s.min_crop_scale,
                             pin_memory=trainer.device.type == "cuda",
                             cache_dir=cache_dir if p.use_cache else None)


def profile_settings(profile: str, overrides: dict) -> TrainSettings:
    """TrainSettings from a params profile: its keys 02 declares, then ``overrides`` (02's only)."""
    from furlib import pipeline

    names = set(TrainSettings.__dataclass_fields__)
    if pipeline.notebook_path("02_train").exists():  # a checkout: a key no notebook declares is an error
        values = pipeline.load_profile(profile)
    else:  # an installed furlib without the notebooks: other stages' keys cannot be told from typos
        import yaml

        if not Path(profile).exists():
            raise FileNotFoundError(f"params file {profile} does not exist (see params/ for profiles)")
        values = yaml.safe_load(Path(profile).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{profile} must be a flat mapping of parameter names to values")
        other = sorted(set(values) - names)
        print(f"{profile}: not 02_train's parameters, ignored: {other}", flush=True) if other else None
    return TrainSettings.from_params({**{k: v for k, v in values.items() if k in names}, **overrides})


def main(argv=None) -> int:
    from furlib.pipeline import parse_override

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("-p", "--param", action="append", default=[], help="override one of 02's parameters: key=value")
    args = ap.parse_args(argv)
    fit(profile_settings(args.profile, dict(parse_override(x) for x in args.param)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
