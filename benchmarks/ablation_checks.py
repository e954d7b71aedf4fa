"""Checks before an ablation table is believed (issue 26): did each variant's decoder change at
all, and which differences between variants are larger than the run-to-run noise measured by
training the reference variant again with another seed.

Conventions: a variant's result is ``variant_runs.score_variant``'s dict; its ``scores`` hold
``{model: {metric: mean over the val split}}`` with models ``base``, ``finetuned-ema`` and
``finetuned-raw``.
"""

from pathlib import Path

import torch

# Below this relative change the stored fp32 weights only differ by rounding (fp32 eps 1.2e-7 per
# element; a real AdamW step at lr 5e-7 moves them by ~1e-5 of their norm).
UNCHANGED_BELOW = 1e-8
NOISE_METRICS = {"psnr": "PSNR (dB)", "delta_e_ok": "ΔE_ok", "hf_ratio": "HF ratio", "ab_shift": "ab shift",
                 "lpips_vgg": "LPIPS vgg", "lpips": "LPIPS alex"}  # those the scores hold


def decoder_change(ckpt: Path) -> dict:
    """{'raw': ..., 'ema': ...}: ||decoder - base decoder|| / ||base decoder|| over all
    decoder-side tensors of checkpoint ``ckpt``, the base being the one its run trained from."""
    from furlib.models import decoder_state, load_vae
    from furlib import checkpoint

    state = checkpoint.read_state(ckpt)
    seed = state.get("settings", {}).get("seed", 0)
    base = decoder_state(load_vae(state["base_model"], state.get("base_config", ""), seed))
    base_norm = torch.sqrt(sum(v.double().pow(2).sum() for v in base.values()))
    out = {}
    for which in ("raw", "ema"):
        weights = checkpoint.load_decoder_weights(ckpt, which)
        diff = torch.sqrt(sum((weights[k].double() - v.double()).pow(2).sum() for k, v in base.items()))
        out[which] = float(diff / base_norm)
    return out


def refuse_unchanged(changes: dict, step: int) -> None:
    """Raise naming every variant whose raw or EMA decoder is still the base's at ``step``:
    its row would report base == finetuned and look like a finding."""
    frozen = {name: c for name, c in changes.items() if min(c.values()) < UNCHANGED_BELOW}
    if frozen:
        detail = "; ".join(f"{n}: raw {c['raw']:.2g}, EMA {c['ema']:.2g}" for n, c in frozen.items())
        raise RuntimeError(
            f"refusing to report: the decoder of {sorted(frozen)} did not change by step {step} "
            f"(relative change to the base below {UNCHANGED_BELOW:g}: {detail}). Its scores would equal the "
            "base's. Check the learning rate (--lr-scale, the profile's lr), that the steps were not all "
            "skipped (the variant's log), and that --steps reaches a checkpoint after training started.")


def noise_section(results: list, reference: str, twin: str, model: str = "finetuned-ema") -> str:
    """Markdown: the run-to-run noise (|reference - twin| per metric, the same variant with another
    seed) and, per variant, which differences to the reference are inside it."""
    by_name = {r["name"]: r for r in results if "scores" in r}
    if reference not in by_name or twin not in by_name:
        return f"run-to-run noise: not measured ({reference} or {twin} has no scores)\n"
    ref = by_name[reference]["scores"][model]
    metrics = {k: label for k, label in NOISE_METRICS.items() if k in ref}
    noise = {k: abs(ref[k] - by_name[twin]["scores"][model][k]) for k in metrics}
    lines = [f"run-to-run noise ({model}, {reference} vs {twin}, same settings, other seed): " + ", ".join(
        f"{label} {noise[k]:.4g}" for k, label in metrics.items()), "",
        "| variant | " + " | ".join(f"Δ{label} vs {reference}" for label in metrics.values()) + " |",
        "|---|" + "---|" * len(metrics)]
    for name, r in by_name.items():
        if name in (reference, twin):
            continue
        cells = []
        for k in metrics:
            d = r["scores"][model][k] - ref[k]
            cells.append(f"{d:+.4g}" + (" (inside noise)" if abs(d) <= noise[k] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nA difference marked *inside noise* is no larger than the gap between two seeds of the "
                 "same recipe: this run cannot tell that variant from the reference on that metric.")
    return "\n".join(lines) + "\n"
