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
            "torch_compile", "phase_upsample", "gradient_checkpointing", "max_steps", "compile_cache_dir"}


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
    saved = dict(_defaults(), **saved, processes=state.get("processes", 1))
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


def _defaults() -> dict:
    """02's defaults: the values of settings a checkpoint of an older version does not record
    (added since, each defaulting to what that version did), so setting one on resume is a change."""
    import dataclasses

    from furlib.training.settings import TrainSettings

    return dataclasses.asdict(TrainSettings())


def thread_note(state: dict, threads: int, device_type: str) -> list[str]:
    """On the CPU a resume repeats an uninterrupted run bit for bit only at the same thread count."""
    saved = state.get("cpu_threads")
    if device_type == "cpu" and saved and saved != threads:
        return [f"CPU threads {saved} -> {threads}: the resumed run is not bit-identical to an uninterrupted "
                "one (reductions split differently); set torch.set_num_threads to match for exactness"]
    return []


def data_fingerprint(train_dir) -> str:
    """SHA-256 of the sorted names in 01's data/train (names are the images' content hashes, so
    an added, removed or changed image changes it); '' for data that is streamed."""
    import hashlib
    from pathlib import Path

    names = sorted(p.name for p in Path(train_dir).iterdir() if not p.name.startswith(".")) \
        if Path(train_dir).is_dir() else []
    return hashlib.sha256("\n".join(names).encode()).hexdigest() if names else ""


def weights_fingerprint(module) -> str:
    """SHA-256 of a model's tensors as loaded (names, dtypes, values): one number for the base,
    whichever form it came in (hub id, folder, single file), so a file replaced under the same
    path is seen."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compare_fingerprints(state: dict, current: dict, allowed, ckpt: str) -> list[str]:
    """The base's and the data's fingerprints against the checkpoint's record. Another base under
    the same name changes the frozen encoder, so the recipe: refused unless ``base_model`` is in
    ``resume_with_changes``. Changed training data is noted (adding images is a normal resume)."""
    saved = state.get("fingerprints")
    if not saved:
        return [f"{ckpt} records no base or data fingerprint (an older version): changes to them cannot be seen"]
    notes = []
    if saved.get("base") and current.get("base") and saved["base"] != current["base"]:
        if "base_model" not in set(allowed):
            raise ValueError(f"base_model {state.get('base_model')!r} holds other weights than when {ckpt} was "
                             "trained (the file or folder was replaced): the frozen encoder, and so the run, would "
                             "change. Put the original back, choose a new run_name, or list 'base_model' in "
                             "resume_with_changes if the change is intended")
        notes.append("resume changes the base model's weights (allowed by resume_with_changes)")
    if saved.get("data") != current.get("data"):
        notes.append(f"NOTE: the training images changed since {ckpt} (data/train has other files): the "
                     "resumed run continues on the new set")
    return notes
