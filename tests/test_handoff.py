"""Stages on separate runtimes (Colab, Kaggle): Drive mounted on use, a missing run said plainly."""

import sys
import types

import papermill
import pytest

from furlib import handoff, pipeline


def test_a_missing_run_names_the_folder_the_writer_and_both_ways_to_bring_it(tmp_path):
    run = tmp_path / "outs" / "r1"
    with pytest.raises(FileNotFoundError) as err:
        handoff.require(run, "checkpoints", "03_eval", "02_train")
    message = str(err.value)
    assert f"{run / 'checkpoints'} (written by 02_train), and it does not exist" in message
    assert "run_name='r1'" in message and handoff.COLAB_DRIVE_DIR in message and "/kaggle/input/" in message
    (run / "checkpoints").mkdir(parents=True)  # what pipeline.run's mkdir and a killed copy leave
    with pytest.raises(FileNotFoundError, match="is empty"):
        handoff.require(run, "checkpoints", "03_eval", "02_train")
    (run / "checkpoints" / "latest").write_text("step_1")
    assert handoff.require(run, "checkpoints", "03_eval", "02_train") == run / "checkpoints"


def test_a_kaggle_input_holding_the_run_is_named_with_the_copy_command(tmp_path, monkeypatch):
    monkeypatch.setattr(handoff, "KAGGLE_INPUT", tmp_path / "input")
    attached = tmp_path / "input" / "furception-01" / "furception" / "outputs" / "r1"
    (attached / "data" / "train").mkdir(parents=True)
    (attached / "data" / "train" / "a.png").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=f"cp -r {attached} {tmp_path / 'work'}/"):
        handoff.require(tmp_path / "work" / "r1", "data/train", "02_train", "01_data_prep")


def test_colab_mounts_drive_when_outputs_dir_is_on_it(tmp_path, monkeypatch):
    mounted = []
    drive = types.SimpleNamespace(mount=lambda where: (mounted.append(where), (tmp_path / "MyDrive").mkdir()))
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=drive))
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setattr(handoff, "DRIVE", tmp_path)
    assert handoff.use_outputs_dir(str(tmp_path / "MyDrive" / "furception")) == ""
    assert mounted == [str(tmp_path)]
    handoff.use_outputs_dir(str(tmp_path / "MyDrive" / "furception"))
    assert len(mounted) == 1, "mounted once per runtime"
    note = handoff.use_outputs_dir("outputs")  # the runtime's own disk: said, with the way out
    assert "gone when it stops" in note and handoff.COLAB_DRIVE_DIR in note


def test_drive_path_off_colab_is_refused(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(handoff, "DRIVE", tmp_path / "drive")
    with pytest.raises(FileNotFoundError, match="not mounted"):
        handoff.use_outputs_dir(str(tmp_path / "drive" / "MyDrive" / "x"))
    assert handoff.use_outputs_dir(str(tmp_path)) == ""  # locally: nothing to say


def test_eval_notebook_on_a_fresh_runtime_says_what_is_missing(tmp_path):
    """The real 03 where no run was handed over: the error is the missing folder, not a traceback
    from deep inside evaluation."""
    out = tmp_path / "executed.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(pipeline.notebook_path("03_eval")), str(out), cwd=str(pipeline.ROOT),
                                   parameters=dict(outputs_dir=str(tmp_path / "fresh"), run_name="r1"),
                                   progress_bar=False)
    assert err.value.ename == "FileNotFoundError"
    assert "needs" in err.value.evalue and "(written by 02_train)" in err.value.evalue
    assert handoff.COLAB_DRIVE_DIR in err.value.evalue
