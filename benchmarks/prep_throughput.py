"""Stage 01 throughput at scale: ``furlib.data.prepare.prepare`` on generated 2-6 MP images.

Sources: ``--images`` synthetic photo-like JPEGs of 2-6 MP (a smooth field, shapes and mild
grain, quality 90), of which ``--convert-share`` need converting (in turn: an EXIF
rotation, a CMYK JPEG, an RGBA PNG), generated with every core. Then, each into a fresh data folder:

- ``num_proc=1`` on ``--plain-images`` of the plain JPEGs alone (symlinked into their own folder):
  the CPU cost of a source that needs no conversion;
- one row per ``--procs`` value: ``prepare(num_proc=p)`` on the first ``--subset p:N`` images
  (default: all), so slow rows stay short;
- ``--shards`` runs of one source started at once, each with ``cores / shards`` processes, merged
  by the last to finish, on ``--subset shards:N`` images; checked equal (accepted files) to the
  widest ``--procs`` row when both cover every image;
- the training loader reading the stored files (256 px crops, batch 32, ``--loader-workers``
  processes, no pixel cache) for ``--loader-seconds``; with ``--cache-images N``, also on the
  first N stored files without and with the decoded-pixel cache (filled first, in one process:
  its cost per image is a row; the cache takes width x height x 3 bytes per image).

Reported per row: wall s, images/s, CPU ms per image (this process and its children, user + sys:
it does not depend on what else runs), stored originals, disk per image (MB), extrapolations to 1M
images. Written to ``--out`` as JSON.

    python benchmarks/prep_throughput.py --images 300 --procs 1 2 --shards 2 --out /tmp/prepare.json

On a 16-core host (sized for 20k images in about 7.5 minutes; ~47 GB of disk in --workdir at its peak):

    python benchmarks/prep_throughput.py --images 20000 --procs 1 4 16 --subset 1:400 4:1600 \
        shards:6000 --plain-images 200 --shards 2 --loader-seconds 10 --cache-images 200 \
        --workdir /tmp/prepbench --out $OUT/prep-16core.json
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
           "cpu_ms_per_image": round(1000 * cpu / n, 1), "accepted": report["counts"]["accepted"],
           "stored_originals": report["counts"]["stored_originals"],
           "disk_mb_per_image": round(disk / 1e6 / max(1, report["counts"]["accepted"]), 3),
           "hours_per_1m_images": round(1e6 / (n / wall) / 3600, 2)}
    print(json.dumps(out), flush=True)
    return out


def run_procs(src: Path, work: Path, procs: int, limit: int, name: str = "") -> tuple[dict, dict]:
    from furlib.data.prepare import prepare

    data = work / f"data-p{procs}"
    shutil.rmtree(data, ignore_errors=True)
    wall, cpu = time.time(), cpu_s()
    report = prepare(src, data, max_images=limit, num_proc=procs, progress=False)
    return row(name or f"num_proc={procs}", report, time.time() - wall, cpu_s() - cpu, data), report


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


def run_shards(src: Path, work: Path, shards: int, procs: int, limit: int) -> tuple[dict, dict]:
    """``shards`` runs started at once (as separate machines would), each a subprocess."""
    data = work / "data-shards"
    shutil.rmtree(data, ignore_errors=True)
    code = ("import sys; from furlib.data.prepare import prepare; prepare(sys.argv[1], sys.argv[2], "
            "max_images=int(sys.argv[3]), num_proc=int(sys.argv[4]), num_shards=int(sys.argv[5]), "
            "shard_index=int(sys.argv[6]), progress=False)")
    wall, cpu = time.time(), cpu_s()
    runs = [subprocess.Popen([sys.executable, "-c", code, str(src), str(data), str(limit), str(procs),
                              str(shards), str(i)]) for i in range(shards)]
    if any(r.wait() for r in runs):
        raise RuntimeError("a shard run failed (its traceback is above)")
    report = json.loads((data / "report.json").read_text())
    return row(f"{shards} shards x num_proc={procs}", report, time.time() - wall, cpu_s() - cpu,
               data), report


def loader_row(folder: Path, workers: int, seconds: float, name: str, cache_dir=None) -> dict:
    from furlib.training.crops import make_loader

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
    ap.add_argument("--loader-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loader-seconds", type=float, default=20.0)
    ap.add_argument("--cache-images", type=int, default=0, help="stored files for the pixel-cache rows")
    ap.add_argument("--workdir", default="/tmp/prep_throughput")
    ap.add_argument("--keep-sources", action="store_true", help="reuse sources already in --workdir")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work, cores = Path(args.workdir), os.cpu_count() or 1
    every = KINDS_EVERY[0] = round(1 / args.convert_share) if args.convert_share > 0 else 0
    src = work / "src"
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
    subset = {k if k == "shards" else int(k): int(v) for k, v in (s.split(":") for s in args.subset)}
    reports = {}
    if args.plain_images:
        out, _ = run_procs(plain_folder(src, work, args.plain_images), work, 1, 0,
                           "num_proc=1, plain JPEGs only")
        result["rows"].append(out)
        shutil.rmtree(work / "data-p1")
    widest = max(args.procs)
    if args.shards > 1:  # first: on disk with the sources, never beside the widest run's copy
        out, sharded = run_shards(src, work, args.shards, max(1, cores // args.shards),
                                  subset.get("shards", 0))
        result["rows"].append(out)
        shutil.rmtree(work / "data-shards")
    for procs in args.procs:
        out, reports[procs] = run_procs(src, work, procs, subset.get(procs, 0))
        result["rows"].append(out)
        if procs != widest:
            shutil.rmtree(work / f"data-p{procs}")  # disk: keep only the widest run's copy
    if args.shards > 1 and not subset.get(widest) and not subset.get("shards"):
        result["rows"][-len(args.procs) - 1]["same_as_num_proc_run"] = \
            sharded["accepted"] == reports[widest]["accepted"]
    train = work / f"data-p{max(args.procs)}" / "train"
    result["rows"].append(loader_row(train, args.loader_workers, args.loader_seconds,
                                     "loader from all stored files, no cache"))
    if args.cache_images:
        result["rows"] += cache_rows(train, work, args.cache_images, args.loader_workers,
                                     args.loader_seconds)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
