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
Temporaries of a killed save are swept by the next save. Loading verifies every file against ``checksums.json``; a damaged
latest checkpoint falls back to the newest intact one with a note (``pick_checkpoint``).
Nothing here unpickles: tensors are safetensors, everything else JSON.
"""

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from furlib import atomic, families
from furlib.atomic import replace_folder
from furlib.runinfo import check_folders, file_sha256

WEIGHT_FILES = {"ema": "ema.safetensors", "raw": "decoder.safetensors"}
CHECKSUMS = "checksums.json"
REFUSE_HINT = " (set on_bad_checkpoint='refuse' to stop instead)"
FIX = "delete that folder (the run resumes from the one before) or set on_bad_checkpoint='fallback'"
STEP_NAME = re.compile(r"step_(\d+)")  # a checkpoint folder; a user's step_0002000_backup copy is none


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


def step_of(folder: Path) -> int:
    """The step a checkpoint folder's name (``step_<digits>``) gives."""
    return int(STEP_NAME.fullmatch(Path(folder).name)[1])


def step_folders(ckpt_root: Path) -> list[Path]:
    """A run's checkpoint folders (``step_<digits>``), newest step first; anything else there (a
    user's ``step_0002000_backup`` copy, a ``step_0002000.zip``) is neither resumed nor pruned."""
    found = [p for p in Path(ckpt_root).glob("step_*") if STEP_NAME.fullmatch(p.name)]
    return sorted(found, key=step_of, reverse=True)


def prunable(ckpt_root: Path, final: Path, keep: int) -> list[Path]:
    """What ``prune`` removes (nothing for ``keep`` 0: all kept)."""
    older = [f for f in step_folders(ckpt_root) if step_of(f) < step_of(final)]
    kept, out = 1, []
    for folder in older if keep > 0 else []:
        if kept < keep and _intact(folder):
            kept += 1
        else:
            out.append(folder)
    return out


def prune(ckpt_root: Path, final: Path, keep: int) -> list[Path]:
    """Keep ``final`` and the newest intact folders before it, ``keep`` in all; remove the older
    ones and any damaged one among them (a damaged folder never takes an intact one's place, as
    after a fallback). Folders after ``final`` (skipped by a fallback) are left for the step that
    rewrites them. Returns what was removed."""
    removed = prunable(ckpt_root, final, keep)
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


_VERIFIED: set = set()  # folders found intact by this process: verified once, not at every save


def _intact(folder: Path) -> bool:
    if folder not in _VERIFIED and verify(folder) is None:
        _VERIFIED.add(folder)
    return folder in _VERIFIED


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches its checksum."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder does not exist"
    if not (folder / CHECKSUMS).exists():  # a step_* folder from before checksums: state only
        return _state_problem(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{CHECKSUMS} is not valid JSON ({err})"
    malformed = _malformed_sums(sums)
    if malformed:
        return f"{CHECKSUMS} {malformed} (hand-edited or damaged): restore the folder, or delete it"
    held = {p.name for p in folder.iterdir() if p.name != CHECKSUMS and not p.name.startswith(".")}
    unlisted = sorted((held | {"state.json"}) - set(sums))
    if unlisted:  # a list with fewer files would leave the others unverified
        return f"{CHECKSUMS} does not list {unlisted}: they cannot be verified"
    for fname, want in sums.items():
        path = folder / fname
        if not path.exists():
            return f"{fname} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{fname} has {path.stat().st_size} bytes, {want['bytes']} were written (truncated?)"
        if file_sha256(path) != want["sha256"]:
            return f"{fname} does not match its SHA-256 (damaged on disk)"
    written = json.loads((folder / "state.json").read_text()).get("files", [])  # verified just above
    if sorted(set(written) - set(sums)):  # a file deleted together with its checksum line
        return f"{sorted(set(written) - set(sums))} were written (state.json says) but are gone from {CHECKSUMS}"
    return None


def _malformed_sums(sums) -> str:
    """What is wrong with the shape of a parsed checksums.json ('' when it is right)."""
    if not isinstance(sums, dict):
        return f"holds {type(sums).__name__}, not an object of file names"
    for fname, want in sums.items():
        if not (isinstance(want, dict) and isinstance(want.get("sha256"), str)
                and isinstance(want.get("bytes"), int) and not isinstance(want.get("bytes"), bool)):
            return f"entry {fname!r} is {want!r}, not {{'sha256': hex string, 'bytes': integer}}"
        if "/" in fname or "\\" in fname or fname.startswith("."):
            return f"entry {fname!r} is not a file name of the folder"
    return ""


def _state_problem(folder: Path) -> str | None:
    try:
        json.loads((folder / "state.json").read_text())["step"]
    except FileNotFoundError:
        return "state.json is missing"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return f"state.json is unreadable ({err!r})"
    return None


def pick_checkpoint(run_dir: Path, on_bad: str = "fallback") -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume or release, notes). ``latest`` when intact; else, with
    ``on_bad='fallback'``, the newest intact step folder and a note saying what was skipped
    and why; with ``on_bad='refuse'`` an error (not for a folder ``latest`` names that is gone:
    deleted as ``FIX`` says, the one before is used, with the note). None: no checkpoint."""
    check_folders(run_dir, ["checkpoints"])  # a file there: training would run, then fail at its first save
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = _pointed(root, pointer)
    folders = step_folders(root)
    if named is None and not folders:
        return None, []
    candidates = ([named] if named else []) + [f for f in folders if f != named]
    skipped, notes = [], []
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            break
        skipped.append(f"{folder}: {problem}")
        if on_bad == "refuse" and folder.exists():  # one deleted as FIX says: the one before is used
            raise RuntimeError(f"checkpoint {folder} is damaged: {problem}. Fix: {FIX}")
    else:
        raise RuntimeError("no intact checkpoint in " + str(root) + ":\n  " + "\n  ".join(skipped) +
                           f"\nFix: restore one from a backup, or delete {root} to start the run over")
    if named is None:
        skipped.insert(0, f"{pointer}: missing, empty or unreadable")
    if skipped:
        which = f"the older {folder.name}" if folders and folder != folders[0] else f"{folder.name}, the newest step"
        notes.append(f"WARNING: using {which}; skipped " + "; ".join(skipped) + REFUSE_HINT)
    if not (folder / CHECKSUMS).exists():
        notes.append(f"{folder} has no {CHECKSUMS} (written by an older version): its files are not verified")
    return folder, notes


def _pointed(root: Path, pointer: Path) -> Path | None:
    """The step folder ``latest`` names; None when it is missing, empty, a folder or not text."""
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if name and "/" not in name else None


def latest_checkpoint(run_dir: Path, on_bad: str = "fallback") -> Path | None:
    """The newest intact checkpoint folder of a run (None if it has none); notes become warnings."""
    folder, notes = pick_checkpoint(run_dir, on_bad)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return folder


def read_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RuntimeError(f"cannot read {path} ({err}). Fix: {FIX}") from err


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


def find_run_checkpoint(run_dir: Path, on_bad: str = "refuse") -> Path:
    """The run's latest checkpoint for 03/04; a missing one is a clear error. A damaged latest is
    refused, naming the intact one ``on_bad='fallback'`` would use (then printed, not only warned:
    a release or a score of an older step must not pass unseen)."""
    ckpt, notes = pick_checkpoint(run_dir, "fallback")  # no intact one at all: its own error
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint: run 02_train with this run_name first")
    damaged = [n for n in notes if n.startswith("WARNING")]
    if damaged and on_bad == "refuse":
        what = damaged[0].removeprefix("WARNING: ").removesuffix(REFUSE_HINT)
        raise RuntimeError(f"the run's latest checkpoint is damaged: {what}. Run 02 again (it trains on "
                           f"from {ckpt.name}), or set on_bad_checkpoint='fallback' here to use {ckpt.name}")
    for note in notes:
        print(note, flush=True)
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
