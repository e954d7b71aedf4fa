"""Stage 01's report: every input once (accepted, duplicate or rejected), the split, and the check
02 runs on it before loading any model (``check_prepared``).

The split is a function of the pixel hash alone: val iff ``int(hash[:8], 16) / 2**32 <
val_fraction``, then only the ``val_max`` smallest val hashes stay in val. The filters
(``resolution``, ``max_pixels``) apply here, to journal entries, so changing them re-decodes nothing.
"""

from collections import Counter
from pathlib import Path

from furlib.runinfo import read_json


def check_prepared(data_dir, resolution: int) -> dict:
    """Before 02 loads any model: the prepared data exists and fits ``resolution``; its counts.

    Raises ValueError naming the fix (01 with this resolution only filters: nothing is decoded)."""
    path = Path(data_dir) / "report.json"
    if not path.exists():
        raise ValueError(f"no prepared data in {data_dir} (no report.json: 01 has not run, or has not "
                         "finished): run notebooks/01_data_prep with the same run_name (all shards, if "
                         "sharded); a stopped run resumes where it stopped")
    fix = "run 01_data_prep again with this run_name (it rewrites report.json from its journal; nothing is decoded again)"
    report = read_json(path, fix)
    try:
        small = [a for a in report["accepted"] if min(a["width"], a["height"]) < resolution]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} lacks or garbles {err}: {fix}") from err
    if small:
        worst = min(small, key=lambda a: min(a["width"], a["height"]))
        raise ValueError(
            f"resolution={resolution} is larger than {len(small)} prepared images (smallest short "
            f"side {min(worst['width'], worst['height'])} px: {worst['file']}); re-run "
            f"01_data_prep with resolution={resolution} (it only filters, nothing is decoded "
            f"again), or train at the resolution 01 used ({report['settings'].get('resolution')})")
    return report["counts"]


def check_trainable(report: dict) -> None:
    """After a complete 01: at least one image kept for training, else a ValueError that says why
    (the rejections by reason, a few examples) and what to change."""
    counts = report["counts"]
    if counts["train"] or not report.get("complete", True):
        return
    why = ", ".join(f"{reason} {n}" for reason, n in counts["rejected_by_reason"].items()) or "none"
    examples = "; ".join(f"{r['path']}: {r['reason']} {r['detail']}".strip() for r in report["rejected"][:3])
    hints = []
    if counts["rejected_by_reason"].get("too_small") or counts["rejected_by_reason"].get("too_small_after_cap"):
        hints.append("a smaller resolution (or a larger max_side) keeps the small images")
    if counts["val"]:
        hints.append(f"all {counts['val']} kept images went to val: lower val_fraction or val_max, or add images")
    raise ValueError(f"no image kept for training: {counts['inputs']} inputs, {counts['accepted']} kept, "
                     f"{counts['duplicates']} duplicates; rejected by reason: {why}"
                     + (f" (e.g. {examples})" if examples else "") + ". "
                     + ("; ".join(hints) or "point source at a folder or table of images") + ".")


def is_val(digest: str, val_fraction: float) -> bool:
    return int(digest[:8], 16) / 2**32 < val_fraction


def _filtered(e: dict, filters: dict) -> dict:
    """An ok entry as the current filters see it: unchanged, or rejected (its file is kept)."""
    if e["status"] == "ok" and min(e["width"], e["height"]) < filters["resolution"]:
        reason = "too_small" if e["width"] == e["source_width"] else "too_small_after_cap"
        return dict(e, status="rejected", reason=reason,
                    detail=f"{e['width']}x{e['height']}, short side < {filters['resolution']}")
    if e["status"] == "ok" and e["source_width"] * e["source_height"] > filters["max_pixels"]:
        return dict(e, status="rejected", reason="too_many_pixels",
                    detail=f"{e['source_width']}x{e['source_height']} > {filters['max_pixels']}")
    return e


def build_report(entries: list, val_fraction: float, val_max: int, filters: dict) -> dict:
    """Every input once: accepted (first of its hash), duplicate (later ones) or rejected."""
    first, accepted, duplicates, rejected = {}, [], [], []
    for e in (_filtered(e, filters) for e in entries):
        if e["status"] != "ok":
            rejected.append({"path": e["id"], "reason": e["reason"], "detail": e.get("detail", "")})
        elif e["hash"] in first:
            duplicates.append({"path": e["id"], "duplicate_of": first[e["hash"]], "hash": e["hash"]})
        else:
            first[e["hash"]] = e["id"]
            accepted.append({k: e[k] for k in ("id", "file", "width", "height", "source_width",
                                               "source_height", "hash")})
            accepted[-1]["stored"] = e.get("stored", "converted")  # older journals: all PNGs
    val = sorted(a["hash"] for a in accepted if is_val(a["hash"], val_fraction))
    keep = set(val[:val_max] if val_max > 0 else val)
    for a in accepted:
        a["split"] = "val" if a["hash"] in keep else "train"
        a["file"] = f"{a['split']}/{a['file']}"
    counts = {"inputs": len(entries), "accepted": len(accepted), "train": len(accepted) - len(keep),
              "val": len(keep), "val_over_cap": len(val) - len(keep), "rejected": len(rejected),
              "rejected_by_reason": dict(Counter(r["reason"] for r in rejected).most_common()),
              "duplicates": len(duplicates),
              "stored_originals": sum(a["stored"] == "original" for a in accepted)}
    versions = sorted({e["version"] for e in entries if "version" in e})
    return {"counts": counts, "source_versions": versions, "accepted": accepted,
            "rejected": rejected, "duplicates": duplicates}
