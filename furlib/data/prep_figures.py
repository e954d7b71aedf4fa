"""Figures for stage 01: what was rejected, what was kept, and what training sees.

Each function takes the report ``prepare`` returned (and the data folder or a batch) and returns a
matplotlib Figure; nothing is shown: the notebook displays and closes it. Batches are ``rgb_m11``
NCHW.
"""

from pathlib import Path

import numpy as np

from furlib.images import to_uint8


def _figure(**kwargs):
    """A pyplot figure (so notebooks display it inline); the caller closes it after showing."""
    import matplotlib.pyplot as plt

    return plt.figure(layout="constrained", **kwargs)


def rejection_table(report: dict, examples: int = 3):
    """A pandas DataFrame: one row per rejection reason (and duplicates), count, first input ids."""
    import pandas as pd

    rows = {}
    for item in report["rejected"]:
        rows.setdefault(item["reason"], []).append(item["path"])
    if report["duplicates"]:
        rows["duplicate"] = [f"{d['path']} (= {d['duplicate_of']})" for d in report["duplicates"]]
    table = pd.DataFrame([{"reason": reason, "count": len(ids), "examples": ", ".join(ids[:examples])}
                          for reason, ids in rows.items()], columns=["reason", "count", "examples"])
    return table.sort_values("count", ascending=False, ignore_index=True)


def rejections_figure(report: dict):
    """Horizontal bars: inputs rejected by reason, plus duplicates, with counts."""
    counts = dict(report["counts"]["rejected_by_reason"])
    if report["counts"]["duplicates"]:
        counts["duplicate (kept once)"] = report["counts"]["duplicates"]
    fig = _figure(figsize=(7, 0.45 * max(len(counts), 2) + 1.2))
    ax = fig.add_subplot()
    total = report["counts"]["inputs"]
    ax.set_title(f"Not kept: {sum(counts.values())} of {total} inputs")
    if not counts:
        ax.text(0.5, 0.5, "nothing rejected", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    reasons = sorted(counts, key=counts.get)
    bars = ax.barh(reasons, [counts[r] for r in reasons], color="#c0504d")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("inputs")
    ax.set_xlim(0, max(counts.values()) * 1.15)
    return fig


def sizes_figure(report: dict):
    """Histograms of the source short side, the stored long side, and the aspect ratio."""
    accepted = report["accepted"]
    fig = _figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    if not accepted:
        fig.suptitle("no accepted images")
        return fig
    short = [min(a["source_width"], a["source_height"]) for a in accepted]
    long_side = [max(a["width"], a["height"]) for a in accepted]
    aspect = [a["width"] / a["height"] for a in accepted]
    for ax, values, label in ((axes[0], short, "source short side (px)"),
                              (axes[1], long_side, "stored long side (px)"),
                              (axes[2], aspect, "aspect ratio (width / height)")):
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#4f81bd")
        ax.set_xlabel(label)
        ax.set_ylabel("images")
    axes[0].axvline(report["settings"]["resolution"], color="k", ls="--", lw=1, label="resolution")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{len(accepted)} kept images")
    return fig


def samples_figure(report: dict, data_dir, per_split: int = 8, thumb: int = 256):
    """A row of stored images per split (train, val), thumbnails with their input ids."""
    from PIL import Image

    rows = [(s, _spread([a for a in report["accepted"] if a["split"] == s], per_split))
            for s in ("train", "val")]
    rows = [(s, items) for s, items in rows if items]
    cols = max([len(items) for _, items in rows] + [1])
    fig = _figure(figsize=(1.9 * cols, 2.2 * max(len(rows), 1)))
    axes = np.atleast_2d(fig.subplots(max(len(rows), 1), cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (split, items) in enumerate(rows):
        for c, item in enumerate(items):
            with Image.open(Path(data_dir) / item["file"]) as image:
                image.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
                axes[r, c].imshow(np.asarray(image.convert("RGB")))
            axes[r, c].set_title(f"{split}: {_short(item['id'])}\n{item['width']}x{item['height']}",
                                 fontsize=7)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no accepted images", ha="center", va="center")
    return fig


def crops_figure(batch_m11, columns: int = 8, title: str = "training crops"):
    """A grid of ``rgb_m11`` (N, 3, H, W) crops, shown at their own pixel size ratio."""
    pixels = to_uint8(batch_m11)  # NHWC for imshow
    count = len(pixels)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig = _figure(figsize=(1.6 * columns, 1.6 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < count:
            ax.imshow(pixels[i], interpolation="nearest")
    fig.suptitle(f"{title}: {count} x {pixels.shape[1]}x{pixels.shape[2]} px")
    return fig


def _spread(items: list, count: int) -> list:
    """``count`` items evenly spaced through the list (sources are in input order)."""
    if len(items) <= count:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def _short(input_id: str, keep: int = 22) -> str:
    return input_id if len(input_id) <= keep else "..." + input_id[-keep + 3:]
