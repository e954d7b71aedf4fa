"""The ablation's report (issue 20): the page, the held-out curves and the reconstruction grid.

Shared by the device phase (curves and grid from the fp32 EMA decoders, returned with the JSON,
so a call's findings never depend on a later CPU job) and the CPU phases: ``ablation.py report``
(the page from ``ablation.json`` alone, seconds) and ``ablation.py score`` (the page with KID and
FID from the returned fp16 decoders, ``ablation_local``).
"""

import json
from pathlib import Path

import numpy as np
import torch

import ablation_checks
import ablation_data
import variant_runs

GRID_IMAGES = 3  # held-out drawings in the reconstruction grid
ZOOM = 4         # the zoomed square is 1/ZOOM of the side, where the base errs most
TABLE = (("psnr", "PSNR (dB) ↑", ".2f"), ("ssim", "SSIM ↑", ".4f"), ("delta_e_ok", "ΔE_ok ↓", ".4f"),
         ("lpips_vgg", "LPIPS vgg ↓", ".4f"), ("lpips", "LPIPS alex ↓", ".4f"), ("kid", "KID ↓", ".4f"),
         ("rfid", "FID ↓", ".2f"), ("hf_ratio", "HF ratio (1 = orig.)", ".3f"), ("ab_shift", "colour shift ‖Δab‖ ↓", ".4f"))
LOCAL_ONLY = ("kid", "rfid")  # computed by the CPU phase with the FID Inception (too big to carry)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(columns: tuple, rows: list) -> list:
    """Markdown lines: a header of ``columns`` labels and one line per (name, {metric: value})."""
    lines = ["| model | " + " | ".join(label for _, label, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    return lines + [f"| {name} | " + " | ".join(_fmt(vals.get(k), f) for k, _, f in columns) + " |" for name, vals in rows]


def markdown(report: dict, summary: dict | None = None, notes=()) -> str:
    """The report page: ``notes`` (known faults of the run, first), what ran, the tables, the noise
    and stability tables; with the CPU phase's ``summary`` also KID/FID and the fp16 cross-check."""
    s, held = report["settings"], report["held_out"]
    local = (summary or {}).get("local", {})
    models = [("base (`tiny`, photo-trained)", "base", report["base"])] + [
        (r["name"], r["name"], r["scores"]) for r in report["results"]]
    reached = ", ".join(f"{r['name']} {r['train']['reached']}" for r in report["results"])
    head = [f"**Note:** {line}\n" for line in notes]
    head += [f"Compared at step **{report['step']}** (planned {s['steps']}; last checkpoint every variant saved; "
             f"reached: {reached}), batch {s['batch']}, {s['resolution']} px, base `tiny`, lr x{s['lr_scale']}, "
             f"LPIPS trunks: {report['lpips']}. Corpus: {report['corpus']['count']} drawings of seed "
             f"{report['corpus']['seed']} (long side <= {report['corpus']['max_side']} px). Device: "
             f"{report['device']}, torch {report['torch']}.", "",
             "Device calls: " + "; ".join(f"`{' '.join(c['argv'])}` ({c['training_s']:.0f} s training)"
                                          for c in report["calls"]), ""]
    if summary:
        pixels = ("the same pixels as the device's." if summary["same_pixels_as_device"] else
                  f"**other pixels than the device's** (Pillow {summary.get('pillow', '?')} here, "
                  f"{report['versions'].get('pillow', '?')} on the device draws them): every model's KID/FID is "
                  "on the same redraws, so they compare with each other; the PSNR check below shows how "
                  "far the redraws move a model's score.")
        kid = (f"KID and FID on {summary['fid_images']} (KID: one subset of all; FID is biased upwards below "
               f"2048 images). Redrawn here: {pixels}")
        columns = TABLE
    else:
        kid = ("KID and FID: not on this page (they need the FID Inception on the returned decoders: "
               "`ablation.py score`).")
        columns = tuple(t for t in TABLE if t[0] not in LOCAL_ONLY)
    art = [f"Held-out drawings: {held['art']} of seed {held['art_seed']}, never trained on. {kid}\n"]
    art += _table(columns, [(label, dict(sc["art"], **{k: local.get(key, {}).get(k) for k in LOCAL_ONLY}))
                            for label, key, sc in models])
    photo_columns = tuple(t for t in TABLE if t[0] not in LOCAL_ONLY)
    photos = [f"\nHeld-out photographs ({', '.join(held['photos'])}: all the built-in set holds; the base's "
              "domain, what the finetune costs there):\n"] + _table(photo_columns, [(label, sc["photos"]) for label, _, sc in models])
    if not held["photos"]:
        photos = ["\nHeld-out photographs: none were found on the device (scikit-image absent): not scored."]
    check = []
    if summary:
        check = ["\nfp16 decoders here vs the device's fp32 EMA, PSNR on the same drawings:\n",
                 "| model | device fp32 (dB) | here fp16 (dB) | mean diff | largest per-image diff |", "|---|---|---|---|---|"]
        check += [f"| {label} | {c['device_fp32']:.4f} | {c['local_fp16']:.4f} | {c['mean_diff_db']:+.4f} | "
                  f"{c['max_abs_diff_db']:.4f} |" for label, key, _ in models for c in [local[key]["psnr_check"]]]
    results = [dict(r, scores={"finetuned-ema": r["scores"]["art"]}) for r in report["results"]]
    twin = f"furception_v1_seed{s['noise_seed']}"
    noise = ablation_checks.noise_section(results, "furception_v1", twin) if s["noise_seed"] >= 0 else \
        "run-to-run noise: not measured (--noise-seed -1)\n"
    tail = ["", noise, variant_runs.stability(results),
            "Variants (02 overrides on top of the profile, before the scaling every variant shares):", ""]
    tail += [f"- `{n}`: params/{p}.yaml {json.dumps(o)}" for n, (p, o) in report["variants"].items()]
    if summary:
        tail += ["", f"Local CPU time: {json.dumps({k: round(v) for k, v in summary['cpu_seconds'].items()})} "
                 f"({summary['torch_threads']} threads)."]
    return "\n".join(head + art + photos + check + tail) + "\n"


def curves_png(report: dict, path: Path) -> None:
    """Held-out LPIPS(vgg), ΔE_ok and PSNR of every variant's EMA against steps (step 0: the base);
    a dotted line marks the step the table compares at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("lpips_vgg", "LPIPS (vgg) ↓"), ("delta_e_ok", "ΔE_ok ↓"), ("psnr", "PSNR (dB) ↑"))
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 4.5))
    for ax, (key, label) in zip(axes, keys):
        for r in report["results"]:
            ax.plot([p["step"] for p in r["curve"]], [p[key] for p in r["curve"]], marker=".", lw=1, label=r["name"])
        ax.axhline(report["results"][0]["curve"][0][key], color="k", ls="--", lw=1, label="base")
        ax.axvline(report["step"], color="grey", ls=":", lw=1, label=f"compared at {report['step']}")
        ax.set(xlabel="training step", ylabel=label, title=f"held-out {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"EMA decoders on the first {report['held_out']['curve_images']} held-out drawings "
                 f"(seed {report['held_out']['art_seed']}), {report['held_out']['resolution']} px")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grid_png(report: dict, x_u8: torch.Tensor, recons: dict, path: Path, precision: str = "fp32") -> None:
    """Rows: each held-out drawing, then a zoom of the square where the base errs most (boxed);
    columns: original, base, every variant's EMA decoder (``precision``), with per-image PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from furlib.evaluation.eval_figures import error_map, largest_difference
    from furlib.evaluation.metrics import psnr
    from furlib.images import to_uint8

    x_u8 = x_u8.cpu()
    orig = [to_uint8(ablation_data.m11(x)) for x in x_u8]
    columns = {"original": orig, **{k: [to_uint8(r) for r in v.cpu()] for k, v in recons.items()}}
    size = x_u8.shape[-1] // ZOOM
    fig, axes = plt.subplots(2 * len(orig), len(columns), figsize=(1.9 * len(columns), 3.9 * len(orig)), squeeze=False)
    for i, o in enumerate(orig):
        e_base = error_map(o, columns["base"][i])
        top, left = largest_difference(e_base, np.zeros_like(e_base), size)
        for j, (name, imgs) in enumerate(columns.items()):
            axes[2 * i, j].imshow(imgs[i])
            axes[2 * i + 1, j].imshow(imgs[i][top:top + size, left:left + size], interpolation="nearest")
            if name != "original":
                p = psnr(ablation_data.m11(x_u8[i:i + 1]), ablation_data.m11(torch.from_numpy(imgs[i]).permute(2, 0, 1)[None]))
                axes[2 * i, j].set_xlabel(f"{float(p):.2f} dB", fontsize=8)
            axes[2 * i, j].set_title(name if i == 0 else "", fontsize=9)
        axes[2 * i, 0].add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, ec="cyan", lw=1.5))
        axes[2 * i, 0].set_ylabel(f"held-out #{i}", fontsize=9)
        axes[2 * i + 1, 0].set_ylabel(f"zoom x{ZOOM} (box)", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"Held-out drawings at {x_u8.shape[-1]} px, {precision} EMA decoders at step {report['step']}\n"
                 f"zoom: the 1/{ZOOM}-side square where the base errs most", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_page(report: dict, out: Path, summary: dict | None = None, returned: Path | None = None,
               notes=()) -> Path:
    """``out/ablation.md``, ``out/curves.png``, ``out/device.json`` (the report as returned) and,
    where the ``returned`` folder holds one, the device's fp32 ``recon_grid.png``."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    if returned is not None and (returned / "recon_grid.png").exists():
        shutil.copyfile(returned / "recon_grid.png", out / "recon_grid.png")
    curves_png(report, out / "curves.png")
    (out / "device.json").write_text(json.dumps(report, indent=1))
    (out / "ablation.md").write_text(markdown(report, summary, notes))
    return out / "ablation.md"
