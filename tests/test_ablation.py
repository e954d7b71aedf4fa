"""benchmarks/ablation.py's own checks (issue 26): a variant whose decoder did not move is
refused, and differences inside the measured run-to-run noise are marked."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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


def test_ablation_refuses_a_frozen_decoder_on_a_tiny_cpu_run(tmp_path):
    """lr x 1e-25 cannot move fp32 weights: the script stops before scoring, naming the variant."""
    ablation = bench("ablation")
    args = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--device", "cpu", "--steps", "1",
            "--art", "4", "--resolution", "64", "--batch", "2", "--jobs", "1", "--workers", "0",
            "--variants", "furception_v1", "--noise-seed", "-1", "--lr-scale", "1e-25", "--val-fraction", "0.3"]
    with pytest.raises(RuntimeError, match=r"refusing to report: the decoder of \['furception_v1'\] did not change"):
        ablation.main(args)
    assert not (tmp_path / "out" / "ablation.md").exists()


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
