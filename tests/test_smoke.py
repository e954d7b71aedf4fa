"""The four real notebooks, in order, through papermill on the smallest profile."""

import json
import math
import shutil

import pytest

from furlib import pipeline


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """01 on one "runtime", 02-04 on another that sees only what 01 left in the shared outputs_dir
    (Colab: Drive, mounted at another path; Kaggle: the first notebook's output, copied over)."""
    first, second = tmp_path_factory.mktemp("runtime1_drive"), tmp_path_factory.mktemp("runtime2_drive")
    profile = pipeline.ROOT / "params" / "smoke.yaml"
    written = pipeline.run(profile, ["01_data_prep"], overrides={"outputs_dir": str(first)})
    shutil.copytree(written, second / written.name)
    shutil.rmtree(first)  # nothing of the first runtime is left to read
    return pipeline.run(profile, pipeline.STAGES[1:], overrides={"outputs_dir": str(second)})


def _record(run_dir, stage):
    return json.loads((run_dir / f"{stage}.record.json").read_text())


def test_every_stage_left_its_notebook_and_record(run_dir):
    for stage in pipeline.STAGES:
        assert (run_dir / f"{stage}.ipynb").exists()
        record = _record(run_dir, stage)
        assert record["parameters"]["run_name"] == "smoke"
        assert record["versions"]["torch"] and record["device"]["device"] == "cpu"


def test_data_report_lists_every_input_once(run_dir):
    report = json.loads((run_dir / "data" / "report.json").read_text())
    ids = [a["id"] for a in report["accepted"]] + [r["path"] for r in report["rejected"]] + \
          [d["path"] for d in report["duplicates"]]
    assert len(ids) == len(set(ids)) and report["counts"]["train"] >= 1 and report["counts"]["val"] >= 1


def test_training_checkpointed_with_critic_active(run_dir):
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    rows = [json.loads(line) for line in (run_dir / "logs" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["rec/total"]) and "critic/gp" in r and "gan/weight" in r for r in rows)
    assert (run_dir / "logs" / "tensorboard").is_dir()
    notes = _record(run_dir, "02_train")["results"]["notes"]
    assert any("RANDOM backbone" in n for n in notes) and any("not pretrained" in n for n in notes)


def test_eval_table_finite_and_honest(run_dir):
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for name in ("base", "finetuned-ema", "finetuned-raw"):
        for key in ("psnr", "ssim", "lpips", "delta_e_ok"):
            assert math.isfinite(metrics["models"][name][key]["mean"]), (name, key)
    table = (run_dir / "eval" / "metrics.md").read_text()
    assert "RANDOM" in table and "n/a" in table  # random LPIPS backbone and rFID off are said
    assert list((run_dir / "eval").glob("diff_*.png"))


def test_export_verified(run_dir):
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert (run_dir / "export" / "config.json").exists()
    assert list((run_dir / "export").glob("smoke-v0.0-smoke-step4.safetensors")), "named after the run"
    card = (run_dir / "export" / "README.md").read_text()
    assert "](reconstructions.png)" in card and (run_dir / "export" / "reconstructions.png").exists()
    assert "## Training data" in card and "`builtin`" in card
    assert len(manifest["files"]) >= 5 and all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert manifest["verification"] and all(v["passed"] for v in manifest["verification"])


def test_interrupted_run_resumes_to_the_same_weights(run_dir):
    """A run stopped at step 4 and resumed to 6 ends with the weights of a straight 6-step run."""
    import shutil

    from safetensors.torch import load_file

    outputs = run_dir.parent
    shutil.copytree(run_dir, outputs / "resumed", ignore=shutil.ignore_patterns("export", "eval"))
    shutil.copytree(run_dir / "data", outputs / "straight" / "data")
    profile = pipeline.ROOT / "params" / "smoke.yaml"
    for name in ("resumed", "straight"):
        pipeline.run(profile, ["02_train"], {"outputs_dir": str(outputs), "run_name": name, "max_steps": 6})
    assert "resumed from" in (outputs / "resumed" / "02_train.ipynb").read_text()
    for stem in ("decoder", "ema", "critic"):
        a = load_file(outputs / "resumed" / "checkpoints" / "step_0000006" / f"{stem}.safetensors")
        b = load_file(outputs / "straight" / "checkpoints" / "step_0000006" / f"{stem}.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stem


def test_restart_without_resume_refuses_to_overwrite(run_dir):
    from furlib.training import fit

    params = dict(outputs_dir=str(run_dir.parent), run_name=run_dir.name, resume=False, device="cpu")
    with pytest.raises(ValueError, match="resume=False"):
        fit.fit(params)


def test_training_without_prepared_data_names_the_missing_step(tmp_path):
    from furlib.training import fit

    params = dict(outputs_dir=str(tmp_path), run_name="nodata", device="cpu")
    with pytest.raises(ValueError, match="no training images .*run 01_data_prep with run_name='nodata'"):
        fit.fit(params)


def test_saved_notebooks_show_text_progress_not_frozen_widgets(run_dir):
    """tqdm.auto stored a widget at 0% in executed notebooks; the text bar keeps its last state."""
    nb = json.loads((run_dir / "03_eval.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    stderr = "".join("".join(o["text"]) for o in outputs if o.get("name") == "stderr")
    assert "evaluate: 100%" in stderr and "batch/s]" in stderr
    texts = "".join("".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", "")) for o in outputs)
    assert "VBox(" not in texts and "headless run: the wipes are" in texts  # no dead widget repr
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
                and "evaluate" in "".join(o["data"].get("text/plain", ""))]
