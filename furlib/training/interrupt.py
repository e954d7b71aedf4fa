"""Stopping a training run by hand without losing its steps.

A first interrupt (Jupyter's or Colab's stop button, Ctrl-C) during 02 lets the step in progress
finish, saves a checkpoint of it and then stops with ``KeyboardInterrupt``; running 02 again
resumes from exactly there. A second interrupt stops at once, as Python would, losing the steps
since the last checkpoint (at most ``checkpoint_every``).

Only a single-process run on the main thread stops this way. Several processes would have to
agree on the step to stop at (a collective every step); they keep Python's own interrupt, like a
kill: at most ``checkpoint_every`` steps lost.
"""

import signal
import threading

_NOT_INSTALLED = object()


class StopAfterStep:
    """Context manager: ``requested`` turns true at the first SIGINT while it is open."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self._previous = enabled, False, _NOT_INSTALLED

    def __enter__(self):
        previous = signal.getsignal(signal.SIGINT)
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and previous is not signal.SIG_IGN):  # ignored (nohup &): so be it
            self._previous = previous
            signal.signal(signal.SIGINT, self._first)
        return self

    def _first(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._second)
        print("\ninterrupted: stopping after this step with a checkpoint of it (interrupt again to "
              "stop at once, losing the steps since the last checkpoint)", flush=True)

    def _second(self, signum, frame):
        self._restore()
        raise KeyboardInterrupt

    def _restore(self):
        if self._previous is not _NOT_INSTALLED:  # None: a handler set outside Python; Python's then
            handler, self._previous = self._previous, _NOT_INSTALLED
            signal.signal(signal.SIGINT, signal.default_int_handler if handler is None else handler)

    def __exit__(self, *exc):
        self._restore()
