"""Does keeping runs in step buy compared steps? The ablation's device phase on this CPU, once
per ``--leads`` value in that order, with the same deadline: runs free (lead 0) and kept in step
(lead N). Two variants of unequal cost share the cores as 8 share one GPU; the report is the
step both reached (the one the ablation compares at) and what each reached. ``--trace`` prints
every pause and resume with the runs' logged steps.

    PYTHONPATH=$PWD python benchmarks/pacing_check.py --deadline 300 --out benchmarks/runs/DATE/pacing_check.json

On 2 shared CPU cores this cannot stand in for a GPU: two processes with spinning OpenMP threads
slow each other ~10x (a run steps ~10x faster while the other is paused), and runs of the same
settings differed by 50 % (RESULTS.md).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ablation  # noqa: E402

from furlib.runinfo import print_and_save  # noqa: E402


def trace_pauses() -> None:
    """Print each change of the paused set, with the logged steps, as the Pacer makes it."""
    import time

    import variant_runs

    update = variant_runs.Pacer.update

    def traced(self, procs):
        before = set(self.paused)
        update(self, procs)
        if before != set(self.paused):
            steps = {n: variant_runs.logged_step(self.root / n) for n in procs}
            print(f"{time.time():.0f} paused {sorted(self.paused)} logged steps {steps}", flush=True)

    variant_runs.Pacer.update = traced


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, default=150, help="seconds of each call (preparation included)")
    ap.add_argument("--variants", default="furception_v1,no_lpips")
    ap.add_argument("--leads", type=int, nargs="+", default=[0, 4], help="lead of each call, in order")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--work", default="/tmp/pacing_check")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    toy = ["--device", "cpu", "--resolution", "64", "--batch", "4", "--art", "40", "--held-out", "8",
           "--curve-images", "2", "--max-side", "256", "--checkpoint-every", "4", "--log-every", "1",
           "--workers", "0", "--steps", "200", "--noise-seed", "-1", "--variants", a.variants]
    out = {"argv": toy, "deadline_s": a.deadline, "order": a.leads}
    if a.trace:
        trace_pauses()
    for lead in a.leads:
        work = Path(a.work) / f"lead{lead}"
        shutil.rmtree(work, ignore_errors=True)
        ablation.main(["device", "--out", str(work / "out"), "--work", str(work), "--deadline", str(a.deadline),
                       "--lead", str(lead), *toy])
        report = json.loads((work / "out" / "ablation.json").read_text())
        out[f"lead {lead}"] = {"compared_step": report["step"], "reached": report["calls"][-1]["reached"]}
    return print_and_save(out, a.out)


if __name__ == "__main__":
    main()
