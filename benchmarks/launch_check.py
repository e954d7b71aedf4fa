"""Run ``furlib.training.fit`` on several processes the two ways users launch it, and check the runs.

    python benchmarks/launch_check.py --nproc 2 --device cuda --out /tmp/launch

1. ``accelerate launch --num_processes N -m furlib.training.fit params/smoke.yaml -p ...`` to step 20, then
   the same command to step 30: it must resume from the step-20 checkpoint;
2. accelerate's ``notebook_launcher(fit.fit, (params,), num_processes=N)`` in a fresh process that,
   like 02 with ``num_gpus=N``, first counts the GPUs and picks the device in the parent.
The smoke profile (tiny random VAE, 64 px, random LPIPS) with batch 4 per process: this checks the
launch paths, rank consistency (``fit`` compares all ranks' weights at every checkpoint) and resume,
not speed. Prints one JSON line per check.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = {"max_steps": 20, "checkpoint_every": 10, "plot_every": 0, "batch_size": 4,
             "num_workers": 2, "torch_compile": "no", "pixel_cache": "yes"}

NOTEBOOK_PATH = """
import json, sys, torch
from accelerate import notebook_launcher
from furlib.training import fit
from furlib import runinfo
params = json.loads(sys.argv[1])
n = params.pop("num_gpus")
if params["device"] == "cuda" and torch.cuda.device_count() < n:  # 02's checks, in the parent
    raise SystemExit(f"{n} GPUs asked, {torch.cuda.device_count()} visible")
runinfo.pick_device(params["device"])
notebook_launcher(fit.fit, (params,), num_processes=n)
"""


def prepare_run(outputs: Path, run_name: str) -> None:
    from furlib.data.prepare import prepare

    prepare("builtin", outputs / run_name / "data", resolution=64, max_side=512, art_count=4,
            max_images=8, val_fraction=0.3, progress=False)


def results(outputs: Path, run_name: str) -> dict:
    r = json.loads((outputs / run_name / "train" / "results.json").read_text())
    return {k: r[k] for k in ("step", "processes", "skipped_steps", "images_per_s", "checkpoint")}


def cli_run(outputs: Path, nproc: int, device: str, max_steps: int) -> dict:
    overrides = dict(OVERRIDES, max_steps=max_steps, device=device, outputs_dir=str(outputs), run_name="cli")
    # --multi_gpu is accelerate's torchrun launcher, on CPUs too (fit uses gloo for device='cpu');
    # --cpu would start ONE process whatever --num_processes says
    mode = ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), *mode, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "furlib.training.fit", "params/smoke.yaml"]
    cmd += [a for k, v in overrides.items() for a in ("-p", f"{k}={v!r}")]  # quoted: 'yes' stays a string
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(f"accelerate launch failed:\n{log[-4000:]}")
    return dict(results(outputs, "cli"), resumed="resumed from" in log)


def notebook_run(outputs: Path, nproc: int, device: str) -> dict:
    import dataclasses

    from furlib.training import fit

    params = dataclasses.asdict(fit.profile_settings(str(ROOT / "params/smoke.yaml"), {}))
    params.update(OVERRIDES, device=device, outputs_dir=str(outputs), run_name="notebook", num_gpus=nproc)
    out = subprocess.run([sys.executable, "-c", NOTEBOOK_PATH, json.dumps(params)], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode:
        raise SystemExit(f"notebook_launcher run failed:\n{(out.stdout + out.stderr)[-4000:]}")
    return results(outputs, "notebook")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True, help="outputs_dir for the runs (must not hold them yet)")
    args = ap.parse_args()
    for run in ("cli", "notebook"):
        prepare_run(args.out, run)
    checks = [("accelerate launch, to step 20", lambda: cli_run(args.out, args.nproc, args.device, 20), 20),
              ("accelerate launch again, to step 30", lambda: cli_run(args.out, args.nproc, args.device, 30), 30),
              ("notebook_launcher as in 02", lambda: notebook_run(args.out, args.nproc, args.device), 20)]
    for name, check, step in checks:
        r = check()
        ok = r["step"] == step and r["processes"] == args.nproc and r.get("resumed", step == 30) == (step == 30)
        print(json.dumps({"check": name, "ok": ok, "nproc": args.nproc, "device": args.device, **r}), flush=True)


if __name__ == "__main__":
    main()
