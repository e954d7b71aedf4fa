"""Training figures: loss curves, adaptive weight, critic scores, and reconstruction strips.

Functions return matplotlib Figures; the notebook shows them. Images are ``rgb_m11`` NCHW.
"""

import numpy as np
import torch

from furlib.images import to_rgb_01


def to_hwc01(rgb_m11: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (N, 3, H, W) in [-1, 1] -> HWC / NHWC numpy in [0, 1]."""
    return to_rgb_01(rgb_m11.detach().cpu()).movedim(-3, -1).numpy()


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


def reconstruction_strip(columns: dict, title: str = ""):
    """Rows are images; columns are named ``rgb_m11`` batches, e.g. original | base | current | EMA."""
    import matplotlib.pyplot as plt

    names = list(columns)
    n = columns[names[0]].shape[0]
    fig, axes = plt.subplots(n, len(names), figsize=(2.6 * len(names), 2.6 * n), squeeze=False)
    for j, name in enumerate(names):
        imgs = to_hwc01(columns[name])
        for i in range(n):
            axes[i, j].imshow(imgs[i], interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[0, j].set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def strip_grid(columns: dict) -> np.ndarray:
    """The same strip as one HWC [0, 1] array, for TensorBoard."""
    rows = [np.concatenate(list(to_hwc01(c)), axis=0) for c in columns.values()]
    return np.concatenate(rows, axis=1)
