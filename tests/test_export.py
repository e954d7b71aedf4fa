"""Stage 04 end to end on a fabricated tiny run: files, verification, manifest, model card."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from furlib.export import hub, model_card, release_files, verify
from furlib.checkpoint import save_checkpoint
from furlib.ldm_keys import ldm_to_diffusers
from furlib.models import decoder_state, load_vae

STEP, STEM = 150, "furception-v1.0-step150"
SD_CONFIG = {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215}
METRICS = "| model | PSNR |\n|---|---|\n| base | 20.1 |\n| this run | 21.3 |"



def fabricate_run(run, with_record=True):
    """A tiny 'trained' run: raw and EMA decoders perturbed differently from the base."""
    gen = torch.Generator().manual_seed(1)
    base = decoder_state(load_vae("tiny-random"))
    raw = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    ema = {k: v + 0.005 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_checkpoint(run / "checkpoints", STEP, {"decoder": raw, "ema": ema}, {"base_model": "tiny-random", "base_config": ""})
    if with_record:
        (run / "02_train.record.json").write_text(json.dumps({"parameters": {"lr": 5e-7, "batch_size": 32}}))
        (run / "eval").mkdir()
        (run / "eval" / "metrics.md").write_text(METRICS + "\n")
        (run / "eval" / "metrics.json").write_text(json.dumps({"models": {"finetuned-ema": {"step": STEP}}}))
    return raw, ema


def run_export(run, weights="ema", fp16_copy=True):
    """The notebook's sequence of calls."""
    release = release_files.release_source(run, weights)
    vae = release_files.build_release_vae(release.base_model, release.base_config, release.decoder_weights)
    stage = run / release_files.STAGING
    meta = release_files.file_metadata("furception", "1.0", release.step, release.base_model, weights)
    files = release_files.write_release_files(vae, stage, STEM, meta, fp16_copy)
    checks = verify.verify_export(vae, files, stage, seed=0)
    card = model_card.model_card(run, release, vae.config, "furception", "1.0", "cc-by-nc-sa-4.0", fp16_copy)
    (stage / "README.md").write_text(card)
    return release_files.finalize_export(stage, run / release_files.EXPORT, release, checks)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("outs") / "t04"
    raw, ema = fabricate_run(run)
    return run, run_export(run), raw, ema


def test_every_file_is_written_and_staging_is_gone(exported):
    run, manifest, _, _ = exported
    out = run / "export"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"README.md", "manifest.json", f"{STEM}.safetensors", f"{STEM}-fp16.safetensors",
                     "config.json", "diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.fp16.safetensors"}
    assert not (run / release_files.STAGING).exists()
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))


def test_the_export_folder_loads_from_its_root_like_a_hub_vae_repository(exported):
    """As `stabilityai/sd-vae-ft-mse`: from_pretrained(root) with no subfolder, the single file beside."""
    from diffusers import AutoencoderKL

    run, _, _, ema = exported
    root = run / "export"
    by_folder = AutoencoderKL.from_pretrained(str(root))
    by_file = AutoencoderKL.from_single_file(str(root / f"{STEM}.safetensors"), config=str(root),
                                             local_files_only=True)
    for vae in (by_folder, by_file):
        state = vae.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ema.items())
    fp16 = AutoencoderKL.from_pretrained(str(root), variant="fp16").state_dict()
    assert all(torch.equal(fp16[k].half(), v.half()) for k, v in ema.items())


def test_manifest_sizes_and_hashes_are_right(exported):
    run, manifest, _, _ = exported
    listed = {f["path"]: f for f in manifest["files"]}
    assert len(listed) == 6  # every file but the manifest itself
    for rel, entry in listed.items():
        data = (run / "export" / rel).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_verification_results(exported):
    checks = exported[1]["verification"]
    assert exported[1]["passed"] and all(c["passed"] for c in checks)
    assert {(c["file"], c["loader"]) for c in checks} == {
        ("diffusion_pytorch_model.safetensors", "diffusers from_pretrained"),
        ("diffusion_pytorch_model.fp16.safetensors", "diffusers from_pretrained fp16"),
        (f"{STEM}.safetensors", "diffusers from_single_file"), (f"{STEM}.safetensors", "furlib load_single_file"),
        (f"{STEM}-fp16.safetensors", "diffusers from_single_file"),
        (f"{STEM}-fp16.safetensors", "furlib load_single_file")}
    for c in checks:
        assert c["weights_max_abs_diff"] == 0.0
        fp16 = "fp16" in c["file"]
        assert c["decode_max_abs_diff"] <= (verify.FP16_TOL if fp16 else verify.FP32_TOL)


def test_single_file_is_full_vae_with_ema_decoder(exported):
    run, _, raw, ema = exported
    path = run / "export" / f"{STEM}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["step"] == str(STEP) and meta["model_name"] == "furception"
    assert meta["base_model"] == "tiny-random" and meta["weights"] == "ema"
    ldm = load_file(path)
    assert "encoder.conv_in.weight" in ldm and "decoder.up.3.block.0.conv1.weight" in ldm
    base = load_vae("tiny-random").state_dict()
    state = ldm_to_diffusers(ldm, base)
    for k in base:
        assert torch.equal(state[k], ema[k] if k in ema else base[k]), k
    assert not torch.equal(state["decoder.conv_out.weight"], raw["decoder.conv_out.weight"])


def test_fp16_copy_is_the_fp32_file_rounded(exported):
    run = exported[0]
    full = load_file(run / "export" / f"{STEM}.safetensors")
    half = load_file(run / "export" / f"{STEM}-fp16.safetensors")
    assert set(full) == set(half) and {v.dtype for v in half.values()} == {torch.float16}
    assert all(torch.equal(half[k], full[k].half()) for k in full)


def test_model_card(exported):
    card = (exported[0] / "export" / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-sa-4.0\n")
    front = card.split("---")[1]
    assert "base_model:" not in front and "- test-only" in front  # tiny-random is no hub model
    assert METRICS in card and "| `lr` | `5e-07` |" in card and f"steps: {STEP}" in card
    assert "Testing only" in card and "models/VAE/" in card and "ComfyUI/models/vae/" in card
    assert "AutoencoderKL.from_pretrained" in card and "licence" in card.lower()


def test_card_labels_an_evaluation_of_another_step(tmp_path):
    fabricate_run(tmp_path)
    release = release_files.Release(checkpoint="x/step_9", step=STEP + 5, base_model="tiny", base_config="", base_family="",
                             trained_base_model="tiny", weights="ema", base_seed=0, decoder_weights={})
    card = model_card.model_card(tmp_path, release, SD_CONFIG, "m", "2.0", "mit", fp16_copy=False)
    assert f"numbers are of step {STEP}, not of this release (step {STEP + 5})" in card and METRICS in card
    assert "not of this release" not in (tmp_path / "eval" / "metrics.md").read_text()


def test_card_names_a_hub_base_and_says_when_eval_is_missing(tmp_path):
    release = release_files.Release(checkpoint="x/step_0000007", step=7, base_model="stabilityai/sd-vae-ft-mse@vae",
                             base_config="", base_family="", trained_base_model="tiny", weights="raw", base_seed=0, decoder_weights={})
    card = model_card.model_card(tmp_path, release, SD_CONFIG, "m", "2.0", "mit", fp16_copy=False, hub_repo="me/m")
    assert "base_model: stabilityai/sd-vae-ft-mse\n" in card and "test-only" not in card
    assert "was not run" in card and "parameters unknown" in card and "fp16" not in card
    assert 'from_pretrained("me/m")' in card and "subfolder" not in card


def test_raw_weights_on_request_and_no_fp16(tmp_path):
    run = tmp_path / "raw"
    raw, _ = fabricate_run(run, with_record=False)
    manifest = run_export(run, weights="raw", fp16_copy=False)
    assert not [f for f in manifest["files"] if "fp16" in f["path"]]
    assert len(manifest["verification"]) == 3
    state = ldm_to_diffusers(load_file(run / "export" / f"{STEM}.safetensors"), load_vae("tiny-random").state_dict())
    assert all(torch.equal(state[k], raw[k]) for k in raw)


@pytest.mark.parametrize("damage", ["encoder", "decoder_only"])
def test_a_broken_file_fails_verification(tmp_path, damage):
    run = tmp_path / "broken"
    fabricate_run(run, with_record=False)
    release = release_files.release_source(run)
    vae = release_files.build_release_vae("tiny-random", "", release.decoder_weights)
    stage = run / release_files.STAGING
    files = release_files.write_release_files(vae, stage, STEM, {"format": "pt"}, fp16_copy=False)
    ldm = load_file(files["single"])
    if damage == "encoder":  # invisible to a decode-only check: only the weight comparison sees it
        ldm["encoder.conv_in.weight"] += 1e-3
    else:
        ldm = {k: v for k, v in ldm.items() if not k.startswith(("encoder.", "quant_conv."))}
    save_file(ldm, files["single"], metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="export verification failed"):
        verify.verify_export(vae, {"single": files["single"]}, stage)
    assert not (run / release_files.EXPORT).exists()


def test_finalize_refuses_failed_checks(tmp_path):
    with pytest.raises(RuntimeError, match="passing verification"):
        release_files.finalize_export(tmp_path, tmp_path / "export", None, [{"passed": False}])


def test_release_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="02_train"):
        release_files.release_source(tmp_path / "empty")
    save_checkpoint(tmp_path / "nobase" / "checkpoints", 1, {"ema": {}}, {})
    with pytest.raises(ValueError, match="base_model"):
        release_files.release_source(tmp_path / "nobase")


def test_push_to_hub_error_paths(exported, monkeypatch):
    out = exported[0] / "export"
    with pytest.raises(ValueError, match="owner/name"):
        hub.push_to_hub(out, "")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        hub.push_to_hub(out, "me/furception")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(RuntimeError, match="failed"):  # nothing listens on port 9: no upload happens
        hub.push_to_hub(out, "me/furception", endpoint="http://127.0.0.1:9")


def test_val_images_and_reconstructions(tmp_path):
    val = tmp_path / "data" / "val"
    val.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((40, 56, 3), 60 * i, np.uint8)).save(val / f"{i}.png")
    images = verify.val_images(tmp_path, size=32)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    vae = load_vae("tiny-random")
    cols = verify.reconstructions(images, {"a": vae, "b": vae}, vae)
    assert list(cols) == ["input", "a", "b"] and torch.equal(cols["a"], cols["b"])
    assert verify.val_images(tmp_path / "none") is None
    shutil.rmtree(val)


def _card(run_dir, base="stabilityai/sd-vae-ft-mse", config=SD_CONFIG, **kw):
    release = release_files.Release(checkpoint="x/step_0000007", step=7, base_model=base, base_config="", base_family="",
                             trained_base_model=base, weights="ema", base_seed=0, decoder_weights={})
    return model_card.model_card(run_dir, release, config, "my_run", "1.0", "mit", **kw)


def test_card_says_what_the_data_was(tmp_path):
    (tmp_path / "data").mkdir()
    report = {"source": "/data/my_art", "settings": {"resolution": 256, "max_side": 1536},
              "counts": {"inputs": 120, "train": 100, "val": 10, "rejected": 6, "duplicates": 4}}
    (tmp_path / "data" / "report.json").write_text(json.dumps(report))
    card = _card(tmp_path, training_data="My own drawings, CC BY 4.0.")
    data = card.split("## Training data")[1].split("\n## ")[0]
    assert "My own drawings, CC BY 4.0." in data and "- source: `my_art`" in data
    assert "/data/" not in card  # the folder's name only: its absolute path stays on this machine
    assert "100 training and 10 held-out" in data and "6 rejected, 4 duplicates" in data
    assert "1536 px" in data and "256 px" in data
    blank = _card(tmp_path / "elsewhere")
    assert "Not described" in blank and "No `data/report.json`" in blank


@pytest.mark.parametrize("base, config, says, denies", [
    ("stabilityai/sd-vae-ft-mse", SD_CONFIG, "Stable Diffusion 1.x and 2.x", "Not for SDXL"),
    ("madebyollin/sdxl-vae-fp16-fix", dict(SD_CONFIG, scaling_factor=0.13025), "**SDXL", "Not for Stable Diffusion 1.x/2.x"),
    ("someone/f16-vae", dict(SD_CONFIG, latent_channels=16), "16 channels", "drop-in"),
    ("tiny-random", dict(SD_CONFIG, block_out_channels=[32, 64, 64, 64]), "None: `tiny-random` is a random test VAE", "drop-in"),
])
def test_card_states_compatibility_from_the_latent_layout(tmp_path, base, config, says, denies):
    section = _card(tmp_path, base, config).split("## Compatibility")[1].split("\n## ")[0]
    assert says in section and "kl-f8" in section
    assert ("drop-in" not in section) if denies == "drop-in" else (denies in section)


def test_card_embeds_the_picture_and_is_not_furception(tmp_path):
    card = _card(tmp_path, picture="reconstructions.png")
    assert "](reconstructions.png)" in card and "# my_run v1.0" in card
    assert "not the Furception release" in card
    assert "](" not in _card(tmp_path).split("## Training data")[0]


def test_a_decoder_from_another_base_is_one_short_error():
    """03/04 with a base_model of other widths than the run's: one line naming the cause and the
    fix (torch's load_state_dict printed a hundred 'size mismatch' lines)."""
    from furlib import models

    vae = models.load_vae("tiny-random")
    weights = models.decoder_state(vae)
    weights = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim == 4 else v for k, v in weights.items()}
    with pytest.raises(ValueError, match=r"the run's decoder does not fit this VAE \(0 missing.*0 unexpected.*"
                                         r"[1-9][0-9]* of other shapes.*leave base_model empty") as err:
        models.with_decoder(vae, weights)
    assert len(str(err.value)) < 700


def test_04_refuses_to_replace_what_it_did_not_write(tmp_path):
    """04 replaces export/ whole: a file a user added there, or a card edited by hand, is refused
    before any work (it was deleted without a word); its own release is replaced as before."""
    run = tmp_path / "t04"
    fabricate_run(run)
    run_export(run)
    run_export(run)  # its own files: replaced, no question
    card = run / release_files.EXPORT / "README.md"
    card.write_text(card.read_text() + "\nmy own words\n")
    (run / release_files.EXPORT / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files 04 did not write, or edited since it did: \['README.md', 'notes.txt'\]"):
        release_files.release_source(run)
    (run / release_files.EXPORT / "notes.txt").unlink()
    card.write_text(card.read_text().replace("\nmy own words\n", ""))
    (run / release_files.EXPORT / ".DS_Store").write_bytes(b"junk")  # desktop junk: replaced with export/
    release_files.release_source(run)
    (run / release_files.EXPORT / ".git").mkdir()  # a Hub clone made in place: its history is not junk
    (run / release_files.EXPORT / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(ValueError, match=r"did not write.*\['.git/HEAD'\]"):
        release_files.release_source(run)
    shutil.move(run / release_files.EXPORT, tmp_path / "elsewhere")
    (run / release_files.EXPORT).symlink_to(tmp_path / "elsewhere")  # e.g. to Drive: the swap broke the link
    with pytest.raises(ValueError, match="export is a link .*elsewhere"):
        release_files.release_source(run)
    (run / release_files.EXPORT).unlink()
    (run / release_files.EXPORT).write_text("a file")
    with pytest.raises(ValueError, match="t04/export should be a folder but is a file"):
        release_files.release_source(run)


def test_push_to_hub_without_a_token_is_refused_with_the_other_values(monkeypatch):
    """Before 01 starts (the pipeline's checks), not after the training and the export."""
    from furlib import pipeline

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="push_to_hub needs a Hugging Face write token"):
        release_files.check_parameters({**pipeline.stage_defaults("04_export"), "push_to_hub": True, "hub_repo": "me/x"})
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    release_files.check_parameters({**pipeline.stage_defaults("04_export"), "push_to_hub": True, "hub_repo": "me/x"})


@pytest.mark.parametrize("licence", ["other: see LICENSE", "mit\nfoo: bar", "cc by 4.0"])
def test_a_licence_that_would_break_the_cards_yaml_is_refused(licence):
    from furlib import pipeline

    with pytest.raises(ValueError, match="license must be a Hugging Face licence id"):
        release_files.check_parameters({**pipeline.stage_defaults("04_export"), "license": licence})
    release_files.check_parameters({**pipeline.stage_defaults("04_export"), "license": "openrail++"})


@pytest.mark.parametrize("repo", ["me/my model", "/x", "me/", "me/--x", "me/x/y", "x"])
def test_a_hub_repo_of_a_bad_form_is_refused_before_training(repo, monkeypatch):
    """'me/my model' passed the slash count and failed in huggingface_hub after training and export."""
    from unittest import mock

    from furlib import pipeline

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(ValueError, match="hub_repo must be 'owner/name'"):
        release_files.check_parameters({**pipeline.stage_defaults("04_export"), "push_to_hub": True, "hub_repo": repo})
    with mock.patch("huggingface_hub.HfApi") as api, pytest.raises(ValueError, match="hub_repo must be"):
        hub.push_to_hub("unused", repo)
    assert not api.called
    release_files.check_parameters({**pipeline.stage_defaults("04_export"), "push_to_hub": True,
                                    "hub_repo": "my-org/sd_vae.ft-2"})


def test_push_uploads_only_the_export_its_manifest_vouches_for(exported, tmp_path, monkeypatch):
    """An edited or deleted file went up under a manifest whose checksums no longer matched; a
    failed upload says the local export is whole and how to retry."""
    from unittest import mock

    out = tmp_path / "export"
    shutil.copytree(exported[0] / "export", out)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    before = hub.file_table(out)
    (out / "README.md").write_text("my edit")
    with mock.patch("huggingface_hub.HfApi") as api, pytest.raises(RuntimeError, match=r"not the export 04 verified.*README.md"):
        hub.push_to_hub(out, "me/x")
    assert not api.return_value.upload_folder.called
    shutil.copy(exported[0] / "export" / "README.md", out / "README.md")
    (out / f"{STEM}-fp16.safetensors").unlink()
    with mock.patch("huggingface_hub.HfApi") as api, pytest.raises(RuntimeError, match=r"gone: \['furception"):
        hub.push_to_hub(out, "me/x")
    shutil.copy(exported[0] / "export" / f"{STEM}-fp16.safetensors", out)
    (out / ".DS_Store").write_bytes(b"junk")
    with mock.patch("huggingface_hub.HfApi") as api:
        api.return_value.upload_folder.side_effect = OSError("connection reset")
        with pytest.raises(RuntimeError, match="connection reset.*complete and unchanged"):
            hub.push_to_hub(out, "me/x")
    assert ".DS_Store" in api.return_value.upload_folder.call_args.kwargs["ignore_patterns"]
    assert [f for f in hub.file_table(out) if f["path"] != ".DS_Store"] == before


def test_exporting_twice_writes_the_same_bytes(tmp_path):
    """safetensors wrote the metadata in hash order: each export's single files had new SHA-256s."""
    vae = load_vae("tiny-random")
    meta = release_files.file_metadata("m", "1.0", 3, "tiny-random", "ema", vae.config)
    sums = [{k: hashlib.sha256(p.read_bytes()).hexdigest()
             for k, p in release_files.write_release_files(vae, tmp_path / str(i), "m", meta).items()}
            for i in range(3)]
    assert sums[0] == sums[1] == sums[2]
    with safe_open(str(tmp_path / "0" / "m.safetensors"), "pt") as f:
        assert f.metadata() == dict(meta, dtype="float32")
    assert torch.equal(load_file(tmp_path / "0" / "m.safetensors")["decoder.conv_in.weight"],
                       vae.decoder.conv_in.weight)


def test_an_fp16_copy_that_overflows_in_fp16_is_warned_and_on_the_card(tmp_path):
    """The fp16 files were checked decoded in fp32 only: one that gives black images in fp16 passed
    silently and the card offered it as 'the same in fp16'."""
    vae = load_vae("tiny-random")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # its output passes fp16's 65504; fp32's group norm absorbs it
    files = release_files.write_release_files(vae, tmp_path / "stage", "m", {"format": "pt"})
    with pytest.warns(UserWarning, match="non-finite values .* in float16"):
        checks = verify.verify_export(vae, files, tmp_path / "stage")
    assert all(c["passed"] for c in checks)
    half = {c["file"]: c["fp16_decode"] for c in checks if "fp16_decode" in c}
    assert half == {"m-fp16.safetensors": "overflow", "diffusion_pytorch_model.fp16.safetensors": "overflow"}
    release = release_files.Release(checkpoint="x/step_3", step=3, base_model="tiny-random", base_config="",
                                    base_family="", trained_base_model="tiny-random", weights="ema", base_seed=0,
                                    decoder_weights={})
    card = model_card.model_card(tmp_path, release, vae.config, "m", "1.0", "mit", checks=checks)
    assert "decodes to non-finite values (black images) in float16" in card
    assert "non-finite" not in model_card.model_card(tmp_path, release, vae.config, "m", "1.0", "mit")


def test_a_run_still_training_is_exported_at_its_latest_checkpoint_with_a_note(tmp_path, capsys):
    """04 while 02 trains the run (its run lock held): checkpoints are written whole, so the latest
    complete one is released, and 04 says which step and that training goes on (it said nothing).
    The owner record a crashed run left, its lock free, is no training."""
    import os

    from furlib.training.runlock import RunLock

    run = tmp_path / "run"
    fabricate_run(run, with_record=False)
    with RunLock(run):  # held by this process: 04's look at the lock finds it taken, as another's
        release = release_files.release_source(run)
    said = capsys.readouterr().out
    assert release.step == STEP and f"exporting step {STEP}" in said and "still training" in said
    assert f"process {os.getpid()}" in said
    (run / "run.lock.owner").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    assert release_files.release_source(run).step == STEP
    assert "still training" not in capsys.readouterr().out
