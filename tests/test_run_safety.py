"""A run that cannot be lost: lock, verified checkpoints and fallback, strict loads, torn logs,
resume against changed settings, one validation of 02's parameters (issue 13)."""

import dataclasses
import json
import time
import os
import subprocess
import sys

import pytest
import torch

from furlib.data import prepare
from furlib import checkpoint, checkpoint_pick
from furlib.training import fit
from furlib.training.logbook import Logbook
from furlib.training.settings import TrainSettings

TINY = dict(base_model="tiny", lpips_backbone="random", device="cpu", resolution=64, batch_size=2,
            max_steps=2, num_workers=0, lr=1e-3, critic_lr=1e-3, warmup_steps=0, ema_decay=0.5,
            mixed_precision="no", checkpoint_every=2, log_every=1, plot_every=2, preview_images=1,
            critic_channels=8, critic_layers=2, pixel_cache="no")


def tiny(outputs, **kw):
    return TrainSettings(**{**TINY, "outputs_dir": str(outputs), "run_name": "r", **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run (64 px); returns (outputs folder, results, figures shown, saves made)."""
    outputs = tmp_path_factory.mktemp("outputs")
    prepare.prepare("builtin", outputs / "r" / "data", resolution=64, max_side=256, max_images=4, art_count=4,
                    val_fraction=0.3, progress=False)
    shown, saves = [], []
    real_save = checkpoint.save_checkpoint

    def counting_save(*a, **kw):
        saves.append(a[1])
        return real_save(*a, **kw)

    checkpoint.save_checkpoint = counting_save
    try:
        results = fit.fit(tiny(outputs), show=shown.append)
    finally:
        checkpoint.save_checkpoint = real_save
    return outputs, results, shown, saves


def test_final_step_saved_and_shown_once(trained):
    _, results, shown, saves = trained
    assert saves == [2], "max_steps is a multiple of checkpoint_every: one save of step 2"
    assert len(shown) == 2, "the last dashboard and strip once each, not twice"
    assert results["global_batch"] == 2 and results["processes"] == 1


def _hold_lock(run_dir):
    code = ("import sys, time; from furlib.training.runlock import RunLock; "
            f"RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_other(tmp_path):
    holder = _hold_lock(tmp_path / "r")
    try:
        with pytest.raises(RuntimeError, match=f"in use by process {holder.pid} on "):
            fit.fit(tiny(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the next run takes it over
    from furlib.training.runlock import RunLock

    with RunLock(tmp_path / "r") as lock:
        assert f"stale lock of process {holder.pid}" in lock.note
    assert not (tmp_path / "r" / "run.lock.owner").exists(), "a released lock leaves no owner record"


def _save(root, step, value=1.0, **state):
    w = {"w": torch.full((2, 2), value)}
    return checkpoint.save_checkpoint(root, step, {"decoder": w, "ema": w}, {"base_model": "tiny", **state})


def test_a_second_save_of_a_step_never_costs_the_first(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    first = _save(root, 2)
    (root / ".tmp-step_0000009").mkdir()  # left by a save killed long ago

    def killed(*a):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.os, "replace", killed)  # any rename now "kills" the process
    try:
        _save(root, 2, value=1.0)  # the closing save of a step already saved
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert checkpoint_pick.latest_checkpoint(tmp_path) == first
    assert checkpoint.load_decoder_weights(first)["w"][0, 0] == 1.0
    _save(root, 4)
    assert not list(root.glob(".tmp-*")), "stale temporaries are swept"


def _flip_byte(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_latest_falls_back_loudly_or_refuses(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    newest = _save(root, 4, value=2.0)
    _flip_byte(newest / "ema.safetensors")
    folder, notes = checkpoint_pick.pick_checkpoint(tmp_path)
    assert folder.name == "step_0000002"
    assert "WARNING" in notes[0] and "step_0000004" in notes[0] and "ema.safetensors" in notes[0]
    with pytest.raises(RuntimeError, match="step_0000004 is damaged: ema.safetensors does not match"):
        checkpoint_pick.pick_checkpoint(tmp_path, on_bad="refuse")
    (newest / "decoder.safetensors").write_bytes((newest / "decoder.safetensors").read_bytes()[:50])
    assert "truncated" in checkpoint_pick.verify(newest) or "SHA-256" in checkpoint_pick.verify(newest)
    import shutil

    shutil.rmtree(newest)  # latest names a folder that is gone (a death mid-replace in old versions)
    assert checkpoint_pick.latest_checkpoint(tmp_path).name == "step_0000002"


def test_garbled_file_and_missing_optimizer_slot_name_the_file(tmp_path):
    folder = _save(tmp_path / "checkpoints", 2)
    (folder / "ema.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(RuntimeError, match="ema.safetensors"):
        checkpoint.load_decoder_weights(folder)
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p, q])
    p.grad, q.grad = torch.randn(3), torch.randn(3)
    opt.step()
    tensors, meta = checkpoint.optimizer_tensors(opt)
    del tensors["1.exp_avg_sq"]
    with pytest.raises(RuntimeError, match=r"optim_decoder.safetensors lacks slot\(s\) \['1.exp_avg_sq'\]"):
        checkpoint.restore_optimizer(torch.optim.AdamW([p, q]), tensors, meta, "optim_decoder.safetensors")


def test_checkpoint_missing_a_tensor_is_not_resumed(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from furlib.models import load_vae
    from furlib.perceptual import LPIPS
    from furlib.training.trainer import Trainer

    outputs = trained[0]
    ckpt = checkpoint_pick.latest_checkpoint(outputs / "r")
    import shutil

    broken = tmp_path / "step"
    shutil.copytree(ckpt, broken)
    weights = load_file(broken / "decoder.safetensors")
    weights.pop("decoder.conv_out.bias")
    save_file(weights, broken / "decoder.safetensors")
    t = Trainer(load_vae("tiny"), tiny(outputs), "cpu", LPIPS("vgg", "random"))
    with pytest.raises(RuntimeError, match=r"decoder.safetensors does not fit this model: missing \['decoder.conv_out.bias'\]"):
        t.load(broken)


def test_torn_last_log_line_is_dropped_with_a_note(tmp_path):
    rows = "".join(json.dumps({"step": s, "rec/total": 0.5}) + "\n" for s in (1, 2, 3))
    (tmp_path / "log.jsonl").write_text(rows + '{"step": 4, "rec/to')
    book = Logbook(tmp_path, resume_step=3, tensorboard=False)
    assert [r["step"] for r in book.history] == [1, 2, 3]
    assert "half-written last line" in book.notes[0]
    (tmp_path / "log.jsonl").write_text('{"step": 1\n' + rows)
    with pytest.raises(ValueError, match="log.jsonl line 1 is not JSON"):
        Logbook(tmp_path, resume_step=3, tensorboard=False)


def test_tensorboard_after_a_resume_keeps_the_checkpoint_step(tmp_path):
    """A run killed after logging steps 1-4 resumes from its step-2 checkpoint: TensorBoard shows
    1, 2 as logged and 3, 4 as trained again, as log.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    book = Logbook(tmp_path)
    for step in (1, 2, 3, 4):
        book.log(step, {"loss": float(step)})
    book.close()
    # a real resume is a later process: its event file's name sorts after the first one's (names
    # hold the second and a per-process counter, which within one test process can roll 9 -> 10)
    time.sleep(1.1)
    book = Logbook(tmp_path, resume_step=2)
    for step in (3, 4):
        book.log(step, {"loss": 10.0 * step})
    book.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [r["loss"] for r in book.history] == [1.0, 2.0, 30.0, 40.0]


def test_resume_checks_the_settings_it_continues(trained):
    from furlib.training.plan import make_plan

    outputs, cpu = trained[0], torch.device("cpu")
    with pytest.raises(ValueError, match=r"changed recipe settings \(seed: 0 -> 1\).*resume_with_changes=\['seed'\]"):
        make_plan(tiny(outputs, seed=1, max_steps=3), 1, cpu)
    with pytest.raises(ValueError, match="trained from base_model='tiny', not 'random:sd'"):
        make_plan(tiny(outputs, base_model="random:sd"), 1, cpu)
    plan = make_plan(tiny(outputs, seed=1, resume_with_changes=["seed"], log_every=2, max_steps=3), 1, cpu)
    assert plan.start_step == 2 and any("log_every: 1 -> 2" in n for n in plan.notes)
    assert any("seed: 0 -> 1 (allowed" in n for n in plan.notes)


def test_every_bad_parameter_is_named_with_what_is_allowed():
    bad = dict(batch_size=0, resolution=60, checkpoint_every=0, log_every=0, ema_decay=1.5, phase_upsample=False,
               lpips_backbone="imagenet", num_workers=-1)
    with pytest.raises(ValueError) as err:
        TrainSettings(**bad)
    for name, value in bad.items():
        assert f"{name}={value!r}: must be" in str(err.value), name
    assert "bare yes/no" in str(err.value)
    assert "multiple of 8" in str(err.value)
    with pytest.raises(ValueError, match="ema_decay=-0.5"):
        TrainSettings(ema_decay=-0.5)
    with pytest.raises(ValueError, match="no parameter.*learning_rate"):
        TrainSettings.from_params({"learning_rate": 0.1})


def test_cli_checks_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="resolution=60: must be a multiple of 8"):
        fit.main(["params/smoke.yaml", "-p", "resolution=60", "-p", f"outputs_dir={tmp_path}"])
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        fit.main(["params/smoke.yaml", "-p", "checkpoint_every=0", "-p", f"outputs_dir={tmp_path}"])


def _names_and_comments(source: str) -> list[tuple[str, str]]:
    """(assigned name, its end-of-line comment) for each one-line assignment in ``source``."""
    import ast
    import io
    import tokenize

    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = []
    for node in ast.walk(ast.parse(source)):
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name):
            out.append((node.lineno, target.id, comments.get(node.end_lineno, "")))
    return [(name, comment) for _, name, comment in sorted(out)]


def test_notebook_cell_and_settings_are_line_for_line_the_same():
    """02's parameters cell and TrainSettings: the same values, names in the same order, and the
    same comment on each line (a default lives in one cell line and one settings line)."""
    import inspect

    from furlib import pipeline

    cell = pipeline.stage_defaults("02_train")
    defaults = dataclasses.asdict(TrainSettings())
    assert cell == defaults
    assert cell["run_name"] != "demo", "the default run must not resume make demo's folder"
    cell_lines = _names_and_comments(_parameters_cell_source())
    fields = inspect.getsource(TrainSettings).split("    @classmethod")[0]  # the class up to its methods
    settings_lines = _names_and_comments(fields)
    assert [n for n, _ in settings_lines] == [n for n, _ in cell_lines], "same order"
    differ = [(n, c, sc) for (n, c), (_, sc) in zip(cell_lines, settings_lines) if c != sc]
    assert not differ, f"comments differ (name, cell, settings): {differ}"
    assert all(c for _, c in cell_lines), "every parameter has a comment"


def _parameters_cell_source() -> str:
    import json

    from furlib import pipeline

    cells = json.loads(pipeline.notebook_path("02_train").read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return "".join(cell["source"])


def test_cpu_runs_say_what_they_cost_and_use_the_cores_there_are(tmp_path):
    from furlib.models import load_vae
    from furlib.training import plan

    cores = len(os.sched_getaffinity(0))
    workers, note = plan.worker_cap(4, 1)
    assert workers <= max(cores - 1, 0) and (workers == 4 or "capped" in note)
    cpu = torch.device("cpu")
    cost = lambda s, device=cpu: plan.cpu_cost_note(s, device, plan.base_vae(s))  # noqa: E731 - as make_plan does
    note = cost(TrainSettings(base_model="random:sd"))
    assert "WARNING" in note and "params/demo.yaml" in note and " s and up to" in note
    assert "49.5 M-parameter decoder (9.46 TFLOP per megapixel" in note  # SD's decoder, counted
    assert cost(TrainSettings(base_model="random:sd"), torch.device("cuda")) == ""
    # the size decides, not the name: the same 2000 steps, ~1 h for SD's decoder, ~2 min for a 0.8 M one
    small = dict(resolution=96, batch_size=4, max_steps=2000)
    assert "~1.08 h" in cost(TrainSettings(base_model="random:flux", **small))
    load_vae("tiny-random").save_pretrained(tmp_path / "sd-vae-ft-mse")
    assert cost(TrainSettings(base_model=str(tmp_path / "sd-vae-ft-mse"), **small)) == ""
    assert cost(TrainSettings(base_model="tiny", resolution=96, batch_size=4, max_steps=100)) == ""


def test_bin_only_base_folder_is_refused(tmp_path):
    from furlib.models import load_vae

    vae = load_vae("tiny")
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)  # config.json + a pickled .bin
    assert not list((tmp_path / "vae").glob("*.safetensors"))
    with pytest.raises(ValueError, match="no .safetensors weights.*pickled weights are not loaded"):
        load_vae(str(tmp_path / "vae"))


def test_export_builds_a_random_base_with_the_runs_seed(tmp_path):
    from furlib.export import release_files
    from furlib.models import decoder_state, load_vae

    weights = decoder_state(load_vae("tiny-random", seed=3))
    checkpoint.save_checkpoint(tmp_path / "checkpoints", 5, {"decoder": weights, "ema": weights},
                               {"base_model": "tiny-random", "settings": {"seed": 3}})
    src = release_files.release_source(tmp_path)
    vae = release_files.build_release_vae(src.base_model, src.base_config, src.decoder_weights, src.base_seed)
    encoder = {k: v for k, v in load_vae("tiny-random", seed=3).state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in encoder.items())


def test_a_bad_batch_is_called_bad_data():
    from furlib.models import load_vae
    from furlib.training.trainer import NonFiniteError, Trainer

    t = Trainer(load_vae("tiny"), TrainSettings(**{**TINY, "lpips_weight": 0.0, "max_bad_steps": 1}), "cpu")
    bad = torch.zeros(2, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="the data is bad"):
        t.step(bad)


def test_checkpoints_of_older_versions_still_resume_with_a_note(tmp_path):
    folder = _save(tmp_path / "checkpoints", 2)
    (folder / "checksums.json").unlink()  # as written before checksums existed
    found, notes = checkpoint_pick.pick_checkpoint(tmp_path)
    assert found == folder and "not verified" in notes[0]


@pytest.fixture
def interruptible():
    """SIGINT raises KeyboardInterrupt here, as in a Jupyter kernel or a terminal, even where the
    test runner was started in the background with SIGINT ignored (``nohup ... &``)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("interrupts", [1, 2])
def test_an_interrupt_saves_the_step_in_progress_then_stops(tmp_path, monkeypatch, interrupts, interruptible):
    """Jupyter's stop button (SIGINT) during step 2 of 6: one interrupt finishes step 2, saves it
    and stops; resumed to step 3 it equals a straight 3-step run. Two interrupts stop at once."""
    import shutil
    import signal

    from safetensors.torch import load_file

    from furlib.training.trainer import Trainer

    outputs = tmp_path / "outputs"
    prepare.prepare("builtin", outputs / "r" / "data", resolution=64, max_side=256, max_images=4,
                    art_count=4, val_fraction=0.3, progress=False)
    shutil.copytree(outputs / "r" / "data", outputs / "straight" / "data")
    real_step, handler = Trainer.step, signal.getsignal(signal.SIGINT)

    def step_then_stop_button(self, batch):
        logs = real_step(self, batch)
        if self.step_count == 2:
            for _ in range(interrupts):
                os.kill(os.getpid(), signal.SIGINT)
        return logs

    monkeypatch.setattr(Trainer, "step", step_then_stop_button)
    with pytest.raises(KeyboardInterrupt) as stopped:
        fit.fit(tiny(outputs, max_steps=6, checkpoint_every=100, plot_every=0))
    assert signal.getsignal(signal.SIGINT) is handler, "the run's handler outlived it"
    saved = sorted(p.name for p in (outputs / "r" / "checkpoints").glob("step_*"))
    if interrupts == 2:
        assert saved == [] and "stopped by hand" not in str(stopped.value)
        return
    assert saved == ["step_0000002"] and "stopped by hand after step 2" in str(stopped.value)
    monkeypatch.setattr(Trainer, "step", real_step)
    for name in ("r", "straight"):
        fit.fit(tiny(outputs, run_name=name, max_steps=3, checkpoint_every=100, plot_every=0))
    for stem in ("decoder", "ema", "critic"):
        a = load_file(outputs / "r" / "checkpoints" / "step_0000003" / f"{stem}.safetensors")
        b = load_file(outputs / "straight" / "checkpoints" / "step_0000003" / f"{stem}.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stem


def test_an_ignored_interrupt_stays_ignored():
    """A run started with SIGINT ignored (``nohup ... &``) is not made stoppable by 02."""
    import signal

    from furlib.training.interrupt import StopAfterStep

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAfterStep():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_setting_an_older_checkpoint_does_not_record_is_compared_with_its_default():
    """A checkpoint written before loss_schedule_steps and mae_weight_end existed: a resume that set
    them (a newer profile's schedule) changed the recipe with no word; now they are compared with
    their defaults, what that version did."""
    from furlib.training import resume

    old = dataclasses.asdict(TrainSettings(base_model="tiny"))
    for name in ("loss_schedule_steps", "mae_weight_end"):
        del old[name]
    state = {"settings": old, "base_model": "tiny"}
    scheduled = dict(dataclasses.asdict(TrainSettings(base_model="tiny", loss_schedule_steps=1000, mae_weight_end=0.5)))
    with pytest.raises(ValueError, match=r"mae_weight_end: 1.0 -> 0.5, loss_schedule_steps: 0 -> 1000"):
        resume.compare(state, scheduled, 1, "ckpt")
    assert resume.compare(state, dataclasses.asdict(TrainSettings(base_model="tiny")), 1, "ckpt") == []
