"""02's dashboard: loss curves, adaptive weight, critic scores and penalties from the log rows.

Returns a matplotlib Figure; the notebook shows it. (The reconstruction strip 02 shows beside it
is shared with 04: ``furlib.reconstructions``.)
"""

import numpy as np


def _series(history: list, key: str):
    pts = [(r["step"], r[key]) for r in history if key in r and np.isfinite(r[key])]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (None, None)


def _smooth(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    k = max(1, int(len(y) * frac))
    return np.convolve(y, np.ones(k) / k, mode="valid") if len(y) > k else y


def training_dashboard(history: list):
    """2x2: reconstruction terms, critic scores, adaptive weight, critic penalties."""
    import matplotlib.pyplot as plt

    panels = [("Reconstruction", ["rec/total", "rec/mae", "rec/mse", "rec/lpips"], True),
              ("Critic scores", ["critic/real", "critic/fake", "gan/generator"], False),
              ("Adaptive critic weight", ["gan/weight"], True),
              ("Critic loss and penalty", ["critic/loss", "critic/gp", "critic/r1"], False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for ax, (title, keys, log_y) in zip(axes.flat, panels):
        for key in keys:
            x, y = _series(history, key)
            if x is None:
                continue
            ys = _smooth(y)
            ax.plot(x[len(x) - len(ys):], ys, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_y and ax.lines and all((l.get_ydata() > 0).all() for l in ax.lines):
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not active yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig
