"""Stage 01's shards and processes read only their share of a dataset source (rows counted)."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from furlib.data import prepare, shares

datasets = pytest.importorskip("datasets")
FILES, ROWS = 4, 4  # a source of 4 files x 4 rows


def _rows(first: int, n: int) -> "datasets.Dataset":
    images = []
    for seed in range(first, first + n):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 40, 3), np.uint8)).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    return datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    (root / "files").mkdir()
    for f in range(FILES):  # a folder of parquet files: what a Hub dataset streams from
        _rows(ROWS * f, ROWS).to_parquet(str(root / "files" / f"part-{f}.parquet"))
    _rows(0, FILES * ROWS).save_to_disk(str(root / "saved"))  # memory-mapped arrow
    _rows(0, FILES * ROWS).to_parquet(str(root / "one.parquet"))  # one file: nothing to divide
    return root


@pytest.fixture
def rows_read(monkeypatch):
    """Rows that came out of any `datasets` stream in this process (every table row 01 reads does)."""
    count = [0]
    real = datasets.IterableDataset.__iter__

    def counting(self):
        for row in real(self):
            count[0] += 1
            yield row

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counting)
    return count


def _prepare(source, data_dir, **kw):
    return prepare.prepare(source, data_dir, resolution=32, max_side=128, val_fraction=0.3,
                        progress=False, workers=1, **kw)


@pytest.mark.parametrize("name", ["files", "saved"])
def test_each_shard_reads_only_its_half(sources, tmp_path, rows_read, name):
    whole = _prepare(sources / name, tmp_path / "whole")
    assert rows_read[0] == FILES * ROWS
    per_shard = []
    for shard in (1, 0):
        rows_read[0] = 0
        report = _prepare(sources / name, tmp_path / "sharded", num_shards=2, shard_index=shard)
        per_shard.append(rows_read[0])
    owned = [sum(shares.shard_of(i, 2) == shard for i in range(FILES * ROWS)) for shard in (1, 0)]
    want = owned if name == "saved" else [FILES * ROWS // 2] * 2  # rows by shard_of; files by f % 2
    assert per_shard == want and sum(want) == FILES * ROWS, per_shard  # was 16 of 16 in each
    assert report["complete"] and report["accepted"] == whole["accepted"]


def test_each_process_reads_only_its_share(sources, tmp_path, rows_read, monkeypatch):
    # the processes as threads of this one, so their reads are counted here; the code is the same
    monkeypatch.setattr(shares, "ProcessPoolExecutor", lambda n, mp_context=None, **kw: ThreadPoolExecutor(n, **kw))
    monkeypatch.setattr(shares, "_join", lambda counters: monkeypatch.setattr(shares, "_COUNTERS", counters))
    whole = _prepare(sources / "files", tmp_path / "whole")
    rows_read[0] = 0
    shard = _prepare(sources / "files", tmp_path / "procs", num_proc=2, num_shards=2, shard_index=0)
    assert rows_read[0] == FILES * ROWS // 2  # 2 processes x a quarter each (was 2 x 16)
    rows_read[0] = 0
    both = _prepare(sources / "files", tmp_path / "procs", num_proc=2, num_shards=2, shard_index=1)
    assert rows_read[0] == FILES * ROWS // 2 and both["accepted"] == whole["accepted"]
    again = _prepare(sources / "files", tmp_path / "procs")  # another split: every journal reused
    assert again["counts"]["decoded_this_run"] == 0 and not shard["complete"]


def test_a_single_file_is_read_whole_by_each_and_says_so(sources, tmp_path, rows_read, capsys):
    prepare.prepare(sources / "one.parquet", tmp_path / "one", resolution=32, max_side=128, progress=True,
                 workers=1, num_shards=2, shard_index=0)
    assert rows_read[0] == FILES * ROWS  # a row filter: the only split one file allows
    assert "every reader reads every row" in capsys.readouterr().out


def test_a_stream_of_files_resumes_in_the_file_it_stopped_in(sources, tmp_path, rows_read, monkeypatch):
    monkeypatch.setattr(prepare, "STREAM_SAVE_S", 0.0)  # save the position after every row
    real, done = prepare.process_input, []

    def dies_after_six(item, *args):
        if len(done) == 6:  # row 2 of file 1
            raise KeyboardInterrupt
        done.append(item.input_id)
        return real(item, *args)

    monkeypatch.setattr(prepare, "process_input", dies_after_six)
    with pytest.raises(KeyboardInterrupt):
        _prepare(sources / "files", tmp_path / "data")
    assert done[-1] == "files/1/1"
    monkeypatch.setattr(prepare, "process_input", real)
    rows_read[0] = 0
    resumed = _prepare(sources / "files", tmp_path / "data")
    assert rows_read[0] == FILES * ROWS - 6 and resumed["counts"]["decoded_this_run"] == FILES * ROWS - 6
    assert resumed["accepted"] == _prepare(sources / "files", tmp_path / "fresh")["accepted"]


def test_shards_split_every_regular_pattern_evenly():
    for shards in (2, 3, 4, 16):
        for period in range(2, 17):  # e.g. every 10th input a PNG to convert, pairs of image + mask
            marked = [i for i in range(0, 16_000, period)]
            counts = np.bincount([shares.shard_of(i, shards) for i in marked], minlength=shards)
            assert counts.max() - counts.min() <= 0.1 * len(marked) / shards + 2, (shards, period, counts)
            # i % shards would put all of them on 1 / gcd(period, shards) of the shards


def test_the_dealer_deals_each_input_once_in_shrinking_blocks():
    from multiprocessing import get_context

    counters = get_context("spawn").Array("q", [0, 0, -1, 0])
    dealers = [shares.Dealer(4, counters) for _ in range(4)]
    streams = [d.blocks(1000) for d in dealers]
    blocks = []
    while streams:  # the four take turns, as processes finishing their blocks would
        for stream in list(streams):
            block = next(stream, None)
            if block is None:
                streams.remove(stream)
            else:
                blocks.append(block)
    assert sorted(i for b in blocks for i in b) == list(range(1000))
    sizes = [len(b) for b in blocks]
    assert sizes[0] == 62 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert list(shares.Dealer().blocks(7)) == [range(7)]  # one process: everything at once


def test_slow_inputs_are_shared_by_the_processes(tmp_path, monkeypatch):
    """Every other input is slow: a fixed split (input i to process i % 2) gave process 0 all of
    them; dealt, both processes take their part."""
    import time

    monkeypatch.setattr(shares, "ProcessPoolExecutor", lambda n, mp_context=None, **kw: ThreadPoolExecutor(n, **kw))
    monkeypatch.setattr(shares, "_join", lambda counters: monkeypatch.setattr(shares, "_COUNTERS", counters))
    real = prepare.process_input

    def slow_when_even(item, *args):
        if int(item.input_id[:3]) % 2 == 0:
            time.sleep(0.03)
        return real(item, *args)

    monkeypatch.setattr(prepare, "process_input", slow_when_even)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 40, 3), np.uint8)).save(src / f"{i:03d}.png")
    report = _prepare(src, tmp_path / "data", num_proc=2)
    assert report["counts"]["accepted"] == 40
    slow_per_process = []
    for journal in sorted((tmp_path / "data" / "journal").glob("*.jsonl")):
        ids = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
        slow_per_process.append(sum(int(json.loads(key)[1][:3]) % 2 == 0 for key in ids))
    assert len(slow_per_process) == 2 and sum(slow_per_process) == 20
    assert min(slow_per_process) >= 5, slow_per_process


def test_each_process_stats_only_the_files_dealt_to_it(tmp_path, monkeypatch):
    """Every process lists the folder (cheap: names only), but a file's stat (its stamp, a
    network round trip on a mounted drive) is read once, by the process that decodes it."""
    from furlib import sources

    monkeypatch.setattr(shares, "ProcessPoolExecutor", lambda n, mp_context=None, **kw: ThreadPoolExecutor(n, **kw))
    monkeypatch.setattr(shares, "_join", lambda counters: monkeypatch.setattr(shares, "_COUNTERS", counters))
    stats, real = [], sources.file_stamp
    monkeypatch.setattr(sources, "file_stamp", lambda path: stats.append(path.name) or real(path))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 40, 3), np.uint8)).save(src / f"{i:03d}.png")
    (src / "notes.txt").write_text("not an image")
    report = _prepare(src, tmp_path / "data", num_proc=3)
    assert report["counts"]["accepted"] == 24 and report["counts"]["rejected"] == 1
    assert sorted(stats) == sorted(p.name for p in src.iterdir())  # each once (was once per process)


def _fails_at_once_or_works_long(k: int, m: int) -> str:
    """A process's task (spawned, so importable): process 0 fails; the others would work ~17 min."""
    import time

    if k == 0:
        time.sleep(0.5)  # the other has started its work
        raise ValueError("input 7 broke the decoder")
    for _ in shares.until_stopped(range(100_000)):
        time.sleep(0.01)
    return "stopped" if shares.shared_counters()[shares.STOP] else "finished"


def test_one_process_error_stops_the_others_within_seconds():
    """The pool's exit waits for every process: without the stop flag the healthy one would finish
    its whole share before the error reached the user."""
    import time

    start = time.monotonic()
    with pytest.raises(ValueError, match="input 7 broke"):
        shares.run_processes(_fails_at_once_or_works_long, 2, progress=False)
    assert time.monotonic() - start < 30
