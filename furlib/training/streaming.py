"""Training straight from a parquet/arrow/save_to_disk or Hub dataset, without 01's folder.

For data that does not fit a local disk. ``StreamCrops`` reads the dataset as a ``datasets``
IterableDataset (``furlib.table_sources.open_stream``), splits it per rank with datasets'
``split_dataset_by_node`` and per DataLoader worker with datasets' own worker sharding (an
IterableDataset iterated inside a worker reads only its share of the shards), decodes every row
with 01's own functions (``images.decode_input``: EXIF, ICC, alpha, bombs, too small rejected;
``images.cap_long_side``: long side capped at ``max_side``) and yields one random crop per image (``crops.random_crop``) as ``rgb_m11`` CHW.
Rows that fail go to ``<log_dir>/rejected-rank<r>-worker<w>.jsonl``, one JSON line each.

Differences from the prepared path, by design: no deduplication and no val split (use a prepared
val set or another split), shuffling by datasets' shard order and a ``shuffle_buffer`` of rows
(an epoch is one pass), and no exact resume at a step: a resumed run (``start_step``) draws another
shard order, buffer order and crops, so it does not repeat the first batches, but it reads the
stream from the start again (with a single file, near the rows an earlier session began with).
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from furlib.images import DEFAULT_MAX_PIXELS, ImageRejected, cap_long_side, decode_input
from furlib import crops
from furlib.table_sources import beside


class StreamCrops(torch.utils.data.IterableDataset):
    """Endless ``rgb_m11`` CHW crops of one rank's share of a streamed dataset."""

    def __init__(self, source, resolution: int, seed: int = 0, rank: int = 0, world: int = 1,
                 source_split: str = "train", image_column: str = "image", revision: str = "",
                 max_side: int = 16384, max_pixels: int = DEFAULT_MAX_PIXELS,
                 background=(255, 255, 255), min_crop_scale: float = 0.08,
                 shuffle_buffer: int = 256, log_dir=None, start_step: int = 0):
        from datasets.distributed import split_dataset_by_node

        from furlib.inputs import source_kind
        from furlib.table_sources import open_stream

        ds, self.prefix = open_stream(source, source_split, image_column, revision)  # fails here, early
        kind, path = source_kind(source)
        self.table = path if kind == "table" else None  # its relative image paths are taken beside it
        order = int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0])  # a resume: another
        if shuffle_buffer > 0:
            ds = ds.shuffle(seed=order, buffer_size=shuffle_buffer)
        self.ds, self.column = split_dataset_by_node(ds, rank=rank, world_size=world), image_column
        self.resolution, self.seed, self.rank, self.min_crop_scale = resolution, order, rank, min_crop_scale
        self.max_side, self.max_pixels, self.background = max_side, max_pixels, tuple(background)
        self.log_dir = None if log_dir is None else Path(log_dir)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        epoch, count = 0, 0
        while True:
            self.ds.set_epoch(epoch)  # a new shard and buffer order every pass
            got = rows = 0
            for rows, row in enumerate(self.ds, 1):
                index = rows - 1
                image = self._decode(row[self.column], f"{self.prefix}/epoch{epoch}/{index}", worker)
                if image is None:
                    continue
                rng = np.random.default_rng([self.seed, self.rank, worker, count])
                count, got = count + 1, got + 1
                yield crops.to_rgb_m11(crops.random_crop(image, self.resolution, rng, self.min_crop_scale))
            if not rows:  # more workers than shards: datasets gives this one none
                return
            if not got:
                raise ValueError(f"rank {self.rank} worker {worker}: no usable image in its share of "
                                 f"{self.prefix} (see the rejection log in {self.log_dir})")
            epoch += 1

    def _decode(self, value, where: str, worker: int) -> Image.Image | None:
        """01's decoding of one row (``images.decode_input``, ``cap_long_side``), or None after
        logging why it was rejected."""
        if isinstance(value, dict):  # datasets' Image feature: {"bytes", "path"}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and self.table is not None:
            value = beside(self.table, Path(value))
        try:
            image, _ = decode_input(value, self.background, self.max_pixels, min_side=self.resolution)
            return cap_long_side(image, self.max_side, self.resolution)
        except ImageRejected as e:
            self._log(where, worker, e.reason, e.detail)
            return None
        except Exception as e:  # noqa: BLE001 - as 01's: one odd row must not end a long run; it is logged
            self._log(where, worker, "error", f"{type(e).__name__}: {e}")
            return None

    def _log(self, where: str, worker: int, reason: str, detail: str) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"rejected-rank{self.rank}-worker{worker}.jsonl", "a") as f:
                f.write(json.dumps({"row": where, "reason": reason, "detail": detail}) + "\n")


def make_stream_loader(source, resolution: int, batch_size: int, seed: int = 0, rank: int = 0,
                       world: int = 1, num_workers: int = 0, pin_memory: bool = False,
                       log_dir=None, **stream) -> torch.utils.data.DataLoader:
    """An endless DataLoader of ``(batch_size, 3, resolution, resolution)`` ``rgb_m11`` batches
    streamed from ``source`` (``stream``: StreamCrops' other settings)."""
    dataset = StreamCrops(source, resolution, seed, rank, world, log_dir=log_dir, **stream)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
