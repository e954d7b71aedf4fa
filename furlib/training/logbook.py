"""Where training logs go: a JSONL file, TensorBoard scalars and images, and in-memory history."""

import json
from pathlib import Path

import torch


def _plain(logs: dict) -> dict:
    return {k: float(v.detach().float()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}


class Logbook:
    """``log(step, logs)`` appends to ``log.jsonl`` and TensorBoard; ``history`` feeds the plots.

    On resume the JSONL is cut back to the checkpoint's step, so the history has no duplicates.
    """

    def __init__(self, log_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "log.jsonl"
        self.history = [r for r in self._read() if r["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.log_dir / "tensorboard", purge_step=resume_step or None)

    def _read(self) -> list:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, step: int, logs: dict) -> dict:
        row = dict(_plain(logs), step=step)
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
        return row

    def image(self, tag: str, grid_hwc_01, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, grid_hwc_01, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
