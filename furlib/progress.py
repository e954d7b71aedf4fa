"""Progress bars that stay readable wherever a stage runs.

``tqdm.auto`` picks a widget in every Jupyter kernel, papermill's included: there no frontend
ever updates it, so executed notebooks keep a bar frozen at 0% and ``--log-output`` shows
nothing for hours. Here a widget is used only when a person is looking (Colab, a notebook
opened in Jupyter or on Kaggle interactively); everywhere else (papermill, a shell, Kaggle's
batch "Save & Run All") it is tqdm's text bar with rate and ETA; when that text goes to a
notebook or a log rather than a terminal it is updated at most every ``HEADLESS_MININTERVAL_S``
so the saved notebook or log stays small.

``FURLIB_PROGRESS=text`` or ``=widgets`` overrides the choice (e.g. for an IDE we do not detect).
"""

import os
import sys

HEADLESS_MININTERVAL_S = 10.0  # seconds between text updates: ~360 lines for an hour's loop
MODES = ("text", "widgets")


def _in_kernel() -> bool:
    """True inside a Jupyter (ipykernel) kernel, Colab's included, not a terminal IPython."""
    if "ipykernel" not in sys.modules:
        return False
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython import get_ipython

    return isinstance(get_ipython(), ZMQInteractiveShell)


def mode() -> str:
    """'widgets' when someone watches a notebook live, else 'text'."""
    forced = os.environ.get("FURLIB_PROGRESS", "")
    if forced:
        if forced not in MODES:
            raise ValueError(f"FURLIB_PROGRESS must be one of {MODES} or unset, got {forced!r}")
        return forced
    if not _in_kernel():
        return "text"
    # Jupyter Server (2.x) names the notebook of a kernel it starts in JPY_SESSION_NAME;
    # papermill starts kernels itself and sets nothing, nor does Kaggle's batch run.
    watched = ("google.colab" in sys.modules or bool(os.environ.get("JPY_SESSION_NAME"))
               or os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Interactive")
    return "widgets" if watched else "text"


def tqdm(*args, **kwargs):
    """A drop-in for ``tqdm.auto.tqdm(...)``: same arguments, the bar kind chosen by ``mode()``."""
    if mode() == "widgets":
        from tqdm.notebook import tqdm as bar
    else:
        from tqdm.std import tqdm as bar

        stream = kwargs.get("file") or sys.stderr
        if not (hasattr(stream, "isatty") and stream.isatty()):  # a terminal redraws in place
            kwargs.setdefault("mininterval", HEADLESS_MININTERVAL_S)
    return bar(*args, **kwargs)
