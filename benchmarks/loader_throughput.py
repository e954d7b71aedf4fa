"""Training-loader throughput (images/s) of ``furlib.crops.make_loader`` against ``num_workers``.

Sources are generated 1-2 MP PNGs written to a temporary folder exactly as stage 01 stores them
(lossless PNG, compress level 3): half drawn flat-colour artwork (``furlib.builtin.draw_art``), half
photo-like (the bundled photographs enlarged, plus mild sensor-like noise, which makes PNG decoding
slower: the hard case). Crops are 256 px unless ``--resolution`` says otherwise.

Each worker count gets a fresh loader; its first ``max(1, workers)`` batches (process start-up,
first fill) are a warm-up and not timed. The CPU cost of one sample in this process (decode, crop,
tensor; ``time.process_time``) is reported too, per kind of source: unlike images/s it does not
depend on what else runs on the machine.

    python benchmarks/loader_throughput.py --workers 1 2 4 8 16 --batches 50 --out loader.json
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


def cpu_ms_per_sample(folder: Path, kinds: list[dict], resolution: int, samples: int = 40) -> dict:
    """Single-process CPU milliseconds per sample by kind of source, and for comparison the time
    to decode a whole PNG (a sample decodes only the rows its crop needs)."""
    from furlib.crops import CropDataset, list_images, open_rgb

    paths = list_images(folder)
    out = {}
    for kind in sorted({k["kind"] for k in kinds}) + ["all"]:
        chosen = [p for p, k in zip(paths, kinds) if kind in ("all", k["kind"])]
        dataset = CropDataset(chosen, resolution, seed=0)
        start = time.process_time()
        for g in range(samples):
            dataset[g]
        sample_ms = (time.process_time() - start) / samples * 1e3
        start = time.process_time()
        for g in range(samples):
            open_rgb(chosen[g % len(chosen)])
        decode_ms = (time.process_time() - start) / samples * 1e3
        out[kind] = {"sample": round(sample_ms, 1), "decode": round(decode_ms, 1)}
    return out


def loader_rate(folder: Path, workers: int, batches: int, batch_size: int, resolution: int) -> dict:
    from furlib.crops import make_loader

    loader = make_loader(folder, resolution, batch_size, seed=0, num_workers=workers)
    batches_iter = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: worker start and the first batch of each
        next(batches_iter)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    seconds = time.perf_counter() - start
    del batches_iter, loader  # stops the workers before the next configuration starts
    rate = batches * batch_size / seconds
    return {"workers": workers, "images_per_s": round(rate, 1), "seconds": round(seconds, 2),
            "per_worker": round(rate / max(1, workers), 1), "loadavg_1min_before": load_before}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])  # loader processes
    parser.add_argument("--batches", type=int, default=50)  # timed batches per worker count
    parser.add_argument("--batch-size", type=int, default=16)  # images per batch
    parser.add_argument("--resolution", type=int, default=256)  # crop side, px
    parser.add_argument("--images", type=int, default=32)  # generated source PNGs
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)  # JSON results path
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        kinds = make_sources(Path(tmp), args.images, args.seed)
        cpu_ms = cpu_ms_per_sample(Path(tmp), kinds, args.resolution)
        rows = [loader_rate(Path(tmp), w, args.batches, args.batch_size, args.resolution)
                for w in args.workers]
    result = _describe(args, kinds, cpu_ms, rows)
    _print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


def _describe(args, kinds: list[dict], cpu_ms: dict, rows: list[dict]) -> dict:
    import PIL
    import torch

    megapixels = [k["width"] * k["height"] / 1e6 for k in kinds]
    return {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "pillow": PIL.__version__},
            "resolution": args.resolution, "batch_size": args.batch_size, "batches": args.batches,
            "sources": {"count": len(kinds), "photo": sum(k["kind"] == "photo" for k in kinds),
                        "megapixels_mean": round(sum(megapixels) / len(megapixels), 2)},
            "cpu_ms_per_sample": cpu_ms, "results": rows}


def _print_table(result: dict) -> None:
    print(f"{result['sources']['count']} PNG sources, {result['sources']['megapixels_mean']} MP "
          f"mean, {result['resolution']} px crops, batch {result['batch_size']}")
    for kind, ms in result["cpu_ms_per_sample"].items():
        print(f"CPU per sample, {kind:>5}: {ms['sample']} ms ({1e3 / ms['sample']:.0f}/s per process); "
              f"decoding a whole PNG alone: {ms['decode']} ms")
    print(f"{'workers':>8} {'images/s':>9} {'per worker':>11} {'load avg':>9}")
    for row in result["results"]:
        print(f"{row['workers']:>8} {row['images_per_s']:>9} {row['per_worker']:>11} "
              f"{row['loadavg_1min_before']:>9.2f}")


if __name__ == "__main__":
    main()
