"""furlib.training.streaming: crops straight from a parquet source, split per rank and worker."""

import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from furlib.training import streaming

datasets = pytest.importorskip("datasets")
COLOURS = [(20 * i + 10, 200 - 15 * i, 40) for i in range(9)]  # one solid colour per row


def table(tmp_path, saved: bool = False) -> str:
    """9 solid-colour rows and 2 bad ones (rows 4 and 7); a parquet file (one shard) or a
    save_to_disk folder (streamed as 11 shards)."""
    rows = []
    for i, colour in enumerate(COLOURS):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + 3 * i, 36), colour).save(buffer, "PNG")
        rows.append({"bytes": buffer.getvalue(), "path": None})
    rows.insert(4, {"bytes": b"not an image", "path": None})
    rows.insert(7, {"bytes": _png(20, 20), "path": None})  # too small for 32 px crops
    ds = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    if saved:
        ds.save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    ds.to_parquet(str(tmp_path / "set.parquet"))
    return str(tmp_path / "set.parquet")


def _png(w, h) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (0, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def colour_of(crop: torch.Tensor) -> int:
    """Which row a crop came from: its (solid) colour."""
    rgb = ((crop.mean(dim=(1, 2)) + 1) * 127.5).numpy()
    return int(np.argmin([np.abs(rgb - c).max() for c in COLOURS]))


def test_ranks_read_disjoint_shares_and_rejections_are_logged(tmp_path):
    source = table(tmp_path)  # one shard: split_dataset_by_node gives ranks alternate rows
    seen = []
    for rank in (0, 1):
        stream = iter(streaming.StreamCrops(source, 32, seed=1, rank=rank, world=2, shuffle_buffer=0,
                                            log_dir=tmp_path / "log"))
        first = [next(stream) for _ in range(12)]  # over one epoch of this rank's share
        assert all(c.shape == (3, 32, 32) and -1 <= c.min() and c.max() <= 1 for c in first)
        seen.append({colour_of(c) for c in first})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(COLOURS)))
    reasons = sorted(json.loads(line)["reason"] for f in (tmp_path / "log").glob("*.jsonl")
                     for line in f.read_text().splitlines())
    assert set(reasons) == {"not_an_image", "too_small"}


def test_a_resumed_stream_does_not_repeat_the_first_batches(tmp_path):
    """02 resumed at a step draws another row order (and other crops): a session on Colab that
    resumes must not train on the first session's batches again; the same step, the same order."""
    source = table(tmp_path)
    stream = lambda step: streaming.StreamCrops(source, 32, seed=1, shuffle_buffer=4, start_step=step)  # noqa: E731
    assert stream(40).seed == stream(40).seed != stream(0).seed  # the order's and the crops' seed
    order = lambda step: [colour_of(c) for c in itertools.islice(iter(stream(step)), 5)]  # noqa: E731
    assert order(0) != order(40)  # (each pass costs ~5 s: datasets' shuffled stream stalls as it closes)


def test_loader_workers_split_the_stream(tmp_path):
    loader = streaming.make_stream_loader(table(tmp_path, saved=True), 32, batch_size=3, num_workers=2,
                                          shuffle_buffer=0, log_dir=tmp_path / "log")  # datasets 5's
    # shuffle buffer stalls ~5 s at the end of every pass: fine for 1M rows, slow for a test
    batches = iter(loader)
    crops = torch.cat([next(batches) for _ in range(6)])
    assert crops.shape == (18, 3, 32, 32)
    assert {colour_of(c) for c in crops} == set(range(len(COLOURS)))  # every row, from both workers
    assert {f.name for f in (tmp_path / "log").glob("*.jsonl")} == {  # each read its own bad row
        "rejected-rank0-worker0.jsonl", "rejected-rank0-worker1.jsonl"}


def test_a_folder_of_images_is_not_streamed(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="01_data_prep"):
        streaming.StreamCrops(tmp_path, 32)


def test_02_trains_from_a_streamed_source_without_preparing_it(tmp_path):
    """train_source: fit streams its batches (no data/train); 01's val split still feeds the preview."""
    from furlib.data import prepare
    from furlib.training import fit
    from furlib.training.settings import TrainSettings

    source = table(tmp_path)
    run = tmp_path / "outputs" / "s"
    s = TrainSettings(base_model="tiny", lpips_backbone="random", device="cpu", resolution=32, batch_size=6,
                      max_steps=2, num_workers=0, warmup_steps=0, mixed_precision="no", checkpoint_every=2,
                      log_every=1, plot_every=0, preview_images=1, critic_channels=8, critic_layers=2,
                      outputs_dir=str(tmp_path / "outputs"), run_name="s", train_source=source)
    with pytest.raises(ValueError, match="need held-out ones"):
        fit.fit(s)
    prepare.prepare("builtin", run / "data", resolution=32, max_side=128, max_images=3, art_count=3,
                    val_fraction=1.0, progress=False)
    assert not any((run / "data" / "train").glob("*.*"))  # nothing to train from but the stream
    results = fit.fit(s)  # 2 x 6 crops: more than the 11 good rows, so every row was read
    assert results["step"] == 2 and (run / "checkpoints").is_dir()
    rejected = list((run / "logs" / "stream_rejected").glob("*.jsonl"))
    assert rejected and "not_an_image" in "".join(p.read_text() for p in rejected)


def test_a_row_that_fails_oddly_is_logged_like_01_does_not_end_the_run(tmp_path):
    """01 rejects a row whose decoding raises anything (reason 'error') and goes on; the stream let
    it end the run, in a loader worker, naming no row: e.g. image_column set to a text column, whose
    long captions are taken as file names (OSError: File name too long)."""
    Image.new("RGB", (40, 40), COLOURS[2]).save(tmp_path / "good.png")
    datasets.Dataset.from_dict({"image": ["a caption " * 40, "good.png"]}).to_parquet(str(tmp_path / "t.parquet"))
    stream = iter(streaming.StreamCrops(str(tmp_path / "t.parquet"), 32, shuffle_buffer=0, log_dir=tmp_path / "log"))
    assert {colour_of(next(stream)) for _ in range(3)} == {2}
    logged = json.loads((tmp_path / "log" / "rejected-rank0-worker0.jsonl").read_text().splitlines()[0])
    assert logged["row"] == "t.parquet/epoch0/0" and logged["reason"] == "error"
    assert "File name too long" in logged["detail"]
