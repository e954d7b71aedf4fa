"""Parameters checked strictly and before anything is written (issue 24, classes 2, 3, 4, 8):
a quoted 'False' is not a boolean, a size must be a number, inf is not a learning rate, a path
outside the run folder is refused before the pipeline writes, and a misspelt papermill key stops
the notebook before its run starts."""

import json

import pytest
import torch

from furlib import parameters, pipeline
from furlib.training.settings import TrainSettings
from conftest import ROOT


@pytest.mark.parametrize("key, value", [("rebuild", "False"), ("rfid", "maybe"), ("fp16_copy", "maybe"),
                                        ("max_side", "big"), ("val_fraction", float("inf"))])
def test_pipeline_refuses_wrong_types_before_writing(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        pipeline.run(ROOT / "params" / "smoke.yaml", overrides={key: value, "outputs_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir()), "nothing may be written before the parameters are checked"


@pytest.mark.parametrize("override, message", [
    ({"eval_resolution": 100}, "eval_resolution must be a multiple of 8, at least 32"),
    ({"eval_resolution": 16}, "at least 32"),  # AlexNet's LPIPS trunk pools a 16 px crop away
    ({"weights": "EMA"}, "weights must be 'ema' or 'raw'"),
    ({"run_name": "my run"}, "model_name \\(empty: the run_name\\) must be non-empty without slashes or spaces"),
    ({"base_family": "sdxl"}, None)])  # a -p base_family for 03 without a base_model
def test_pipeline_checks_03_and_04_values_before_01_starts(tmp_path, monkeypatch, override, message):
    """A bad 03 or 04 value failed after 01 and 02 had run (on the card's profile: 150k steps)."""
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: None)
    overrides = {**override, "outputs_dir": str(tmp_path / "o")}
    if message is None:
        with pytest.raises(ValueError, match="base_config and base_family are only used with an explicit base_model"):
            pipeline.run(ROOT / "params" / "smoke.yaml", ["03_eval"], overrides)
        return
    with pytest.raises(ValueError, match=message):
        pipeline.run(ROOT / "params" / "smoke.yaml", overrides=overrides)
    assert not (tmp_path / "o").exists(), "nothing may be written before the parameters are checked"


@pytest.mark.parametrize("run_name", ["../notebooks", "..", ".hidden", "a/b"])
def test_pipeline_refuses_a_run_name_outside_the_run_folder(run_name):
    before = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    with pytest.raises(ValueError, match="run_name"):
        pipeline.run(ROOT / "params" / "smoke.yaml", overrides={"run_name": run_name})
    assert before == {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}


def test_pipeline_never_overwrites_a_file_that_is_not_an_executed_notebook(tmp_path):
    (tmp_path / "r").mkdir()
    mine = tmp_path / "r" / "01_data_prep.ipynb"
    mine.write_text(json.dumps({"cells": [], "metadata": {}}))
    with pytest.raises(ValueError, match="not an executed notebook"):
        pipeline.run(ROOT / "params" / "smoke.yaml", overrides={"outputs_dir": str(tmp_path), "run_name": "r"})
    with pytest.raises(ValueError, match="project's own"):  # outputs_dir=<root>, run_name=notebooks
        pipeline.check_before_writing({"outputs_dir": str(ROOT), "run_name": "notebooks"}, ["01_data_prep"])


def test_library_flags_are_strict():
    from furlib.data import prepare

    with pytest.raises(ValueError, match="rebuild='False'"):
        prepare.prepare("builtin", "/nonexistent/never-written", rebuild="False")
    assert parameters.strict_bool("x", True) is True
    with pytest.raises(ValueError, match="lr=inf"):
        parameters.finite("lr", float("inf"))


@pytest.mark.parametrize("key, value", [("lr", float("inf")), ("disc_weight", float("nan")), ("critic_lr", float("inf"))])
def test_train_settings_refuse_non_finite(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        TrainSettings.from_params({key: value})


def test_notebook_check_names_the_misspelt_key():
    namespace = {**pipeline.stage_defaults("04_export"), "In": ["", "# Parameters\nfp16_cpy = False\n", "check"]}
    with pytest.raises(ValueError, match="'fp16_cpy' \\(did you mean 'fp16_copy'\\?\\)"):
        parameters.check_notebook("04_export", namespace)
    namespace["In"][1] = "x = 1\nprint(x)\n"  # an ordinary cell ran before: nothing to compare
    parameters.check_notebook("04_export", namespace)
    namespace["In"][1] = "# Parameters\nsource = 'builtin'\nlr = 1.0e-5\nbase_model = 'x'\n"  # papermill -f
    namespace["base_model"] = "x"
    parameters.check_notebook("04_export", namespace)  # other stages' names: a note, not an error
    assert namespace["base_model"] == ""  # a whole profile's base is 02's: 04 uses the run's own


@pytest.mark.parametrize("notebook, parameters, message", [
    ("03_eval", {"eval_max_image": 2}, "'eval_max_image' (did you mean 'eval_max_images'?)"),
    # a bad value is named before the missing data: the user fixes both in one go, not in two runs
    ("02_train", {"mae_weight": 2.0}, "mae_weight=2.0 but mae_weight_end=1.0"),
])
def test_papermill_bad_parameter_stops_before_the_run(tmp_path, notebook, parameters, message):
    """A real papermill run on a run folder with no data: the notebook stops at its first check,
    naming the key or the value."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(pipeline.notebook_path(notebook)), str(tmp_path / "out.ipynb"),
                                   parameters=dict(parameters, outputs_dir=str(tmp_path), run_name="r"),
                                   cwd=str(ROOT), progress_bar=False)
    assert message in str(err.value)


def test_yaml_exponent_without_a_dot_is_named_with_the_fix():
    import yaml

    value = yaml.safe_load("lr: 5e-7")["lr"]  # YAML 1.1: a string
    with pytest.raises(ValueError, match="lr='5e-7': must be a finite number.*write 5.0e-7"):
        TrainSettings.from_params({"lr": value})
    for text in ("pixel_cache: yes", "mixed_precision: no"):  # documented values, unquoted: YAML's booleans
        key, value = next(iter(yaml.safe_load(text).items()))
        with pytest.raises(ValueError, match=f"{key}={value}: must be a string .*quote it"):
            TrainSettings.from_params({key: value})


def test_a_lone_pixel_weight_override_is_refused_not_ignored():
    """Without a schedule the end weight was what trained: mae_weight 0.28 alone left L1 at the
    profile's 1.0 (the 2026-12-06 ablation's rgb_matched ran as rgb). Now it is an error naming the fix,
    and equal start and end weights are what the step uses."""
    with pytest.raises(ValueError, match="mae_weight=0.28 but mae_weight_end=1.0 with loss_schedule_steps=0.*"
                                         "set mae_weight_end to 0.28 too"):
        TrainSettings.from_params({"mae_weight": 0.28})
    with pytest.raises(ValueError, match="mse_weight_end=2.0"):
        TrainSettings.from_params({"mse_weight_end": 2.0})
    s = TrainSettings.from_params({"mae_weight": 0.28, "mae_weight_end": 0.28, "mse_weight": 0.45, "mse_weight_end": 0.45})
    assert s.loss_weights(0) == s.loss_weights(10**6) == (0.28, 0.45)
    from furlib.training.losses import cosine_ramp

    assert cosine_ramp(5, 0.28, 1.0, 0) == 0.28  # no ramp: the start weight, the one a user set
    ramp = TrainSettings.from_params({"mae_weight": 0.28, "loss_schedule_steps": 10})
    assert ramp.loss_weights(0) == (0.28, 5.0) and ramp.loss_weights(10) == (1.0, 5.0)


def test_critic_settings_that_cannot_work_are_refused_with_the_fix():
    """A critic term before the critic trains (the decoder pushed by a random critic), and a critic
    too deep for the crop (torch's 'Kernel size can't be greater than actual input size' at step 0)."""
    with pytest.raises(ValueError, match="gan_start=0 is before critic_start=100.*at least critic_start"):
        TrainSettings.from_params({"critic_start": 100})
    TrainSettings.from_params({"critic_start": 100, "gan_start": 100})
    TrainSettings.from_params({"critic_start": 100, "disc_weight": 0.0})  # no critic term at all
    with pytest.raises(ValueError, match="critic_layers=6 needs resolution >= 192.*use at most 4"):
        TrainSettings.from_params({"critic_layers": 6, "resolution": 64})
    TrainSettings.from_params({"critic_layers": 4, "resolution": 64})
    with pytest.raises(ValueError, match=r"needs resolution >= 3 x 2\*\*1000000 .*use at most 4"):
        TrainSettings.from_params({"critic_layers": 10**6, "resolution": 64})  # (once: Python's int-to-str limit)
    from furlib.training.losses import PatchCritic

    for layers, res in ((4, 48), (6, 192)):  # the smallest crops the relation allows do run
        assert PatchCritic(layers, 4)(torch.zeros(1, 3, res, res)).shape[-1] == 1


def test_outputs_dir_under_home_is_expanded():
    """``~/runs`` is the home folder, as in a shell, not a folder named ``~`` under the notebooks'
    working directory."""
    from pathlib import Path

    from furlib import runinfo

    assert runinfo.run_dir("~/runs", "r") == Path.home() / "runs" / "r"


def test_paths_and_values_that_would_fail_mid_run_are_refused_first(tmp_path):
    """An outputs_dir or checkpoints that is a file (02 trained, then failed at its first save), a
    seed from time.time_ns() (torch's generator overflowed at step 0), a device this torch lacks."""
    from furlib import checkpoint_pick, runinfo
    from furlib.evaluation import eval_inputs

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="outputs_dir=.*afile' is a file, not a folder"):
        runinfo.run_dir(str(tmp_path / "afile"), "r")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoints").write_text("x")
    with pytest.raises(ValueError, match="r/checkpoints should be a folder but is a file"):
        checkpoint_pick.pick_checkpoint(tmp_path / "r")
    (tmp_path / "r" / "logs").write_text("x")
    with pytest.raises(ValueError, match=r"r/logs should be a folder but is a file"):
        runinfo.check_folders(tmp_path / "r", ["eval", "logs"])
    with pytest.raises(ValueError, match=r"seed=1765000000000000000: must be an integer in \[0, 2\*\*32\)"):
        TrainSettings.from_params({"seed": 1_765_000_000_000_000_000})
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        eval_inputs.check_parameters({**pipeline.stage_defaults("03_eval"), "seed": 2 ** 40})
    if not torch.backends.mps.is_available():  # Linux, Colab, Kaggle
        with pytest.raises(ValueError, match="device='mps' is not usable here"):
            runinfo.pick_device("mps")


def test_a_p_value_that_yaml_would_cut_at_a_hash_is_refused():
    """``-p training_data=art from #e621`` reached the notebook as 'art from' (YAML's comment)."""
    with pytest.raises(ValueError, match="YAML reads '#e621' as a comment.*-p 'training_data=\"art from #e621\"'"):
        pipeline.parse_override("training_data=art from #e621")
    with pytest.raises(ValueError, match="'#2' as a comment"):
        pipeline.parse_override("source=/data/set #2")
    assert pipeline.parse_override("source=/data/set#2") == ("source", "/data/set#2")  # no space: no comment
    assert pipeline.parse_override('training_data="art from #e621"') == ("training_data", "art from #e621")
    assert pipeline.parse_override("resume_with_changes=[seed, lr]") == ("resume_with_changes", ["seed", "lr"])


@pytest.mark.parametrize("key, value, fix", [
    ("max_steps", "1e5", "write 100000, without a dot"),  # the float hint's 1.0e5 failed again as not an integer
    ("max_steps", 20000.0, "write 20000, without a dot"),
    ("base_config", None, "YAML's null, not the default"),  # `base_config:` or `-p base_config=`
    ("source", {"my": "images"}, "'a: b' as a mapping: quote the string")])
def test_wrong_values_name_the_fix_that_works(tmp_path, key, value, fix):
    with pytest.raises(ValueError, match=f"{key}=.*: must be .*{fix}"):
        pipeline.run(ROOT / "params" / "smoke.yaml", overrides={key: value, "outputs_dir": str(tmp_path)})
