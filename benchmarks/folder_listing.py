"""What each of 01's processes pays to find its share of a folder, before and after a change.

Makes ``--files`` empty ``.jpg`` files in 100 subfolders, then in a fresh process per tree (this
one and ``--before``, a folder holding an older ``furlib/``) times ``shares.own_inputs`` for one
process of ``--procs`` and drains what it is dealt (everything: it is alone), counting ``stat``
calls of the listing and the inputs' stamps; memory is the process's peak RSS.

    python benchmarks/folder_listing.py --before /tmp/before --files 100000 --out listing.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, resource, sys, time
from furlib.data import shares
listing_stats = [0]
real_stat = os.stat
def counting_stat(*a, **k):
    listing_stats[0] += 1
    return real_stat(*a, **k)
job = dict(selection=dict(max_images=0, art_count=0, seed=0), source=sys.argv[1], num_shards=1, shard_index=0,
           source_split="train", image_column="image", data_dir=sys.argv[2])
if hasattr(shares, "list_folder"):  # since 2026-12-06 the shard lists once; each process reads that list
    job["listing"] = os.path.join(sys.argv[2], "listing.json")
    shares.list_folder(job, __import__("pathlib").Path(job["listing"]))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
os.stat = counting_stat
own, n, how = shares.own_inputs(job, 0, int(sys.argv[3]), shares.Dealer(int(sys.argv[3]), None))
listed = time.perf_counter() - t
stats_listing = listing_stats[0]
next(iter(own))  # the first input dealt: its stat, and the process's memory by then
os.stat = real_stat
print(json.dumps(dict(inputs=n, listing_s=round(listed, 3), stat_calls_before_first_input=stats_listing,
                      peak_rss_mb_added=round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1e3, 1))))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for i in range(args.files):
            folder = src / f"d{i % 100:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:07d}.jpg").touch()
        for name, tree in (("before", args.before), ("after", ROOT)):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
            out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "data"), str(args.procs)],
                                 env=env, cwd=tmp, check=True, capture_output=True, text=True).stdout
            rows[name] = json.loads(out.splitlines()[-1])
            print(name, rows[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(rows, files=args.files, procs=args.procs), indent=1))


if __name__ == "__main__":
    main()
