"""How stage 01 should store a converted image: lossless formats, per megapixel, on one core.

For each test image (the bundled photographs at their own size, one of them enlarged 4x to ~2 MP,
and a 4 MP photo-like synthetic image from ``prep_throughput.synth``, grain included): encode and
decode CPU ms per MP (best of ``--repeats``, ``time.process_time``), MB per MP, and whether the
decoded pixels equal the originals exactly. Candidates: PNG at zlib levels 1, 3 (01's earlier
choice) and 6 (PIL's default), and lossless WebP at its fastest setting (``method=0``, ``quality=0``).

    python benchmarks/lossless_formats.py --out benchmarks/runs/2026-12-04/lossless_formats.json
"""

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from prep_throughput import synth  # noqa: E402

FORMATS = {  # name: PIL save arguments
    "PNG level 1": dict(format="PNG", compress_level=1),
    "PNG level 3": dict(format="PNG", compress_level=3),
    "PNG level 6": dict(format="PNG", compress_level=6),
    "WebP lossless, method 0": dict(format="WEBP", lossless=True, quality=0, method=0, exact=True),
}


def best_cpu(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def images() -> dict:
    from furlib.builtin import PHOTOS, photo_path

    out = {}
    for name, package, folder, filename in PHOTOS:
        with Image.open(photo_path(package, folder, filename)) as im:
            out[name] = im.convert("RGB")
    chelsea = out["chelsea"]
    out["chelsea, enlarged 4x"] = chelsea.resize((chelsea.width * 4, chelsea.height * 4), Image.Resampling.LANCZOS)
    out["synthetic 4 MP (prep_throughput)"] = synth(3, 4.0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for name, image in images().items():
        mp = image.width * image.height / 1e6
        pixels = np.asarray(image)
        for fmt, kwargs in FORMATS.items():
            def encode():
                buffer = io.BytesIO()
                image.save(buffer, **kwargs)
                return buffer.getvalue()

            encode_s, data = best_cpu(encode, args.repeats)
            decode_s, back = best_cpu(lambda: Image.open(io.BytesIO(data)).convert("RGB"), args.repeats)
            rows.append({"image": name, "megapixels": round(mp, 2), "format": fmt,
                         "encode_ms_per_mp": round(1000 * encode_s / mp, 1),
                         "decode_ms_per_mp": round(1000 * decode_s / mp, 1),
                         "mb_per_mp": round(len(data) / 1e6 / mp, 3),
                         "exact": bool(np.array_equal(np.asarray(back), pixels))})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"python": sys.version.split()[0], "platform": platform.platform(),
                                              "pillow": Image.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
