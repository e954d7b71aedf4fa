"""What a resume may change: the checkpoint's settings against the requested ones.

A resumed run must train the run it continues. Settings that change what is trained (the recipe,
the base, the data crops, the seed, the global batch) refuse unless named in
``resume_with_changes``; the ones that only change cadence, speed or where things go are noted.
A checkpoint of another base model is refused in one sentence, whatever the list says, when its
architecture differs too (the strict load would otherwise report every tensor).
"""

# only how often, how fast or where: the same weights come out (speed knobs: tested equal)
HARMLESS = {"run_name", "outputs_dir", "device", "num_gpus", "num_workers", "pixel_cache", "resume",
            "resume_with_changes", "on_bad_checkpoint", "checkpoint_every", "keep_checkpoints",
            "log_every", "plot_every", "preview_images", "max_bad_steps", "channels_last",
            "torch_compile", "phase_upsample", "gradient_checkpointing", "max_steps"}


def compare(state: dict, requested: dict, processes: int, ckpt: str) -> list[str]:
    """Notes on harmless changes; raises ValueError naming recipe changes not allowed."""
    saved = state.get("settings")
    if not saved:
        return [f"{ckpt} records no settings (an older version): the resume cannot be checked against them"]
    allowed = set(requested.get("resume_with_changes", []))
    base = (state.get("base_model"), requested.get("base_model"))
    if base[0] and base[0] != base[1] and "base_model" not in allowed:
        raise ValueError(f"{ckpt} was trained from base_model={base[0]!r}, not {base[1]!r}: set base_model "
                         f"back, or choose a new run_name to train from {base[1]!r}")
    saved = dict(saved, processes=state.get("processes", 1))
    wanted = dict(requested, processes=processes)
    changed = {k: (saved[k], wanted[k]) for k in saved if k in wanted and saved[k] != wanted[k]}
    recipe = {k: v for k, v in changed.items() if k not in HARMLESS or
              (k == "max_steps" and wanted.get("lr_schedule") == "cosine")}  # the cosine ends at max_steps
    refused = {k: v for k, v in recipe.items() if k not in allowed}
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"resuming {ckpt} with changed recipe settings ({listed}) would train a different "
                         f"run: set them back, choose a new run_name, or list them in resume_with_changes="
                         f"{sorted(set(refused) | allowed)!r} if the change is intended")
    notes = [f"resume changes {k}: {a!r} -> {b!r}" + ("" if k in HARMLESS else " (allowed by resume_with_changes)")
             for k, (a, b) in changed.items() if k not in ("resume_with_changes",)]
    return notes


def thread_note(state: dict, threads: int, device_type: str) -> list[str]:
    """On the CPU a resume repeats an uninterrupted run bit for bit only at the same thread count."""
    saved = state.get("cpu_threads")
    if device_type == "cpu" and saved and saved != threads:
        return [f"CPU threads {saved} -> {threads}: the resumed run is not bit-identical to an uninterrupted "
                "one (reductions split differently); set torch.set_num_threads to match for exactness"]
    return []
