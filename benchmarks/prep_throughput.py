"""Stage 01 throughput at scale: ``furlib.data.prepare.prepare`` on generated 2-6 MP images.

Sources: ``--images`` synthetic photo-like JPEGs of 2-6 MP (a smooth field, shapes and mild
grain, quality 90), of which ``--convert-share`` need converting (in turn: an EXIF
rotation, a CMYK JPEG, an RGBA PNG), generated with every core. Then, each into a fresh data folder:

- ``num_proc=1`` on ``--plain-images`` of the plain JPEGs alone (symlinked into their own folder):
  the CPU cost of a source that needs no conversion;
- ``num_proc=1, workers=1`` on the ``--subset 1:N`` images: one process, one thread, one core,
  the unit that scaling is measured against;
- one row per ``--procs`` value: ``prepare(num_proc=p)`` (threads per process: prepare's default,
  cores / p) on the first ``--subset p:N`` images (default: all), so slow rows stay short;
- with ``--before DIR`` (a folder holding an older ``furlib/``, e.g. ``git archive <commit> furlib``):
  that tree's plain row, its smallest and widest ``--procs`` rows, and a check that its widest run
  accepted the same inputs with the same pixel hashes as this tree's, and that converted images
  decode to identical pixels from both (``same_images_and_pixels_as_now``);
- ``--shards`` runs of one source started at once, each with ``cores / shards`` processes of one
  thread (as on machines of ``cores / shards`` cores each), merged
  by the last to finish, on ``--subset shards:N`` images; checked equal (accepted files) to the
  widest ``--procs`` row when both cover the same images (``same_as_num_proc_run``);
- ``--disk``: the disk alone, every source file copied with one thread per core, then synced;
- the training loader reading the stored files (256 px crops, batch 32, ``--loader-workers``
  processes, no pixel cache) for ``--loader-seconds``; with ``--cache-images N``, also on the
  first N stored files without and with the decoded-pixel cache (filled first, in one process:
  its cost per image is a row; the cache takes width x height x 3 bytes per image).

Every prepare row is its own process (``python -c``, the measured tree first on PYTHONPATH).
Reported per row: wall s, images/s, CPU ms per image (the row's processes, user + sys: it does not
depend on what else runs), cores kept busy (CPU s per wall s), stored originals, disk per image
(MB), hours per 1M images. Written to ``--out`` as JSON.

    python benchmarks/prep_throughput.py --images 200 --procs 1 2 --subset 1:100 --shards 2 --out /tmp/prepare.json

On a 16-core host, before and after in one call (about 6 minutes; ~40 GB of disk in --workdir at
its peak), with the older tree carried as a folder:

    git archive 7a6280e furlib ':(exclude)furlib/assets' | tar -x -C .carry/prep-before
    python benchmarks/prep_throughput.py --images 8000 --procs 1 4 16 --subset 1:400 4:1600 \
        --plain-images 200 --shards 2 --before .carry/prep-before --disk --loader-seconds 10 \
        --cache-images 200 --workdir /tmp/prepbench --out $OUT/prep-16core.json
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's furlib for the checks and the loader rows, with or without PYTHONPATH
KINDS = ("rotated", "cmyk", "rgba")  # sources that must be converted: every KINDS_EVERY-th
KINDS_EVERY = [10]  # set from --convert-share (0: none)


def synth(index: int, megapixels: float):
    """A photo-like RGB image of ``megapixels``: a smooth field, shapes and mild grain (all in
    PIL's C code: with the JPEG encode, ~0.1 s of CPU for 4 MP)."""
    import numpy as np
    from PIL import Image, ImageChops, ImageDraw

    rng = np.random.default_rng(index)
    aspect = rng.uniform(0.6, 1.7)
    width = int((megapixels * 1e6 * aspect) ** 0.5)
    height = int(megapixels * 1e6 / width)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8))
    image = field.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, width // 3)), y0 + int(rng.integers(20, height // 3))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    patch = Image.effect_noise((509, 509), 4.0).convert("RGB")  # sigma 4 levels around 128
    grain = Image.new("RGB", (width, height))
    for top in range(0, height, 509):  # tiled: drawing noise for every pixel costs 9x more
        for left in range(0, width, 509):
            grain.paste(patch, (left, top))
    return ImageChops.add(image, grain, 1.0, -128)


def write_source(args) -> int:
    """Write source ``index``; return its bytes."""
    from PIL import Image

    folder, index, convert_every = args
    image = synth(index, 2.0 + 4.0 * ((index * 0.618) % 1.0))
    kind = KINDS[(index // convert_every) % len(KINDS)] if convert_every and index % convert_every == 0 \
        else "plain"
    path = Path(folder) / f"{index:06d}.{'png' if kind == 'rgba' else 'jpg'}"
    if kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(path, quality=90, exif=exif)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, quality=90)
    elif kind == "rgba":
        image.putalpha(200)
        image.save(path, compress_level=1)
    else:
        image.save(path, quality=90)
    return path.stat().st_size


def cpu_s() -> float:
    """User + sys CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def stored_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for s in ("train", "val") for p in (data_dir / s).iterdir())


def row(name: str, report: dict, wall: float, cpu: float, data_dir: Path) -> dict:
    n = report["counts"]["inputs"]
    disk = stored_bytes(data_dir)
    out = {"row": name, "images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
           "cpu_ms_per_image": round(1000 * cpu / n, 1),
           "cores_busy": round(cpu / wall, 2),  # CPU s per wall s: cores kept busy on average
           "accepted": report["counts"]["accepted"],
           "stored_originals": report["counts"]["stored_originals"],
           "disk_mb_per_image": round(disk / 1e6 / max(1, report["counts"]["accepted"]), 3),
           "hours_per_1m_images": round(1e6 / (n / wall) / 3600, 2)}
    print(json.dumps(out), flush=True)
    return out


# One prepare() call in its own process, with the furlib of ``code`` (the tree to measure) first
# on the path: "before" rows run an older tree the same way (--before).
PREPARE = ("import sys; from furlib.data.prepare import prepare; prepare(sys.argv[1], sys.argv[2], "
           "max_images=int(sys.argv[3]), num_proc=int(sys.argv[4]), num_shards=int(sys.argv[5]), "
           "shard_index=int(sys.argv[6]), workers=int(sys.argv[7]), progress=False)")


def run_prepare(code: Path, src: Path, data: Path, limit: int, procs: int, shards: int = 1,
                workers: int = 0) -> tuple[float, float, dict]:
    """(wall s, CPU s, merged report) of ``shards`` runs of one source started at once (as separate
    machines would), each with ``procs`` processes of ``workers`` threads (0: prepare's default,
    cores / procs), merged by the last to finish."""
    shutil.rmtree(data, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]))
    wall, cpu = time.time(), cpu_s()
    runs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(src), str(data), str(limit),
                              str(procs), str(shards), str(i), str(workers)], env=env, cwd=data.parent)
            for i in range(shards)]  # cwd: not a folder holding another furlib/
    if any(r.wait() for r in runs):
        raise RuntimeError("a prepare run failed (its traceback is above)")
    wall, cpu = time.time() - wall, cpu_s() - cpu
    return wall, cpu, json.loads((data / "report.json").read_text())


def plain_folder(src: Path, work: Path, count: int) -> Path:
    """Symlinks to the first ``count`` sources that need no conversion."""
    folder = work / "plain"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    every = KINDS_EVERY[0]
    plain = [p for i, p in enumerate(sorted(src.iterdir())) if not every or i % every][:count]
    for p in plain:
        (folder / p.name).symlink_to(p)
    return folder


def same_pixels(a: Path, b: Path, report_a: dict, report_b: dict, sample: int = 40) -> bool:
    """Two prepared folders accepted the same inputs with the same pixel hashes, and (for up to
    ``sample`` converted images, stored as PNG in one and WebP in the other, say) their stored
    files decode to identical pixels."""
    import numpy as np

    from furlib.prepared import open_rgb

    def accepted(report):
        return sorted((e["id"], e["hash"]) for e in report["accepted"])

    if accepted(report_a) != accepted(report_b):
        return False
    files_b = {e["hash"]: e["file"] for e in report_b["accepted"]}
    converted = [e for e in report_a["accepted"] if e["stored"] == "converted"][:sample]
    return all(np.array_equal(np.asarray(open_rgb(a / e["file"])),
                              np.asarray(open_rgb(b / files_b[e["hash"]]))) for e in converted)


def disk_row(src: Path, work: Path, threads: int) -> dict:
    """The disk alone: copy every source file (read, then write) with ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    folder = work / "disk-copy"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = sorted(src.iterdir())
    start = time.time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: shutil.copyfile(p, folder / p.name), files))
    os.sync()
    wall = time.time() - start
    total = sum(p.stat().st_size for p in files)
    shutil.rmtree(folder)
    out = {"row": f"disk alone: copy {len(files)} source files, {threads} threads, then sync",
           "wall_s": round(wall, 2), "mb_per_s": round(total / 1e6 / wall, 1),
           "images_per_s": round(len(files) / wall, 1)}
    print(json.dumps(out), flush=True)
    return out


def loader_row(folder: Path, workers: int, seconds: float, name: str, cache_dir=None) -> dict:
    from furlib.crops import make_loader

    batches = iter(make_loader(folder, 256, 32, num_workers=workers, cache_dir=cache_dir))
    for _ in range(max(1, workers)):  # warm-up: worker start and first fill
        next(batches)
    count, start = 0, time.time()
    while time.time() - start < seconds:
        next(batches)
        count += 1
    out = {"row": name, "workers": workers, "batch": 32, "resolution": 256,
           "images_per_s": round(32 * count / (time.time() - start), 1)}
    print(json.dumps(out), flush=True)
    return out


def cache_rows(train: Path, work: Path, count: int, workers: int, seconds: float) -> list:
    """The loader on the first ``count`` stored files, from the files and from a filled cache."""
    from loader_throughput import fill_cache  # the sibling script: run this one as a script

    folder, cache = work / "cache-src", work / "cache"
    for path in (folder, cache):
        shutil.rmtree(path, ignore_errors=True)
    folder.mkdir()
    for path in sorted(train.iterdir())[:count]:
        (folder / path.name).symlink_to(path)
    fill = dict(fill_cache(folder, cache), row=f"pixel cache fill (one process, {count} images)")
    print(json.dumps(fill), flush=True)
    rows = [fill, loader_row(folder, workers, seconds, f"loader, {count} stored files, no cache"),
            loader_row(folder, workers, seconds, f"loader, {count} stored files, pixel cache", cache)]
    shutil.rmtree(cache)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--convert-share", type=float, default=0.1, help="share of sources needing conversion")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--subset", nargs="*", default=[], help="p:N, e.g. 1:1000 (images for the num_proc=p row)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--plain-images", type=int, default=100, help="plain JPEGs for the no-conversion row")
    ap.add_argument("--before", default="", help="a folder holding an older furlib/ (git archive): "
                    "its num_proc=1 and widest rows too, and its accepted images and pixels compared")
    ap.add_argument("--disk", action="store_true", help="also the disk alone (copy every source)")
    ap.add_argument("--loader-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loader-seconds", type=float, default=20.0)
    ap.add_argument("--cache-images", type=int, default=0, help="stored files for the pixel-cache rows")
    ap.add_argument("--workdir", default="/tmp/prep_throughput")
    ap.add_argument("--keep-sources", action="store_true", help="reuse sources already in --workdir")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work, cores = Path(args.workdir).resolve(), os.cpu_count() or 1
    every = KINDS_EVERY[0] = round(1 / args.convert_share) if args.convert_share > 0 else 0
    src, here = work / "src", ROOT
    result = {"args": vars(args), "cores": cores, "python": sys.version.split()[0],
              "platform": platform.platform(), "rows": []}
    if not (args.keep_sources and src.exists()):
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        start = time.time()
        with ProcessPoolExecutor(cores) as pool:
            sizes = list(pool.map(write_source, [(src, i, every) for i in range(args.images)], chunksize=8))
        result["sources"] = {"count": len(sizes), "mb_per_image": round(sum(sizes) / 1e6 / len(sizes), 3),
                             "generate_s": round(time.time() - start, 1)}
        print(json.dumps(result["sources"]), flush=True)
    if args.disk:
        result["rows"].append(disk_row(src, work, cores))
    subset = {k if k == "shards" else int(k): int(v) for k, v in (s.split(":") for s in args.subset)}
    widest = max(args.procs)

    def save():  # after every row: a call cut short still returns what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))

    def measure(name, code, source, data, limit, procs, shards=1, workers=0):
        wall, cpu, report = run_prepare(code, source, data, limit, procs, shards, workers)
        result["rows"].append(row(name, report, wall, cpu, data))
        save()
        return report

    trees = [("", here)] + ([("before: ", Path(args.before).resolve())] if args.before else [])
    widest_report = {}  # label -> the report of that tree's widest row
    for label, code in trees:
        if args.plain_images:
            measure(f"{label}num_proc=1, plain JPEGs only", code, plain_folder(src, work, args.plain_images),
                    work / "data-plain", 0, 1)
            shutil.rmtree(work / "data-plain")
        if not label:  # the unit of scaling: one process, one thread, one core
            measure("num_proc=1, workers=1 (one core)", code, src, work / "data-core", subset.get(1, 0), 1,
                    workers=1)
            shutil.rmtree(work / "data-core")
        for procs in args.procs if not label else sorted({min(args.procs), widest}):
            data = work / f"data-{'before-' if label else ''}p{procs}"
            report = measure(f"{label}num_proc={procs}", code, src, data, subset.get(procs, 0), procs)
            if procs == widest:
                widest_report[label] = report
            if procs != widest or label:  # disk: keep only this tree's widest copy
                if procs == widest:
                    result["rows"][-1]["same_images_and_pixels_as_now"] = same_pixels(
                        work / f"data-p{widest}", data, widest_report[""], report)
                shutil.rmtree(data)
    if args.shards > 1:
        procs = max(1, cores // args.shards)  # one thread each: the cores a shard's own machine has
        data = work / "data-shards"
        sharded = measure(f"{args.shards} shards x num_proc={procs} (started at once, merged by the last)",
                          here, src, data, subset.get("shards", 0), procs, args.shards, workers=1)
        if subset.get("shards", 0) == subset.get(widest, 0):
            result["rows"][-1]["same_as_num_proc_run"] = sharded["accepted"] == widest_report[""]["accepted"]
        shutil.rmtree(data)
    train = work / f"data-p{widest}" / "train"
    result["rows"].append(loader_row(train, args.loader_workers, args.loader_seconds,
                                     "loader from all stored files, no cache"))
    if args.cache_images:
        result["rows"] += cache_rows(train, work, args.cache_images, args.loader_workers,
                                     args.loader_seconds)
    save()


if __name__ == "__main__":
    main()
