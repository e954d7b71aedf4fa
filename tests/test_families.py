"""The four VAE families (SD 1.x/2.x, SDXL, SD3, FLUX.1) through all four stages, and the family
questions: inferred from a config, asked for where a single file's keys cannot tell.

The bases are tiny random VAEs with each family's latent interface (latent channels, quant
convs, scaling/shift factors), saved as local diffusers folders: a local folder counts as
pretrained, so the card is the one a real SDXL/SD3/FLUX.1 base gets.
"""

import json
import re
import math
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from furlib import families, models, runinfo
from furlib.data.prepare import prepare
from furlib.evaluation import eval_inputs, eval_report, evaluate
from furlib.export import model_card
from furlib.export import release_files as export
from furlib.export import verify
from furlib.ldm_keys import diffusers_to_ldm
from furlib.training.fit import fit
from furlib.training.settings import TrainSettings

STEPS = 2
TRAIN = dict(device="cpu", resolution=64, batch_size=2, max_steps=STEPS, lpips_weight=0.0, num_workers=0,
             lr=1e-3, critic_lr=1e-3, warmup_steps=0, ema_decay=0.5, mixed_precision="no",
             checkpoint_every=STEPS, plot_every=STEPS, log_every=1, preview_images=1, pixel_cache="no")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """01 once: the built-in drawings, split into data/train and data/val."""
    data = tmp_path_factory.mktemp("prepared") / "data"
    prepare("builtin", data, resolution=64, max_side=128, val_fraction=0.3, max_images=6, art_count=3,
            progress=False)
    return data


def _base_folder(root, family: str):
    """A tiny random VAE of ``family``'s latent interface as a diffusers folder (no base_family)."""
    folder = root / f"base-{family}"
    models.load_vae("tiny-random", seed=1, base_family=family).save_pretrained(folder)
    return folder


def _comfy_style_load(path):
    """Load a single file as ComfyUI does, from the file alone: latent channels from
    ``decoder.conv_in``, quant convs only if the file has them; then a strict load through
    diffusers' own converter. Returns (model, channels, quant convs present)."""
    with safe_open(str(path), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    channels, quant = shapes["decoder.conv_in.weight"][1], "post_quant_conv.weight" in shapes
    config = dict(models.TINY_CONFIG, latent_channels=channels, use_quant_conv=quant, use_post_quant_conv=quant)
    vae = AutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(path), config), strict=True)
    return vae, channels, quant


def _stages(run, base, data):
    """02, 03 and 04 as the notebooks call them; returns (manifest, card)."""
    shutil.copytree(data, run / "data")
    settings = TrainSettings(run_name=run.name, outputs_dir=str(run.parent), base_model=str(base), **TRAIN)
    fit(settings)
    runinfo.write_record(run / "02_train.record.json", settings.__dict__, {}, torch.device("cpu"))
    specs = eval_inputs.run_models(run)
    result = evaluate.evaluate(eval_inputs.load_models(specs, "cpu"), eval_inputs.image_set("val", run), resolution=64,
                               batch_size=2, lpips_backbone="random", rfid=False, n_show=1, finetuned="finetuned-ema")
    eval_report.write_outputs(result, run / "eval", {s.name: {"step": s.step} for s in specs})
    release = export.release_source(run)
    vae = export.build_release_vae(release.base_model, release.base_config, release.decoder_weights,
                                   release.base_seed, release.base_family)
    stage, stem = run / export.STAGING, export.release_stem(run.name, "1.0", release.step)
    meta = export.file_metadata(run.name, "1.0", release.step, release.base_model, "ema", vae.config)
    files = export.write_release_files(vae, stage, stem, meta)
    checks = verify.verify_export(vae, files, stage)
    card = model_card.model_card(run, release, vae.config, run.name, "1.0", "mit")
    (stage / "README.md").write_text(card)
    return export.finalize_export(stage, run / export.EXPORT, release, checks), card


@pytest.mark.parametrize("family", families.CHOICES)
def test_family_end_to_end(family, prepared, tmp_path, tmp_path_factory):
    fam = families.get(family)
    base = _base_folder(tmp_path, family)
    run = tmp_path / "outputs" / f"run-{family}"
    manifest, card = _stages(run, base, prepared)
    exported = run / "export"

    metrics = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    assert math.isfinite(metrics["finetuned-ema"]["psnr"]["mean"]) and metrics["finetuned-ema"]["step"] == STEPS

    reloaded = AutoencoderKL.from_pretrained(exported)  # at the release root; the family's factors survive
    assert families.of_config(reloaded.config) is fam
    assert math.isclose(reloaded.config.scaling_factor, fam.scaling_factor)
    assert math.isclose(reloaded.config.shift_factor or 0.0, fam.shift_factor)

    single = exported / f"run-{family}-v1.0-step{STEPS}.safetensors"
    comfy, channels, quant = _comfy_style_load(single)
    assert (channels, quant) == (fam.latent_channels, fam.quant_conv)
    latents = verify.seeded_latents(reloaded)
    assert (verify.decode(comfy, latents) - verify.decode(reloaded, latents)).abs().max() <= verify.FP32_TOL
    with safe_open(str(single), "pt") as f:  # our files say their family: no question to ask
        shapes, stated = {k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata()["family"]
    assert families.single_file_family(single.name, shapes, "", stated) is fam
    with pytest.raises(ValueError, match=f"does not fit the architecture in the shipped {re.escape(fam.title)} config.*give base_config"):
        models.load_vae(str(single))  # the family's shipped config is full-size; this one is tiny
    assert families.of_config(models.load_vae(str(single), base_config=str(exported)).config) is fam

    front = card.split("---")[1]
    assert all(f"- {tag}\n" in front for tag in fam.tags) and "- test-only" not in front
    others = [f for f in families.FAMILIES.values() if f is not fam]
    assert not any(f"- {tag}\n" in front for f in others for tag in f.tags if tag not in fam.tags)
    assert f"Family: **{fam.title}** (`{family}`)" in card and fam.factors() in card
    assert f"from diffusers import AutoencoderKL, {fam.pipeline}" in card and fam.example in card
    assert ("`quant_conv` are the base" in card) == fam.quant_conv
    assert all(f"Not for {f.title} (" in card or f"; {f.title} (" in card for f in others)
    assert manifest["release"]["checkpoint"] == f"checkpoints/step_{STEPS:07d}"

    root = tmp_path_factory.getbasetemp()  # the run, its base and its prepared data all live under it
    local = sorted({str(root), str(root.resolve()), str(tmp_path)})
    for path in exported.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            leaks = [p for p in local if p.encode() in content]
            assert not leaks, f"{path.relative_to(exported)} records the local path {leaks[0]}"


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """An LDM single file of each family's tiny layout, with no metadata (as others' files are)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for family in families.CHOICES:
        state = diffusers_to_ldm(models.load_vae("tiny-random", base_family=family).state_dict())
        out[family] = root / f"{family}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, out[family])
    return out


@pytest.mark.parametrize("family, pair", [("sd", "'sd'.*'sdxl'"), ("sdxl", "'sd'.*'sdxl'"),
                                          ("sd3", "'sd3'.*'flux'"), ("flux", "'sd3'.*'flux'")])
def test_a_single_file_without_family_is_one_clear_question(single_files, family, pair):
    with pytest.raises(ValueError, match=f"Set base_family to {pair}") as err:
        models.load_vae(str(single_files[family]))
    fam = families.get(family)
    assert f"{fam.latent_channels} latent channels" in str(err.value) and str(fam.scaling_factor) in str(err.value)


def test_a_single_file_takes_the_family_it_is_given(single_files, tmp_path):
    """base_family picks the shipped config (its factors); a family that does not fit the keys,
    or contradicts base_config, is an error naming it."""
    with pytest.raises(ValueError, match="base_family='flux'.*does not fit.*'sd', 'sdxl'"):
        models.load_vae(str(single_files["sdxl"]), base_family="flux")
    with pytest.raises(ValueError, match="base_family='SDXL': must be one of sd, sdxl, sd3, flux"):
        models.load_vae(str(single_files["sdxl"]), base_family="SDXL")
    folder = tmp_path / "sd3"
    models.load_vae("tiny-random", base_family="sd3").save_pretrained(folder)
    loaded = models.load_vae(str(single_files["flux"]), base_config=str(folder))  # the config decides
    assert families.of_config(loaded.config).name == "sd3"
    with pytest.raises(ValueError, match="base_family='flux'.*Stable Diffusion 3's latents"):
        models.load_vae(str(single_files["flux"]), base_config=str(folder), base_family="flux")
    models.load_vae("tiny-random").save_pretrained(tmp_path / "sd")  # a folder's config: checked, not rewritten
    with pytest.raises(ValueError, match="base_family='sdxl'.*Stable Diffusion 1.x/2.x's latents"):
        models.load_vae(str(tmp_path / "sd"), base_family="sdxl")
    own = json.loads((models.TINY_BASE_DIR / "config.json").read_text())["scaling_factor"]
    with pytest.raises(ValueError, match=rf"base_family='sd'.*scaling factor {own}: no known family"):
        models.load_vae("tiny", base_family="sd")  # the shipped tiny VAE has its own factor


@pytest.mark.parametrize("family", families.CHOICES)
def test_shipped_configs_are_diffusers_own_settings(family):
    """Full-size family configs: the factors above, and the SD VAE architecture."""
    fam = families.get(family)
    config = AutoencoderKL.load_config(fam.config_dir)
    assert families.of_config(config) is fam
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["layers_per_block"] == 2
    assert config.get("force_upcast") is (True if family != "sd" else None)  # SD's config predates it
    with torch.device("meta"):  # the full-size model, without its memory
        vae = AutoencoderKL.from_config(config)
    assert any("quant_conv" in k for k in vae.state_dict()) is fam.quant_conv
    assert vae.decoder.conv_in.in_channels == fam.latent_channels


def test_config_inference_is_strict():
    sd = dict(AutoencoderKL.load_config(families.get("sd").config_dir))
    assert families.of_config(dict(sd, scaling_factor=0.2)) is None
    assert families.of_config(dict(sd, latent_channels=16)) is None  # 16 channels with quant convs
    assert families.of_config(dict(sd, block_out_channels=[128, 256, 512])) is None  # kl-f4
    flux = dict(AutoencoderKL.load_config(families.get("flux").config_dir))
    assert families.of_config(dict(flux, shift_factor=None)) is None


@pytest.mark.parametrize("profile, family", [("sdxl_decoder", "sdxl"), ("flux1_decoder", "flux"),
                                             ("furception_v1", "")])
def test_family_profiles_validate_and_name_their_family(profile, family):
    from furlib import pipeline

    params = pipeline.load_profile(pipeline.ROOT / "params" / f"{profile}.yaml")
    keys = set(TrainSettings.__dataclass_fields__)
    settings = TrainSettings(**{k: v for k, v in params.items() if k in keys})
    settings.validate()
    assert settings.base_family == family and settings.mixed_precision == "bf16"
    assert "/" in settings.base_model.partition("@")[0]  # a hub id: the Hub's weights, not a local file
    with pytest.raises(ValueError, match="base_family='SDXL'"):
        TrainSettings(**dict(settings.__dict__, base_family="SDXL")).validate()


def test_03_compares_a_single_file_as_one_of_the_runs_family(tmp_path, single_files):
    """A run's family comes from its checkpoint (base_family) or its base's config; 03's compare
    loads single files in that family, since their keys cannot say it."""
    from furlib.checkpoint import save_checkpoint

    base = _base_folder(tmp_path, "sdxl")
    dec = models.decoder_state(models.load_vae(str(base)))
    save_checkpoint(tmp_path / "run" / "checkpoints", 3, {"decoder": dec, "ema": dec},
                    {"base_model": str(base), "base_config": "", "base_family": ""})
    specs = eval_inputs.run_models(tmp_path / "run", compare=f"{single_files['sd']}, {base}")
    assert [(s.name, s.base_family) for s in specs] == [
        ("base", ""), ("finetuned-ema", ""), ("finetuned-raw", ""), ("sd", "sdxl"), ("base-sdxl", "")]
    with pytest.raises(ValueError, match="does not fit the architecture in the shipped SDXL config"):  # SDXL's shipped config was used
        specs[3].load()
    save_checkpoint(tmp_path / "single" / "checkpoints", 3, {"decoder": dec, "ema": dec},
                    {"base_model": str(single_files["sdxl"]), "base_config": "", "base_family": "sdxl"})
    specs = eval_inputs.run_models(tmp_path / "single")  # the run's own family, from its checkpoint
    assert {s.base_family for s in specs} == {"sdxl"}
    with pytest.raises(ValueError, match="Set base_family"):
        eval_inputs.run_models(tmp_path / "single", base_model=str(single_files["sdxl"]))[0].load()


@pytest.mark.parametrize("trained, other", [("sd", "sdxl"), ("flux", "sd3")])
def test_03_and_04_refuse_a_base_of_another_family_than_the_runs(tmp_path, trained, other):
    """SD/SDXL and SD3/FLUX.1 VAEs have the same shapes: 04 with another family's base_model
    would ship the run's decoder behind latents it never learnt to read, under a card naming
    the wrong models, and 03 would score that pair as if it were the finetune. A base of the
    run's own family is still taken."""
    from furlib.evaluation.eval_inputs import run_models

    from furlib.checkpoint import save_checkpoint

    base, wrong = _base_folder(tmp_path, trained), _base_folder(tmp_path, other)
    same = tmp_path / "same"
    models.load_vae("tiny-random", seed=5, base_family=trained).save_pretrained(same)
    dec = models.decoder_state(models.load_vae(str(base)))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 3, {"decoder": dec, "ema": dec},
                    {"base_model": str(base), "base_config": "", "base_family": ""})
    fam, wrong_fam = families.get(trained), families.get(other)
    with pytest.raises(ValueError, match=rf"{re.escape(wrong_fam.title)}.*trained on {re.escape(fam.title)}"):
        export.release_source(run, base_model=str(wrong))
    with pytest.raises(ValueError, match=rf"{re.escape(wrong_fam.title)}.*trained on {re.escape(fam.title)}"):
        export.release_source(run, base_model="tiny-random", base_family=other)
    assert export.release_source(run, base_model=str(same)).base_model == str(same)
    with pytest.raises(ValueError, match=rf"{re.escape(wrong_fam.title)}.*trained on {re.escape(fam.title)}"):
        run_models(run, base_model=str(wrong))
    assert run_models(run, base_model=str(same))[0].base_model == str(same)


def test_a_flux_sft_file_is_a_single_file(tmp_path, single_files):
    """FLUX.1's VAE circulates as ae.sft (safetensors under another suffix, as ComfyUI reads it);
    it was reported as 'no such ... file' though it exists."""
    sft = tmp_path / "ae.sft"
    shutil.copy(single_files["flux"], sft)
    folder = _base_folder(tmp_path, "flux")
    loaded = models.load_vae(str(sft), base_config=str(folder))
    assert families.of_config(loaded.config).name == "flux"
    with pytest.raises(ValueError, match="Set base_family to 'sd3'.*'flux'"):
        models.load_vae(str(sft))
    assert families.of_config(models.base_vae_config(str(sft), base_family="flux")).name == "flux"
