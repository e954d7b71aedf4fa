"""The recipe at full scale on the shipped pretrained base, and its ablation, side by side.

Every variant is the project's own loop (``furlib.training.fit``) on a profile's 02 values
(``params/furception_v1.yaml``, ``params/ldm_like.yaml``), with the same changes for all:
``base_model: tiny``, 256 px, batch 32, ``--steps`` steps, the same prepared built-in data
(stage 01: the photos and ``--art`` drawings of seed 0, which the base never saw). Variants:

- ``furception_v1``: the profile as it is;
- ``ldm_like``: the LDM-style profile (RGB L1 + LPIPS, hinge critic, batch norm);
- ``recon_only``: furception_v1 without the critic term (``disc_weight 0``);
- ``rgb``: furception_v1 with its pixel losses in RGB instead of Oklab;
- ``later_schedule``: furception_v1 with the author's later loss schedule (MAE 1 -> 0.6 and
  MSE 0 -> 2 in plain-mean units, cosine over two thirds of the run, as 100k of 150k steps);
- ``furception_v1_seed<N>`` (``--noise-seed N``, default 1; -1: none): furception_v1 again with
  another seed. The gap between the two is the run-to-run noise; the report marks every
  difference to furception_v1 that is no larger (``ablation_checks.noise_section``).

Before scoring, every variant's decoder (raw and EMA) at the compared step must differ from the
base's: a frozen decoder (e.g. a learning rate too small to move fp32 weights) would report
base == finetuned, so the script stops with an error naming it (``ablation_checks``).

Scaling for a 5 M-parameter base and a short run (the profiles are for SD's 83 M VAE, 150k steps):
- lr and critic_lr x ``--lr-scale`` (default 20: 5e-7 -> 1e-5). The base was pretrained with a
  peak of 8e-4 and ended at 4e-5; on the demo's data, 3e-5 already made it worse at batch 4 and
  1e-4+ clearly (benchmarks/RESULTS.md, demo sweep), while 5e-7 would hardly move it in 5k steps.
- every step-valued setting (warm-up, critic_start, gan_start, loss_schedule_steps) x steps/150k,
  so the warm-up is the same 3.3 % of the run (5000 -> 167 steps at 5k);
- the EMA horizon, 1/(1 - decay), x steps/150k: 0.999833 -> 0.995 at 5k steps.
- LPIPS: no pretrained backbone is reachable offline; ``--lpips random`` keeps the term with a
  random VGG (not perceptual; about doubles the step), the default ``none`` drops it in all
  variants. The report says which.

Outputs under ``--out`` (at most 4 files): ``ablation.json`` (settings, per-variant results,
log histories), ``ablation.md`` (the table), ``curves.png``, ``recon_grid.png``. Run folders and
per-variant logs go to ``--work``. On one H200, 5 processes at once::

    python benchmarks/ablation.py --out $OUT --work /tmp/ablation --steps 5000 --jobs 5
    python benchmarks/ablation.py --out /tmp/a --device cpu --steps 2 --art 2 --resolution 64 --batch 2  # CPU check
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # variant_runs beside this script
import ablation_checks  # noqa: E402
import variant_runs  # noqa: E402

PARAMS = Path(__file__).parent.parent / "params"
PROFILE_STEPS = 150_000  # the profiles' max_steps, the unit the step-valued settings scale from
STEP_KEYS = ("warmup_steps", "critic_start", "gan_start", "loss_schedule_steps")
REFERENCE = "furception_v1"  # the variant the others, and its second seed, are compared with
VARIANTS = {  # name: (profile, overrides on top of it)
    "furception_v1": ("furception_v1", {}),
    "ldm_like": ("ldm_like", {}),
    "recon_only": ("furception_v1", {"disc_weight": 0.0}),
    "rgb": ("furception_v1", {"color_space": "rgb"}),
    "later_schedule": ("furception_v1", {"mae_weight": 1.0, "mae_weight_end": 0.6, "mse_weight": 0.0,
                                         "mse_weight_end": 2.0, "loss_schedule_steps": 100_000}),
}


def noise_twin(a) -> str:
    """The name of the reference's second-seed run ('' when --noise-seed is -1)."""
    return f"{REFERENCE}_seed{a.noise_seed}" if a.noise_seed >= 0 else ""


def variant_overrides(name: str, a) -> tuple[str, dict]:
    """(profile path, the 02 overrides of one variant, scaled as the module docstring says)."""
    profile, own = (VARIANTS[REFERENCE][0], {"seed": a.noise_seed}) if name == noise_twin(a) else VARIANTS[name]
    path = str(PARAMS / f"{profile}.yaml")
    p = variant_runs.profile_params(path, own)
    scale = a.steps / PROFILE_STEPS
    from furlib.training.ema import scaled_decay
    decay = p["ema_decay"] or scaled_decay(a.batch, p["ema_ref_decay"], p["ema_ref_batch"])
    over = dict(own, base_model="tiny", base_config="", resolution=a.resolution, batch_size=a.batch,
                grad_accum=1, max_steps=a.steps, device=a.device, lr=p["lr"] * a.lr_scale,
                critic_lr=p["critic_lr"] * a.lr_scale, ema_decay=max(0.0, 1 - (1 - decay) / scale),
                num_workers=a.workers, checkpoint_every=min(a.checkpoint_every, a.steps), keep_checkpoints=0,
                plot_every=0, log_every=a.log_every,
                lpips_weight=p["lpips_weight"] if a.lpips == "random" else 0.0, lpips_backbone="random")
    over.update({k: int(round(p[k] * scale)) for k in STEP_KEYS if k in p})
    return path, over


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/ablation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--art", type=int, default=600, help="built-in drawings (seed 0) in the data")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="stage 01's val share")
    ap.add_argument("--lr-scale", type=float, default=20.0)
    ap.add_argument("--lpips", choices=("none", "random"), default="none")
    ap.add_argument("--jobs", type=int, default=5, help="variants trained at once (one GPU)")
    ap.add_argument("--workers", type=int, default=2, help="data loader processes per variant")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--checkpoint-every", type=int, default=250, help="steps; the variants are compared "
                    "at the last step all of them saved")
    ap.add_argument("--deadline", type=float, default=0, help="seconds of training (0: none); runs still "
                    "going then are stopped and every variant is scored at the last step all saved")
    ap.add_argument("--noise-seed", type=int, default=1, help=f"seed of a second {REFERENCE} run that "
                    "measures the run-to-run noise (its profile's seed is 0); -1: none")
    ap.add_argument("--only", default="", help="internal: one variant in this process")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.only:  # one variant's training, in its own process
        profile, over = variant_overrides(a.only, a)
        info = variant_runs.train(profile, a.only, over, work, work / "data")
        (work / f"{a.only}.json").write_text(json.dumps(dict(info, name=a.only, profile=profile), indent=1, default=str))
        return 0
    names = a.variants.split(",") + ([noise_twin(a)] if noise_twin(a) and REFERENCE in a.variants.split(",") else [])
    counts = variant_runs.prepare_data(str(PARAMS / "furception_v1.yaml"), work / "data", dict(
        source="builtin", art_count=a.art, resolution=a.resolution, val_fraction=a.val_fraction, max_images=0))
    if not counts["val"]:
        raise ValueError(f"the prepared data has no val images ({counts}): raise --art or --val-fraction")
    extra = [x for k, v in vars(a).items() if k not in ("only", "variants") for x in (f"--{k.replace('_', '-')}", str(v))]
    t0 = time.time()
    ended = variant_runs.run_parallel(__file__, names, a.jobs, work, extra, a.deadline)
    print(f"training: {time.time() - t0:.0f} s; " + ", ".join(
        f"{r['name']}: {'stopped at the deadline' if r.get('stopped') else r.get('failed', 'finished')}"
        for r in ended), flush=True)
    results = [r for r in ended if "failed" in r]
    trained = [r["name"] for r in ended if "failed" not in r]
    saved = [variant_runs.checkpoint_steps(work / n) for n in trained]
    common = max(set.intersection(*saved)) if saved and set.intersection(*saved) else None
    if common is None:
        raise RuntimeError(f"no checkpoint step that every variant reached: {dict(zip(trained, saved))}")
    ablation_checks.refuse_unchanged({n: ablation_checks.decoder_change(variant_runs.checkpoint_at(work / n, common))
                                      for n in trained}, common)
    for r in ended:
        if "failed" not in r:
            info = {k: v for k, v in r.items() if k not in ("name", "stopped", "profile")}
            reached = max(variant_runs.checkpoint_steps(work / r["name"]))
            results.append(variant_runs.score_variant(work, r["name"], common, a.resolution, info,
                                                      reached=reached, stopped=bool(r.get("stopped"))))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k != "only"}
    (out / "ablation.json").write_text(json.dumps({"settings": settings, "data": counts, "results": results},
                                                  indent=1, default=str))
    md = (f"compared at step {common} (of {a.steps} planned; the last checkpoint every variant reached), batch {a.batch}, {a.resolution} px, base `tiny`, lr x{a.lr_scale}, LPIPS: "
          f"{'random VGG (not perceptual)' if a.lpips == 'random' else 'off in every variant'}; "
          f"val split: {counts['val']} images\n\n" + variant_runs.table(results) + "\n" + variant_runs.stability(results)
          + ("\n" + ablation_checks.noise_section(results, REFERENCE, noise_twin(a)) if noise_twin(a) in names else ""))
    (out / "ablation.md").write_text(md)
    variant_runs.save_figures(results, work, out, a.resolution)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
