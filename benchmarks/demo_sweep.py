"""How params/demo.yaml's finetune settings were chosen: variants of its 02 values, each trained
by ``furlib.training.fit`` on the demo's own data (stage 01 with the demo's values), scored on
the demo's val split with 03's metrics (``variant_runs``). The demo's aims: the finetuned EMA
decoder with a lower Oklab ΔE and a high-frequency ratio closer to 1 than the base, PSNR not
more than 0.3 dB worse.

On a GPU the runs are fp32 and uncompiled, as on the demo's CPU (same maths, different hardware,
so numbers differ slightly from a CPU run; the chosen one is confirmed by ``make demo``)::

    python benchmarks/demo_sweep.py --out OUT --jobs 12
    python benchmarks/demo_sweep.py --out /tmp/s --device cpu --variants lr3e-4 --steps 2   # CPU check
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # variant_runs beside this script (not part of furlib)
import variant_runs  # noqa: E402

PROFILE = str(Path(__file__).parent.parent / "params" / "demo.yaml")
FAST = {"torch_compile": "no", "phase_upsample": "no", "channels_last": "no", "mixed_precision": "no",
        "num_workers": 1, "plot_every": 0, "checkpoint_every": 100000}
W = {"mae_weight": 1.0, "mae_weight_end": 1.0, "mse_weight": 5.0, "mse_weight_end": 5.0}  # the card's
NO_LPIPS = {"lpips_weight": 0.0}
GAN = {"critic_start": 0, "gan_start": 50, "warmup_steps": 20}


def _v(lr, steps, ema, lpips=True, **kw):
    return dict(W, **GAN, lr=lr, critic_lr=lr, max_steps=steps, ema_decay=ema,
                **({} if lpips else NO_LPIPS), **kw)


VARIANTS = {
    "lr1e-4_300_lpips": _v(1e-4, 300, 0.97),
    "lr3e-4_300_lpips": _v(3e-4, 300, 0.97),
    "lr1e-3_300_lpips": _v(1e-3, 300, 0.97),
    "lr3e-5_300_lpips": _v(3e-5, 300, 0.97),
    "lr1e-4_300": _v(1e-4, 300, 0.97, False),
    "lr3e-4_300": _v(3e-4, 300, 0.97, False),
    "lr1e-3_300": _v(1e-3, 300, 0.97, False),
    "lr3e-4_300_ema99": _v(3e-4, 300, 0.99, False),
    "lr3e-4_150": _v(3e-4, 150, 0.95, False),
    "lr3e-4_150_lpips": _v(3e-4, 150, 0.95),
    "lr1e-4_150_lpips": _v(1e-4, 150, 0.95),
    "lr3e-4_300_reconly": _v(3e-4, 300, 0.97, False, disc_weight=0.0),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="", help="run folders and logs (default: OUT/../demo_sweep_work)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=0, help="override max_steps (CPU checks)")
    ap.add_argument("--only", default="", help="internal: run one variant in this process")
    args = ap.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "demo_sweep_work"
    work.mkdir(parents=True, exist_ok=True)
    if args.only:
        over = dict(VARIANTS[args.only], **FAST, device=args.device)
        if args.steps:
            over.update(max_steps=args.steps, gan_start=min(over["gan_start"], args.steps // 2))
        result = variant_runs.train_and_score(PROFILE, args.only, over, work, work / "data")
        (work / f"{args.only}.json").write_text(json.dumps(result, indent=1, default=str))
        return 0
    names = args.variants.split(",")
    counts = variant_runs.prepare_data(PROFILE, work / "data")
    extra = ["--out", str(out), "--work", str(work), "--device", args.device, "--steps", str(args.steps)]
    results = variant_runs.run_parallel(__file__, names, args.jobs, work, extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_sweep.json").write_text(json.dumps({"data": counts, "results": results}, indent=1, default=str))
    md = variant_runs.table(results)
    (out / "demo_sweep.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
