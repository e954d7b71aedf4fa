"""Stage 03's report: an ``EvalResult`` as summary tables, Markdown for the model card, and files.

Files under ``outputs/<run>/eval/``: ``per_image.csv``, ``metrics.{json,csv,md}``.
"""

import json
import math
from pathlib import Path

import pandas as pd

from furlib.evaluation import metrics
from furlib.evaluation.evaluate import EvalResult

# Table columns: metric key -> (header, decimals, signed); arrows say which way is better.
TABLE = {"psnr": ("PSNR ↑", 2, False), "ssim": ("SSIM ↑", 3, False), "lpips": ("LPIPS-Alex ↓", 3, False),
         "lpips_vgg": ("LPIPS-VGG ↓", 3, False),
         "delta_e_ok": ("ΔE_ok ↓", 4, False), "d_a": ("Δa", 4, True), "d_b": ("Δb", 4, True),
         "ab_shift": ("‖Δab‖ ↓", 4, False), "hf_ratio": ("HF ratio (1 = orig.)", 3, False)}


def summarize(result: EvalResult) -> pd.DataFrame:
    """Index: model (evaluation order); columns n_images, rFID, KID, then <metric> and <metric>_std."""
    df = result.per_image
    order = list(dict.fromkeys(df["model"]))
    stats = df.groupby("model", sort=False)[list(metrics.PER_IMAGE)].agg(["mean", "std"]).loc[order]
    stats.columns = [k if agg == "mean" else f"{k}_std" for k, agg in stats.columns]
    stats.insert(0, "KID", [result.kid.get(m, "n/a") for m in order])
    stats.insert(0, "rFID", [result.rfid.get(m, "n/a") for m in order])
    stats.insert(0, "n_images", df.groupby("model", sort=False).size().loc[order])
    return stats


def _cell(mean, std, decimals: int, signed: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{decimals}f}}"
    return fmt.format(mean) + ("" if std is None or math.isnan(std) else f" ± {std:.{decimals}f}")


def summary_table(result: EvalResult) -> pd.DataFrame:
    """The card-shaped table as strings: rFID / KID / PSNR / SSIM / LPIPS / Oklab, mean ± std."""
    s = summarize(result)
    out = pd.DataFrame(index=s.index)
    out["rFID ↓"] = [f"{v:.2f}" if isinstance(v, float) else "n/a" for v in s["rFID"]]
    out["KID ↓"] = [f"{v:.4f}" if isinstance(v, float) else "n/a" for v in s["KID"]]  # can be < 0
    for key, (head, dec, signed) in TABLE.items():
        out[head] = [_cell(m, sd, dec, signed) for m, sd in zip(s[key], s[f"{key}_std"])]
    return out


def markdown(result: EvalResult, model_notes: dict | None = None) -> str:
    """Self-contained Markdown table plus a note line (included verbatim by the model card)."""
    t = summary_table(result)
    lines = ["| model | " + " | ".join(t.columns) + " |", "|---" * (len(t.columns) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(row) + " |" for m, row in zip(t.index, t.values.tolist())]
    n = result.notes
    note = (f"_{n['n_images']} images of {n['image_set']}, {n['resolution']}×{n['resolution']} (short side "
            f"Lanczos-resized, centre crop; posterior mode); mean ± std over images. {n['lpips']}. "
            f"{n['rfid']}. Oklab: ΔE_ok mean distance, Δa/Δb mean tint of reconstruction − original, "
            f"HF ratio = Laplacian energy reconstruction / original (> 1 adds noise, < 1 blurs)._")
    if n.get("upscaled"):
        note += (f"\n\n_{n['upscaled']} of the {n['n_images']} images were smaller than {n['resolution']} px and were "
                 f"enlarged (e.g. {', '.join(map(str, n['upscaled_examples']))}): smooth, they flatter every score; "
                 "lower eval_resolution or leave them out._")
    untrained = [k for k, v in (model_notes or {}).items() if not v.get("pretrained", True)]
    if untrained:
        note += f"\n\n_Not pretrained (test weights, numbers mean nothing): {', '.join(untrained)}._"
    return "\n".join(lines) + "\n\n" + note + "\n"


def summary_json(result: EvalResult, model_notes: dict | None = None) -> dict:
    s = summarize(result)
    clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else (None if math.isnan(v) else str(v))  # noqa: E731
    models = {m: {"rFID": clean(row["rFID"]), "KID": clean(row["KID"]), "n_images": int(row["n_images"]), **(model_notes or {}).get(m, {}),
                  **{k: {"mean": clean(float(row[k])), "std": clean(float(row[f"{k}_std"]))} for k in metrics.PER_IMAGE}}
              for m, row in s.iterrows()}
    return {"notes": result.notes, "models": models}


def write_outputs(result: EvalResult, eval_dir, model_notes: dict | None = None) -> dict:
    """per_image.csv, metrics.csv (numeric summary), metrics.json, metrics.md; returns their paths."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: eval_dir / f for k, f in (("per_image", "per_image.csv"), ("csv", "metrics.csv"),
                                          ("json", "metrics.json"), ("md", "metrics.md"))}
    result.per_image.to_csv(paths["per_image"], index=False)
    summarize(result).to_csv(paths["csv"], index_label="model")
    paths["json"].write_text(json.dumps(summary_json(result, model_notes), indent=1, ensure_ascii=False))
    paths["md"].write_text(markdown(result, model_notes))
    return paths


def add_reference(result: EvalResult, eval_dir, name: str, model_notes: dict | None = None) -> dict:
    """A second set scored apart (``reference_source``): its own files in ``eval_dir/reference``
    and a section of its own at the end of ``eval_dir/metrics.md``; returns its paths."""
    paths = write_outputs(result, Path(eval_dir) / "reference", model_notes)
    md = Path(eval_dir) / "metrics.md"
    md.write_text(md.read_text() + f"\n\n## Reference set: {name}\n\n" + markdown(result, model_notes))
    return paths
