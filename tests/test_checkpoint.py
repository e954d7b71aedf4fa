"""Checkpoints: atomic under a crash mid-save, last K kept, optimizer state round trip."""

import pytest
import torch

from furlib import checkpoint, checkpoint_pick


def _tensors(v):
    return {"decoder": {"w": torch.full((2, 2), float(v))}, "ema": {"w": torch.full((2, 2), float(v))}}


def test_crash_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 10, _tensors(1), {"base_model": "tiny-random"})
    calls = {"n": 0}
    real_save = checkpoint.save_file

    def dying_save(tensors, path):  # the process "dies" while writing the second file
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(root, 20, _tensors(2), {"base_model": "tiny-random"})
    latest = checkpoint_pick.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000010"
    assert checkpoint.load_decoder_weights(latest, "ema")["w"][0, 0] == 1.0
    monkeypatch.setattr(checkpoint, "save_file", real_save)  # the next save cleans up and works
    assert checkpoint.save_checkpoint(root, 20, _tensors(2), {}).name == "step_0000020"
    assert not list(root.glob(".tmp-*"))


def test_a_full_disk_during_a_save_names_the_room_needed_and_leaves_no_half_folder(tmp_path, monkeypatch):
    """safetensors' 'I/O error: No space left on device' (what Kaggle's 20 GB or a full Drive
    gives): an error saying how much room a checkpoint needs, how much is free and which intact
    checkpoint a re-run resumes from; the half-written folder is removed at once."""
    from safetensors import SafetensorError

    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 10, _tensors(1), {})

    def full_disk(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint step_0000020 \(.*No space left.*\): it needs "
                                      r"~0.00 GB, [0-9.]+ GB are free .* still step_0000010, intact"):
        checkpoint.save_checkpoint(root, 20, _tensors(2), {})
    assert not list(root.glob(".tmp-*")) and checkpoint_pick.latest_checkpoint(tmp_path).name == "step_0000010"


def test_keeps_last_k_and_reads_state(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(root, step, _tensors(step), {"base_model": "tiny-random"}, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000003", "step_0000004"]
    assert checkpoint.read_state(checkpoint_pick.latest_checkpoint(tmp_path)) == {
        "base_model": "tiny-random", "step": 4, "files": ["decoder.safetensors", "ema.safetensors"]}
    assert checkpoint.run_base(checkpoint_pick.latest_checkpoint(tmp_path))[:2] == ("tiny-random", "")
    with pytest.raises(FileNotFoundError, match="run 02_train"):
        checkpoint_pick.find_run_checkpoint(tmp_path / "nothing")
    with pytest.raises(ValueError, match="weights"):
        checkpoint.load_decoder_weights(root / "step_0000004", "best")


def test_03_04_refuse_a_damaged_latest_or_fall_back_out_loud(tmp_path, capsys):
    """03 and 04 score and release the latest checkpoint: a damaged one is refused, naming the
    intact step 'fallback' would use; with 'fallback' that step is used and the note printed
    (a release of an older step only warned before). A garbled ``latest`` pointer is damage too."""
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_checkpoint(root, step, _tensors(step), {"base_model": "tiny-random"})
    with open(root / "step_0000002" / "ema.safetensors", "r+b") as f:
        f.truncate(20)
    with pytest.raises(RuntimeError, match=r"latest checkpoint is damaged: using the older step_0000001; skipped "
                                           r".*step_0000002: ema.safetensors has 20 bytes.*on_bad_checkpoint='fallback'"
                                           r" here to use step_0000001$"):
        checkpoint_pick.find_run_checkpoint(tmp_path)
    assert checkpoint_pick.find_run_checkpoint(tmp_path, "fallback").name == "step_0000001"
    assert "WARNING: using the older step_0000001" in capsys.readouterr().out
    for garbage in (b"\xff\xfe\x00", b"", b"../../etc\n"):  # a pointer that names no step folder
        (root / "latest").write_bytes(garbage)
        assert checkpoint_pick.pick_checkpoint(tmp_path)[1][0].startswith("WARNING: using the older step_0000001; "
                                                                    f"skipped {root / 'latest'}: missing, empty")
    checkpoint.save_checkpoint(root, 3, _tensors(3), {"base_model": "tiny-random"})
    (root / "latest").unlink()  # only the pointer lost: the newest step is used, and said so (not "older")
    assert checkpoint_pick.pick_checkpoint(tmp_path)[1][0].startswith("WARNING: using step_0000003, the newest step; ")


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.5, 0.9))
    p.grad = torch.randn(3)
    opt.step()
    tensors, meta = checkpoint.optimizer_tensors(opt)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    checkpoint.restore_optimizer(opt2, tensors, meta)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["betas"] == (0.5, 0.9)
    for k, v in opt.state[p].items():
        assert torch.equal(v, opt2.state[q][k])


def test_a_latest_folder_deleted_as_the_fix_says_resumes_from_the_one_before(tmp_path):
    """on_bad_checkpoint='refuse' said "delete that folder (the run resumes from the one before)";
    once deleted, it refused again ("the folder does not exist ... delete that folder"): a loop."""
    import shutil

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_checkpoint(root, step, _tensors(step), {})
    (root / "step_0000002" / "ema.safetensors").write_bytes(b"damaged")
    with pytest.raises(RuntimeError, match=r"step_0000002 is damaged: .*Fix: delete that folder \(the run resumes"):
        checkpoint_pick.pick_checkpoint(tmp_path, on_bad="refuse")
    shutil.rmtree(root / "step_0000002")
    folder, notes = checkpoint_pick.pick_checkpoint(tmp_path, on_bad="refuse")
    assert folder.name == "step_0000001" and "step_0000002: the folder does not exist" in notes[0]


def test_only_step_folders_are_checkpoints(tmp_path):
    """A user's copy kept beside the checkpoints (step_0000001_keep, a .zip for download) was pruned
    as an old step; steps past 9,999,999 sorted as older than the 7-digit ones."""
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 1, _tensors(1), {}, keep=1)
    import shutil

    shutil.copytree(root / "step_0000001", root / "step_0000001_keep")
    (root / "step_0000001.zip").write_bytes(b"PK")
    for step in (9_999_999, 10_000_000):
        checkpoint.save_checkpoint(root, step, _tensors(step), {}, keep=1)
    kept = ["latest", "step_0000001.zip", "step_0000001_keep", "step_10000000"]
    assert sorted(p.name for p in root.iterdir()) == kept
    (root / "latest").unlink()  # the newest is found by its step number, not by the name's letters
    checkpoint.save_checkpoint(root, 9_999_999, _tensors(9), {}, keep=0)
    (root / "latest").unlink()
    assert checkpoint_pick.pick_checkpoint(tmp_path)[0].name == "step_10000000"


def test_an_unwritable_checkpoint_folder_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """A permission or read-only error was reported as room needed and free ('77 GB are free ...
    Free some space'); a full disk still says how much room a checkpoint needs."""
    import errno

    from safetensors import SafetensorError

    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 10, _tensors(1), {})

    def denied(tensors, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "save_file", denied)
    with pytest.raises(OSError, match=r"Permission denied.*still step_0000010, intact\. Make .* writable") as err:
        checkpoint.save_checkpoint(root, 20, _tensors(2), {})
    assert "free" not in str(err.value).lower()

    def full(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match=r"GB are free .* Free some space \(or lower keep_checkpoints=3: 02 removes"):
        checkpoint.save_checkpoint(root, 20, _tensors(2), {})
