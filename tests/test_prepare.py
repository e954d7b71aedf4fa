"""furlib.data.prepare and input_entry (and furlib.sources) on generated corpora: verdicts, report, split, incremental and resumed runs."""

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from furlib.data import input_entry, prep_report, prepare
from furlib import inputs, sources, table_sources
from furlib.images import load_rgb

RES = 32  # crop side for these tests: small images keep them fast


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def bomb_png(width=100_000, height=100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def make_corpus(folder) -> dict:
    """Write the corpus; return {input id: expected verdict ('ok', 'dup', or a reject reason)}."""
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        noise(40 + 4 * i, 60, i).save(folder / f"good_{i}.png")
    noise(48, 64, 100).save(folder / "sub" / "photo.jpg", quality=90)
    shutil.copy(folder / "good_0.png", folder / "sub" / "copy_of_0.png")
    noise(40, 60, 0).save(folder / "same_pixels.bmp")  # same pixels, another format
    jpeg = io.BytesIO()
    noise(48, 64, 7).save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[:400])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    (folder / "notes.txt").write_text("not an image")
    (folder / "bomb.png").write_bytes(bomb_png())
    noise(20, 60, 9).save(folder / "tiny.png")
    noise(40, 300, 10).save(folder / "narrow.png")  # 300x40 capped at 128 -> 17 px high
    (folder / ".hidden.png").write_bytes(b"")  # hidden: not an input at all
    odd = _odd_modes(folder / "odd")
    expected = {f"good_{i}.png": "ok" for i in range(6)}
    expected.update({"sub/photo.jpg": "ok", "sub/copy_of_0.png": "dup", "same_pixels.bmp": "dup",
                     "truncated.jpg": "truncated", "zero.png": "empty", "text.png": "not_an_image",
                     "notes.txt": "not_an_image", "bomb.png": "too_many_pixels",
                     "tiny.png": "too_small", "narrow.png": "too_small_after_cap"})
    expected.update({f"odd/{name}": "ok" for name in odd})
    return expected


def _odd_modes(folder) -> list[str]:
    """Decodable files in every awkward mode: all must be accepted."""
    folder.mkdir()
    gradient = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    Image.new("CMYK", (48, 40), (0, 200, 100, 20)).save(folder / "cmyk.jpg")
    Image.fromarray((gradient * 65535).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(gradient, "F").save(folder / "float.tif")
    Image.new("LA", (48, 40), (90, 128)).save(folder / "la.png")
    Image.new("RGBA", (48, 40), (9, 200, 30, 60)).save(folder / "rgba.png")
    palette = noise(40, 48, 20).convert("P")
    palette.info["transparency"] = 3
    palette.save(folder / "palette.png")
    frames = [noise(40, 48, s) for s in (21, 22)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    exif = Image.Exif()
    exif[0x0112] = 8
    noise(40, 56, 23).save(folder / "rotated.jpg", exif=exif)
    return sorted(p.name for p in folder.iterdir())


def run(source, data_dir, **kw):
    kw = {"resolution": RES, "max_side": 128, "val_fraction": 0.3, "progress": False, "workers": 1,
          **kw}
    return prepare.prepare(source, data_dir, **kw)


def verdicts(report) -> dict:
    out = {a["id"]: "ok" for a in report["accepted"]}
    for d in report["duplicates"]:
        assert d["path"] not in out
        out[d["path"]] = "dup"
    for r in report["rejected"]:
        assert r["path"] not in out
        out[r["path"]] = r["reason"]
    return out


def test_every_input_gets_the_right_verdict(tmp_path):
    expected = make_corpus(tmp_path / "src")
    report = run(tmp_path / "src", tmp_path / "data")
    n = len(report["accepted"]) + len(report["rejected"]) + len(report["duplicates"])
    assert n == report["counts"]["inputs"] == len(expected)  # each input listed exactly once
    assert verdicts(report) == expected
    dups = {d["path"]: d["duplicate_of"] for d in report["duplicates"]}
    assert dups == {"sub/copy_of_0.png": "good_0.png", "same_pixels.bmp": "good_0.png"}
    assert report["counts"]["rejected_by_reason"]["not_an_image"] == 2
    assert json.loads((tmp_path / "data" / "report.json").read_text()) == report
    rotated = next(a for a in report["accepted"] if a["id"] == "odd/rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (40, 56)  # EXIF orientation applied
    threaded = run(tmp_path / "src", tmp_path / "data_threads", workers=3)
    assert {k: threaded[k] for k in ("accepted", "rejected", "duplicates")} == \
        {k: report[k] for k in ("accepted", "rejected", "duplicates")}


def test_stored_files_are_lossless_capped_and_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise(50, 70, 1).save(src / "small.png")
    noise(150, 300, 2).save(src / "big.png")  # long side 300 > max_side 128
    report = run(src, tmp_path / "data", val_fraction=0.5)
    by_id = {a["id"]: a for a in report["accepted"]}
    small = np.asarray(Image.open(tmp_path / "data" / by_id["small.png"]["file"]))
    assert np.array_equal(small, np.asarray(load_rgb(src / "small.png")))  # bit-exact PNG
    assert (by_id["big.png"]["width"], by_id["big.png"]["height"]) == (128, 64)
    for a in report["accepted"]:  # small.png as it is, big.png converted: lossless WebP
        suffix, form = (".png", "PNG") if a["stored"] == "original" else (".webp", "WEBP")
        assert a["file"] == f"{a['split']}/{a['hash'][:16]}{suffix}"
        assert (a["split"] == "val") == prep_report.is_val(a["hash"], 0.5)
        assert Image.open(tmp_path / "data" / a["file"]).format == form
    assert {a["stored"] for a in report["accepted"]} == {"original", "converted"}


def test_split_is_stable_when_images_are_added(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        noise(36, 40, i).save(src / f"{i:02d}.png")
    first = run(src, tmp_path / "data", val_fraction=0.4)
    for i in range(12, 24):
        noise(36, 40, i).save(src / f"{i:02d}.png")
    second = run(src, tmp_path / "data", val_fraction=0.4)
    split_of = {a["id"]: a["split"] for a in second["accepted"]}
    assert all(split_of[a["id"]] == a["split"] for a in first["accepted"])
    train = set(os.listdir(tmp_path / "data" / "train"))
    val = set(os.listdir(tmp_path / "data" / "val"))
    assert not train & val and len(train) + len(val) == 24
    assert len(val) == second["counts"]["val"] > 0


def test_val_max_keeps_the_smallest_hashes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        noise(36, 40, i).save(src / f"{i:02d}.png")
    report = run(src, tmp_path / "data", val_fraction=0.9, val_max=3)
    candidates = sorted(a["hash"] for a in report["accepted"] if prep_report.is_val(a["hash"], 0.9))
    assert sorted(a["hash"] for a in report["accepted"] if a["split"] == "val") == candidates[:3]
    assert len(os.listdir(tmp_path / "data" / "val")) == 3
    assert report["counts"]["val_over_cap"] == len(candidates) - 3


def test_rerun_skips_work_and_sees_changes(tmp_path):
    src = tmp_path / "src"
    expected = make_corpus(src)
    first = run(src, tmp_path / "data")
    assert first["counts"]["decoded_this_run"] == len(expected)
    again = run(src, tmp_path / "data")
    assert again["counts"]["decoded_this_run"] == 0
    assert again["accepted"] == first["accepted"] and again["rejected"] == first["rejected"]
    noise(44, 44, 50).save(src / "new.png")
    noise(46, 60, 51).save(src / "good_1.png")  # changed content: size and mtime differ
    third = run(src, tmp_path / "data")
    assert third["counts"]["decoded_this_run"] == 2
    assert third["counts"]["accepted"] == first["counts"]["accepted"] + 1
    assert len(os.listdir(tmp_path / "data" / "unused")) == 1  # the old good_1, kept aside


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    expected = make_corpus(src)
    real, calls = prepare.process_input, []

    def dies_after_five(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "process_input", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "data")
    monkeypatch.setattr(prepare, "process_input", real)
    with open(tmp_path / "data" / "journal.jsonl", "a") as log:
        log.write('{"key": "half a li')  # what a kill mid-write leaves
    journal = next((tmp_path / "data" / "journal").glob("*.jsonl"))
    first_key = json.loads(journal.read_text().splitlines()[0])["key"]
    with open(journal, "a") as log:  # the latest line of an input, valid JSON with fields lost: not taken
        log.write("\n" + json.dumps({"key": first_key, "status": "ok", "hash": "ab"}) + "\n\xff\xfe garbage\n")
    stale = tmp_path / "data" / "train" / ".tmp-1-0123456789abcdef.png"  # a killed writer's
    stale.write_bytes(b"\x89PNG half")
    os.utime(stale, (1e9, 1e9))
    live = tmp_path / "data" / "val" / ".tmp-2-fedcba9876543210.png"  # a running writer's
    live.write_bytes(b"\x89PNG half")
    resumed = run(src, tmp_path / "data")
    assert resumed["counts"]["decoded_this_run"] == len(expected) - 5
    assert list((tmp_path / "data").glob("*/.tmp-*")) == [live]  # another process's: untouched
    fresh = run(src, tmp_path / "fresh")
    assert resumed["accepted"] == fresh["accepted"] and verdicts(resumed) == expected


def test_a_stopped_rerun_leaves_02_no_stale_report(tmp_path, monkeypatch):
    """Images added, 01 re-run and stopped: the folders are mid-change, so the old report is gone
    and 02's check says 01 has not finished, instead of training on counts that no longer hold."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        noise(40, 48, i).save(src / f"{i}.png")
    run(src, tmp_path / "data")
    assert prep_report.check_prepared(tmp_path / "data", RES)["accepted"] == 3
    for i in range(3, 8):
        noise(40, 48, i).save(src / f"{i}.png")
    real = prepare.process_input
    monkeypatch.setattr(prepare, "process_input", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "data")
    with pytest.raises(ValueError, match="has not finished"):
        prep_report.check_prepared(tmp_path / "data", RES)
    monkeypatch.setattr(prepare, "process_input", real)
    run(src, tmp_path / "data")
    assert prep_report.check_prepared(tmp_path / "data", RES)["accepted"] == 8


def test_nothing_to_train_on_says_why(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise(10, 10, 0).save(src / "small.png")
    (src / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"no image kept for training: 2 inputs.*too_small 1.*smaller resolution"):
        prep_report.check_trainable(run(src, tmp_path / "data"))
    noise(40, 48, 1).save(src / "good.png")
    with pytest.raises(ValueError, match="went to val: lower val_fraction"):
        prep_report.check_trainable(run(src, tmp_path / "data", val_fraction=0.999))
    prep_report.check_trainable(run(src, tmp_path / "data", val_fraction=0.0))  # one to train on: fine


def test_unexpected_errors_are_reported_then_retried(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        noise(36, 40, i).save(src / f"{i}.png")
    real = input_entry.decode_input

    def flaky(source, *args, **kwargs):
        if str(source).endswith("1.png"):
            raise MemoryError("simulated")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(input_entry, "decode_input", flaky)
    report = run(src, tmp_path / "data")
    assert report["rejected"] == [{"path": "1.png", "reason": "error", "detail": "MemoryError: simulated"}]
    monkeypatch.setattr(input_entry, "decode_input", real)
    again = run(src, tmp_path / "data")
    assert again["counts"]["decoded_this_run"] == 1 and again["counts"]["accepted"] == 3


def test_linked_folders_other_suffixes_and_unlisted_folders(tmp_path, monkeypatch):
    """A linked folder leading out of the source is read (once, loops ignored); JPEGs named
    .jfif/.jpe are images; an unknown suffix says which are read; a folder that cannot be listed
    is a recorded rejection, read once it can be."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    noise(40, 48, 1).save(src / "own.png")
    noise(40, 48, 2).save(src / "sub" / "inner.png")
    noise(40, 48, 3).save(outside / "a.jfif", "JPEG")
    noise(40, 48, 4).save(outside / "b.jpe", "JPEG")
    (outside / "c.heic").write_bytes(b"heic")
    (src / ".real").mkdir()
    noise(40, 48, 6).save(src / ".real" / "hidden.png")  # hidden: read only through its visible link
    for name, target in {"linked": outside, "again": outside, "loop": src, "sub_link": src / "sub",
                         "photos": src / ".real"}.items():
        (src / name).symlink_to(target, target_is_directory=True)
    (src / "locked").mkdir()
    noise(40, 48, 5).save(src / "locked" / "d.png")
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(PermissionError(13, "denied", str(path)))
                        if str(path).endswith("locked") else real_scandir(path))
    report = run(src, tmp_path / "data")
    assert verdicts(report) == {"own.png": "ok", "sub/inner.png": "ok", "again/a.jfif": "ok", "again/b.jpe": "ok",
                                "again/c.heic": "not_an_image", "locked": "unreadable", "photos/hidden.png": "ok"}
    details = {r["path"]: r["detail"] for r in report["rejected"]}
    assert details["again/c.heic"].startswith(".heic: not one of") and ".jfif" in details["again/c.heic"]
    assert details["locked"] == "a folder that cannot be listed"
    monkeypatch.setattr(os, "scandir", real_scandir)  # permissions fixed: read now, the rest reused
    again = run(src, tmp_path / "data")
    assert verdicts(again)["locked/d.png"] == "ok" and "locked" not in verdicts(again)
    assert again["counts"]["decoded_this_run"] == 1


def test_a_decoding_fix_decodes_again_only_the_inputs_it_touches(tmp_path):
    """Data prepared before the colour-key fix (journal entries without ``decoder``): a re-run
    decodes its converted PNGs again, where the fix applies, and reuses everything else."""
    src = tmp_path / "src"
    src.mkdir()
    keyed = Image.new("RGB", (48, 40), (255, 0, 255))
    keyed.paste((0, 120, 0), (8, 8, 40, 32))
    keyed.save(src / "keyed.png", transparency=(255, 0, 255))  # converted: a colour key
    noise(40, 48, 1).save(src / "plain.png")  # stored as it is
    noise(40, 48, 2).save(src / "photo.jpg")
    noise(40, 48, 3).convert("P").save(src / "palette.bmp")  # converted, not a PNG
    run(src, tmp_path / "data")
    journal = next((tmp_path / "data" / "journal").glob("*.jsonl"))
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    journal.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "decoder"}) + "\n" for e in lines))
    again = run(src, tmp_path / "data")
    assert again["counts"]["decoded_this_run"] == 1  # keyed.png alone
    assert run(src, tmp_path / "data")["counts"]["decoded_this_run"] == 0


def test_a_source_inside_the_runs_data_folder_is_refused(tmp_path):
    """01 pointed at its own output (data/train of the same run) moved images out of its own source."""
    src = tmp_path / "src"
    src.mkdir()
    noise(40, 48, 1).save(src / "a.png")
    run(src, tmp_path / "data")
    for inside in (tmp_path / "data", tmp_path / "data" / "train"):
        with pytest.raises(ValueError, match="is inside the run's data folder"):
            run(inside, tmp_path / "data")


def test_file_names_that_are_not_utf8_are_inputs_with_printable_ids(tmp_path):
    """Names from another system's archive (Latin-1 bytes): read, with ids a table, a figure and
    a UTF-8 file take (Python's lone surrogates crashed 01's rejection table and samples figure)."""
    from furlib.data import prep_figures

    src = tmp_path / "src"
    src.mkdir()
    noise(40, 48, 1).save(os.path.join(os.fsencode(src), b"caf\xe9.png"), "PNG")
    with open(os.path.join(os.fsencode(src), b"notes\xff.jpg"), "wb") as f:
        f.write(b"text")
    report = run(src, tmp_path / "data")
    assert verdicts(report) == {"caf\\xe9.png": "ok", "notes\\xff.jpg": "not_an_image"}
    json.dumps(report, ensure_ascii=False).encode("utf-8")
    str(prep_figures.rejection_table(report))


def test_a_file_changed_or_deleted_while_it_is_read_is_not_stored(tmp_path, monkeypatch):
    """A plain JPEG is decoded, hashed, then its own bytes copied: a file rewritten in between would
    be stored under the old pixels' hash, and one deleted ended the run. Now: rejected (read
    again next run), and 'missing'."""
    src = tmp_path / "src"
    src.mkdir()
    for name, seed in (("changed.jpg", 1), ("deleted.jpg", 2), ("kept.jpg", 3)):
        noise(40, 48, seed).save(src / name, quality=90)
    real = input_entry.decode_input

    def meddling(source, *args, **kwargs):
        out = real(source, *args, **kwargs)
        if str(source).endswith("changed.jpg"):
            noise(40, 48, 9).save(source, quality=90)
            os.utime(source, ns=(1, 10**18))
        elif str(source).endswith("deleted.jpg"):
            source.unlink()
        return out

    monkeypatch.setattr(input_entry, "decode_input", meddling)
    report = run(src, tmp_path / "data", val_fraction=0.0)
    assert verdicts(report) == {"changed.jpg": "error", "deleted.jpg": "missing", "kept.jpg": "ok"}
    assert len(list((tmp_path / "data" / "train").iterdir())) == 1  # nothing stored for the changed one
    monkeypatch.setattr(input_entry, "decode_input", real)
    again = run(src, tmp_path / "data", val_fraction=0.0)
    assert verdicts(again) == {"changed.jpg": "ok", "kept.jpg": "ok"}


def test_pixel_settings_refuse_until_rebuild(tmp_path):
    src = tmp_path / "src"
    make_corpus(src)
    first = run(src, tmp_path / "data")
    stored = sorted(p.name for p in (tmp_path / "data").rglob("*.*") if p.parent.name in prepare.store.SPLITS)
    for change in ({"max_side": 96}, {"background": (0, 0, 0)}):
        with pytest.raises(ValueError, match="rebuild=True"):
            run(src, tmp_path / "data", **change)
    assert sorted(p.name for p in (tmp_path / "data").rglob("*.*")
                  if p.parent.name in prepare.store.SPLITS) == stored  # nothing deleted
    assert run(src, tmp_path / "data")["accepted"] == first["accepted"]
    report = run(src, tmp_path / "data", max_side=96, rebuild=True)
    assert "max_side 128 -> 96" in report["rebuilt_because"]
    assert all(max(a["width"], a["height"]) <= 96 for a in report["accepted"])


def test_resolution_only_filters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, (h, w) in enumerate([(36, 40), (50, 60), (70, 44), (30, 90)]):
        noise(h, w, i).save(src / f"{i}.png")
    low = run(src, tmp_path / "data", resolution=32)
    high = run(src, tmp_path / "data", resolution=48)
    assert high["counts"]["decoded_this_run"] == 0 and not high["rebuilt_because"]
    assert {a["id"] for a in high["accepted"]} == {"1.png"}  # short sides 36, 50, 44, 30
    assert len(list((tmp_path / "data" / "unused").iterdir())) == 2  # kept aside, not deleted
    lowest = run(src, tmp_path / "data", resolution=24)
    assert lowest["counts"]["decoded_this_run"] == 1  # only 3.png, rejected at 32, is decoded again
    again = run(src, tmp_path / "data", resolution=32)
    assert again["accepted"] == low["accepted"] and again["counts"]["decoded_this_run"] == 0


def test_switching_source_says_what_it_set_aside_and_switching_back_restores_it(tmp_path, capsys):
    """Another source on the same data folder moves the earlier source's images to unused/:
    a NOTE says how many and from where, and running the earlier source again brings them back."""
    a, b, data = tmp_path / "a", tmp_path / "b", tmp_path / "data"
    a.mkdir(), b.mkdir()
    for i in range(4):
        noise(36, 40, i).save(a / f"{i}.png")
    noise(36, 40, 10).save(b / "new.png")
    shutil.copy(a / "0.png", b / "also_in_a.png")  # in both sources: stays where it is

    def stored():
        return {p.name for split in ("train", "val") for p in (data / split).iterdir()}

    first = run(a, data)
    run(a, data)
    noise(36, 40, 20).save(a / "1.png")  # the same source, one image replaced: not another source
    changed = run(a, data)
    assert len(list((data / "unused").iterdir())) == 1 and "NOTE" not in capsys.readouterr().out
    run(b, data)
    note = f"NOTE: 3 images of the previous run (source={str(a.resolve())!r}) were set aside into {data / 'unused'}"
    assert note in capsys.readouterr().out
    assert len(list((data / "unused").iterdir())) == 4
    back = run(a, data)
    assert back["accepted"] == changed["accepted"] and back["counts"]["decoded_this_run"] == 0
    assert stored() == {x["file"].split("/")[1] for x in back["accepted"]} and len(first["accepted"]) == 4
    assert "NOTE: 1 image of the previous run" in capsys.readouterr().out  # b's new.png, aside now


def test_a_table_is_opened_once_by_one_process(tmp_path, monkeypatch):
    """01 checks a table source before its lock (a wrong split must leave the report be), then reads
    it: one process reads what the check opened (each open resolves every file of a folder of
    them, again) instead of opening it a second time. The kind of a source is public (02's stream
    asks it too)."""
    datasets = pytest.importorskip("datasets")
    rows = [{"bytes": io.BytesIO(), "path": None} for _ in range(3)]
    for i, row in enumerate(rows):
        noise(40, 40 + i, i).save(row["bytes"], "PNG")
        row["bytes"] = row["bytes"].getvalue()
    datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "t.parquet"))
    opened, real = [], table_sources.open_table
    monkeypatch.setattr(table_sources, "open_table", lambda *a, **k: opened.append(a) or real(*a, **k))
    assert run(tmp_path / "t.parquet", tmp_path / "data")["counts"]["accepted"] == 3
    assert len(opened) == 1
    assert inputs.source_kind(tmp_path / "t.parquet") == ("table", tmp_path / "t.parquet")


def test_table_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"bytes": io.BytesIO(), "path": None} for _ in range(4)]
    for i, row in enumerate(rows):
        noise(40, 40 + i, i).save(row["bytes"], "PNG")
        row["bytes"] = row["bytes"].getvalue()
    rows[3] = {"bytes": b"garbage", "path": None}
    ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "set.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "set.parquet", tmp_path / "saved"):
        report = run(source, tmp_path / f"data_{source.name}")
        assert report["counts"]["accepted"] == 3 and report["rejected"][0]["reason"] == "not_an_image"
    with pytest.raises(ValueError, match="image_column"):
        run(tmp_path / "set.parquet", tmp_path / "d2", image_column="picture")
    assert len(list(sources.iter_source(tmp_path / "saved", max_images=2))) == 2
    import pyarrow.feather  # pandas' to_feather and polars' write_ipc: Arrow's file format, not datasets'

    pyarrow.feather.write_feather(ds.data.table, str(tmp_path / "feather.arrow"), compression="uncompressed")
    assert run(tmp_path / "feather.arrow", tmp_path / "d3")["counts"]["accepted"] == 3
    ds.select([]).to_parquet(str(tmp_path / "empty.parquet"))
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "set.parquet").read_bytes()[:-100])
    for name, said in (("empty.parquet", "has no rows"), ("cut.parquet", "is not a readable parquet file")):
        with pytest.raises(ValueError, match=f"{name} {said}"):  # pyarrow's own words named no file
            run(tmp_path / name, tmp_path / "d4")
        folder = tmp_path / f"folder_{name}"  # one bad file among good ones, in a folder of parquet files
        folder.mkdir()
        shutil.copy(tmp_path / "set.parquet", folder / "a.parquet")
        shutil.copy(tmp_path / name, folder / name)
        with pytest.raises(ValueError, match=f"{name} {said}"):
            run(folder, tmp_path / "d5")


def test_a_tables_relative_image_paths_are_taken_from_its_folder(tmp_path, monkeypatch):
    """A parquet listing ``images/0.png`` beside itself: read from the table's folder (they were
    looked up from the notebooks' working directory: all 'missing', or another file of that name)."""
    datasets = pytest.importorskip("datasets")
    from furlib.training import streaming

    (tmp_path / "images").mkdir()
    for i in range(3):
        noise(40, 48, i).save(tmp_path / "images" / f"{i}.png")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": f"images/{i}.png"} for i in range(3)]})
    ds.to_parquet(str(tmp_path / "list.parquet"))
    monkeypatch.chdir(tmp_path.parent)  # anywhere but the table's folder
    assert run(tmp_path / "list.parquet", tmp_path / "data")["counts"]["accepted"] == 3
    assert len(list(sources.iter_source(tmp_path / "list.parquet"))) == 3
    crops = streaming.StreamCrops(str(tmp_path / "list.parquet"), 32, shuffle_buffer=0, log_dir=tmp_path / "log")
    assert next(iter(crops)).shape == (3, 32, 32) and not (tmp_path / "log").exists()


def test_hub_source_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(table_sources, "hub_unreachable", lambda: "cannot resolve the Hub (test)")
    with pytest.raises(RuntimeError, match="source='builtin'") as info:
        run("someone/some-dataset", tmp_path / "data")
    error = info.value  # no chained library traceback under it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    datasets = pytest.importorskip("datasets")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some-dataset' on the Hub (test)")

    monkeypatch.setattr(table_sources, "hub_unreachable", lambda: "")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="Couldn't reach") as info:
        run("someone/some-dataset", tmp_path / "data")
    assert info.value.__suppress_context__ and "save_to_disk" in str(info.value)
    assert "cache" not in str(info.value).replace("never cached", "")  # a stream is never cached
    assert "hf download someone/some-dataset --repo-type dataset --local-dir" in str(info.value)


def test_a_hub_dataset_downloaded_for_offline_use_is_a_source(tmp_path):
    """What the offline message advises: `hf download` writes data/<split>-*.parquet (and a README)."""
    datasets = pytest.importorskip("datasets")
    make_corpus(tmp_path / "src")
    images = [{"bytes": p.read_bytes(), "path": None} for p in sorted((tmp_path / "src").glob("good_*.png"))[:4]]
    (tmp_path / "dl" / "data").mkdir(parents=True)
    for split, rows in (("train", images[:3]), ("validation", images[3:])):
        ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
        ds.to_parquet(str(tmp_path / "dl" / "data" / f"{split}-00000-of-00001.parquet"))
    (tmp_path / "dl" / "README.md").write_text("---\nlicense: mit\n---\n")
    assert len(list(sources.iter_source(tmp_path / "dl"))) == 3
    assert len(list(sources.iter_source(tmp_path / "dl", source_split="validation"))) == 1


def test_a_table_without_splits_refuses_another_source_split(tmp_path):
    """One saved Dataset, parquet or arrow file has no splits: source_split='validation' read
    every row as if they were the validation rows. The default reads them all, as it always did."""
    datasets = pytest.importorskip("datasets")
    rows = [io.BytesIO() for _ in range(2)]
    for i, row in enumerate(rows):
        noise(40, 40, i).save(row, "PNG")
    ds = datasets.Dataset.from_dict({"image": [r.getvalue() for r in rows]})
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "set.parquet"))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "set.arrow")
    one_file = "is one table file, without splits"
    for source, said in (("saved", "holds one Dataset without splits"), ("set.parquet", one_file),
                         ("set.arrow", one_file)):
        with pytest.raises(ValueError, match=f"{source} {said}.*source_split at its default 'train'"):
            list(sources.iter_source(tmp_path / source, source_split="validation"))
        assert len(list(sources.iter_source(tmp_path / source))) == 2
    run(tmp_path / "saved", tmp_path / "data")
    report = (tmp_path / "data" / "report.json").read_text()
    with pytest.raises(ValueError, match="save a DatasetDict"):
        run(tmp_path / "saved", tmp_path / "data", source_split="validation")
    assert (tmp_path / "data" / "report.json").read_text() == report  # refused before anything changed
    datasets.Dataset.from_dict(ds.to_dict(), split="validation").save_to_disk(str(tmp_path / "val"))
    assert len(list(sources.iter_source(tmp_path / "val", source_split="validation"))) == 2  # its own split
    with pytest.raises(ValueError, match="saved from split 'validation'"):
        list(sources.iter_source(tmp_path / "val", source_split="test"))


def test_iter_source_and_builtin(tmp_path):
    make_corpus(tmp_path / "src")
    ids = [i for i, _ in sources.iter_source(tmp_path / "src")]
    assert "notes.txt" not in ids and "good_0.png" in ids and ".hidden.png" not in ids
    assert len(list(sources.iter_source(tmp_path / "src", max_images=3))) == 3
    report = run("builtin", tmp_path / "data", art_count=2, resolution=64, max_side=256)
    photos = [a for a in report["accepted"] if a["id"].startswith("builtin/photo/")]
    assert len(photos) >= 5 and report["counts"]["accepted"] == len(photos) + 2
    art = dict(sources.iter_source("builtin", art_count=2, seed=1))["builtin/art/001"]
    assert isinstance(art, Image.Image) and min(art.size) >= 512


def test_builtin_parts_split_the_domains():
    """builtin-art: the drawings only (what the demo finetunes on); builtin-photos: the
    photographs the shipped base never trained on (the base's domain, scored apart)."""
    from furlib import builtin

    def ids(source):
        return [i for i, _ in sources.iter_source(source, art_count=3)]

    assert ids("builtin-art") == [f"builtin/art/{i:03d}" for i in range(3)]
    assert ids("builtin-photos") == [f"builtin/photo/{n}" for n, *_ in builtin.PHOTOS if n in builtin.HELD_OUT_PHOTOS]
    assert set(ids("builtin")) == {f"builtin/photo/{n}" for n, *_ in builtin.PHOTOS} | set(ids("builtin-art"))
    assert len({sources.source_key(s, "train", "image") for s in builtin.BUILTIN_SOURCES}) == 3  # journals apart


def test_sources_that_cannot_work_are_refused_with_the_way_that_does(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_corpus(tmp_path / "src")
    with pytest.raises(ValueError, match="source_revision='v1' pins a Hub dataset's commit.*local folder"):
        run(tmp_path / "src", tmp_path / "data", source_revision="v1")
    with pytest.raises(TypeError, match=r"not a Dataset: save a dataset with .save_to_disk"):
        run(datasets.Dataset.from_dict({"image": [b""]}), tmp_path / "data")
    with pytest.raises(ValueError, match="give the Hub dataset's id"):
        run("hf://datasets/someone/some-dataset/data/*.parquet", tmp_path / "data")
    with pytest.raises(ValueError, match="is a glob: give the folder"):
        run(str(tmp_path / "src" / "*.png"), tmp_path / "data")
