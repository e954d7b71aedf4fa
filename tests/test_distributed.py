"""Two processes (torchrun, gloo on the CPU) train one run: the same weights on every rank."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from furlib.data import prepare

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_stay_in_sync(tmp_path):
    run = tmp_path / "ddp"
    prepare.prepare("builtin", run / "data", resolution=64, max_side=256, max_images=4, art_count=4,
                    val_fraction=0.3, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "furlib.training.fit",
           "params/smoke.yaml", "-p", f"outputs_dir={tmp_path}", "-p", "run_name=ddp", "-p", "max_steps=2",
           "-p", "checkpoint_every=1", "-p", "plot_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run / "train" / "results.json").read_text())
    assert results["processes"] == 2 and results["step"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def _desync_worker(rank, init_file, results):
    import torch
    import torch.distributed as dist

    from furlib.models import load_vae
    from furlib.training.settings import TrainSettings
    from furlib.training.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    trainer = Trainer(load_vae("tiny-random", seed=rank), TrainSettings(batch_size=2, lpips_weight=0.0, mixed_precision="no"),
                      "cpu", None, rank=rank, world_size=2)  # different seeds: different weights
    try:
        trainer.check_in_sync()
        results[rank] = "in sync"
    except RuntimeError as err:
        results[rank] = str(err)
    dist.destroy_process_group()


def test_sync_check_catches_ranks_that_differ(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_desync_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert all("differ between ranks" in results[r] for r in (0, 1)), dict(results)


def _half_batch_worker(rank, init_file, results):
    import torch
    import torch.distributed as dist

    from test_recipe import accum_trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    t = accum_trainer(1, batch=4, world_size=2)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    logs = t.step(x[4 * rank:4 * rank + 4])
    results[rank] = (float(logs["gan/weight"]), torch.cat([p.grad.flatten() for _, p in t.trainable]))
    dist.destroy_process_group()


def test_two_processes_share_the_global_batchs_adaptive_weight(tmp_path):
    """Two ranks of 4 images: the weight and the averaged gradient are one process's on all 8."""
    import torch
    import torch.multiprocessing as mp

    from test_recipe import accum_trainer

    results = mp.Manager().dict()
    mp.spawn(_half_batch_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    one = accum_trainer(1, batch=8)
    logs = one.step(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    want = torch.cat([p.grad.flatten() for _, p in one.trainable])
    for rank in (0, 1):
        weight, grad = results[rank]
        assert weight == pytest.approx(float(logs["gan/weight"]), rel=1e-4)
        assert (grad - want).norm() <= 1e-3 * want.norm()


def test_a_stream_with_fewer_rows_than_processes_stops_every_rank_with_a_clear_error(tmp_path):
    """A streamed train_source of one row, two processes: rank 1's share is empty. Its loader ended
    at once while rank 0 waited for it in the first step's gradient average, for ever (rank 1 in
    the final save's collective); now every rank stops before the first step, the cause named."""
    import io

    import datasets
    from PIL import Image

    run = tmp_path / "s"
    prepare.prepare("builtin", run / "data", resolution=32, max_side=128, max_images=3, art_count=3,
                    val_fraction=1.0, progress=False)  # data/val only: the preview's
    png = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 40, 40)).save(png, "PNG")
    datasets.Dataset.from_dict({"image": [{"bytes": png.getvalue(), "path": None}]}).cast_column(
        "image", datasets.Image()).to_parquet(str(tmp_path / "one.parquet"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "furlib.training.fit",
           "params/smoke.yaml", "-p", f"outputs_dir={tmp_path}", "-p", "run_name=s", "-p", "max_steps=2",
           "-p", "resolution=32", "-p", "plot_every=0", "-p", f"train_source={tmp_path / 'one.parquet'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        proc.communicate()
        pytest.fail("the two processes hung")
    assert proc.returncode != 0
    assert stderr.count("rank 1 of 2 has no rows of train_source") >= 2, stderr[-3000:]  # both ranks say it
    assert not (run / "checkpoints").exists()
