"""FLOPs of each part of the project's training step, under the names ``project-parts`` times.

    python benchmarks/step_flops.py                      # SD-sized, batch 32, 256 px: seconds on a CPU
    python benchmarks/step_flops.py --batch 8 --res 512

Counted with ``torch.utils.flop_counter``'s formulas (convolutions and matrix products, forward and
backward) on the meta device: nothing is computed, so the SD-sized step is counted here, on any
CPU, and FLOPs do not depend on the dtype. The step runs part by part as ``Trainer.step`` does at
``grad_accum`` 1 (encode with the posterior mode, the first pass, the last-layer gradients, the
decoder backward, the critic's loss and penalty), with phase upsampling on (``--no-phase``: off).
Divided into ``project-parts``' milliseconds this gives each part's TFLOP/s: where the GPU is
far from its rate, the part has room; where it is near, only fewer FLOPs help.
"""

import argparse
import contextlib
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from furlib.models import load_vae
from furlib.perceptual import LPIPS
from furlib.training import speed
from furlib.training.settings import TrainSettings
from furlib.training.trainer import Trainer


class _MetaSafeAutocast(torch.autocast):
    """``torch.autocast`` refuses the meta device; the step's (and the layer norms' and Oklab's
    ``enabled=False``) contexts are no-ops there. Dtypes do not change FLOPs."""

    def __init__(self, device_type, *args, **kwargs):
        self.meta = device_type == "meta"
        if not self.meta:
            super().__init__(device_type, *args, **kwargs)

    def __enter__(self):
        return None if self.meta else super().__enter__()

    def __exit__(self, *exc):
        return None if self.meta else super().__exit__(*exc)


class FlopTotal(TorchDispatchMode):
    """``FlopCounterMode``'s formulas without its module hooks, which refuse the step's
    ``autograd.grad`` at a leaf (the reconstruction)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


def count(batch: int, res: int, phase: bool) -> dict:
    counter, flops, open_at = FlopTotal(), {}, {}

    @contextlib.contextmanager
    def part(name):  # Tuning.part_timer: FLOPs instead of milliseconds, nested parts each counted
        open_at[name] = counter.get_total_flops()
        yield
        flops[name] = flops.get(name, 0) + counter.get_total_flops() - open_at.pop(name)

    s = TrainSettings(batch_size=batch, latent_mode="mode", mixed_precision="no",
                      phase_upsample="yes" if phase else "no", torch_compile="no")
    t = Trainer(load_vae("random:sd"), s, "meta", LPIPS("vgg", "random"), tuning=speed.Tuning(part_timer=part))
    x = torch.empty(batch, 3, res, res, device="meta")
    with counter:
        with part("encode"):
            z = t.encode(x, None)
        with part("decoder_grads"):
            micro, recon, logs = t.reconstruction_grads(x, z, gan_on=True, keep_graph=True)
        with part("decoder_grads"), part("decoder backward"):
            t.decoder_backward(micro, torch.ones((), device="meta"), 1)
        with part("critic_grads"):
            t.critic_grads(x, recon, None, 1)
    return {name: f / 1e12 for name, f in flops.items()} | {"step": counter.get_total_flops() / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--no-phase", action="store_true", help="plain upsampling convs")
    args = ap.parse_args()
    torch.autocast = _MetaSafeAutocast  # this process only: it never computes
    tflop = count(args.batch, args.res, not args.no_phase)
    print(json.dumps({"batch": args.batch, "res": args.res, "phase_upsample": not args.no_phase,
                      "tflop": {k: round(v, 3) for k, v in tflop.items()}}, indent=1))


if __name__ == "__main__":
    main()
