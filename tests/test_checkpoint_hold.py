"""03 and 04 reading a run that 02 still trains: the pruning of keep_checkpoints never takes the
checkpoint they read from under them, nor makes them call it damaged."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from furlib import atomic, checkpoint, checkpoint_pick


def _tensors(v):
    return {"decoder": {"w": torch.full((2, 2), float(v))}, "ema": {"w": torch.full((2, 2), float(v))}}


def _train_on(root, step):
    """What 02 does at each checkpoint with keep_checkpoints=1: save, then remove the one before."""
    checkpoint.save_checkpoint(root, step, _tensors(step), {"base_model": "tiny-random"}, keep=1)


def test_a_checkpoint_pruned_while_03_reads_it_is_read_whole(tmp_path, monkeypatch):
    """keep_checkpoints=1: the save after the one 03 picked removed it between its ema and raw
    reads; 03 then said 'cannot read ... Fix: delete that folder', as of damage. 03's hold keeps it
    until it has read it; once the reader moves on, pruning removes it as before."""
    root = tmp_path / "checkpoints"
    _train_on(root, 1)
    ckpt = checkpoint_pick.find_run_checkpoint(tmp_path)
    assert checkpoint.run_base(ckpt)[0] == "tiny-random"
    real_load = checkpoint.load_file

    def load_while_training_saves(path):
        if not (root / "step_0000002").exists():  # training goes on while 03 reads
            _train_on(root, 2)
        return real_load(path)

    monkeypatch.setattr(checkpoint, "load_file", load_while_training_saves)
    assert checkpoint.load_decoder_weights(ckpt, "ema")["w"][0, 0] == 1.0
    assert checkpoint.load_decoder_weights(ckpt, "raw")["w"][0, 0] == 1.0
    assert checkpoint_pick.verify(ckpt) is None  # the hold is no file of the checkpoint
    assert checkpoint_pick.find_run_checkpoint(tmp_path).name == "step_0000002"  # the hold moves with the pick
    _train_on(root, 3)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000003"]


@pytest.mark.parametrize("when", ["before its hold", "while hashed"])
def test_a_checkpoint_pruned_while_it_is_picked_is_no_damage(tmp_path, monkeypatch, capsys, when):
    """The save that makes a newer checkpoint and prunes the one 04 was checking (before 04's hold
    was written, or by a training on another machine that had not seen the hold yet): 04 said 'the
    run's latest checkpoint is damaged', or failed in a hash of a file gone. It picks again."""
    root = tmp_path / "checkpoints"
    _train_on(root, 1)
    if when == "before its hold":
        real, name = checkpoint_pick.step_folders, "step_folders"  # listed after `latest` is read
    else:
        real, name = checkpoint_pick.file_sha256, "file_sha256"
        monkeypatch.setattr(checkpoint, "held", lambda folder: False, raising=False)  # the hold not seen there

    def training_goes_on(*args):
        if not (root / "step_0000002").exists():
            _train_on(root, 2)
        return real(*args)

    monkeypatch.setattr(checkpoint_pick, name, training_goes_on)
    assert checkpoint_pick.find_run_checkpoint(tmp_path).name == "step_0000002"
    said = capsys.readouterr().out
    assert "step_0000001 was removed while it was checked" in said and "damaged" not in said
    assert not (root / "step_0000001").exists()


def test_a_checkpoint_gone_after_its_hold_lapsed_is_said_to_be_gone_not_damaged(tmp_path, monkeypatch):
    """A reader that waits past its hold (HOLD_S) may find its checkpoint pruned: it is told to run
    the stage again, not to delete a folder. A file that was never written is not called gone."""
    root = tmp_path / "checkpoints"
    _train_on(root, 1)
    ckpt = checkpoint_pick.find_run_checkpoint(tmp_path)
    monkeypatch.setattr(checkpoint_pick, "HOLD_S", 0.0)
    _train_on(root, 2)
    assert not ckpt.exists()
    for read in (lambda: checkpoint.load_decoder_weights(ckpt, "ema"), lambda: checkpoint.run_base(ckpt)):
        with pytest.raises(RuntimeError, match=r"step_0000001/\S+ is gone: removed after this stage picked "
                                               r"step_0000001 .*Nothing is damaged: run this stage again") as err:
            read()
        assert "delete that folder" not in str(err.value)
    checkpoint.save_checkpoint(root, 3, {"ema": _tensors(3)["ema"]}, {})  # no raw weights were ever written
    with pytest.raises(RuntimeError, match=r"cannot read .*step_0000003/decoder.safetensors .*Fix: delete"):
        checkpoint.load_decoder_weights(root / "step_0000003", "raw")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_holds_of_readers_gone_stale_or_unreadable_never_stop_pruning(tmp_path):
    """A reader that crashed leaves its hold: one of a process no longer running on this host, one
    older than HOLD_S (a reader on another machine), and one that is no record hold nothing."""
    root = tmp_path / "checkpoints"
    _train_on(root, 1)
    folder, now, here = root / "step_0000001", time.time(), socket.gethostname()
    hold_file = folder / f"{checkpoint_pick.HOLD_PREFIX}someone"
    stale = [json.dumps({"pid": _dead_pid(), "host": here, "since": now}),
             json.dumps({"pid": 1, "host": "elsewhere", "since": now - checkpoint_pick.HOLD_S - 1}),
             json.dumps({"pid": 1, "host": "elsewhere", "since": now + 10 * checkpoint_pick.HOLD_S}),  # a clock far off
             json.dumps([1, 2]), '{"pid": 1, "host": "elsew']
    for text in stale:
        hold_file.write_text(text)
        assert not checkpoint_pick.held(folder), text
    for record in ({"pid": os.getpid(), "host": here, "since": now}, {"pid": 1, "host": "elsewhere", "since": now}):
        hold_file.write_text(json.dumps(record))
        assert checkpoint_pick.held(folder), record
    _train_on(root, 2)  # a fresh hold of a reader on another machine: kept past keep_checkpoints
    assert folder.exists() and checkpoint_pick.verify(folder) is None
    hold_file.write_text(stale[0])
    _train_on(root, 3)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000003"]


def test_a_read_only_run_is_read_without_a_hold(tmp_path, monkeypatch):
    """A run copied where no one writes (a Kaggle input dataset): no hold can be written, and no
    training prunes there either; 03 and 04 read it as before."""
    _train_on(tmp_path / "checkpoints", 1)

    def read_only(path, text):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(atomic, "write_text", read_only)
    ckpt = checkpoint_pick.find_run_checkpoint(tmp_path)
    assert checkpoint.load_decoder_weights(ckpt)["w"][0, 0] == 1.0
    assert not list(ckpt.glob(".*"))


def test_a_readers_hold_goes_with_its_process(tmp_path):
    """03 and 04 leave the run folder as they found it: a process's hold is removed when it exits."""
    _train_on(tmp_path / "checkpoints", 1)
    code = ("import sys; from furlib import checkpoint_pick as p; "
            "c = p.find_run_checkpoint(sys.argv[1]); print(len(list(c.glob(p.HOLD_PREFIX + '*'))))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"  # held while it ran
    assert not list((tmp_path / "checkpoints").glob(f"step_*/{checkpoint_pick.HOLD_PREFIX}*"))
