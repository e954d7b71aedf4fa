"""Nothing lost, nothing accepted silently (issue 24): seeds, weights, exports, pruning,
verification, fingerprints, warnings and errors that name the file or key."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from furlib.data import prepare
from furlib.training import fit
from furlib.training.plan import make_plan
from furlib.training.settings import TrainSettings

TINY = dict(base_model="tiny", lpips_backbone="random", device="cpu", resolution=64, batch_size=2,
            max_steps=2, num_workers=0, lr=1e-3, critic_lr=1e-3, warmup_steps=0, ema_decay=0.5,
            mixed_precision="no", checkpoint_every=2, log_every=1, plot_every=0, preview_images=1,
            critic_channels=8, critic_layers=2, pixel_cache="no")


def _prepared(outputs, run="r"):
    prepare.prepare("builtin", outputs / run / "data", resolution=64, max_side=256, max_images=4, art_count=4,
                    val_fraction=0.3, progress=False)


def test_two_runs_on_the_pretrained_base_are_identical(tmp_path):
    """Class 10: every random draw comes from the run's seed, also with the pretrained `tiny` base
    (whose loading draws nothing, so the critic's start once followed the process's RNG state)."""
    checkpoints = []
    for run, process_seed in (("a", 1), ("b", 2)):  # another process: another global RNG state
        _prepared(tmp_path, run)
        torch.manual_seed(process_seed)
        settings = TrainSettings(**{**TINY, "lpips_weight": 0.0}, outputs_dir=str(tmp_path), run_name=run)
        result = fit.fit(settings)  # no LPIPS: a random backbone would seed as it builds
        checkpoints.append(result["checkpoint"])
    for stem in ("critic", "decoder", "ema", "optim_decoder", "optim_critic"):
        a, b = (load_file(f"{c}/{stem}.safetensors") for c in checkpoints)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stem}.safetensors {k} differs between two runs of one profile"


def _tensors(v):
    return {"decoder": {"w": torch.full((2, 2), float(v))}, "ema": {"w": torch.full((2, 2), float(v))}}


def _damage(folder, name="ema.safetensors"):
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 0xFF
    (folder / name).write_bytes(bytes(data))


def test_pruning_after_a_fallback_keeps_the_intact_checkpoint(tmp_path):
    """Class 6: step 2 is damaged, the run falls back to step 1 and saves step 3 (keep=2): the
    damaged step 2 must not take the intact step 1's place."""
    from furlib import checkpoint, checkpoint_pick

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_checkpoint(root, step, _tensors(step), {}, keep=2)
    _damage(root / "step_0000002")
    with pytest.warns(UserWarning, match="using the older step_0000001"):
        assert checkpoint_pick.latest_checkpoint(tmp_path).name == "step_0000001"
    checkpoint.save_checkpoint(root, 3, _tensors(3), {}, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000001", "step_0000003"]


@pytest.mark.parametrize("edit, words", [
    (lambda sums: sums.pop("ema.safetensors"), "does not list \\['ema.safetensors'\\]"),
    (lambda sums: sums.update({"ema.safetensors": {"sha256": 5, "bytes": "x"}}), "entry 'ema.safetensors' is"),
    (lambda sums: sums.update({"ema.safetensors": "deadbeef"}), "entry 'ema.safetensors' is"),
])
def test_verification_cannot_be_bypassed_by_omission(tmp_path, edit, words):
    """Class 7 and 11: a checksums.json that lists fewer files, or has values of the wrong types,
    fails verification with the file named, never with a library's TypeError."""
    from furlib import checkpoint, checkpoint_pick

    folder = checkpoint.save_checkpoint(tmp_path / "checkpoints", 1, _tensors(1), {})
    sums = json.loads((folder / "checksums.json").read_text())
    edit(sums)
    (folder / "checksums.json").write_text(json.dumps(sums))
    _damage(folder)  # the damage the shortened list would hide
    assert checkpoint_pick.verify(folder) is not None
    with pytest.raises(RuntimeError, match=words):
        checkpoint_pick.pick_checkpoint(tmp_path, on_bad="refuse")


def test_a_file_deleted_with_its_checksum_line_is_found(tmp_path):
    from furlib import checkpoint, checkpoint_pick

    folder = checkpoint.save_checkpoint(tmp_path / "checkpoints", 1, _tensors(1), {})
    sums = json.loads((folder / "checksums.json").read_text())
    del sums["ema.safetensors"]
    (folder / "ema.safetensors").unlink()
    (folder / "checksums.json").write_text(json.dumps(sums))
    assert "were written (state.json says) but are gone" in checkpoint_pick.verify(folder)


def test_export_swap_never_loses_the_last_release(tmp_path, monkeypatch):
    """Class 5: 04 dies between moving the old export/ away and moving the new one in; the old
    release is whole and back in place when 04 (or its upload) next looks."""
    import os
    from types import SimpleNamespace

    from furlib.export import release_files

    export_dir, stage = tmp_path / "export", tmp_path / ".export-staging"
    export_dir.mkdir()
    (export_dir / "manifest.json").write_text("the last good release")
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"new")
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(src) == str(stage):  # killed just before the new folder moves in
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        release_files.finalize_export(stage, export_dir, SimpleNamespace(record=dict), [{"passed": True}])
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.warns(UserWarning, match="restored"):
        with pytest.raises(FileNotFoundError):  # no checkpoint here: only the recovery matters
            release_files.release_source(tmp_path)
    assert (export_dir / "manifest.json").read_text() == "the last good release"


@pytest.fixture(scope="module")
def small_vae_folder(tmp_path_factory):
    """tiny-random saved as a diffusers folder (config + safetensors) and as an LDM single file."""
    from safetensors.torch import save_file

    from furlib import models
    from furlib.ldm_keys import diffusers_to_ldm

    folder = tmp_path_factory.mktemp("vae")
    vae = models.load_vae("tiny-random")
    vae.save_pretrained(folder / "diffusers", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}, folder / "single.safetensors")
    return folder


def _single(folder, name, change):
    from safetensors.torch import save_file

    tensors = load_file(folder / "single.safetensors")
    save_file(change(tensors), folder / name)
    return folder / name


@pytest.mark.parametrize("name, change, words", [
    ("nan.safetensors", lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, "NaN or infinity"),
    ("int.safetensors", lambda t: {k: v.to(torch.int32) for k, v in t.items()}, "not floating point"),
])
def test_base_weights_must_be_finite_floats(small_vae_folder, name, change, words):
    """Class 4: a base of NaNs or of integers is refused with the file named."""
    from furlib import models

    path = _single(small_vae_folder, name, change)
    with pytest.raises(ValueError, match=f"{name}.*{words}"):
        models.load_vae(str(path), str(small_vae_folder / "diffusers"))


def test_nan_base_folder_is_refused(small_vae_folder, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from furlib import models

    folder = tmp_path / "nan_folder"
    shutil.copytree(small_vae_folder / "diffusers", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match="nan_folder.*NaN or infinity"):
        models.load_vae(str(folder))


def test_pickle_renamed_safetensors_names_the_file(small_vae_folder):
    """Class 11: torch.save'd weights under a .safetensors name: the file and the fix are named
    (never unpickled)."""
    from furlib import models

    path = small_vae_folder / "pickled.safetensors"
    torch.save(load_file(small_vae_folder / "single.safetensors"), path)
    with pytest.raises(ValueError, match="pickled.safetensors is not a readable safetensors file"):
        models.load_vae(str(path), str(small_vae_folder / "diffusers"))
    truncated = small_vae_folder / "truncated.safetensors"  # a download cut short; no base_config:
    truncated.write_bytes((small_vae_folder / "single.safetensors").read_bytes()[:5000])  # the header is read
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable safetensors file"):
        models.load_vae(str(truncated), base_family="sd")
    from furlib.training import plan
    from furlib.training.settings import TrainSettings

    s = TrainSettings.from_params({"base_model": str(truncated), "base_family": "sd"})
    vae = plan.base_vae(s)  # 02's plan, before load_vae: no raw error, no cost note
    assert vae is None and plan.cpu_cost_note(s, torch.device("cpu"), vae) == ""


def test_config_that_does_not_match_its_weights(small_vae_folder, tmp_path):
    """Class 11: a single file with another VAE's config, and a folder whose config.json is
    another VAE's: the message names both files and does not advise ignoring the sizes."""
    import shutil

    from furlib import models

    with pytest.raises(ValueError, match="single.safetensors does not fit the architecture in .*sd_vae") as err:
        models.load_vae(str(small_vae_folder / "single.safetensors"), base_family="sd")  # the SD VAE's shipped config
    assert "do not ignore" in str(err.value)
    folder = tmp_path / "wrong_config"
    shutil.copytree(small_vae_folder / "diffusers", folder)
    shutil.copy(models.SD_VAE_CONFIG / "config.json", folder / "config.json")
    with pytest.raises(ValueError, match="wrong_config.*config.json"):
        models.load_vae(str(folder))


def test_resume_compares_the_base_and_data_fingerprints(small_vae_folder, tmp_path):
    """Class 7: changed training data is noted on resume; a base replaced under the same path
    (other weights, same name) is refused, naming the way out."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(small_vae_folder / "diffusers", base)
    _prepared(tmp_path)
    settings = dict(TINY, base_model=str(base), outputs_dir=str(tmp_path), run_name="r", lpips_weight=0.0)
    fit.fit(TrainSettings(**settings))
    train = tmp_path / "r" / "data" / "train"
    first = sorted(train.iterdir())[0]
    shutil.copy(first, train / f"0000000000000000{first.suffix}")  # one more image
    result = fit.fit(TrainSettings(**{**settings, "max_steps": 4}))
    assert any("training images changed" in n for n in result["notes"]), result["notes"]
    weights = base / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)  # same path, other weights
    with pytest.raises(ValueError, match="holds other weights.*resume_with_changes"):
        fit.fit(TrainSettings(**{**settings, "max_steps": 6}))


def test_batch_larger_than_the_data_is_warned(tmp_path):
    """Class 9."""
    _prepared(tmp_path)
    images = len(list((tmp_path / "r" / "data" / "train").iterdir()))
    p = make_plan(TrainSettings(**{**TINY, "batch_size": 16}, outputs_dir=str(tmp_path), run_name="r"), 1,
                  torch.device("cpu"))
    assert any("takes 16 crops" in n and f"only {images} image" in n for n in p.notes), p.notes


@pytest.mark.parametrize("gan_loss,norm,warned", [("wgan-gp", "batch", True), ("hinge", "batch", False),
                                                   ("wgan-gp", "pixel_layer", False)])
def test_a_batch_norm_critic_under_wgan_gp_is_warned(tmp_path, gan_loss, norm, warned):
    _prepared(tmp_path)
    p = make_plan(TrainSettings(**{**TINY, "gan_loss": gan_loss, "critic_norm": norm}, outputs_dir=str(tmp_path),
                                run_name="r"), 1, torch.device("cpu"))
    assert any("critic_norm='batch' mixes the samples" in n for n in p.notes) == warned, p.notes


def _all_batches(loader, n_images, batch):
    it = iter(loader)
    for _ in range(-(-2 * n_images // batch)):  # two epochs: every image at least once
        next(it)


def test_truncated_training_image_is_named_inside_the_loader(tmp_path):
    """Class 11: PIL's 'image file is truncated' becomes an error naming the image and the fix."""
    from furlib import crops

    _prepared(tmp_path)
    train = tmp_path / "r" / "data" / "train"
    victim = sorted(train.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    loader = crops.make_loader(train, 64, 2, num_workers=0)
    with pytest.raises(ValueError, match=f"training image {victim} cannot be read.*Delete it"):
        _all_batches(loader, len(list(train.iterdir())), 2)


def test_damaged_pixel_cache_entries_are_named_and_rebuilt(tmp_path):
    """A cache entry is derived from its PNG: a damaged one (truncated, or another array) is named
    in a warning and rebuilt, all in one run (it stopped the run, one file per run)."""
    import numpy as np

    from furlib import crops, pixelcache

    _prepared(tmp_path)
    train, cache = tmp_path / "r" / "data" / "train", tmp_path / "cache"
    n = len(list(train.iterdir()))
    _all_batches(crops.make_loader(train, 64, 2, cache_dir=cache), n, 2)
    first, second = sorted(cache.glob("*.npy"))[:2]
    good = np.array(pixelcache.read(first))
    first.write_bytes(first.read_bytes()[:500])
    np.save(second, np.zeros((4, 4), np.float32))
    with pytest.warns(RuntimeWarning, match=f"pixel cache entry {first} is unreadable.*rebuilt from its PNG"):
        _all_batches(crops.make_loader(train, 64, 2, cache_dir=cache), n, 2)
    assert np.array_equal(pixelcache.read(first), good) and pixelcache.read(second).dtype == np.uint8


@pytest.mark.parametrize("garble", ["{not json", "[1, 2]", '{"counts": {}}'])
def test_garbled_report_json_names_the_file_and_the_fix(tmp_path, garble):
    """Class 11: 02's data check on a garbled data/report.json."""
    _prepared(tmp_path)
    (tmp_path / "r" / "data" / "report.json").write_text(garble)
    with pytest.raises(ValueError, match="report.json .*run 01_data_prep again"):
        make_plan(TrainSettings(**TINY, outputs_dir=str(tmp_path), run_name="r"), 1, torch.device("cpu"))


def test_malformed_lock_owner_record_names_the_file(tmp_path):
    """Class 11: the lock's owner record is only information: garbled, a busy lock still refuses
    (naming the record), and a free one is taken with a note, never a JSON error."""
    import subprocess
    import sys

    from furlib.training.runlock import RunLock

    (tmp_path / "run.lock.owner").write_text("{garbled")
    with RunLock(tmp_path) as lock:
        assert "unreadable record" in lock.note and "run.lock.owner" in lock.note
        (tmp_path / "run.lock.owner").write_text("[]")
        code = f"from furlib.training.runlock import RunLock; RunLock({str(tmp_path)!r}).acquire()"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert "run.lock.owner holds list" in done.stderr and "delete it if no training" in done.stderr


def test_a_resume_below_the_checkpoints_step_says_nothing_trains(tmp_path):
    """max_steps lowered on resume: no rewind; a WARNING says nothing is trained and which
    checkpoint stays the latest (the plan only listed 'changes max_steps')."""
    import dataclasses

    from furlib import checkpoint

    _prepared(tmp_path)
    s = TrainSettings(**TINY, outputs_dir=str(tmp_path), run_name="r")
    checkpoint.save_checkpoint(tmp_path / "r" / "checkpoints", 12, {"decoder": {"w": torch.zeros(1)}},
                               {"settings": dataclasses.asdict(dataclasses.replace(s, max_steps=12)), "processes": 1})
    notes = make_plan(s, 1, torch.device("cpu")).notes
    assert any(n.startswith("WARNING: max_steps=2 is below the checkpoint's step 12: nothing is trained") for n in notes)


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    """The first save failed after checkpoint_every steps, all of them lost; now the plan compares
    the disk's free space with one checkpoint's size (decoder, EMA, AdamW moments, critic)."""
    import shutil
    from collections import namedtuple

    from furlib.training import plan

    _prepared(tmp_path)
    s = TrainSettings(**TINY, outputs_dir=str(tmp_path), run_name="r")
    need = plan.checkpoint_bytes(s, plan.base_vae(s))
    assert 45e6 < need < 55e6  # TINY's run: 49.80 MB estimated, 49.88 MB written (measured 2026-12-06)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need // 2))
    with pytest.raises(ValueError, match=r"one checkpoint of this run takes ~0.0[0-9] GB, and 0.0[0-9] GB are free"):
        make_plan(s, 1, torch.device("cpu"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need * 2))
    make_plan(s, 1, torch.device("cpu"))


def test_a_lowered_keep_checkpoints_frees_the_room_it_promises(tmp_path, monkeypatch):
    """A full disk's error says "free some space (or lower keep_checkpoints)"; lowered, the plan
    still refused ("could not save its first one"): the older checkpoints went only after the
    next save, which needed their room. Now the plan counts their room and fit removes them first;
    not the room of those 03 or 04 reads now (held: prune leaves them), which the error names."""
    import shutil
    from collections import namedtuple

    from furlib import checkpoint_pick
    from furlib.models import load_vae
    from furlib.perceptual import LPIPS
    from furlib.training import plan
    from furlib.training.trainer import Trainer

    _prepared(tmp_path)
    s = TrainSettings(**{**TINY, "max_steps": 12}, outputs_dir=str(tmp_path), run_name="r")
    trainer = Trainer(load_vae("tiny", seed=0), s, "cpu", LPIPS("vgg", "random", seed=0))
    for step in (4, 8, 12):  # three real checkpoints, as a run of 12 steps leaves them
        trainer.step_count = step
        trainer.save(tmp_path / "r" / "checkpoints", 3, base_model="tiny", base_config="", base_family="")
    need = plan.checkpoint_bytes(s, plan.base_vae(s))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need // 2))
    with pytest.raises(ValueError, match=r"could not save its next one\. Free some space, or lower keep_checkpoints "
                                         r"\(now 3; the run holds 3\)"):
        make_plan(s, 1, torch.device("cpu"))
    lowered = TrainSettings(**{**TINY, "max_steps": 12, "keep_checkpoints": 1}, outputs_dir=str(tmp_path), run_name="r")
    # read by 03 or 04 (held), the older ones stay when pruned: their room is not free, and the error says why
    readers = [tmp_path / "r" / "checkpoints" / f"step_{step:07d}" / f"{checkpoint_pick.HOLD_PREFIX}elsewhere-1"
               for step in (4, 8)]
    for reader in readers:  # 03 and 04 on another machine, reading now
        reader.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": time.time()}))
    with pytest.raises(ValueError, match=r"could not save its next one \(step_0000008, step_0000004 beyond "
                                         r"keep_checkpoints stay while 03 or 04 reads them: at most 30 min\)"):
        make_plan(lowered, 1, torch.device("cpu"))
    for reader in readers:
        reader.unlink()
    assert [f.name for f in make_plan(lowered, 1, torch.device("cpu")).stale] == ["step_0000008", "step_0000004"]
    results = fit.fit(lowered)
    assert any("removed step_0000008, step_0000004" in n for n in results["notes"])
    assert [f.name for f in checkpoint_pick.step_folders(tmp_path / "r" / "checkpoints")] == ["step_0000012"]


def test_a_data_error_mid_run_saves_the_steps_trained_first(tmp_path, monkeypatch):
    """A batch that cannot be made (an image damaged after 01, a file deleted) stopped the run with
    the file named, and the steps since the last checkpoint were lost: they are saved first now."""
    from furlib import checkpoint_pick

    _prepared(tmp_path)
    real = fit._train_loader

    def failing(*args):
        for i, batch in enumerate(real(*args)):
            if i == 3:
                raise ValueError("training image X cannot be read (test)")
            yield batch

    monkeypatch.setattr(fit, "_train_loader", failing)
    settings = TrainSettings(**{**TINY, "lpips_weight": 0.0, "max_steps": 10, "checkpoint_every": 100},
                             outputs_dir=str(tmp_path), run_name="r")
    with pytest.raises(ValueError, match="cannot be read") as caught:
        fit.fit(settings)
    folders = checkpoint_pick.step_folders(tmp_path / "r" / "checkpoints")
    assert [f.name for f in folders] == ["step_0000003"]
    assert "02 saved the 3 step(s) trained in this run as" in "".join(getattr(caught.value, "__notes__", []))
