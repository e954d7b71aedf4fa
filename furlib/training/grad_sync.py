"""Several processes, one run: gradients averaged by hand, and a check that ranks agree.

Why not ``DistributedDataParallel`` (or accelerate's ``prepare``, which wraps the model in it):
- the step differentiates at the reconstruction with ``torch.autograd.grad`` (the adaptive
  weight's fast path, ``furlib.training.step``); DDP's reducer only handles gradients that
  backward accumulates into ``.grad`` and documents that ``autograd.grad`` does not work with it;
- the critic runs three ways a step (the decoder's term, its own loss, the gradient penalty's
  double backward): a DDP-wrapped critic would expect one reduction per forward;
- two models with their own optimizers, scalers and skip decisions: every rank must take the
  same skip-or-step decision, so the loss is averaged along with the gradients.
One flat all-reduce after all micro-batches does all of this (one call a step; ``grad_accum``
needs no ``no_sync``). What it gives up: DDP overlaps the reduction with the backward; here it
runs after it (one decoder's and one critic's gradients a step).
"""

import torch


def average_gradients(params: list, scalars: list, world_size: int) -> None:
    """Average the ``.grad`` of ``params`` and the 0-dim tensors ``scalars`` (in place) over all
    ranks with one all-reduce; a no-op on one process. Everything must be fp32 (one flat buffer)."""
    if world_size == 1:
        return
    average_tensors([p.grad for p in params if p.grad is not None] + [s.view(1) for s in scalars], world_size)


def average_tensors(tensors: list, world_size: int) -> None:
    """Average fp32 ``tensors`` in place over all ranks with one all-reduce (e.g. the adaptive
    weight's last-layer gradient sums); a no-op on one process."""
    if world_size == 1:
        return
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    for t, synced in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(synced.view_as(t))


def check_in_sync(tensors: list, rank: int, world_size: int, step: int) -> None:
    """Raise unless every rank holds the same ``tensors`` (a collective call; compares one
    float64 sum per tensor, which any real divergence changes)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    mine = torch.stack([t.detach().double().sum() for t in tensors])
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    if not all(torch.equal(mine, other) for other in every):
        raise RuntimeError(f"rank {rank}: weights differ between ranks at step {step}")
