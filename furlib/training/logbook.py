"""Where training logs go: a JSONL file, TensorBoard scalars and images, and in-memory history."""

import json
from pathlib import Path

import torch

from furlib import atomic


def read_log(path: Path) -> tuple[list, list]:
    """(the rows of a ``log.jsonl``, notes): a half-written last line (the normal result of a kill
    mid-write) is dropped with a note; a damaged line before the last is an error naming the
    file and line; no file, no rows."""
    if not path.exists():
        return [], []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows, notes = [], []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i != lines[-1][0]:
                raise ValueError(f"{path} line {i} is not JSON ({err}); remove that line "
                                 "or the whole file (the checkpoint does not depend on it)") from err
            notes.append(f"{path}: dropped a half-written last line {line[:40]!r}... "
                         "(the run was killed while logging)")
    return rows, notes


def _plain(logs: dict) -> dict:
    return {k: float(v.detach().float()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}


class Logbook:
    """``log(step, logs)`` appends to ``log.jsonl`` and TensorBoard; ``history`` feeds the plots.

    On resume the JSONL is cut back to the checkpoint's step, so the history has no duplicates.
    A half-written last line (the normal result of a kill mid-write) is dropped, and ``notes``
    says so; a damaged line before the last is an error naming the file and line.
    """

    def __init__(self, log_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "log.jsonl"
        self.notes: list[str] = []
        self.history = [r for r in self._read() if r["step"] <= resume_step] if resume_step else []
        # a kill here keeps the old log whole
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops events at steps >= purge_step: the checkpoint's own step stays
            # (as in log.jsonl), the steps after it that the resume trains again go
            self.writer = SummaryWriter(self.log_dir / "tensorboard",
                                        purge_step=resume_step + 1 if resume_step else None)

    def _read(self) -> list:
        rows, notes = read_log(self.path)
        self.notes += notes
        return rows

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
