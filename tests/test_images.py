"""furlib.images.load_rgb on a corpus of odd and broken files generated here (no binaries in git)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from furlib.images import ImageRejected, load_rgb


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height`` RGB, with a token IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def swapped_primaries_profile() -> bytes:
    """sRGB's ICC profile with its red and green colorant tags swapped: under it, the pixel
    (255, 0, 0) means sRGB green. A non-sRGB profile whose correct conversion is unmistakable."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", icc[128:132])[0]
    for i in range(count):
        at = 132 + 12 * i
        if icc[at:at + 4] in (b"rXYZ", b"gXYZ"):
            icc[at:at + 4] = b"gXYZ" if icc[at:at + 4] == b"rXYZ" else b"rXYZ"
    return bytes(icc)


def noise(height=48, width=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


def rejected(src, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        load_rgb(src, **kw)
    return info.value.reason


def test_broken_inputs_are_rejected_with_a_reason(tmp_path):
    jpeg = encode(noise(), "JPEG")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not really a png\n")
    assert rejected(jpeg[: len(jpeg) // 2]) == "truncated"
    assert rejected(jpeg[:200]) == "truncated"  # cut inside the header
    assert rejected(encode(noise(), "PNG")[:-300]) == "truncated"
    assert rejected(tmp_path / "zero.jpg") == "empty"
    assert rejected(b"") == "empty"
    assert rejected(tmp_path / "text.png") == "not_an_image"
    assert rejected(tmp_path / "absent.png") == "missing"


def test_decompression_bombs_are_rejected_without_decoding(tmp_path):
    bomb = png_header_only(100_000, 100_000)  # 1e10 px: PIL's own DecompressionBombError
    assert len(bomb) < 200
    assert rejected(bomb) == "too_many_pixels"
    assert rejected(png_header_only(10_000, 9_000)) == "too_many_pixels"  # PIL's warning zone
    assert rejected(png_header_only(3000, 3000), max_pixels=1_000_000) == "too_many_pixels"
    (tmp_path / "bomb.png").write_bytes(bomb)
    assert rejected(tmp_path / "bomb.png") == "too_many_pixels"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_files_pillow_fails_on_without_an_oserror_are_corrupt():
    """Pillow raises ValueError, TypeError and others, not only OSError, on some malformed files:
    each is a ``corrupt`` rejection, never an exception that stops 01 or a streamed training."""
    ihdr = lambda interlace: png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, interlace))  # noqa: E731
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 25 * 8)) + png_chunk(b"IEND", b"")
    big_text = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * 3_000_000))  # > Pillow's 1 MB text cap
    cases = {"PGM with maxval 0": b"P5 8 8 0\n" + bytes(64),
             "PNG interlace method 2": b"\x89PNG\r\n\x1a\n" + ihdr(2) + idat,
             "PNG with a 3 MB text chunk": b"\x89PNG\r\n\x1a\n" + ihdr(0) + big_text + idat}
    for name, data in cases.items():
        assert rejected(data) == "corrupt", name
    assert load_rgb(b"\x89PNG\r\n\x1a\n" + ihdr(0) + idat).size == (8, 8)  # the same file, well formed


def test_max_pixels_above_pillows_own_limit_is_refused(tmp_path):
    """01 refuses a max_pixels over Pillow's own limit: it had no effect (Pillow rejected such
    images anyway), and an image 01 stored above it would fail every later reader (crops, 03)."""
    from furlib.data import prepare

    with pytest.raises(ValueError, match="max_pixels=200,000,000 is over Pillow's own limit"):
        prepare.prepare("builtin", tmp_path / "data", max_pixels=200_000_000, progress=False)
    assert not (tmp_path / "data").exists()


def test_a_png_colour_key_is_transparency():
    """A PNG's tRNS colour key on an RGB, grey or 16-bit grey image makes the keyed pixels
    transparent: they come out as the background, like a palette PNG's."""
    rgb = Image.new("RGB", (8, 8), (255, 0, 255))
    rgb.paste((0, 120, 0), (2, 2, 6, 6))
    grey16 = np.full((8, 8), 7, np.uint16)
    grey16[2:6, 2:6] = 40000
    keyed = {"RGB": encode(rgb, "PNG", transparency=(255, 0, 255)),
             "L": encode(rgb.convert("L"), "PNG", transparency=rgb.convert("L").getpixel((0, 0))),
             "I;16": encode(Image.fromarray(grey16), "PNG", transparency=7)}
    for mode, data in keyed.items():
        out = np.asarray(load_rgb(data, background=(10, 20, 30)))
        assert (out[0, 0] == (10, 20, 30)).all(), mode  # keyed: the background
        assert (out[3, 3] != (10, 20, 30)).any(), mode  # the rest kept
    assert np.asarray(load_rgb(keyed["I;16"]))[3, 3, 0] == round(40000 * 255 / 65535)  # 16-bit depth kept
    rows = b"".join(b"\0" + struct.pack(">HHH", 1000, 2000, 3000) * 8 for _ in range(8))  # 16-bit RGB, keyed
    rgb16 = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
             + png_chunk(b"tRNS", struct.pack(">HHH", 1000, 2000, 3000)) + png_chunk(b"IDAT", zlib.compress(rows))
             + png_chunk(b"IEND", b""))
    assert rejected(rgb16) == "unsupported_mode"  # Pillow's 8-bit pixels cannot meet a 16-bit key


def test_too_small_is_checked_before_decoding():
    assert rejected(png_header_only(40, 20), min_side=32) == "too_small"
    assert load_rgb(encode(noise(20, 40), "PNG"), min_side=20).size == (40, 20)


def test_path_bytes_and_pil_give_the_same_pixels(tmp_path):
    image = noise()
    (tmp_path / "a.png").write_bytes(encode(image, "PNG"))
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), encode(image, "PNG"), image):
        out = load_rgb(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image))
        assert "icc_profile" not in out.info


@pytest.mark.parametrize("mode, value, expected", [
    ("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77)), ("I", 30000, (117, 117, 117)),
    ("I;16", 65535, (255, 255, 255)), ("I;16", 32896, (128, 128, 128)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_modes_become_8bit_rgb(mode, value, expected):
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I",) else "PNG"
    out = np.asarray(load_rgb(encode(Image.new(mode, (16, 16), value), fmt)))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert np.abs(out[8, 8].astype(int) - expected).max() <= 3  # JPEG rounding for CMYK


def test_sixteen_bit_png_keeps_its_range():
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    out = np.asarray(load_rgb(encode(Image.fromarray(ramp), "PNG")))[..., 0]
    assert np.array_equal(out, np.arange(256).reshape(16, 16))  # not clipped at 255


def test_float_tiff_in_unit_range():
    ramp = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    out = np.asarray(load_rgb(encode(Image.fromarray(ramp, "F"), "TIFF")))[..., 1]
    assert out.min() == 0 and out.max() == 255 and abs(int(out[8, 0]) - 128) <= 1


def test_transparency_is_composited_over_the_background():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    data = encode(palette, "PNG")
    assert load_rgb(data).getpixel((4, 4)) == (255, 255, 255)
    assert load_rgb(data, background=(0, 0, 10)).getpixel((4, 4)) == (0, 0, 10)
    assert load_rgb(data).getpixel((0, 0)) == (0, 255, 0)
    la = encode(Image.new("LA", (8, 8), (100, 128)), "PNG")  # half transparent grey 100
    assert load_rgb(la, background=(0, 0, 0)).getpixel((1, 1)) == (50, 50, 50)
    rgba = encode(Image.new("RGBA", (8, 8), (200, 0, 0, 0)), "PNG")
    assert load_rgb(rgba, background=(10, 20, 30)).getpixel((1, 1)) == (10, 20, 30)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_rgb(buf.getvalue()).getpixel((8, 8)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_rgb(encode(image, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    assert out.getpixel((15, 4))[0] > 200 and out.getpixel((4, 4))[0] < 50  # now top-right


def test_icc_profile_is_converted_to_srgb():
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    out = load_rgb(encode(red, "JPEG", quality=100, icc_profile=swapped_primaries_profile()))
    r, g, b = out.getpixel((8, 8))
    assert g > 240 and r < 15 and b < 15  # the profile says this red is green
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    colour = Image.new("RGB", (16, 16), (200, 30, 60))
    same = np.asarray(load_rgb(encode(colour, "PNG", icc_profile=srgb))).astype(int)
    assert np.abs(same - (200, 30, 60)).max() <= 2  # an sRGB profile changes (almost) nothing


def test_a_broken_icc_profile_is_a_rejection():
    assert rejected(encode(noise(), "PNG", icc_profile=b"garbage" * 30)) == "bad_icc_profile"


def test_train_previews_and_eval_see_the_same_pixels(tmp_path):
    """02's preview strip (prepared.center_crops) and 03's evaluation (eval_inputs.batches) crop a
    non-square val image identically: the one ``images.center_crop``."""
    from furlib.evaluation import eval_inputs
    from furlib import prepared

    rng = np.random.default_rng(0)
    val = tmp_path / "data" / "val"
    val.mkdir(parents=True)
    for i, (w, h) in enumerate(((400, 300), (300, 451), (64, 64))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(val / f"{i}.png")
    paths = prepared.list_images(val)
    preview = prepared.center_crops(paths, 64)
    (_, evaluated), = eval_inputs.batches(eval_inputs.image_set("val", tmp_path), 64, batch_size=8)
    assert torch.equal(preview, evaluated)


def test_range_conversions_round_trip():
    from furlib.images import to_rgb_01, to_rgb_m11, to_uint8

    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    x = to_rgb_m11(pixels)
    assert x.shape == (3, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x), pixels)
    assert torch.equal(to_rgb_01(torch.tensor([-1.5, 0.0, 2.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_decode_input_and_cap_are_01s_rules_for_every_reader():
    """01 (prepare) and training from a stream decode through these two functions."""
    from furlib.images import cap_long_side, decode_input

    wide = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 400, 3), np.uint8))
    image, suffix = decode_input(encode(wide, "PNG"), min_side=32)
    assert image.size == (400, 40) and suffix == ".png"
    assert cap_long_side(image, 400, 32) is image  # fits: untouched, the stored bytes stay usable
    with pytest.raises(ImageRejected) as caught:
        cap_long_side(image, 200, 32)  # 400x40 -> 200x20, below 32 px
    assert caught.value.reason == "too_small_after_cap" and "(200, 20)" in caught.value.detail
    assert cap_long_side(image, 320, 32).size == (320, 32)
    for bad, reason in ((None, "empty"), (b"", "empty"), (3, "not_an_image"), (b"not an image", "not_an_image")):
        with pytest.raises(ImageRejected) as caught:
            decode_input(bad)
        assert caught.value.reason == reason, bad
