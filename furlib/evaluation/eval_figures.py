"""Stage-03 figures: where VAEs differ, metric distributions, decode checks, and a widget.

Examples are the dicts ``furlib.evaluation.evaluate`` keeps: ``{"id", "delta", "original": uint8 HWC,
"recons": {model: uint8 HWC}}``. Error maps are the per-pixel mean |recon - original| over RGB,
in [0, 1] units. Functions return matplotlib Figures (or an ipywidgets widget); nothing is shown.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ERROR_CMAP = "inferno"
BOX_METRICS = (("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS ↓"),
               ("delta_e_ok", "ΔE_ok ↓"), ("ab_shift", "‖Δab‖ colour shift ↓"), ("hf_ratio", "HF ratio (1 = orig.)"))


def error_map(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """(H, W) mean absolute error over RGB, [0, 1] units."""
    return np.abs(recon.astype(np.float32) - original.astype(np.float32)).mean(-1) / 255.0


def largest_difference(err_a: np.ndarray, err_b: np.ndarray, size: int) -> tuple:
    """(top, left) of the size x size window where the two error maps differ most."""
    d = torch.from_numpy(np.abs(err_a - err_b))[None, None]
    mean = F.avg_pool2d(d, size, stride=1)[0, 0]
    top, left = divmod(int(mean.argmax()), mean.shape[1])
    return top, left


def _label(example: dict, model: str, metrics: dict | None) -> str:
    m = (metrics or {}).get((example["id"], model))
    return model if m is None else f"{model}\n{m['psnr']:.2f} dB · LPIPS {m['lpips']:.3f}"


def comparison_figure(examples: list, base: str, finetuned: str, title: str = "", per_image=None):
    """Rows: original | base | finetuned | |error| base | |error| finetuned | zoomed crops.

    Both error columns share one colour scale (vmax = the 99.5th percentile over the figure).
    The crop (a quarter of the side) sits where the two errors differ most; a box marks it.
    ``per_image`` (the evaluation's DataFrame) adds per-image PSNR / LPIPS to the labels.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lookup = None if per_image is None else per_image.set_index(["image", "model"]).to_dict("index")
    errs = [(error_map(e["original"], e["recons"][base]), error_map(e["original"], e["recons"][finetuned]))
            for e in examples]
    vmax = max(1 / 255, max(float(np.percentile(np.stack(p), 99.5)) for p in errs))
    heads = ["original", base, finetuned, f"|error| {base}", f"|error| {finetuned}",
             "zoom: original", f"zoom: {base}", f"zoom: {finetuned}"]
    fig, axes = plt.subplots(len(examples), 8, figsize=(18, 2.3 * len(examples) + 0.8), squeeze=False,
                             layout="constrained")
    for row, (ex, (e_base, e_ft)) in enumerate(zip(examples, errs)):
        size = max(8, ex["original"].shape[0] // 4)
        top, left = largest_difference(e_base, e_ft, size)
        crop = lambda a: a[top:top + size, left:left + size]  # noqa: E731
        imgs = [ex["original"], ex["recons"][base], ex["recons"][finetuned]]
        for ax, img in zip(axes[row, :3], imgs):
            ax.imshow(img)
        axes[row, 0].add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, ec="cyan", lw=1.5))
        for ax, e in zip(axes[row, 3:5], (e_base, e_ft)):
            heat = ax.imshow(e, cmap=ERROR_CMAP, vmin=0, vmax=vmax)
        for ax, img in zip(axes[row, 5:], imgs):
            ax.imshow(crop(img), interpolation="nearest")
        axes[row, 1].set_xlabel(_label(ex, base, lookup), fontsize=8)
        axes[row, 2].set_xlabel(_label(ex, finetuned, lookup), fontsize=8)
        delta = f"\n{ex.get('delta_label', 'Δ')} {ex['delta']:+.3g}" if np.isfinite(ex["delta"]) else ""
        axes[row, 0].set_ylabel(f"{ex['id']}{delta}", fontsize=8)
    for ax, head in zip(axes[0], heads):
        ax.set_title(head, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.colorbar(heat, ax=axes[:, 4], shrink=0.9, label="|error|, 0-1 (shared scale)")
    return fig


def metrics_figure(per_image, metrics=BOX_METRICS):
    """Box plots per model of the per-image metrics (metrics with no values are skipped)."""
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(per_image["model"]))
    present = [(k, t) for k, t in metrics if per_image[k].notna().any()]
    fig, axes = plt.subplots(1, len(present), figsize=(2.2 + 1.1 * len(models) * len(present) / 2, 3.6),
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        data = [per_image.loc[per_image["model"] == m, key].replace([np.inf, -np.inf], np.nan).dropna()
                for m in models]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if key == "hf_ratio":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    return fig


def tiling_figure(details: dict):
    """Column-wise |tiled - full| decode error per model; shaded bands are the tile blends."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for name, d in details.items():
        t = d["tiled"]
        ax.plot(t["col_profile"], label=f"{name} (seam score {t['seam_score']:.2f})", lw=1)
    for a, b in next(iter(details.values()))["tiled"]["bands"]:
        ax.axvspan(a, b, color="grey", alpha=0.2)
    ax.set_xlabel("image column (px); grey: tile blend bands")
    ax.set_ylabel("mean |tiled − full| (0-1)")
    ax.set_title("Tiled vs untiled decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fp16_figure(details: dict):
    """Peak |activation| per decoder block in float16, log scale, against fp16's maximum."""
    import matplotlib.pyplot as plt

    ran = {k: d["fp16"]["peaks"] for k, d in details.items() if "peaks" in d["fp16"]}
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for name, peaks in ran.items():
        ax.plot(range(len(peaks)), [min(p, 1e6) for p in peaks.values()], marker=".", label=name)
    blocks = list(next(iter(ran.values()), {}))
    ax.set_xticks(range(len(blocks)), blocks, rotation=70, ha="right", fontsize=6)
    ax.axhline(65504, color="red", ls="--", lw=1, label="fp16 max (65504)")
    ax.set_yscale("log")
    ax.set_ylabel("peak |activation| (inf/NaN drawn at 1e6)")
    ax.set_title("float16 decode: peak activations per decoder block" + ("" if ran else " (not run)"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def wipe(left: np.ndarray, right: np.ndarray, position: float) -> np.ndarray:
    """``left`` up to the column at ``position`` (0-1), ``right`` after it, a white line between."""
    col = int(round(position * left.shape[1]))
    out = np.concatenate([left[:, :col], right[:, col:]], axis=1)
    out[:, max(col - 1, 0):col + 1] = 255
    return out


def wipe_figure(example: dict, base: str, finetuned: str, positions=(1.0, 0.5, 0.0)):
    """Static stand-in for the widget: the wipe between base (left) and finetuned (right)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(positions), figsize=(3.4 * len(positions), 3.6), squeeze=False)
    for ax, p in zip(axes[0], positions):
        ax.imshow(wipe(example["recons"][base], example["recons"][finetuned], p), interpolation="nearest")
        ax.set_title(f"{base} | {finetuned} at {p:.0%}" if 0 < p < 1 else (finetuned if p == 0 else base), fontsize=9)
        ax.axis("off")
    fig.suptitle(example["id"], fontsize=10)
    fig.tight_layout()
    return fig


def _png(img: np.ndarray, min_side: int = 384) -> bytes:
    import io

    from PIL import Image

    im = Image.fromarray(img)
    scale = max(1, -(-min_side // min(im.size)))  # small eval crops are enlarged, pixel-exact
    buf = io.BytesIO()
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def comparison_widget(examples: list, base: str, finetuned: str):
    """ipywidgets: pick an image and drag a wipe between ``base`` (left) and ``finetuned`` (right)."""
    import ipywidgets as w

    pick = w.Dropdown(options=[(e["id"], i) for i, e in enumerate(examples)], description="image")
    left = w.ToggleButtons(options=["original", *examples[0]["recons"]], value=base, description="left")
    right = w.ToggleButtons(options=["original", *examples[0]["recons"]], value=finetuned, description="right")
    pos = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="wipe")
    view = w.Image(format="png")

    def get(ex, name):
        return ex["original"] if name == "original" else ex["recons"][name]

    def redraw(_=None):
        ex = examples[pick.value]
        view.value = _png(wipe(get(ex, left.value), get(ex, right.value), pos.value))

    for control in (pick, left, right, pos):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([pick, left, right, pos, view])


def save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
