"""Progress: text bars with rate and ETA headless, widgets only when someone watches."""

import io
import sys
import types

import pytest
import tqdm.std

from furlib import progress


@pytest.fixture
def kernel(monkeypatch):
    """Pretend to run inside a Jupyter kernel without a person or a host that says otherwise."""
    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    for var in ("FURLIB_PROGRESS", "JPY_SESSION_NAME", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    return monkeypatch


def test_headless_kernel_gets_text_with_rate_and_eta(kernel):
    """papermill's kernel: tqdm.auto would give a widget, stored frozen at 0%."""
    out = io.StringIO()
    with progress.tqdm(total=4, desc="evaluate", unit="batch", file=out) as bar:
        assert type(bar) is tqdm.std.tqdm and bar.mininterval == progress.HEADLESS_MININTERVAL_S
        for _ in range(4):
            bar.update()
    text = out.getvalue()
    assert "evaluate: 100%" in text and "4/4 [" in text and "batch/s]" in text and "<" in text  # elapsed<ETA


@pytest.mark.parametrize("watched", ["colab", "jupyter", "kaggle-interactive", "forced"])
def test_watched_notebooks_get_widgets(kernel, watched):
    if watched == "colab":
        kernel.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    elif watched == "jupyter":
        kernel.setenv("JPY_SESSION_NAME", "/home/me/furception/notebooks/02_train.ipynb")
    elif watched == "kaggle-interactive":
        kernel.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    else:
        kernel.setenv("FURLIB_PROGRESS", "widgets")
    assert progress.mode() == "widgets"


def test_kaggle_batch_run_and_terminal_get_text(kernel):
    kernel.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert progress.mode() == "text"
    kernel.setattr(progress, "_in_kernel", lambda: False)
    kernel.setenv("JPY_SESSION_NAME", "x.ipynb")
    assert progress.mode() == "text"


def test_bad_override_is_named(kernel):
    kernel.setenv("FURLIB_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="FURLIB_PROGRESS.*'fancy'"):
        progress.tqdm(total=1)


def test_outside_a_kernel_is_not_a_kernel():
    assert progress._in_kernel() is False  # pytest is no Jupyter kernel


def test_pipeline_log_output_lets_papermill_stream_cell_output(monkeypatch):
    """papermill logs a cell's stdout at INFO: with logging never configured, --log-output showed nothing."""
    import logging

    from furlib import pipeline

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: "outputs/x")
    pipeline.main(["params/smoke.yaml", "--log-output"])
    assert logging.getLogger("papermill").isEnabledFor(logging.INFO)
