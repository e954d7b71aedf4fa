"""What a training run will do, decided before any model loads (seconds, not minutes).

``make_plan(settings, processes, device)`` checks the prepared data, picks the checkpoint to
resume (verified; a damaged latest falls back with a note), compares its settings with the
requested ones, decides the pixel cache and the loader workers, and on a CPU says what a step
costs. 02 shows it as "what will run"; ``fit`` makes the same plan under the run lock.
"""

import dataclasses
import os
from pathlib import Path

import torch

from furlib import checkpoint, runinfo
from furlib.data import prep_report
from furlib.prepared import list_images
from furlib.training import crops, resume

# Measured: 02's defaults (an SD-sized VAE, 256 px, batch 32) on a 2-core CPU took 7 min 23 s for
# 4 steps and 10 GB of memory (issue 15); cost grows with the pixels of a batch.
CPU_SECONDS_PER_MEGAPIXEL = 443 / 4 / (32 * 256 * 256 / 1e6)
CPU_GB_AT_DEFAULTS = 10


@dataclasses.dataclass
class Plan:
    run_path: Path
    device: torch.device
    processes: int
    global_batch: int           # images per optimizer step, all processes together
    ema_decay: float
    checkpoint: Path | None     # the checkpoint the run resumes from (None: a fresh start)
    start_step: int
    use_cache: bool
    num_workers: int            # loader processes per training process, after the CPU cap
    notes: list                 # fallbacks, resume changes, caps, costs: shown and recorded

    def describe(self) -> str:
        start = f"resume from {self.checkpoint} (step {self.start_step})" if self.checkpoint else "a fresh start"
        head = (f"{self.processes} process(es) on {self.device}; global batch {self.global_batch} images per "
                f"step; EMA decay {self.ema_decay:.6f}; run folder {self.run_path}; {start}; "
                f"{self.num_workers} loader worker(s) per process")
        return "\n".join([head, *self.notes])


def worker_cap(requested: int, processes: int) -> tuple[int, str]:
    """Loader workers per process that the machine's cores can feed (one core left for training)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cap = max(cores // processes - 1, 0)
    if requested <= cap:
        return requested, ""
    return cap, (f"num_workers={requested} capped to {cap}: {cores} CPU core(s) for {processes} "
                 "process(es), one each kept for training")


def cpu_cost_note(s, device: torch.device) -> str:
    if device.type != "cpu" or s.base_model in ("tiny", "tiny-random"):  # the tiny VAEs: seconds a step
        return ""
    seconds = CPU_SECONDS_PER_MEGAPIXEL * s.batch_size * s.resolution ** 2 / 1e6
    total_h = seconds * s.max_steps / 3600
    return (f"WARNING: training an SD-sized VAE on the CPU: about {seconds:.0f} s and up to "
            f"~{CPU_GB_AT_DEFAULTS * s.batch_size / 32:.0f} GB per step at {s.resolution} px x batch "
            f"{s.batch_size} (measured on 2 cores), ~{total_h:.3g} h for max_steps={s.max_steps}. "
            "For a CPU run use the demo-sized profile: python -m furlib.pipeline params/demo.yaml")


def make_plan(s, processes: int, device: torch.device) -> Plan:
    run_path = runinfo.run_dir(s.outputs_dir, s.run_name)
    train_dir = run_path / "data" / "train"
    if s.train_source:  # streamed: 01's data/ serves only the preview strip (val)
        if not list_images(run_path / "data" / "val"):
            raise ValueError(f"train_source={s.train_source!r} streams the training images, but 02's preview "
                             f"and 03 need held-out ones: run 01_data_prep with run_name={s.run_name!r} on a "
                             "small source first (its data/val is used; its data/train is not)")
        notes = [f"training input: {s.train_source!r} streamed, split per rank and loader worker "
                 "(no deduplication, no pixel cache; rejections under logs/stream_rejected/)"]
    elif not list_images(train_dir):
        raise ValueError(f"no training images in {train_dir}: run 01_data_prep with run_name={s.run_name!r} first")
    else:
        prep_report.check_prepared(run_path / "data", s.resolution)  # a too-large resolution fails here, not in a worker
        notes = []
    ckpt, ckpt_notes = checkpoint.pick_checkpoint(run_path, s.on_bad_checkpoint)
    notes += ckpt_notes
    start = 0
    if ckpt is not None:
        if not s.resume:  # never overwrite a run's work silently
            raise ValueError(f"resume=False but {run_path} already has checkpoints (latest {ckpt.name}): "
                             "set resume=True to continue it, or choose a new run_name")
        state = checkpoint.read_state(ckpt)
        start = state["step"]
        notes += resume.compare(state, dataclasses.asdict(s), processes, str(ckpt))
        notes += resume.thread_note(state, torch.get_num_threads(), device.type)
    use_cache, cache_note = (False, "") if s.train_source else \
        crops.cache_plan(train_dir, run_path / "pixel_cache", s.pixel_cache)
    workers, cap_note = worker_cap(s.num_workers, processes)
    notes += [n for n in (cache_note, cap_note, cpu_cost_note(s, device)) if n]
    return Plan(run_path, device, processes, s.global_batch(processes), s.ema_decay_for(s.global_batch(processes)),
                ckpt, start, use_cache, workers, notes)
