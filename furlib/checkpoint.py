"""Training checkpoints: atomic, verified, safetensors only, the last K kept.

Layout under ``outputs/<run_name>/checkpoints/``::

    step_0000100/
        decoder.safetensors     raw decoder side (AutoencoderKL keys: decoder.*, post_quant_conv.*)
        ema.safetensors         EMA of the same tensors (fp32) -- the release weights
        critic.safetensors      critic weights
        optim_decoder.safetensors, optim_critic.safetensors   optimizer tensors
        state.json              step, base_model, settings, counters, optimizer hyper-parameters, scaler
        checksums.json          SHA-256 and size of every file above, written last
    latest                      one line: the name of the newest complete step folder

A folder is written under a temporary name (``furlib.atomic``) and renamed into place, then
``latest`` is replaced atomically: a kill at any moment leaves the previous checkpoint as
``latest``. A step already saved and intact is never written again; a damaged folder of the same
step is moved aside (to a temporary name too) only once the new one is complete, then removed.
Temporaries of a killed save are swept by the next save. Which checkpoint is used, each verified
against ``checksums.json`` first, is ``furlib.checkpoint_pick``'s, and so are the holds 03 and 04 put
on the one they read while training goes on; here: writing, pruning (a held folder is left for a
later prune), reading a picked one back (``restore``, ``load_decoder_weights``, ``run_base``). Nothing here unpickles:
tensors are safetensors, everything else JSON.
"""

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from furlib import atomic, families
from furlib.atomic import replace_folder
from furlib.checkpoint_pick import CHECKSUMS, FIX, HOLD_S, held, latest_named, step_folders, step_of, verify
from furlib.runinfo import file_sha256

WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "decoder.safetensors"}


def _write_folder(tmp: Path, step: int, tensors: dict, state: dict) -> None:
    tmp.mkdir()
    for stem, named in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, tmp / f"{stem}.safetensors")
    files = sorted(f"{stem}.safetensors" for stem in tensors)  # verify() requires each of them
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step, files=files), indent=1))
    sums = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    for p in tmp.iterdir():  # on disk before the rename publishes the folder
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(ckpt_root: Path, step: int, tensors: dict, state: dict, keep: int = 3) -> Path:
    """Write ``{file_stem: {name: tensor}}`` plus ``state.json``; return the step's folder."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    atomic.sweep(ckpt_root, older_than_s=0)  # only the run lock's holder saves: all are a killed save's
    name = f"step_{step:07d}"
    final = ckpt_root / name
    tmp = atomic.temporary(final)
    if not (final.exists() and verify(final) is None):  # an intact step is never written twice
        try:
            _write_folder(tmp, step, tensors, state)
        except BaseException as err:  # a full disk, a stop mid-write: no half folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, (OSError, SafetensorError)):
                raise OSError(_unwritten(ckpt_root, name, tensors, err, keep)) from err
            raise
        replace_folder(tmp, final)  # a damaged folder of this step goes aside, removed once replaced
    atomic.write_text(ckpt_root / "latest", name + "\n")
    if keep > 0:
        prune(ckpt_root, final, keep)
    return final


def _unwritten(ckpt_root: Path, name: str, tensors: dict, err, keep: int) -> str:
    """Why a checkpoint could not be written, what is still there and what to do: room (how much
    it needs) only when the disk is full, else the error's own cause (permission, read-only)."""
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else "none yet"
    head = f"could not write checkpoint {name} ({' '.join(str(err).split())})"
    kept = f"The latest checkpoint is still {latest}, intact."
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        any(s in str(err) for s in ("No space left", "os error 28", "Disk quota", "os error 122"))
    if not full:
        return (f"{head}. {kept} Make {ckpt_root} writable (or set outputs_dir to a folder that is), then "
                "run 02 again: it resumes from there")
    need = sum(t.numel() * t.element_size() for named in tensors.values() for t in named.values()) / 1e9
    free = shutil.disk_usage(ckpt_root).free / 1e9
    lower = "" if keep == 1 else (f" (or lower keep_checkpoints={keep}: 02 removes the checkpoints beyond it "
                                  "before it trains on)" if keep else " (or set keep_checkpoints: 0 keeps them all)")
    return (f"{head}: it needs ~{need:.2f} GB, {free:.2f} GB are free on {ckpt_root}. {kept} Free some "
            f"space{lower}, then run 02 again: it resumes from there")


def prunable(ckpt_root: Path, final: Path, keep: int) -> tuple[list[Path], list[Path]]:
    """The folders beyond ``keep`` (none for ``keep`` 0: all kept), split into what ``prune``
    removes and what it leaves while 03 or 04 reads it (``checkpoint_pick.held``)."""
    older = [f for f in step_folders(ckpt_root) if step_of(f) < step_of(final)]
    kept, beyond = 1, []
    for folder in older if keep > 0 else []:
        if kept < keep and _intact(folder):
            kept += 1
        else:
            beyond.append(folder)
    reading = [folder for folder in beyond if held(folder)]
    return [folder for folder in beyond if folder not in reading], reading


def prune(ckpt_root: Path, final: Path, keep: int) -> list[Path]:
    """Keep ``final`` and the newest intact folders before it, ``keep`` in all; remove the older
    ones and any damaged one among them (a damaged folder never takes an intact one's place, as
    after a fallback). Folders after ``final`` (skipped by a fallback) are left for the step that
    rewrites them, and one 03 or 04 holds (``checkpoint_pick.held``) for a prune once it is read.
    Returns what was removed."""
    removed, _ = prunable(ckpt_root, final, keep)
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


_VERIFIED: set = set()  # folders found intact by this process: verified once, not at every save


def _intact(folder: Path) -> bool:
    if folder not in _VERIFIED and verify(folder) is None:
        _VERIFIED.add(folder)
    return folder in _VERIFIED


def _pruned(path: Path) -> bool:
    """Whether ``path`` is missing as the pruning of a training that went on leaves it: its folder
    gone, or going while ``latest`` names a newer one (a file never written is no such case)."""
    folder = path.parent
    if not folder.is_dir():
        return True
    named = latest_named(folder.parent)  # None: unreadable, so no sign that training moved on
    return not path.exists() and named is not None and named != folder


def _gone(path: Path) -> str:
    """Why a file of a checkpoint read since it was picked is not there: pruned, not damaged."""
    return (f"{path} is gone: removed after this stage picked {path.parent.name} (a training of this run that goes "
            "on prunes the checkpoints beyond keep_checkpoints that no reader holds; a reader's hold lapses after "
            f"{HOLD_S / 60:.0f} min). Nothing is damaged: run this stage again; it reads the run's latest checkpoint")


def read_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RuntimeError(_gone(path) if _pruned(path) else f"cannot read {path} ({err}). Fix: {FIX}") from err


def run_base(ckpt_dir: Path, base_model: str = "", base_config: str = "",
             base_family: str = "") -> tuple[str, str, str, dict]:
    """(base_model, base_config, base_family, state): the given base, else the run's own. A given
    base must be of the run's family (``families.check_same_family``)."""
    state = read_state(ckpt_dir)
    if base_model:
        families.check_same_family(state, base_model, base_config, base_family)
    else:  # the base the run trained from, with the architecture and family it used
        base_model, base_config = state.get("base_model", ""), state.get("base_config", "")
        base_family = base_family or state.get("base_family", "")
    if not base_model:
        raise ValueError(f"base_model: {ckpt_dir}/state.json names no base model; pass base_model")
    return base_model, base_config or "", base_family or "", state


def load_tensors(ckpt_dir: Path, stem: str) -> dict:
    path = Path(ckpt_dir) / f"{stem}.safetensors"
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types, naming no file
        if _pruned(path):
            raise RuntimeError(_gone(path)) from err
        raise RuntimeError(f"cannot read {path} ({type(err).__name__}: {err}). Fix: {FIX}") from err


def mismatch(tensors: dict, expected: dict) -> tuple[list, list, list]:
    """(keys missing, keys unexpected, "key (shape) vs (shape)" for the others of another shape) of
    ``tensors`` against the state dict ``expected``; three empty lists when they fit."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    return missing, unexpected, shapes


def check_fits(tensors: dict, expected: dict, source: Path) -> None:
    """Tensors read from ``source`` must have exactly the keys and shapes of ``expected`` (a
    state dict): a missing layer would otherwise silently keep its base weights."""
    missing, unexpected, shapes = mismatch(tensors, expected)
    if missing or unexpected or shapes:
        raise RuntimeError(f"{source} does not fit this model: missing {missing[:8]} ({len(missing)}), "
                           f"unexpected {unexpected[:8]} ({len(unexpected)}), shapes differ {shapes[:4]}. "
                           + _why_not_fitting(Path(source).parent))


def _why_not_fitting(folder: Path) -> str:
    """Damaged (the fix for a damaged folder), or intact and another model's (never delete it)."""
    problem = verify(folder)
    if problem:
        return f"The folder is damaged ({problem}). Fix: {FIX}"
    return ("Its files match their checksums: it is intact, another model's, trained from another base_model "
            "(or base_config) than this run loads. Keep it, and load the base it was trained from")


def load_into(module: torch.nn.Module, ckpt_dir: Path, stem: str, prefixes: tuple = ()) -> None:
    """Load ``stem.safetensors`` strictly into the ``prefixes`` part of ``module``'s state dict."""
    expected = {k: v for k, v in module.state_dict().items() if not prefixes or k.startswith(prefixes)}
    tensors = load_tensors(ckpt_dir, stem)
    check_fits(tensors, expected, Path(ckpt_dir) / f"{stem}.safetensors")
    module.load_state_dict(tensors, strict=not prefixes)


def load_decoder_weights(ckpt_dir: Path, which: str = "ema") -> dict:
    """Decoder-side weights of a checkpoint: ``which`` is 'ema' (the release) or 'raw'."""
    if which not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {which!r}")
    return load_tensors(ckpt_dir, WEIGHT_FILES[which].removesuffix(".safetensors"))


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


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, source: str = "") -> None:
    """Inverse of ``optimizer_tensors``; every parameter must have the same slots (e.g. AdamW's
    step, exp_avg, exp_avg_sq), or the error names the file and what is missing."""
    state: dict = {}
    for flat, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    ids = [i for g in meta["param_groups"] for i in g["params"]]
    slots = set().union(*state.values()) if state else set()
    gaps = [f"{i}.{k}" for i in ids for k in sorted(slots - set(state.get(i, {})))]
    if gaps:
        raise RuntimeError(f"{source or 'optimizer state'} lacks slot(s) {gaps[:8]} ({len(gaps)}). Fix: {FIX}")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def restore(ckpt_dir: Path, vae, ema, critic, opt, opt_critic, scaler) -> dict:
    """Load a training checkpoint into a trainer's parts, strictly; returns its state."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    from furlib.models import TRAINABLE_PREFIXES

    load_into(vae, ckpt_dir, "decoder", TRAINABLE_PREFIXES)
    ema_tensors = load_tensors(ckpt_dir, "ema")
    check_fits(ema_tensors, ema.state_dict(), ckpt_dir / "ema.safetensors")
    ema.load_state_dict(ema_tensors)
    load_into(critic, ckpt_dir, "critic")
    for stem, optimizer in (("optim_decoder", opt), ("optim_critic", opt_critic)):
        if stem not in state:
            raise RuntimeError(f"{ckpt_dir / 'state.json'} has no {stem!r} entry. Fix: {FIX}")
        restore_optimizer(optimizer, load_tensors(ckpt_dir, stem), state[stem], str(ckpt_dir / f"{stem}.safetensors"))
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state
