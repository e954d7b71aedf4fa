"""Time the project's training step on a GPU, beside two plain references, in one run.

    python benchmarks/train_step.py --out results.json            # all variants, one process each
    python benchmarks/train_step.py --variant project --steps 10  # one variant

Variants (all: sd-vae-ft-mse architecture with random weights, LPIPS VGG with a random backbone
-- the same compute as the pretrained one --, layer-norm PatchGAN WGAN-GP critic, Oklab L1+L2,
adaptive weight every step, AdamW, EMA; random data resident on the GPU):
- plain-fp32: the recipe written plainly, fp32, TF32 off, adaptive weight by autograd.grad
  with retain_graph (LDM's way);
- plain-bf16: the same with bf16 autocast, channels_last and TF32;
- project-eager: ``furlib.trainer.Trainer.step`` (what 02 runs) without torch.compile;
- project: ``Trainer.step`` with its GPU defaults (compile, channels_last, bf16);
- project-ckpt: ``project`` plus gradient checkpointing (memory);
- colab-t4: fp16 with grad scaling, 4 x 8 micro-batches, checkpointing, memory capped at 15 GiB.
Timing: CUDA events per step, warm-up excluded, median. FLOPs are counted once on the
plain-bf16 step with ``torch.utils.flop_counter`` and used for every variant's TFLOP/s.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from furlib.critic import PatchCritic, critic_loss  # noqa: E402
from furlib.losses import ReconstructionLoss, reference_adaptive_weight  # noqa: E402
from furlib.models import load_vae, split_trainable  # noqa: E402
from furlib.perceptual import LPIPS  # noqa: E402
from furlib.train import TrainSettings  # noqa: E402
from furlib.trainer import Trainer  # noqa: E402

VARIANTS = ("count", "plain-fp32", "plain-bf16", "project-eager", "project", "project-ckpt", "colab-t4")


def plain_stepper(batch: int, bf16: bool):
    """The recipe step as a straightforward script would write it."""
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bf16
    layout = torch.channels_last if bf16 else torch.contiguous_format
    vae = load_vae("random:sd").to(dev, memory_format=layout)
    params = [p for _, p in split_trainable(vae)]
    critic = PatchCritic().to(dev, memory_format=layout)
    rec_loss = ReconstructionLoss("oklab", LPIPS("vgg", "random")).to(dev, memory_format=layout)
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.5, 0.9))
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-6, betas=(0.5, 0.9))
    ema = [p.detach().clone() for p in params]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(x):
        x = x.contiguous(memory_format=layout)
        with torch.no_grad(), amp:
            z = vae.encode(x).latent_dist.sample()
        with amp:
            recon = vae.decode(z).sample
            rec, _ = rec_loss(recon, x, 1.0, 1.0, 1.0)
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

    return step


def project_stepper(batch: int, variant: str):
    """``Trainer.step``; under torchrun each process steps ``batch`` images on its own GPU."""
    from accelerate import PartialState

    state = PartialState()  # reads torchrun's environment; one process otherwise
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    kw = dict(batch_size=batch, warmup_steps=0, lr=1e-6, critic_lr=1e-6)
    if variant == "project-eager":
        kw.update(torch_compile="no")
    elif variant == "project-ckpt":
        kw.update(gradient_checkpointing=True)
    elif variant == "colab-t4":
        torch.cuda.set_per_process_memory_fraction(15 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        kw.update(mixed_precision="fp16", grad_accum=4, gradient_checkpointing=True)
    trainer = Trainer(load_vae("random:sd"), TrainSettings(**kw), state.device, LPIPS("vgg", "random"),
                      state.process_index, state.num_processes)
    return trainer.step


def count_flops(batch: int, res: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    step = plain_stepper(batch, bf16=True)
    x = torch.rand(batch, 3, res, res, device="cuda") * 2 - 1
    step(x)
    with FlopCounterMode(display=False) as counter:
        step(x)
    return float(counter.get_total_flops())


def time_variant(variant: str, batch: int, res: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    step = plain_stepper(batch, variant == "plain-bf16") if variant.startswith("plain") else project_stepper(batch, variant)
    data = [torch.rand(batch, 3, res, res, device=torch.cuda.current_device()) * 2 - 1 for _ in range(3)]
    for i in range(warmup):
        step(data[i % 3])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(data[i % 3])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"variant": variant if world == 1 else f"{variant} x{world} GPUs", "gpus": world, "ms_median": statistics.median(times), "ms_min": min(times),
            "ms_max": max(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "steps": steps, "warmup": warmup}


def run_all(args, variants: str) -> list:
    rows = []
    for variant in variants.split(","):
        launch = [sys.executable] if args.nproc == 1 or variant == "count" else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
        cmd = launch + [__file__, "--variant", variant, "--batch", str(args.batch), "--res", str(args.res),
               "--steps", str(args.steps), "--warmup", str(args.warmup if "fp32" not in variant else 2)]
        out = subprocess.run(cmd, capture_output=True, text=True)
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
    ok = {r["variant"]: r for r in rows if "ms_median" in r}
    lines = ["| variant | ms/step (median) | images/s | TFLOP/s | peak GiB | vs plain-fp32 | vs plain-bf16 |",
             "|---|---|---|---|---|---|---|"]
    for r in ok.values():
        ms = r["ms_median"]
        rel = lambda ref: f"{ok[ref]['ms_median'] / ms:.2f}x" if ref in ok else "n/a"  # noqa: E731
        gpus = r.get("gpus", 1)
        lines.append(f"| {r['variant']} | {ms:.1f} | {gpus * batch * 1000 / ms:.1f} | {gpus * flops / ms / 1e9:.0f} | "
                     f"{r['peak_gib']:.1f} | {rel('plain-fp32')} | {rel('plain-bf16')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--variants", default=",".join(VARIANTS[1:]))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--out", default="")
    ap.add_argument("--nproc", type=int, default=1, help="GPUs (processes) for the project variants")
    ap.add_argument("--flops", type=float, default=0.0, help="FLOPs per step if already counted")
    args = ap.parse_args()
    if args.variant == "count":  # child processes: each variant owns the whole GPU
        print(json.dumps({"flops": count_flops(args.batch, args.res)}))
        return
    if args.variant:
        row = time_variant(args.variant, args.batch, args.res, args.steps, args.warmup)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return
    flops = args.flops or run_all(args, "count")[0]["flops"]
    print(f"counted {flops / 1e12:.1f} TFLOP per step ({flops / args.batch / 1e12:.2f} per image)", flush=True)
    rows = run_all(args, args.variants)
    table = report(rows, flops, args.batch)
    print(f"\n{torch.cuda.get_device_name(0)}, batch {args.batch}, {args.res} px, torch {torch.__version__}\n{table}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                              "flops_per_step": flops, "rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
