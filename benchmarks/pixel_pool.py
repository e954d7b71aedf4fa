"""Stage 01's CPU per image with and without Pillow's pixel-memory pool, side by side.

``furlib.images.reusing_pixel_memory`` lets Pillow keep freed pixel blocks for the next image.
This times ``prepare`` on generated 2-6 MP JPEGs (``prep_throughput.write_source``: plain ones,
and a mixed set with every 10th converted) in a tree without it (``--before``: e.g.
``git archive <commit> furlib``) and in this one, runs interleaved, each in a fresh process that
reports the CPU (user + sys, its worker processes included) of the ``prepare`` call alone.

    python benchmarks/pixel_pool.py --before /tmp/before --images 60 --reps 3 --out pool.json
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import prep_throughput

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys
from furlib.data.prepare import prepare
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
if __name__ == "__main__":
    t = cpu()
    prepare(sys.argv[1], sys.argv[2], progress=False, val_fraction=0, **json.loads(sys.argv[3]))
    print(cpu() - t)
"""


def timed(tree: Path, src: Path, work: Path, settings: dict) -> float:
    """CPU seconds of one ``prepare`` of ``src`` by the furlib in ``tree``, into a fresh folder."""
    shutil.rmtree(work / "data", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(work / "data"), json.dumps(settings)],
                         env=env, cwd=work, check=True, capture_output=True, text=True).stdout  # cwd: no furlib/
    return float(out.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a folder holding furlib/ without the pool")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    before, rows = args.before.resolve(), []  # the children run in a temporary folder
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, every, settings in [("plain JPEGs", 0, {"num_proc": 1, "workers": 1}),
                                      ("10 % converted", 10, {"num_proc": 1, "workers": 1}),
                                      ("10 % converted", 10, {"num_proc": 2})]:
            src = work / f"src-{every}"
            if not src.exists():
                src.mkdir()
                for i in range(1, args.images + 1):
                    prep_throughput.write_source((src, i, every))
            runs = {"before": [], "after": []}
            for _ in range(args.reps):  # interleaved: drift hits both alike
                for which, tree in (("before", before), ("after", ROOT)):
                    runs[which].append(timed(tree, src, work, settings))
            ms = {k: 1000 * statistics.median(v) / args.images for k, v in runs.items()}
            rows.append(dict(images=name, settings=settings, cpu_s=runs, before_ms_per_image=round(ms["before"], 1),
                             after_ms_per_image=round(ms["after"], 1),
                             change=f"{100 * (ms['after'] / ms['before'] - 1):+.1f} %"))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(rows=rows, images=args.images, reps=args.reps,
                                        python=platform.python_version(), platform=platform.platform()), indent=1))


if __name__ == "__main__":
    main()
