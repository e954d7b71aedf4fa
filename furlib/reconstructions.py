"""Reconstruction figures every stage shows: rows of images, columns of named ``rgb_m11`` NCHW
batches (e.g. original | base | current | EMA in 02's preview, input | base | exported in 04).

Functions return a matplotlib Figure or an array; the notebook shows it.
"""

import numpy as np
import torch

from furlib.images import to_rgb_01


def to_hwc01(rgb_m11: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (N, 3, H, W) in [-1, 1] -> HWC / NHWC numpy in [0, 1]."""
    return to_rgb_01(rgb_m11.detach().cpu()).movedim(-3, -1).numpy()


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
