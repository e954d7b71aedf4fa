"""Notebook pairs in sync, parameters declared, params files valid."""

import ast
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest
from furlib import pipeline

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "params").glob("*.yaml"))


def _cells(nb):
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_pair_in_sync_and_without_outputs(stage):
    py = jupytext.read(ROOT / "notebooks" / f"{stage}.py")
    ipynb = nbformat.read(ROOT / "notebooks" / f"{stage}.ipynb", as_version=4)
    assert _cells(py) == _cells(ipynb), f"{stage}: run `make sync` after editing the .py"
    assert all(not c.get("outputs") and not c.get("execution_count") for c in ipynb.cells if c.cell_type == "code")


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_notebook_shape(stage):
    nb = jupytext.read(ROOT / "notebooks" / f"{stage}.py")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one parameters cell"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {stage[:2]} ·")
    assert "write_record" in nb.cells[-1].source, "the last cell writes the run record"
    assert len(nb.cells) <= 40
    params = papermill.inspect_notebook(str(pipeline.notebook_path(stage)))  # what papermill injects
    source_lines = nb.cells[tagged[0]].source.count("\n") + 1
    assert len(params) == source_lines, "every line of the parameters cell must parse (no '=' in comments)"
    assert list(params) == list(pipeline.declared_parameters(stage)), "our reader and papermill's agree"


def test_shared_names():
    declared = {s: pipeline.declared_parameters(s) for s in pipeline.STAGES}
    for stage, names in declared.items():
        assert {"run_name", "outputs_dir"} <= set(names), stage
    for name in ("resolution", "batch_size", "max_steps", "seed", "base_model"):
        assert name in declared["02_train"]
    assert "source" in declared["01_data_prep"]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_keys_declared_and_types_match(profile):
    params = pipeline.load_profile(profile)
    defaults = {}
    for stage in pipeline.STAGES:
        defaults.update(pipeline.declared_parameters(stage))
    for key, value in params.items():
        default = ast.literal_eval(defaults[key])
        if isinstance(default, bool) or isinstance(value, bool):
            assert isinstance(value, bool) == isinstance(default, bool), key
        elif isinstance(default, (int, float)):
            assert isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int)), key
        elif isinstance(default, str):
            assert isinstance(value, str), key


def test_required_profiles_exist():
    assert {"demo", "smoke", "furception_v1", "colab_t4", "ldm_like"} <= {p.stem for p in PROFILES}


def test_undeclared_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        pipeline.load_profile(bad)
    with pytest.raises(FileNotFoundError):
        pipeline.load_profile(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="not a file"):
        pipeline.load_profile(tmp_path)
    bad.write_text("run_name: x\nmax_steps: [1\n")  # broken YAML: named, not yaml's bare traceback
    with pytest.raises(ValueError, match=f"{bad} is not a YAML profile: .*expected ',' or ']'"):
        pipeline.load_profile(bad)
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="is not a YAML profile"):
        pipeline.load_profile(bad)
    with pytest.raises(ValueError, match="-p 'lr=\\[1': the value is not YAML"):
        pipeline.parse_override("lr=[1")


def test_pipeline_gives_every_stage_the_same_run_folder(tmp_path, monkeypatch):
    """A profile without run_name: one folder (the notebooks' default), created before papermill
    writes the first executed notebook into it, and the same run_name handed to every stage."""
    calls = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, out, parameters, **kw: calls.append((Path(out), parameters)))
    profile = tmp_path / "p.yaml"
    profile.write_text("source: builtin\n")
    run_dir = pipeline.run(profile, overrides={"outputs_dir": str(tmp_path / "outs")})
    assert run_dir == tmp_path / "outs" / "my_run" and run_dir.is_dir()
    assert [out.parent for out, _ in calls] == [run_dir] * 4
    assert all(params["run_name"] == "my_run" for _, params in calls)


def test_a_profiles_base_is_02s_and_03_04_use_the_runs_own(tmp_path, monkeypatch):
    """A profile's ``base_model`` is what 02 trains from; 03 and 04 read the run's own base from its
    checkpoint (a -p changes it for 02 but, run later, the profile's would have replaced the
    trained base's encoder silently), unless a -p names one for them."""
    calls = {}
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda src, out, parameters, **kw: calls.update({Path(out).stem: parameters}))
    profile = tmp_path / "p.yaml"
    profile.write_text("source: builtin\nbase_model: tiny-random\nbase_family: sd\n")
    pipeline.run(profile, overrides={"outputs_dir": str(tmp_path / "outs")})
    assert calls["02_train"]["base_model"] == "tiny-random"
    assert not {"base_model", "base_family"} & (set(calls["03_eval"]) | set(calls["04_export"]))
    pipeline.run(profile, ["03_eval", "04_export"], {"outputs_dir": str(tmp_path / "outs"), "base_model": "tiny"})
    assert calls["04_export"]["base_model"] == "tiny" and "base_family" not in calls["04_export"]


def test_train_notebook_asks_for_a_gpu_runtime_and_jupytext_keeps_it(tmp_path):
    """Colab reads `accelerator`/`colab.gpuType`, Kaggle `kaggle.isGpuEnabled`: 02 opens on a GPU."""
    ipynb = nbformat.read(ROOT / "notebooks" / "02_train.ipynb", as_version=4)
    assert ipynb.metadata["accelerator"] == "GPU" and ipynb.metadata["colab"]["gpuType"]
    assert ipynb.metadata["kaggle"]["isGpuEnabled"] is True
    # a `make sync` from the .py with the repository's jupytext.toml must write the same metadata
    config = jupytext.config.load_jupytext_configuration_file(str(ROOT / "jupytext.toml"))
    fmt = jupytext.formats.long_form_one_format("ipynb")
    synced = jupytext.reads(jupytext.writes(ipynb, "py:percent", config=config), "py:percent")
    jupytext.write(synced, tmp_path / "02.ipynb", fmt=fmt, config=config)
    again = nbformat.read(tmp_path / "02.ipynb", as_version=4)
    for key in ("accelerator", "colab", "kaggle"):
        assert again.metadata[key] == ipynb.metadata[key], key
    for stage in ("01_data_prep", "03_eval", "04_export"):  # the others: CPU is enough
        assert "accelerator" not in nbformat.read(pipeline.notebook_path(stage), as_version=4).metadata


def test_a_typo_in_p_is_blamed_on_p_not_on_the_profile(tmp_path):
    profile = tmp_path / "ok.yaml"
    profile.write_text("run_name: x\n")
    with pytest.raises(ValueError, match=r"^-p: no notebook declares \['max_step'\] \('max_step': did you mean 'max_steps'\?\)"):
        pipeline.load_profile(profile, {"max_step": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match=f"^{bad}: no notebook declares"):
        pipeline.load_profile(bad, {"max_steps": 3})


def test_a_relative_source_is_taken_from_where_the_command_runs(tmp_path):
    (tmp_path / "imgs").mkdir()
    got = pipeline.resolve_paths({"source": "imgs", "eval_source": "val", "base_model": "tiny",
                                  "train_source": "not/here", "run_name": "imgs"}, tmp_path)
    assert got == {"source": str(tmp_path / "imgs"), "eval_source": "val", "base_model": "tiny",
                   "train_source": "not/here", "run_name": "imgs"}
    from furlib import sources

    with pytest.raises(FileNotFoundError, match="looked in"):
        sources.source_key(str(tmp_path / "nothing" / "x.y"), "train", "image")


def test_a_failing_stage_ends_with_one_plain_line(tmp_path, monkeypatch, capsys):
    def fails(src, out, parameters, **kw):
        raise papermill.PapermillExecutionError(3, 3, "x", "ValueError", "invalid 02_train parameter(s):\n  resolution=60: a multiple of 8\n  lr=-1: > 0", [])

    monkeypatch.setattr(papermill, "execute_notebook", fails)
    code = pipeline.main(["params/smoke.yaml", "--stages", "02_train,03_eval", "-p", f"outputs_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("ERROR: [02_train] failed: ValueError: invalid 02_train parameter(s): resolution=60: a multiple of 8 lr=-1: > 0 -- ")
    assert "--stages 02_train,03_eval" in err[0] and str(tmp_path / "smoke" / "02_train.ipynb") in err[0]


def test_make_demo_streams_the_notebooks_progress(tmp_path):
    """`make demo` passes --log-output, and with it the pipeline prints the notebook's progress lines
    while the stage runs (before the stage's 'done'), not only into the executed notebook."""
    import re
    import subprocess
    import sys

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*furlib\.pipeline params/demo\.yaml --log-output$", makefile, re.M)
    done = subprocess.run([sys.executable, "-m", "furlib.pipeline", "params/smoke.yaml", "--stages", "01_data_prep",
                           "--log-output", "-p", f"outputs_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)  # one stream, in order
    out = done.stdout
    assert done.returncode == 0, out[-2000:]
    assert re.search(r"prepare.*img", out), out[-2000:]
    assert out.index("[01_data_prep] done") > re.search(r"prepare.*img", out).start()


def test_a_ctrl_c_gives_the_kernel_time_to_save_and_says_what_was_saved(tmp_path, monkeypatch):
    """papermill's kernel shutdown on a Ctrl-C sent SIGTERM 2.5 s after the SIGINT that makes 02
    save its step: the save was cut short. Each kernel now has STOP_GRACE_S, and the pipeline's
    stop names the stage and the latest checkpoint."""
    calls = []

    def interrupted(src, out, parameters, **kw):
        calls.append(kw["kernel_manager_class"])
        (Path(out).parent / "checkpoints").mkdir(exist_ok=True)
        (Path(out).parent / "checkpoints" / "latest").write_text("step_0000026\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    profile = tmp_path / "p.yaml"
    profile.write_text("source: builtin\n")
    with pytest.raises(KeyboardInterrupt, match=r"\[01_data_prep\] stopped by hand; the latest checkpoint is "
                                                r"step_0000026. Re-run with --stages 01_data_prep,02_train"):
        pipeline.run(profile, overrides={"outputs_dir": str(tmp_path / "o")})
    assert calls[0]().shutdown_wait_time == pipeline.STOP_GRACE_S >= 60


def test_stages_out_of_order_or_twice_are_refused_before_writing(tmp_path, monkeypatch, capsys):
    """``--stages 03_eval,02_train`` scored the previous checkpoint, then trained: a table that did not
    describe the run. A repeated stage ran twice. Both are refused, naming the order to use."""
    calls = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, out, parameters, **kw: calls.append(Path(out).stem))
    overrides = {"outputs_dir": str(tmp_path / "o")}
    for stages in (["03_eval", "02_train"], ["02_train", "02_train"]):
        with pytest.raises(ValueError, match="in the pipeline's order .*--stages 02_train,03_eval$|--stages 02_train$"):
            pipeline.run(ROOT / "params" / "smoke.yaml", stages, overrides)
    assert not calls and not (tmp_path / "o").exists()
    assert pipeline.main(["params/smoke.yaml", "--stages", "04_export,01_data_prep", "-p", f"outputs_dir={tmp_path}"]) == 1
    assert "--stages 01_data_prep,04_export" in capsys.readouterr().err
    pipeline.run(ROOT / "params" / "smoke.yaml", ["02_train", "04_export"], overrides)  # skipping one is fine
    assert calls == ["02_train", "04_export"]


def test_a_dead_kernel_ends_with_one_plain_line_naming_the_stage_and_notebook(tmp_path, monkeypatch, capsys):
    """A kernel killed mid-stage (out of memory) raised nbclient's DeadKernelError through papermill:
    a traceback with no stage, no saved notebook and no way to continue."""
    from nbclient.exceptions import DeadKernelError

    def dies(src, out, parameters, **kw):
        raise DeadKernelError("Kernel died")

    monkeypatch.setattr(papermill, "execute_notebook", dies)
    code = pipeline.main(["params/smoke.yaml", "--stages", "02_train,03_eval", "-p", f"outputs_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("ERROR: [02_train] failed: its kernel died (out of memory")
    assert str(tmp_path / "smoke" / "02_train.ipynb") in err[0] and "--stages 02_train,03_eval" in err[0]
