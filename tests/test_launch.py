"""A launcher that asked for several processes while one trains alone is said, not silent."""

import os
import subprocess
import sys
from pathlib import Path

from furlib.training import launch

ROOT = Path(__file__).resolve().parent.parent


def test_what_a_launcher_asked_for_is_read_from_its_env_or_command_line():
    assert launch.launcher_processes({"WORLD_SIZE": "4"}, []) == (4, "the launcher's WORLD_SIZE=4")
    cmdline = ["/usr/bin/python", "/x/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "furlib.training.fit"]
    assert launch.launcher_processes({}, cmdline) == (2, "accelerate launch --num_processes 2")
    assert launch.launcher_processes({}, ["python", "-m", "accelerate.commands.launch", "--num_processes=3"])[0] == 3
    assert launch.launcher_processes({}, ["bash", "run.sh", "--num_processes", "2"]) == (1, "")  # not accelerate
    assert launch.single_process_warning("cpu", 2, {"WORLD_SIZE": "2"}, []) == ""  # it did start two
    assert launch.single_process_warning("cpu", 1, {}, ["python"]) == ""


def test_accelerate_launch_cpu_with_two_processes_warns_in_the_one_it_starts(tmp_path):
    """The real launcher: `accelerate launch --cpu --num_processes 2` starts one process."""
    script = tmp_path / "probe.py"
    script.write_text("import os\nfrom furlib.training import launch\n"
                      "print('WORLD', os.environ.get('WORLD_SIZE'))\nprint(launch.single_process_warning('auto', 1))\n")
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("WORLD") == 1, "accelerate --cpu started one process"
    assert "WARNING: accelerate launch --num_processes 2 asked for 2 processes" in out.stdout
    assert "--multi_gpu" in out.stdout


def test_num_gpus_without_a_gpu_says_so(monkeypatch):
    import pytest
    import torch

    from furlib.training.settings import TrainSettings

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError) as err:
        TrainSettings(num_gpus=2)
    assert "num_gpus=2: no CUDA GPU is visible" in str(err.value) and "at most 0" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="use at most 1"):
        TrainSettings(num_gpus=2)
