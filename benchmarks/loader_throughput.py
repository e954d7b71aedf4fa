"""Training-loader throughput (images/s) of ``furlib.training.crops.make_loader`` against ``num_workers``,
decoding the PNGs (``png``) or reading the decoded-pixel cache (``cache``).

Sources are generated 1-2 MP PNGs written to a temporary folder exactly as stage 01 stores them
(lossless PNG, compress level 3): half drawn flat-colour artwork (``furlib.builtin.draw_art``), half
photo-like (the bundled photographs enlarged, plus mild sensor-like noise, which makes PNG decoding
slower: the hard case). Crops are 256 px unless ``--resolution`` says otherwise.

The cache is filled once, in one process, before any cache row (its cold cost per image, decoding
the PNG whole and writing the entry, is reported); cache rows then read it warm, from the page
cache (a cache larger than RAM would be read from disk instead). Each (workers, storage) row gets a
fresh loader; its first ``max(1, workers)`` batches (process start-up, first fill) are a warm-up
and not timed; then it times at least ``--batches`` batches and at least ``--min-seconds``, so rows
with many workers are not a blip. The CPU cost of one sample in this process (``time.process_time``)
is reported per storage and kind of source: unlike images/s it does not depend on what else runs on
the machine. Rows are printed and written to ``--out`` as they finish.

    python benchmarks/loader_throughput.py --workers 1 2 4 8 16 --batches 60 --storage png cache --out loader.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def make_sources(folder: Path, count: int, seed: int) -> list[dict]:
    """Write ``count`` PNGs of 1-2 MP; return their kind and size."""
    import numpy as np
    from PIL import Image

    from furlib.builtin import PHOTOS, draw_art, photo_path
    from furlib.images import ImageRejected, load_rgb

    rng = np.random.default_rng(seed)
    photos = []
    for _, package, sub, name in PHOTOS:
        try:
            photos.append(load_rgb(photo_path(package, sub, name)))
        except ImageRejected:
            pass  # a package without its sample file: fewer distinct photos, same sizes
    out = []
    for index in range(count):
        megapixels, aspect = rng.uniform(1.0, 2.0), rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9])
        width = int(round(np.sqrt(megapixels * 1e6 * aspect)))
        size = (width, int(round(megapixels * 1e6 / width)))
        size = size if rng.random() < 0.5 else size[::-1]
        kind = "photo" if photos and index % 2 else "art"
        if kind == "art":
            image = draw_art(index, seed).resize(size, Image.Resampling.LANCZOS)
        else:
            base = np.asarray(photos[index // 2 % len(photos)].resize(size, Image.Resampling.LANCZOS))
            noisy = base.astype(np.float32) + rng.normal(0.0, 2.0, base.shape)  # sigma in 8-bit levels
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        image.save(folder / f"{index:03d}.png", "PNG", compress_level=3)
        out.append({"kind": kind, "width": size[0], "height": size[1]})
    return out


def cpu_ms_by_kind(folder: Path, kinds: list[dict], work, samples: int = 40) -> dict:
    """Single-process CPU milliseconds per call, by kind of source and for all: ``work(paths)``
    (untimed) returns the timed ``g -> None`` call for the sources of one kind."""
    from furlib.prepared import list_images

    paths = list_images(folder)
    out = {}
    for kind in sorted({k["kind"] for k in kinds}) + ["all"]:
        call = work([p for p, k in zip(paths, kinds) if kind in ("all", k["kind"])])
        start = time.process_time()
        for g in range(samples):
            call(g)
        out[kind] = round((time.process_time() - start) / samples * 1e3, 1)
    return out


def cpu_ms_per_sample(folder: Path, kinds: list[dict], resolution: int, cache_dir=None) -> dict:
    """One training sample, reading the PNGs or (with ``cache_dir``, already filled) the cache."""
    from furlib.training.crops import CropDataset

    return cpu_ms_by_kind(folder, kinds, lambda chosen: CropDataset(chosen, resolution, seed=0,
                                                                    cache_dir=cache_dir).__getitem__)


def decode_ms(folder: Path, kinds: list[dict]) -> dict:
    """Decoding a whole PNG (a PNG-path sample decodes only the rows its crop needs)."""
    from furlib.prepared import open_rgb

    return cpu_ms_by_kind(folder, kinds, lambda chosen: lambda g: open_rgb(chosen[g % len(chosen)]))


def fill_cache(folder: Path, cache_dir: Path) -> dict:
    """Fill the cache in one process, as the first touch of each image in training does (decode
    the PNG whole, write the entry atomically); per image: wall and CPU ms, and MB on disk."""
    import numpy as np

    from furlib.training import pixelcache
    from furlib.prepared import list_images, open_rgb

    paths = list_images(folder)
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        pixelcache.write(pixelcache.entry_path(cache_dir, path), np.asarray(open_rgb(path)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    size = sum(p.stat().st_size for p in cache_dir.glob("*.npy"))
    return {"images": len(paths), "wall_ms_per_image": round(wall / len(paths) * 1e3, 1),
            "cpu_ms_per_image": round(cpu / len(paths) * 1e3, 1),
            "mb_per_image": round(size / len(paths) / 1e6, 2)}


def loader_rate(folder: Path, workers: int, args, cache_dir=None) -> dict:
    from furlib.training.crops import make_loader

    loader = make_loader(folder, args.resolution, args.batch_size, seed=0, num_workers=workers,
                         cache_dir=cache_dir)
    batches_iter = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: worker start and the first batch of each
        next(batches_iter)
    load_before, start, batches = os.getloadavg()[0], time.perf_counter(), 0
    while batches < args.batches or time.perf_counter() - start < args.min_seconds:
        next(batches_iter)
        batches += 1
    seconds = time.perf_counter() - start
    del batches_iter, loader  # stops the workers before the next configuration starts
    rate = batches * args.batch_size / seconds
    return {"storage": "cache" if cache_dir else "png", "workers": workers,
            "images_per_s": round(rate, 1), "per_worker": round(rate / max(1, workers), 1),
            "batches": batches, "seconds": round(seconds, 2), "loadavg_1min_before": load_before}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])  # loader processes
    parser.add_argument("--storage", nargs="+", choices=["png", "cache"], default=["png", "cache"])
    parser.add_argument("--batches", type=int, default=60)  # at least this many timed batches a row
    parser.add_argument("--min-seconds", type=float, default=10.0)  # and at least this long, s
    parser.add_argument("--batch-size", type=int, default=16)  # images per batch
    parser.add_argument("--resolution", type=int, default=256)  # crop side, px
    parser.add_argument("--images", type=int, default=32)  # generated source PNGs
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)  # JSON results, rewritten after each row
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        sources, cache_dir = Path(tmp) / "train", Path(tmp) / "pixel_cache"
        sources.mkdir()
        kinds = make_sources(sources, args.images, args.seed)
        result = _describe(args, kinds)
        result["decode_ms"] = decode_ms(sources, kinds)
        for storage in args.storage:
            if storage == "cache":
                result["cache_fill"] = fill_cache(sources, cache_dir)
            result["cpu_ms_per_sample"][storage] = cpu_ms_per_sample(
                sources, kinds, args.resolution, cache_dir if storage == "cache" else None)
        _print_header(result)
        _save(result, args.out)
        for workers in args.workers:
            for storage in args.storage:
                row = loader_rate(sources, workers, args, cache_dir if storage == "cache" else None)
                result["results"].append(row)
                _print_row(row)
                _save(result, args.out)
    return result


def _save(result: dict, path) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def _describe(args, kinds: list[dict]) -> dict:
    import PIL
    import torch

    megapixels = [k["width"] * k["height"] / 1e6 for k in kinds]
    return {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "pillow": PIL.__version__},
            "resolution": args.resolution, "batch_size": args.batch_size,
            "min_batches": args.batches, "min_seconds": args.min_seconds,
            "sources": {"count": len(kinds), "photo": sum(k["kind"] == "photo" for k in kinds),
                        "megapixels_mean": round(sum(megapixels) / len(megapixels), 2)},
            "cpu_ms_per_sample": {}, "results": []}


def _print_header(result: dict) -> None:
    print(f"{result['sources']['count']} PNG sources, {result['sources']['megapixels_mean']} MP "
          f"mean, {result['resolution']} px crops, batch {result['batch_size']}", flush=True)
    for kind, ms in result["decode_ms"].items():
        line = ", ".join(f"{s} {by_kind[kind]} ms ({1e3 / by_kind[kind]:.0f}/s)"
                         for s, by_kind in result["cpu_ms_per_sample"].items())
        print(f"CPU per sample, {kind:>5}: {line}; decoding a whole PNG alone: {ms} ms", flush=True)
    if "cache_fill" in result:
        fill = result["cache_fill"]
        print(f"cache fill (cold, one process): {fill['wall_ms_per_image']} ms wall, "
              f"{fill['cpu_ms_per_image']} ms CPU, {fill['mb_per_image']} MB per image", flush=True)
    print(f"{'storage':>8} {'workers':>8} {'images/s':>9} {'per worker':>11} {'timed s':>8} "
          f"{'load avg':>9}", flush=True)


def _print_row(row: dict) -> None:
    print(f"{row['storage']:>8} {row['workers']:>8} {row['images_per_s']:>9} {row['per_worker']:>11} "
          f"{row['seconds']:>8} {row['loadavg_1min_before']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
