"""furlib.atomic: the one atomic write and the one sweeper every stage uses."""

import os
import time

import pytest

from furlib import atomic


def test_a_write_is_whole_or_absent(tmp_path):
    target = tmp_path / "report.json"
    atomic.write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half of the ne")
            raise KeyboardInterrupt("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_temporaries_are_hidden_and_unique_per_writer(tmp_path):
    tmp = atomic.temporary(tmp_path / "a.png")
    assert tmp.parent == tmp_path and tmp.name.startswith(atomic.PREFIX) and tmp.name.endswith("-a.png")
    assert str(os.getpid()) in tmp.name


def test_sweep_removes_old_temporaries_and_keeps_fresh_ones(tmp_path):
    old, fresh, entry = (tmp_path / f"{atomic.PREFIX}x-1-2-a.npy", tmp_path / f"{atomic.PREFIX}x-1-3-b.npy",
                         tmp_path / "c.npy")
    folder = tmp_path / f"{atomic.PREFIX}x-1-2-step_0000009"  # a killed checkpoint save
    folder.mkdir()
    (folder / "ema.safetensors").write_bytes(b"x")
    for f in (old, fresh, entry):
        f.write_bytes(b"x")
    hour_ago = time.time() - 2 * atomic.STALE_S
    for f in (old, entry, folder):
        os.utime(f, (hour_ago, hour_ago))
    assert atomic.sweep(tmp_path) == 2
    assert not old.exists() and not folder.exists() and fresh.exists() and entry.exists()
    assert atomic.sweep(tmp_path, older_than_s=0) == 1  # the lock holder: every temporary goes
    assert not fresh.exists() and entry.exists()
    assert atomic.sweep(tmp_path / "missing") == 0
