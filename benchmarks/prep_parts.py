"""Where stage 01's CPU per image goes, part by part, on one core.

``prep_throughput.py`` gives a row's CPU per image; this splits it. On ``--images`` generated
2-6 MP sources (``prep_throughput.write_source``: plain JPEGs and, every 10th, one that must be
converted), one thread, Pillow's pixel pool on as in 01, CPU time (``time.process_time``) of:
decoding as 01 does (``decode_input``: plain, or decoded and converted), the pixel bytes
(``tobytes``), their SHA-256 (01's pixel hash) and, for comparison only, BLAKE2b and SHA-1 of the
same bytes, copying a plain source's file, and encoding a conversion as 01 stores it (lossless
WebP) and as uncompressed TIFF (the cheapest lossless store). Then the same images through
``prepare(num_proc=1, workers=1)``: what 01 adds around the parts. The CPU's flags say whether
it hashes SHA-256 in hardware (``sha_ni``).

    python benchmarks/prep_parts.py --images 40 --out /tmp/parts.json
"""

import argparse
import hashlib
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import prep_throughput  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)

from furlib.runinfo import print_and_save  # noqa: E402


def cpu_flags() -> list:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f in ("sha_ni", "avx2", "avx512f", "avx512bw"))


def parts(sources: list, out: Path) -> dict:
    """{part: CPU ms per image it applies to}, and how many images each part saw."""
    from furlib.images import decode_input, reusing_pixel_memory

    total, count = {}, {}

    def timed(name, fn):
        start = time.process_time()
        result = fn()
        total[name] = total.get(name, 0.0) + time.process_time() - start
        count[name] = count.get(name, 0) + 1
        return result

    with reusing_pixel_memory(1):
        for path in sources:
            image, suffix = decode_input(path)  # warm-up of this image's file in the page cache
            image = None
            kind = "plain" if suffix else "converted"
            image, _ = timed(f"decode ({kind})", lambda: decode_input(path))
            data = timed("pixel bytes (tobytes)", image.tobytes)
            timed("sha256 (01's pixel hash)", lambda: hashlib.sha256(data).hexdigest())
            timed("blake2b (comparison)", lambda: hashlib.blake2b(data).hexdigest())
            timed("sha1 (comparison)", lambda: hashlib.sha1(data).hexdigest())
            data = None
            if suffix:
                timed("copy the source file", lambda: shutil.copyfile(path, out / f"copy{suffix}"))
            else:
                timed("encode lossless WebP (01's store)", lambda: image.save(
                    out / "c.webp", "WEBP", lossless=True, quality=0, method=0, exact=True))
                timed("encode uncompressed TIFF (comparison)", lambda: image.save(out / "c.tif", "TIFF"))
    return {k: {"ms_per_image": round(1000 * v / count[k], 2), "images": count[k]} for k, v in total.items()}


def through_prepare(src: Path, data: Path) -> float:
    """CPU ms per image of ``prepare`` on ``src`` in this process (one process, one thread)."""
    from furlib.data.prepare import prepare

    def cpu():
        return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage,
                                                       (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    start = cpu()
    report = prepare(src, data, progress=False, val_fraction=0, num_proc=1, workers=1)
    return round(1000 * (cpu() - start) / max(1, report["counts"]["inputs"]), 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        for i in range(args.images):
            prep_throughput.write_source((src, i, 10))
        sources = sorted(src.iterdir())
        from PIL import Image
        megapixels = [Image.open(p).width * Image.open(p).height / 1e6 for p in sources]
        result = {"images": len(sources), "mean_megapixels": round(sum(megapixels) / len(megapixels), 2),
                  "cpu_flags": cpu_flags(), "python": platform.python_version(), "platform": platform.platform(),
                  "parts": parts(sources, work)}
        result["prepare_ms_per_image"] = through_prepare(src, work / "data")
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
