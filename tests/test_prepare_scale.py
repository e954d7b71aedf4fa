"""Stage 01 at scale: stored originals, shards and processes, locks, stream resume, 02's check."""

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import proc_fields

from furlib.data import prep_report, prepare
from furlib.data import store
from furlib import prepared
from furlib.images import cap_long_side, load_rgb
from furlib import crops

RES = 32


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def png16(width=48, height=40) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one), rows of a gradient."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + b"".join(struct.pack(">HHH", 1000 * x, 65535 - 900 * x, 300 * x) for x in range(width))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def run(source, data_dir, **kw):
    kw = {"resolution": RES, "max_side": 128, "val_fraction": 0.3, "progress": False, "workers": 1,
          **kw}
    return prepare.prepare(source, data_dir, **kw)


def originals_and_conversions(folder) -> tuple[set, set]:
    """Files that must be stored as they are, and files that must be converted."""
    folder.mkdir(parents=True)
    noise(40, 60, 1).save(folder / "plain.jpg", quality=85)
    noise(44, 60, 2).save(folder / "plain.png")
    noise(48, 60, 3).save(folder / "plain.webp", quality=80)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    noise(52, 60, 4).save(folder / "srgb_icc.jpg", icc_profile=srgb)
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    noise(40, 64, 5).save(folder / "other_icc.png", icc_profile=lab)  # not sRGB: converted
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(40, 68, 6).save(folder / "rotated.jpg", exif=exif)
    noise(40, 72, 7).convert("P").save(folder / "palette.png")
    Image.new("RGBA", (76, 40), (9, 200, 30, 60)).save(folder / "alpha.webp")
    Image.new("CMYK", (80, 40), (0, 200, 100, 20)).save(folder / "cmyk.jpg")
    (folder / "sixteen.png").write_bytes(png16())
    noise(100, 300, 8).save(folder / "too_long.jpg")  # over max_side 128: downscaled, so converted
    noise(40, 60, 9).convert("L").save(folder / "grey.jpg")
    return ({"plain.jpg", "plain.png", "plain.webp", "srgb_icc.jpg"},
            {"other_icc.png", "rotated.jpg", "palette.png", "alpha.webp", "cmyk.jpg", "sixteen.png",
             "too_long.jpg", "grey.jpg"})


def test_faithful_sources_are_stored_as_their_own_bytes(tmp_path):
    originals, converted = originals_and_conversions(tmp_path / "src")
    report = run(tmp_path / "src", tmp_path / "data")
    by_id = {a["id"]: a for a in report["accepted"]}
    assert set(by_id) == originals | converted
    assert {i for i, a in by_id.items() if a["stored"] == "original"} == originals
    assert report["counts"]["stored_originals"] == len(originals)
    for input_id, a in by_id.items():
        stored = tmp_path / "data" / a["file"]
        source = tmp_path / "src" / input_id
        if input_id in originals:
            assert stored.read_bytes() == source.read_bytes()
            assert stored.suffix == {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[Image.open(source).format]
        else:  # converted: a lossless WebP of exactly load_rgb's pixels (capped), read as RGB
            assert stored.suffix == ".webp"
            expected = cap_long_side(load_rgb(source), 128, 1)
            assert np.array_equal(np.asarray(prepared.open_rgb(stored)), np.asarray(expected)), input_id
    assert sorted(p.name for p in prepared.list_images(tmp_path / "data" / "train")
                  + prepared.list_images(tmp_path / "data" / "val")) == sorted(
        a["file"].split("/")[1] for a in report["accepted"])


@pytest.mark.parametrize("width", [300, store.WEBP_MAX_SIDE + 1])  # past WebP's limit: PNG
def test_converted_images_keep_every_pixel(tmp_path, width):
    rng = np.random.default_rng(width)
    ramp = np.linspace(0, 255, width * 40 * 3).reshape(40, width, 3)  # smooth: predictors used
    pixels = np.where(rng.random((40, width, 1)) < 0.5, ramp, rng.integers(0, 256, (40, width, 3)))
    image = Image.fromarray(pixels.astype(np.uint8))
    path = tmp_path / f"x{store.converted_suffix(image)}"
    store.save_converted(image, path)
    assert path.suffix == (".webp" if width <= store.WEBP_MAX_SIDE else ".png")
    back = prepared.open_rgb(path)
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(image))


def test_reused_pixel_memory_decodes_the_same_pixels_and_is_given_back(tmp_path):
    """01 lets Pillow reuse freed pixel memory: after a large noisy image is freed in the pool,
    every kind of source still decodes (and converts) to exactly its pixels; on the way out the
    pool is emptied and Pillow's settings are what they were."""
    from furlib.images import reusing_pixel_memory

    originals, conversions = originals_and_conversions(tmp_path / "src")
    names = sorted(originals | conversions)
    outside = [load_rgb(tmp_path / "src" / n).tobytes() for n in names]
    settings = Image.core.get_block_size(), Image.core.get_blocks_max()
    with reusing_pixel_memory(threads=2):
        for seed in (1, 2):
            del_me = noise(1500, 1400, seed).convert("RGBA")  # blocks full of noise, then freed
            del del_me
        assert Image.core.get_stats()["blocks_cached"] > 0
        inside = [load_rgb(tmp_path / "src" / n).tobytes() for n in names]
    assert inside == outside
    assert (Image.core.get_block_size(), Image.core.get_blocks_max()) == settings
    assert Image.core.get_stats()["blocks_cached"] <= settings[1]


def test_crops_of_stored_originals_equal_crops_of_the_source(tmp_path):
    originals, _ = originals_and_conversions(tmp_path / "src")
    report = run(tmp_path / "src", tmp_path / "data", val_fraction=0)
    paths = prepared.list_images(tmp_path / "data" / "train")
    assert {p.suffix for p in paths} == {".jpg", ".png", ".webp"}  # the loader reads every kind
    sources = {a["file"].split("/")[1]: tmp_path / "src" / a["id"] for a in report["accepted"]}
    for kw in ({}, {"cache_dir": tmp_path / "cache"}):
        dataset = crops.CropDataset(paths, 24, seed=3, **kw)
        for g in range(3 * len(paths)):
            path = paths[dataset.image_index(g)]
            if sources[path.name].name not in originals:
                continue
            rng = crops.sample_rng(3, g)
            image = load_rgb(sources[path.name])
            want = crops.apply_crop(image, 24, *crops.crop_params(*image.size, 24, rng))
            assert np.array_equal(crops.to_rgb_m11(want).numpy(), dataset[g].numpy()), path


def test_two_shards_equal_one_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(14):
        noise(36 + i, 40, i % 11).save(src / f"{i:02d}.{'jpg' if i % 2 else 'png'}")  # 3 duplicates
    (src / "bad.png").write_text("no image")
    whole = run(src, tmp_path / "whole", val_max=2)
    first = run(src, tmp_path / "sharded", num_shards=2, shard_index=1, val_max=2)
    assert not first["complete"] and first["missing_shards"] == ["shard-00000-of-00002"]
    assert not (tmp_path / "sharded" / "report.json").exists()
    part = tmp_path / "sharded" / "parts" / "shard-00001-of-00002.jsonl"
    intact = part.read_bytes()
    part.write_bytes(intact[: len(intact) // 2])  # damaged on disk: that shard is missing again
    assert run(src, tmp_path / "sharded", num_shards=2, shard_index=0, val_max=2)["missing_shards"] == \
        ["shard-00001-of-00002"]
    part.write_bytes(intact)
    second = run(src, tmp_path / "sharded", num_shards=2, shard_index=0, val_max=2)
    assert second["complete"]
    for key in ("accepted", "rejected", "duplicates"):
        assert second[key] == whole[key]
    assert second["counts"] == dict(whole["counts"], decoded_this_run=second["counts"]["decoded_this_run"],
                                    reused=second["counts"]["reused"])
    for split in ("train", "val"):
        assert sorted(p.name for p in (tmp_path / "sharded" / split).iterdir()) == \
            sorted(p.name for p in (tmp_path / "whole" / split).iterdir())
    again = run(src, tmp_path / "sharded", num_proc=2, val_max=2)  # another split: all reused
    assert again["counts"]["decoded_this_run"] == 0 and again["accepted"] == whole["accepted"]


def test_shards_of_a_folder_that_changed_between_them_do_not_merge(tmp_path):
    """A file added between two shards' runs moved every later position: merged, the shards' parts
    skipped inputs and listed others as duplicates of themselves, marked complete. Each part now
    carries its listing's digest: the stale shard is named to run again, then all is read once."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        noise(36, 40, i).save(src / f"b_{i:02d}.png")
    run(src, tmp_path / "data", num_shards=2, shard_index=0)
    noise(36, 40, 99).save(src / "a_new.png")  # sorts first: every position moves
    second = run(src, tmp_path / "data", num_shards=2, shard_index=1)
    assert not second["complete"] and not (tmp_path / "data" / "report.json").exists()
    assert second["missing_shards"] == [
        "shard-00000-of-00002 (it listed the source folder before it changed: run it again)"]
    again = run(src, tmp_path / "data", num_shards=2, shard_index=0)
    assert again["complete"] and again["counts"]["inputs"] == 13 == again["counts"]["accepted"]
    assert not again["duplicates"]
    assert not list((tmp_path / "data" / "parts").glob("*.listing.json"))  # each run lists anew
    lower = run(src, tmp_path / "data", num_shards=2, shard_index=1, resolution=RES // 2)  # a filter changed:
    assert lower["missing_shards"] == ["shard-00000-of-00002 (it ran with other settings: run it again)"]


def test_the_processes_of_a_shard_deal_from_its_one_listing(tmp_path):
    """Every process of a shard reads the listing the shard wrote once (a folder still filling
    up gave each process its own list, so dealt positions meant different files)."""
    from furlib.data import shares

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        noise(36, 40, i).save(src / f"{i}.png")
    job = dict(source=str(src), data_dir=str(tmp_path / "data"), num_shards=1, shard_index=0,
               selection=dict(max_images=0), listing=str(tmp_path / "listing.json"))
    shares.list_folder(job, Path(job["listing"]))
    noise(36, 40, 9).save(src / "late.png")  # after the listing: not this shard's
    own, count, _ = shares.own_inputs(job, 0, 2, shares.Dealer(2, None))
    assert count == 4 and sorted(item.input_id for _, item in own) == [f"{i}.png" for i in range(4)]


def test_a_second_run_on_the_same_part_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise(40, 40, 0).save(src / "a.png")
    with store.locked(tmp_path / "data" / "parts" / "shard-00000-of-00001.lock", False, "held"):
        with pytest.raises(RuntimeError, match="another prepare run"):
            run(src, tmp_path / "data")
        run(src, tmp_path / "data", num_shards=2, shard_index=1)  # another shard may run
    with store.locked(tmp_path / "data" / ".lock", True, "running"):  # a rebuild must wait
        with pytest.raises(RuntimeError, match="another prepare run"):
            run(src, tmp_path / "data", max_side=64, rebuild=True)
    assert (tmp_path / "data" / "train").exists() or (tmp_path / "data" / "val").exists()


def table(tmp_path, n: int):
    datasets = pytest.importorskip("datasets")
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        noise(40, 40 + i, i).save(buffer, "PNG")
        rows.append({"bytes": buffer.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    path = tmp_path / "set.parquet"
    ds.to_parquet(str(path))
    return path


def test_stream_resumes_at_its_position(tmp_path, monkeypatch):
    source = table(tmp_path, 10)
    monkeypatch.setattr(prepare, "STREAM_SAVE_S", 0.0)  # save the position after every row
    real, read = prepare.process_input, []

    def dies_after_six(item, *args):
        if len(read) == 6:
            raise KeyboardInterrupt
        read.append(item.input_id)
        return real(item, *args)

    monkeypatch.setattr(prepare, "process_input", dies_after_six)
    with pytest.raises(KeyboardInterrupt):
        run(source, tmp_path / "data")
    from furlib import inputs
    from furlib.data import shares
    real_rows, seen = shares._stream_rows, []

    def counting(*args, **kwargs):  # which rows the resumed stream really reads
        for index, item in real_rows(*args, **kwargs):
            if item.src is not inputs.RESUMED:
                seen.append(item.input_id)
            yield index, item

    monkeypatch.setattr(shares, "_stream_rows", counting)
    monkeypatch.setattr(prepare, "process_input", real)
    resumed = run(source, tmp_path / "data")
    assert seen == [f"set.parquet/{i}" for i in range(6, 10)]  # rows 0-5 are not read again
    assert resumed["counts"]["decoded_this_run"] == 4
    fresh = run(source, tmp_path / "fresh")
    assert resumed["accepted"] == fresh["accepted"]
    seen.clear()
    assert run(source, tmp_path / "data")["counts"]["decoded_this_run"] == 0 and seen == []


def test_replaced_table_images_are_not_stale(tmp_path):
    datasets = pytest.importorskip("datasets")

    def saved(seeds):  # a save_to_disk folder: its rows were once journalled by position only
        rows = []
        for seed in seeds:
            buffer = io.BytesIO()
            noise(40, 40, seed).save(buffer, "PNG")
            rows.append({"bytes": buffer.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
        shutil.rmtree(tmp_path / "saved", ignore_errors=True)
        ds.save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"

    first = run(saved([1, 2, 3]), tmp_path / "data")
    second = run(saved([4, 5, 6]), tmp_path / "data")  # same rows, every image replaced
    assert second["counts"]["decoded_this_run"] == 3
    assert {a["hash"] for a in second["accepted"]}.isdisjoint(a["hash"] for a in first["accepted"])
    assert len(first["source_versions"]) == 1 and first["source_versions"] != second["source_versions"]


def test_check_prepared_names_the_fix(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, (h, w) in enumerate([(40, 40), (64, 80)]):
        noise(h, w, i).save(src / f"{i}.png")
    run(src, tmp_path / "data", val_fraction=0)
    assert prep_report.check_prepared(tmp_path / "data", 32)["train"] == 2
    with pytest.raises(ValueError, match=r"resolution=48.*resolution=48"):
        prep_report.check_prepared(tmp_path / "data", 48)
    with pytest.raises(ValueError, match="01_data_prep"):
        prep_report.check_prepared(tmp_path / "nothing", 32)


def test_two_shard_processes_at_once_on_one_folder(tmp_path):
    """What two machines sharing the data folder do: start together, the last one merges."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        noise(36 + 2 * i, 44, i % 8).save(src / f"{i:02d}.png")  # 2 duplicates
    code = ("import sys; from furlib.data.prepare import prepare; prepare(sys.argv[1], sys.argv[2], "
            f"resolution={RES}, max_side=128, val_fraction=0.3, progress=False, workers=1, "
            "num_shards=2, shard_index=int(sys.argv[3]))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))  # this tree's furlib
    runs = [subprocess.Popen([sys.executable, "-c", code, str(src), str(tmp_path / "data"), str(i)],
                             env=env) for i in (0, 1)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0]
    merged = json.loads((tmp_path / "data" / "report.json").read_text())
    whole = run(src, tmp_path / "whole")
    assert merged["complete"] and merged["accepted"] == whole["accepted"]
    assert merged["duplicates"] == whole["duplicates"]
    for split in ("train", "val"):
        assert sorted(p.name for p in (tmp_path / "data" / split).iterdir()) == \
            sorted(p.name for p in (tmp_path / "whole" / split).iterdir())


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_fields(int(entry.name))
        if fields and int(fields[1]) == pid:  # None: it ended while we looked
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    fields = proc_fields(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.parametrize("how", ["SIGINT", "SIGINT twice", "SIGKILL"])
def test_an_interrupt_or_a_kill_stops_every_process(tmp_path, how):
    """Jupyter's stop button (SIGINT to the kernel alone), the same pressed again while the
    processes finish the inputs they have in flight (the second stops the wait), and a restarted
    kernel (the parent killed) all stop the shard's processes within seconds, not after their whole
    share; the run then resumes from their journals."""
    import signal
    import subprocess
    import sys
    import time

    # 100 drawings: the stop lands after ~15 of them; a shard that ran on would journal them all
    data, source, art, first = tmp_path / "data", "builtin", 100, 10
    total = art
    if how == "SIGINT twice":  # inputs of a second or so each: the second SIGINT lands in the wait
        source, total, first = tmp_path / "big", 8, 1
        source.mkdir()
        exif = Image.Exif()
        exif[0x0112] = 6  # converted (rotated), kept at full size: a slow lossless encode
        for i in range(total):
            noise(2400, 2400, i).save(source / f"{i}.jpg", quality=90, exif=exif)
    code = ("import signal, sys; from furlib.data.prepare import prepare\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # as a Jupyter kernel does\n"
            f"prepare({str(source)!r}, sys.argv[1], art_count={art}, resolution={RES}, max_side=4096, "
            "progress=False, workers=1, num_proc=2)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    parent = subprocess.Popen([sys.executable, "-c", code, str(data)], env=env,
                              stderr=subprocess.PIPE)
    journalled = lambda: sum(len(p.read_text().splitlines()) for p in data.glob("journal/*.jsonl"))
    workers = []
    try:
        deadline = time.monotonic() + 120
        while journalled() < first and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children_of(parent.pid)
        assert parent.poll() is None and len(workers) >= 2, "the run ended before it could be stopped"
        parent.send_signal(getattr(signal, how.split()[0]))
        if how == "SIGINT twice":
            time.sleep(0.1)
            parent.send_signal(signal.SIGINT)
        parent.wait(timeout=30)
        if how.startswith("SIGINT"):
            assert b"KeyboardInterrupt" in parent.stderr.read()
        deadline = time.monotonic() + 20
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        # checked before the cleanup below, which would otherwise hide an orphan that kept working
        assert not any(map(alive, workers)), "a process of the shard kept going after its parent stopped"
    finally:  # a hung run, or an orphan the assertion found, must not outlive the test
        for pid in [parent.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    done = journalled()
    assert first <= done < total  # stopped early, with what it had done journalled
    time.sleep(1)
    assert journalled() == done
    resumed = run(source, data, art_count=art, max_side=4096)
    assert resumed["complete"] and resumed["counts"]["reused"] == done
    assert resumed["counts"]["accepted"] + resumed["counts"]["rejected"] == resumed["counts"]["inputs"]


def test_the_16_core_benchmarks_run_as_a_device_call_runs_them(tmp_path):
    """``prep_throughput.py``, ``pixel_pool.py`` and ``prep_parts.py`` from the repository root with no PYTHONPATH and
    a relative ``--before`` tree, as the device call does (a call lost both to these two faults)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *argv: subprocess.run([sys.executable, *argv], cwd=root, env=env,  # noqa: E731
                                       capture_output=True, text=True)
    prep = run("benchmarks/prep_throughput.py", "--images", "3", "--procs", "1", "--plain-images", "2",
               "--shards", "0", "--before", ".", "--loader-workers", "1", "--loader-seconds", "0.5",
               "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "prep.json"))
    assert prep.returncode == 0, prep.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "prep.json").read_text())["rows"]}
    assert rows["before: num_proc=1"]["same_images_and_pixels_as_now"] is True
    pool = run("benchmarks/pixel_pool.py", "--before", ".", "--images", "1", "--reps", "1",
               "--out", str(tmp_path / "pool.json"))
    assert pool.returncode == 0, pool.stderr[-2000:]
    assert len(json.loads((tmp_path / "pool.json").read_text())["rows"]) == 3
    parts = run("benchmarks/prep_parts.py", "--images", "11", "--out", str(tmp_path / "parts.json"))
    assert parts.returncode == 0, parts.stderr[-2000:]
    measured = json.loads((tmp_path / "parts.json").read_text())
    assert measured["parts"]["decode (plain)"]["images"] == 9 and measured["prepare_ms_per_image"] > 0
