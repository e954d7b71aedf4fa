"""Time the project's training step on a GPU, beside two plain references, in one run.

    python benchmarks/train_step.py --out results.json            # all variants, one process each
    python benchmarks/train_step.py --variant project --steps 10  # one variant
    python benchmarks/train_step.py --variants "project[lpips_autocast=True],project"  # a lever's cost
    python benchmarks/train_step.py --device cpu --model tiny --res 64 --batch 2 --steps 2 --warmup 1 \
        --flops 1 --variants "project-eager[lpips_autocast=True],project-eager"  # CPU check of a command

A variant takes settings in brackets, ``variant[key=value;...]``: a ``speed.Tuning`` field
(``lpips_autocast``, ``compile_critic``, ``compile_penalty``, ``math_attention``, ``tap_detached``,
``channel_stats_norm``, ``inductor_options``), a
``TrainSettings`` field (``mixed_precision='fp16'``, ``compile_cache_dir='/tmp/cc'``), ``cudnn.<name>``
(``torch.backends.cudnn``; ``benchmark`` itself is set by the variant), or else a
``torch._inductor.config`` value (``max_autotune=True``). The same variant twice with one fresh
``compile_cache_dir`` measures compilation cold, then warm (each variant is its own process).

Variants (all: sd-vae-ft-mse architecture with random weights, LPIPS VGG with a random backbone
-- the same compute as the pretrained one --, layer-norm PatchGAN WGAN-GP critic, Oklab L1+L2,
adaptive weight every step, AdamW, EMA; random data resident on the GPU):
- plain-fp32: the recipe written plainly, fp32, TF32 off, adaptive weight by autograd.grad
  with retain_graph (LDM's way);
- plain-bf16: the same with bf16 autocast, channels_last and TF32;
- project-eager: ``furlib.training.trainer.Trainer.step`` (what 02 runs) without torch.compile;
- project: ``Trainer.step`` with its GPU defaults (compile incl. the critic's first-order passes
  and the gradient penalty, phase upsampling, NHWC, attention as matrix products, group norms by
  channel statistics, the adaptive weight's features detached, bf16);
- project-prev: the defaults of issue 7's first round (channels_last model, inductor's own layout
  choice, eager critic and penalty, SDPA attention, plain upsampling);
- project-issue7: the defaults issue 21 started from (eager penalty, SDPA attention, native group
  norm, the features kept with their graph:
  ``Tuning(compile_penalty=False, math_attention=False, tap_detached=False, channel_stats_norm=False)``);
- project-nophase: ``project`` without phase upsampling;
- project-fed: ``project`` fed by ``furlib.crops.make_loader`` (``--workers`` processes, pinned
  memory) from generated 1-2 MP PNGs, once decoding the PNGs and once from the pixel cache; wall
  clock per step including any wait for data, over steps after the prefetch buffer is drained;
- project-parts: ``project`` with the GPU synchronised around each part of the step, to see
  where the time goes (slightly slower in total; ``--profile DIR`` also writes a kernel table);
- project-ckpt: ``project`` plus gradient checkpointing (memory);
- colab-t4: fp16 with grad scaling, 4 x 8 micro-batches, checkpointing, memory capped at 15 GiB.
Timing: CUDA events per step, warm-up excluded, median. FLOPs are counted once on the
plain-bf16 step with ``torch.utils.flop_counter`` and used for every variant's TFLOP/s. Each row
also has ``wait_s``: seconds to build the models, then of the first and second warm-up steps
(step 0 compiles every graph and runs cuDNN's algorithm search; step 1 shows any recompile),
what a user waits before training runs at speed. ``project-parts`` sums each part's ms over a step
(``parts_ms``, medians over steps); with ``--profile`` each project row also has
``kernel_ms_per_step`` (the GPU's busy time; the rest of ``ms_median`` it idles), and the profile
folder the two steps' Chrome trace, whose idle gaps ``trace_gaps.py`` charges to the host code
that launched the work after each (appended to the kernel tables).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from furlib.training.losses import PatchCritic, critic_loss  # noqa: E402
from furlib.training.losses import ReconstructionLoss, reference_adaptive_weight  # noqa: E402
from furlib.models import load_vae, split_trainable  # noqa: E402
from furlib.perceptual import LPIPS  # noqa: E402
from furlib.training.speed import Tuning  # noqa: E402
from furlib.training.settings import TrainSettings  # noqa: E402
from furlib.training.trainer import Trainer  # noqa: E402

VARIANTS = ("count", "plain-fp32", "plain-bf16", "project-eager", "project-prev", "project-issue7", "project-nophase",
            "project", "project-fed", "project-parts", "project-ckpt", "colab-t4")
# the Tuning levers issue 21 added, each off: the step as that issue started from it
ISSUE21_LEVERS_OFF = dict(compile_penalty=False, math_attention=False, tap_detached=False, channel_stats_norm=False,
                          critic_patch_matmul=False, compile_pixel_terms=False, transposed_upsample=False,
                          fused_norm_silu=False, lpips_fp16=False)
TUNING_FIELDS = {f.name for f in dataclasses.fields(Tuning)}
SETTING_FIELDS = {f.name for f in dataclasses.fields(TrainSettings)}
DEVICE = torch.device("cuda")  # --device; MODEL: --model; LPIPS_TRUNKS: --lpips-trunks
MODEL = "random:sd"
LPIPS_TRUNKS = ""


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def plain_stepper(batch: int, bf16: bool):
    """The recipe step as a straightforward script would write it (LPIPS under its autocast)."""
    dev = DEVICE
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16
    layout = torch.channels_last if bf16 else torch.contiguous_format
    vae = load_vae(MODEL).to(dev, memory_format=layout)
    params = [p for _, p in split_trainable(vae)]
    critic = PatchCritic().to(dev, memory_format=layout)
    rec_loss = ReconstructionLoss("oklab", lpips_vgg(), lpips_autocast=True).to(dev, memory_format=layout)
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.5, 0.9))
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-6, betas=(0.5, 0.9))
    ema = [p.detach().clone() for p in params]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(x):
        x = x.contiguous(memory_format=layout)
        with torch.no_grad(), amp:
            z = vae.encode(x).latent_dist.sample()
        with amp:
            recon = vae.decode(z).sample
            rec, _ = rec_loss(recon, x, 1.0, 5.0, 1.0)
            gan = -critic(recon).float().mean()
        w = reference_adaptive_weight(rec, gan, vae.decoder.conv_out.weight, 0.5)
        opt.zero_grad(set_to_none=True)
        (rec + w * gan).backward()
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999833)
        with amp:
            loss_c, _ = critic_loss(critic, x, recon.detach(), "wgan-gp")
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_c.step()

    return step, None


def lpips_vgg() -> LPIPS:
    """LPIPS VGG: a random trunk (the same compute), or the pretrained one from the fp16 copy in
    ``--lpips-trunks`` (what fp16 does with real activations)."""
    if not LPIPS_TRUNKS:
        return LPIPS("vgg", "random")
    sys.path.insert(0, str(Path(__file__).parent))  # variant_runs beside this script
    import variant_runs

    variant_runs.use_carried_trunks(LPIPS_TRUNKS)
    return LPIPS("vgg", "pretrained")


def project_stepper(batch: int, variant: str, overrides: dict):
    """``Trainer.step``; under torchrun each process steps ``batch`` images on its own GPU.
    ``overrides``: the variant's bracketed ``Tuning`` and ``TrainSettings`` values."""
    from accelerate import PartialState

    state = PartialState(cpu=DEVICE.type == "cpu")  # reads torchrun's environment; one process otherwise
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    kw, tuning = dict(batch_size=batch, warmup_steps=0, lr=1e-6, critic_lr=1e-6), {}
    if variant == "project-eager":
        kw.update(torch_compile="no")
    elif variant == "project-nophase":
        kw.update(phase_upsample="no")
    elif variant == "project-prev":
        kw.update(phase_upsample="no", channels_last="yes")
        tuning.update(ISSUE21_LEVERS_OFF, inductor_options={}, compile_critic=False)  # inductor's own layouts, eager critic
    elif variant == "project-issue7":
        tuning.update(ISSUE21_LEVERS_OFF)
    elif variant == "project-ckpt":
        kw.update(gradient_checkpointing=True)
    elif variant == "colab-t4":
        if DEVICE.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(15 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        kw.update(mixed_precision="fp16", grad_accum=4, gradient_checkpointing=True)
    parts = PartTimes() if variant == "project-parts" else None
    if parts is not None:
        tuning["part_timer"] = parts.timer
    kw.update({k: v for k, v in overrides.items() if k in SETTING_FIELDS})
    tuning.update({k: v for k, v in overrides.items() if k in TUNING_FIELDS})
    trainer = Trainer(load_vae(MODEL), TrainSettings(**kw), state.device, lpips_vgg(),
                      state.process_index, state.num_processes, Tuning(**tuning))
    return trainer.step, parts


class PartTimes:
    """Synchronised wall-clock ms of each named part of the step (``Tuning.part_timer``), summed
    over a step: a name may run several times a step (``decoder_grads`` twice: the first pass and
    the backward; parts of a micro-batch once per micro-batch)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.now, self.steps = {}, {}

    @contextlib.contextmanager
    def timer(self, name: str):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.now[name] = self.now.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def end_step(self) -> None:
        for name, ms in self.now.items():
            self.steps.setdefault(name, []).append(ms)
        self.now = {}

    def medians(self) -> dict:
        return {name: statistics.median(ms) for name, ms in self.steps.items()}


def count_flops(batch: int, res: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = plain_stepper(batch, bf16=True)
    x = torch.rand(batch, 3, res, res, device=DEVICE) * 2 - 1
    step(x)
    with FlopCounterMode(display=False) as counter:
        step(x)
    return float(counter.get_total_flops())


def fed_steps(step, batch: int, res: int, workers: int, steps: int = 100) -> dict:
    """Wall-clock ms per step with batches from the real loader, per storage (see the docstring)."""
    import tempfile

    from benchmarks.loader_throughput import fill_cache, make_sources
    from furlib.crops import make_loader

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "train", Path(tmp) / "pixel_cache"
        folder.mkdir()
        cache.mkdir()
        make_sources(folder, 32, seed=0)
        for storage in ("png", "cache"):
            if storage == "cache":
                fill_cache(folder, cache)
            it = iter(make_loader(folder, res, batch, num_workers=workers, pin_memory=True,
                                  cache_dir=cache if storage == "cache" else None))
            times, waits = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                x = next(it)
                waits.append(time.perf_counter() - t0)
                step(x)
                sync()
                times.append(time.perf_counter() - t0)
            del it
            tail = slice(steps // 2, None)  # the prefetch buffer (4 batches a worker) is drained
            out[storage] = {"workers": workers, "ms_median": statistics.median(times[tail]) * 1e3,
                            "ms_mean": statistics.mean(times[tail]) * 1e3,
                            "wait_ms_mean": statistics.mean(waits[tail]) * 1e3,
                            "images_per_s": batch / statistics.mean(times[tail]), "timed_steps": steps - steps // 2}
            print(storage, out[storage], file=sys.stderr, flush=True)
    return out


def write_profile(step, x, path: Path) -> tuple[str, float]:
    """CUDA kernel time of two steps, by operator and by Python caller, as tables; returns the
    file and the kernels' total ms per step. Beside the step's ms (CUDA events, outside the
    profiler) the total says how long the GPU idles a step: what CUDA graphs could win at most."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
                 record_shapes=True) as prof:
        for _ in range(2):
            step(x)
        sync()
    path.parent.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    # as the table's "Self CUDA time total": kernel events only, not the CPU ops that launched them
    kernel_us = sum(e.self_device_time_total for e in events
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
    kernel_ms = kernel_us / 2 / 1e3  # two steps
    by_op = events.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
    by_caller = prof.key_averages(group_by_stack_n=6).table(sort_by="self_cuda_time_total", row_limit=30,
                                                            max_name_column_width=90)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=150,
                                                                  max_name_column_width=60)
    path.write_text(f"kernel time per step: {kernel_ms:.1f} ms\n\n{by_op}\n\nBy Python caller (6 frames):\n{by_caller}"
                    f"\n\nBy operator and input shapes:\n{by_shape}\n\n{big_copies(prof.events())}")
    trace = path.parent / f"{path.stem}.trace.json.gz"  # the timeline: where the GPU idles (trace_gaps.py)
    prof.export_chrome_trace(str(trace))
    try:
        from trace_gaps import load, summary  # beside this script (run as a script: on sys.path)
        gaps = summary(load(trace), steps=2)
    except Exception as e:  # the tables above stand without it; say why it is missing
        gaps = f"no idle-gap summary: {type(e).__name__}: {e}"
    with path.open("a") as f:
        f.write(f"\n\n{gaps}\n")
    return str(path), kernel_ms


def big_copies(events, min_numel: int = 2**26) -> str:
    """Every copy of a tensor of at least ``min_numel`` elements, grouped by the operators that
    called it (innermost last) and its shapes, with its kernels' time and the Python frames
    nearest to it: which layout changes a step pays for, and who asks for them."""
    groups = {}
    for e in events:
        shapes = getattr(e, "input_shapes", None) or []
        if e.name != "aten::copy_" or not shapes or not shapes[0] or math.prod(shapes[0]) < min_numel:
            continue
        ops, frames, parent = [], [], e.cpu_parent
        while parent is not None:  # operators, then (with_stack) Python frames outside torch
            if parent.name.startswith(("aten::", "## Call")):
                ops.append(parent.name)
            elif ".py(" in parent.name and "torch/" not in parent.name:
                frames.append(parent.name)
            parent = parent.cpu_parent
        key = (" < ".join(ops[:4]), str(shapes[:2]), " < ".join(frames[:3]))
        n, us = groups.get(key, (0, 0.0))
        groups[key] = (n + 1, us + e.device_time_total)
    lines = [f"Copies of >= {min_numel} elements (two steps): calls, kernel ms, callers (innermost first), shapes, "
             "Python frames"]
    for (chain, shapes, frames), (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{n:4d} {us / 1e3:8.2f} ms  {chain}  {shapes}  {frames}")
    return "\n".join(lines)


def cache_counters() -> dict:
    """The compile caches' hits, misses and bypasses in this process (inductor's FX graph cache,
    AOTAutograd's cache): what a warm start loaded and what it rebuilt."""
    from torch._dynamo.utils import counters

    return {f"{group}.{key}": n for group in ("inductor", "aot_autograd") for key, n in counters[group].items()
            if "cache" in key}


def time_variant(variant: str, batch: int, res: int, steps: int, warmup: int, profile_dir: str = "",
                 workers: int = 8, overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    # fp32: cuDNN's exhaustive algorithm search over these ~1 GB activations did not finish in
    # 10 minutes (twice); the reference then uses cuDNN's heuristics, like a plain script would
    torch.backends.cudnn.benchmark = variant != "plain-fp32"
    t0 = time.perf_counter()
    step, parts = plain_stepper(batch, variant == "plain-bf16") if variant.startswith("plain") \
        else project_stepper(batch, variant, overrides or {})
    data = [torch.rand(batch, 3, res, res, device=DEVICE) * 2 - 1 for _ in range(3)]
    sync()
    # what a user waits before training: building the models, the first step (compilation, cuDNN's
    # algorithm search), the second (any recompilation)
    wait = {"setup_s": time.perf_counter() - t0}
    for i in range(warmup):
        t0 = time.perf_counter()
        step(data[i % 3])
        sync()
        if i < 2:
            wait[f"step{i}_s"] = time.perf_counter() - t0
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if parts is not None:
        parts.reset()  # warm-up and compilation excluded
    times = []
    for i in range(steps):
        times.append(step_ms(step, data[i % 3]))
        if parts is not None:
            parts.end_step()
        print(f"{variant} step {i}: {times[-1]:.1f} ms", file=sys.stderr, flush=True)
    chain = chain_ms(step, data, steps)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {"wait_s": wait, "ms_chain": chain, "caches": cache_counters()}
    trainer = getattr(step, "__self__", None)  # project variants step with ``Trainer.step``
    if trainer is not None:  # non-finite steps skipped (fp16: overflows), warm-up and chain included
        extra["skipped"] = trainer.skipped
    if parts is not None:
        extra["parts_ms"] = parts.medians()
    if variant == "project-fed":
        extra["fed"] = fed_steps(step, batch, res, workers)
    if profile_dir:
        path = Path(profile_dir) / f"profile-{variant}-{os.getpid()}.txt"
        extra["profile"], extra["kernel_ms_per_step"] = write_profile(step, data[0], path)
    return extra | {"variant": variant if world == 1 else f"{variant} x{world} GPUs", "gpus": world, "ms_median": statistics.median(times), "ms_min": min(times),
            "ms_max": max(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0,
            "steps": steps, "warmup": warmup}


def step_ms(step, x) -> float:
    """One step's time: CUDA events on the GPU, wall clock on the CPU."""
    if DEVICE.type != "cuda":
        t0 = time.perf_counter()
        step(x)
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def chain_ms(step, data: list, steps: int) -> float:
    """Mean time of ``steps`` steps run back to back, synchronised once at the end, as a training
    loop runs them: the host may queue the next step's kernels while the GPU works (``ms_median``
    syncs after every step, so each step starts with the GPU waiting for its first launches)."""
    t0 = time.perf_counter()
    if DEVICE.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for i in range(steps):
        step(data[i % len(data)])
    if DEVICE.type != "cuda":
        return 1000 * (time.perf_counter() - t0) / steps
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def parse_variant(spec: str) -> tuple[str, dict]:
    """``variant[key=value;...]`` -> (variant, its ``Tuning``/``TrainSettings`` values); a key
    ``cudnn.<name>`` is set in ``torch.backends.cudnn`` (e.g. ``cudnn.benchmark_limit=0``: try every
    algorithm), any other in ``torch._inductor.config``, here."""
    import ast

    import torch._inductor.config as inductor

    name, _, settings = spec.partition("[")
    overrides = {}
    for item in filter(None, settings.rstrip("]").split(";")):
        key, value = item.split("=", 1)
        if key in TUNING_FIELDS or key in SETTING_FIELDS:
            overrides[key] = ast.literal_eval(value)
        elif key.startswith("cudnn.") and hasattr(torch.backends.cudnn, key[6:]):
            setattr(torch.backends.cudnn, key[6:], ast.literal_eval(value))
        elif hasattr(inductor, key):
            setattr(inductor, key, ast.literal_eval(value))
        else:
            raise ValueError(f"{spec}: {key!r} is neither a Tuning or TrainSettings field nor in "
                             "torch.backends.cudnn or torch._inductor.config")
    return name, overrides


def split_variants(specs: str) -> list:
    """``--variants`` at the commas outside brackets (a bracketed dict may hold commas)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(specs + ","):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(specs[start:i].strip())
            start = i + 1
    return [v for v in out if v]


def run_all(args, variants: str) -> list:
    rows = []
    for variant in split_variants(variants):  # ";" separates settings inside a variant
        launch = [sys.executable] if args.nproc == 1 or variant == "count" else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
        cmd = launch + [__file__, "--variant", variant, "--batch", str(args.batch), "--res", str(args.res),
               "--steps", str(args.steps), "--warmup", str(args.warmup if "fp32" not in variant else 2),
               "--profile", args.profile, "--workers", str(args.workers), "--device", args.device,
               "--model", args.model, "--lpips-trunks", args.lpips_trunks]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
        except subprocess.TimeoutExpired as e:
            err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or "")[-1500:]
            print(f"{variant}: no result within {args.variant_timeout} s; last output:\n{err}", flush=True)
            rows.append({"variant": variant, "error": f"timeout after {args.variant_timeout} s"})
            continue
        if out.returncode:
            print(f"{variant} failed:\n{out.stderr[-3000:]}", flush=True)
            rows.append({"variant": variant, "error": out.stderr[-500:]})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]}", flush=True)
        if args.out:  # after every variant, so a run cut short still leaves its numbers
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))
    return rows


def report(rows: list, flops: float, batch: int) -> str:
    done = [r for r in rows if "ms_median" in r]  # a variant may run twice (compile cache cold, warm)
    ok = {r["variant"]: r for r in reversed(done)}  # the references: each one's first row
    lines = ["| variant | ms/step (median) | back to back | images/s | TFLOP/s | peak GiB | vs plain-fp32 | vs plain-bf16 "
             "| s to build / step 0 / step 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        ms = r["ms_median"]
        rel = lambda ref: f"{ok[ref]['ms_median'] / ms:.2f}x" if ref in ok else "n/a"  # noqa: E731
        gpus = r.get("gpus", 1)
        wait = " / ".join(f"{r.get('wait_s', {}).get(k, float('nan')):.1f}" for k in ("setup_s", "step0_s", "step1_s"))
        chain = f"{r['ms_chain']:.1f}" if "ms_chain" in r else ""
        lines.append(f"| {r['variant']} | {ms:.1f} | {chain} | {gpus * batch * 1000 / ms:.1f} | {gpus * flops / ms / 1e9:.0f} | "
                     f"{r['peak_gib']:.1f} | {rel('plain-fp32')} | {rel('plain-bf16')} | {wait} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", help=f"one of {VARIANTS}, optionally with [inductor_key=value;...]")
    ap.add_argument("--variants", default=",".join(VARIANTS[1:]))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--out", default="")
    ap.add_argument("--nproc", type=int, default=1, help="GPUs (processes) for the project variants")
    ap.add_argument("--flops", type=float, default=0.0, help="FLOPs per step if already counted")
    ap.add_argument("--variant-timeout", type=float, default=420.0, help="seconds before a variant is abandoned")
    ap.add_argument("--workers", type=int, default=8, help="loader processes for project-fed")
    ap.add_argument("--profile", default="", help="folder for kernel-time tables of the project variants")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check a command at tiny size")
    ap.add_argument("--model", default="random:sd", help="base_model: random:sd, or tiny for CPU checks")
    ap.add_argument("--lpips-trunks", default="", help="LPIPS's pretrained trunk from this carried fp16 file "
                    "(ablation.py trunks); default: a random trunk")
    args = ap.parse_args()
    if args.lpips_trunks and not Path(args.lpips_trunks).is_file():
        raise SystemExit(f"--lpips-trunks: no file {args.lpips_trunks}")
    global DEVICE, MODEL, LPIPS_TRUNKS
    DEVICE, MODEL, LPIPS_TRUNKS = torch.device(args.device), args.model, args.lpips_trunks
    if args.variant == "count":  # child processes: each variant owns the whole GPU
        print(json.dumps({"flops": count_flops(args.batch, args.res)}))
        return
    if args.variant:
        name, overrides = parse_variant(args.variant)
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")
        row = time_variant(name, args.batch, args.res, args.steps, args.warmup,
                           args.profile if name.startswith("project") else "", args.workers, overrides)
        row["variant"] = args.variant if row["gpus"] == 1 else f"{args.variant} x{row['gpus']} GPUs"
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return
    flops = args.flops or run_all(args, "count")[0]["flops"]
    print(f"counted {flops / 1e12:.1f} TFLOP per step ({flops / args.batch / 1e12:.2f} per image)", flush=True)
    rows = run_all(args, args.variants)
    table = report(rows, flops, args.batch)
    device = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else f"CPU ({args.model})"
    print(f"\n{device}, batch {args.batch}, {args.res} px, torch {torch.__version__}\n{table}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                              "flops_per_step": flops, "rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
