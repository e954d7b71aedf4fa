"""Training checkpoints: atomic, safetensors only, the last K kept.

Layout under ``outputs/<run_name>/checkpoints/``::

    step_0000100/
        decoder.safetensors     raw decoder side (AutoencoderKL keys: decoder.*, post_quant_conv.*)
        ema.safetensors         EMA of the same tensors (fp32) -- the release weights
        critic.safetensors      critic weights
        optim_decoder.safetensors, optim_critic.safetensors   optimizer tensors
        state.json              step, base_model, counters, optimizer hyper-parameters, scaler
    latest                      one line: the name of the newest complete step folder

A folder is written as ``.tmp-step_*`` and renamed into place, then ``latest`` is replaced
atomically: a kill at any moment leaves the previous checkpoint as ``latest``. Nothing here
unpickles: tensors are safetensors, everything else JSON.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "decoder.safetensors"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, tensors: dict, state: dict, keep: int = 3) -> Path:
    """Write ``{file_stem: {name: tensor}}`` plus ``state.json``; return the new folder."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp, final = ckpt_root / f".tmp-{name}", ckpt_root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, named in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, tmp / f"{stem}.safetensors")
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
    if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_root / "latest", name + "\n")
    for old in sorted(ckpt_root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None if it has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / "state.json").exists():
        raise RuntimeError(f"{pointer} names {folder.name}, which is incomplete; delete it to start over")
    return folder


def read_state(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / "state.json").read_text())


def run_base(ckpt_dir: Path, base_model: str = "", base_config: str = "") -> tuple[str, str, dict]:
    """(base_model, base_config, state): the given base, else the one the run trained from."""
    state = read_state(ckpt_dir)
    if not base_model:  # the base the run trained from, with the architecture it used
        base_model, base_config = state.get("base_model", ""), state.get("base_config", "")
    if not base_model:
        raise ValueError(f"base_model: {ckpt_dir}/state.json names no base model; pass base_model")
    return base_model, base_config or "", state


def load_tensors(ckpt_dir: Path, stem: str) -> dict:
    return load_file(Path(ckpt_dir) / f"{stem}.safetensors")


def load_decoder_weights(ckpt_dir: Path, which: str = "ema") -> dict:
    """Decoder-side weights of a checkpoint: ``which`` is 'ema' (the release) or 'raw'."""
    if which not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {which!r}")
    return load_file(Path(ckpt_dir) / WEIGHT_FILES[which])


def find_run_checkpoint(run_dir: Path) -> Path:
    """Like ``latest_checkpoint`` but a missing one is a clear error for 03/04."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint: run 02_train with this run_name first")
    return ckpt


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, val in slots.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for flat, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
