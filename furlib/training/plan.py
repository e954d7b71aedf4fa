"""What a training run will do, decided before any model loads (seconds, not minutes).

``make_plan(settings, processes, device)`` checks the prepared data, picks the checkpoint to
resume (verified; a damaged latest falls back with a note), compares its settings with the
requested ones, decides the pixel cache and the loader workers, and on a CPU says what a step
costs. ``fit`` makes it once, under the run lock, and prints it first ("what will run").
"""

import dataclasses
from pathlib import Path

import torch

from furlib import checkpoint, checkpoint_pick, models, runinfo
from furlib.data import prep_report
from furlib.prepared import list_images
from furlib import crops
from furlib.training import resume

# Measured: 02's defaults (an SD-sized VAE, 256 px, batch 32) on a 2-core CPU took 7 min 23 s for
# 4 steps and 10 GB of memory (issue 15); cost grows with the pixels of a batch and, for another
# base, with its decoder's forward FLOPs per pixel relative to the SD decoder's (measured by
# decoder_tflop_per_mp: 9.46 TFLOP per megapixel for SD's; 0.30 for tiny-random, 0.59 for tiny).
CPU_SECONDS_PER_MEGAPIXEL = 443 / 4 / (32 * 256 * 256 / 1e6)
CPU_GB_AT_DEFAULTS = 10
SD_DECODER_TFLOP_PER_MP = 9.46
CPU_WARN_STEP_S, CPU_WARN_TOTAL_H = 10.0, 1.0  # warn above either: a step or a run too slow to wait for


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
    fingerprints: dict = dataclasses.field(default_factory=dict)  # data (here) and base (fit): recorded, compared
    stale: list = dataclasses.field(default_factory=list)  # checkpoints beyond keep_checkpoints: fit removes them

    def describe(self) -> str:
        start = f"resume from {self.checkpoint} (step {self.start_step})" if self.checkpoint else "a fresh start"
        head = (f"{self.processes} process(es) on {self.device}; global batch {self.global_batch} images per "
                f"step; EMA decay {self.ema_decay:.6f}; run folder {self.run_path}; {start}; "
                f"{self.num_workers} loader worker(s) per process")
        return "\n".join([head, *self.notes])


def worker_cap(requested: int, processes: int) -> tuple[int, str]:
    """Loader workers per process that the machine's cores can feed (one core left for training)."""
    cores = runinfo.usable_cores()
    cap = max(cores // processes - 1, 0)
    if requested <= cap:
        return requested, ""
    return cap, (f"num_workers={requested} capped to {cap}: {cores} CPU core(s) for {processes} "
                 "process(es), one each kept for training")


def base_vae(s):
    """The run's base VAE built from its config on the meta device (no weights, no memory, well
    under a second), for counting; None where its config cannot be read or builds no VAE
    (``load_vae`` then says why, next)."""
    from diffusers import AutoencoderKL

    config = models.base_vae_config(s.base_model, s.base_config, s.base_family)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            return AutoencoderKL.from_config(config)
    except Exception:  # noqa: BLE001 - any config diffusers cannot build
        return None


def decoder_parameters(vae) -> int:
    """Parameters 02 trains (decoder and post_quant_conv)."""
    return sum(p.numel() for n, p in vae.named_parameters() if n.startswith(models.TRAINABLE_PREFIXES))


def decoder_tflop_per_mp(vae) -> tuple[int, float]:
    """(decoder parameters, forward TFLOP per output megapixel) of a meta-device VAE
    (``base_vae``), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = torch.empty(1, vae.config.latent_channels, 8, 8, device="meta")
    with FlopCounterMode(display=False) as counter:
        vae.decode(latent)
    return decoder_parameters(vae), counter.get_total_flops() / (8 * factor) ** 2 / 1e6


def cpu_cost_note(s, device: torch.device, vae) -> str:
    """A warning when the base's size (``vae``: ``base_vae(s)``) makes a CPU run slow (a step or
    the run); '' otherwise."""
    if device.type != "cpu" or vae is None:  # None: loading the base fails next, with its own message
        return ""
    try:
        params, tflop = decoder_tflop_per_mp(vae)
    except Exception:  # noqa: BLE001 - a config that builds no decoder: load_vae says why, next
        return ""
    size = tflop / SD_DECODER_TFLOP_PER_MP
    seconds = CPU_SECONDS_PER_MEGAPIXEL * size * s.batch_size * s.resolution ** 2 / 1e6
    total_h = seconds * s.max_steps / 3600
    if seconds < CPU_WARN_STEP_S and total_h < CPU_WARN_TOTAL_H:
        return ""
    return (f"WARNING: training a {params / 1e6:.1f} M-parameter decoder ({tflop:.2f} TFLOP per megapixel, "
            f"{size:.2f} x the SD decoder's) on the CPU: about {seconds:.0f} s and up to "
            f"~{CPU_GB_AT_DEFAULTS * size * s.batch_size * s.resolution ** 2 / (32 * 256 ** 2):.1f} GB per step at "
            f"{s.resolution} px x batch {s.batch_size} (scaled from SD's, measured on 2 cores), ~{total_h:.3g} h "
            f"for max_steps={s.max_steps}. For a CPU run use the demo-sized profile: "
            "python -m furlib.pipeline params/demo.yaml")


def checkpoint_bytes(s, vae) -> int:
    """About what one checkpoint of this run takes (``vae``: ``base_vae(s)``): the decoder side in
    fp32 (raw, EMA, AdamW's two moments: 16 B a parameter) and the critic (weights and moments:
    12 B); 0 without a base VAE (loading it fails next, with its own message)."""
    from furlib.training.losses import PatchCritic

    if vae is None:
        return 0
    with torch.device("meta"):
        critic = PatchCritic(s.critic_layers, s.critic_channels, s.critic_norm, s.critic_input)
    return 16 * decoder_parameters(vae) + 12 * sum(p.numel() for p in critic.parameters())


def check_room_for_a_checkpoint(s, run_path: Path, vae, stale=(), held=()) -> None:
    """Refuse before training when the disk cannot hold one checkpoint: the next save would fail
    after ``checkpoint_every`` steps, all of them lost. ``stale``: checkpoint folders removed before
    training (beyond ``keep_checkpoints``), whose room counts as free; ``held``: ones beyond it that
    03 or 04 reads now (``checkpoint_pick.held``), which stay, so their room does not count."""
    import shutil

    need = checkpoint_bytes(s, vae)
    where = next(p for p in (run_path, *run_path.parents) if p.exists())
    free = shutil.disk_usage(where).free + sum(f.stat().st_size for d in stale for f in d.rglob("*") if f.is_file())
    if need and free < need:
        kept = len(checkpoint_pick.step_folders(run_path / "checkpoints"))
        lower = (f", or lower keep_checkpoints (now {s.keep_checkpoints or 'all'}; the run holds {kept}): the older "
                 "ones beyond it are removed before training") if kept > 1 and s.keep_checkpoints != 1 else ""
        reading = (f" ({', '.join(f.name for f in held)} beyond keep_checkpoints stay while 03 or 04 reads them: "
                   f"at most {checkpoint_pick.HOLD_S / 60:.0f} min)") if held else ""
        raise ValueError(f"one checkpoint of this run takes ~{need / 1e9:.2f} GB, and {free / 1e9:.2f} GB are free on "
                         f"{where}: 02 could not save its {'next' if kept else 'first'} one{reading}. Free some space"
                         f"{lower}, or set outputs_dir elsewhere")


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
    runinfo.check_folders(run_path, ("logs", "train", "pixel_cache"))  # not at the first write (checkpoints: below)
    vae = base_vae(s)  # its config read once, for the disk's room and the CPU's cost
    ckpt, ckpt_notes = checkpoint_pick.pick_checkpoint(run_path, s.on_bad_checkpoint)
    notes += ckpt_notes
    start, stale, held = 0, [], []
    if ckpt is not None:
        if not s.resume:  # never overwrite a run's work silently
            raise ValueError(f"resume=False but {run_path} already has checkpoints (latest {ckpt.name}): "
                             "set resume=True to continue it, or choose a new run_name")
        state = checkpoint.read_state(ckpt)
        start = state["step"]
        notes += resume.compare(state, dataclasses.asdict(s), processes, str(ckpt))
        notes += resume.thread_note(state, torch.get_num_threads(), device.type)
        if start > s.max_steps:  # a shorter max_steps on resume is no rewind: said, not only "changed"
            notes.append(f"WARNING: max_steps={s.max_steps} is below the checkpoint's step {start}: nothing is "
                         f"trained and {ckpt.name} stays the latest (a run does not rewind: a shorter run is a new run_name)")
        # a lowered keep frees room now, but not the checkpoints 03 or 04 reads (prune leaves them)
        stale, held = checkpoint.prunable(run_path / "checkpoints", ckpt, s.keep_checkpoints)
    check_room_for_a_checkpoint(s, run_path, vae, stale, held)
    use_cache, cache_note = (False, "") if s.train_source else \
        crops.cache_plan(train_dir, run_path / "pixel_cache", s.pixel_cache)
    workers, cap_note = worker_cap(s.num_workers, processes)
    batch_note = "" if s.train_source else batch_size_note(s.global_batch(processes), len(list_images(train_dir)))
    notes += [n for n in (cache_note, cap_note, cpu_cost_note(s, device, vae), batch_note, critic_note(s)) if n]
    return Plan(run_path, device, processes, s.global_batch(processes), s.ema_decay_for(s.global_batch(processes)),
                ckpt, start, use_cache, workers, notes,
                {"data": "" if s.train_source else resume.data_fingerprint(train_dir)}, stale)


def batch_size_note(global_batch: int, images: int) -> str:
    """A warning when one step would hold more crops than there are training images."""
    if global_batch <= images:
        return ""
    return (f"WARNING: a step takes {global_batch} crops (batch_size x processes) but data/train holds only "
            f"{images} image(s): every step repeats images, so the critic sees little variety. Prepare more "
            "images, or lower batch_size")


def critic_note(s) -> str:
    """A warning when WGAN-GP's per-sample penalty meets a critic norm that mixes the samples."""
    if s.gan_loss != "wgan-gp" or s.critic_norm != "batch":
        return ""
    return ("WARNING: critic_norm='batch' mixes the samples of a batch, so WGAN-GP's penalty on each "
            "sample's gradient no longer constrains that sample alone (Gulrajani et al. 2017 leave batch "
            "norm out of the critic for this reason). The card's critic is critic_norm='pixel_layer'; "
            "'sample_layer' is per sample too; batch norm belongs with gan_loss='hinge' (LDM's critic)")
