"""Exponential moving average of the decoder's weights, in fp32.

sd-vae-ft-mse's EMA decay was 0.999 at batch 192; the same memory in images at another
effective batch b is ``decay_ref ** (b / batch_ref)``: 0.999833 at batch 32.
"""

import contextlib

import torch


def scaled_decay(batch_size: int, decay_ref: float = 0.999, batch_ref: int = 192) -> float:
    if not 0.0 < decay_ref < 1.0 or batch_size <= 0 or batch_ref <= 0:
        raise ValueError("need 0 < decay_ref < 1 and positive batch sizes")
    return decay_ref ** (batch_size / batch_ref)


class EMA:
    """Shadow copies of ``named_params`` (name -> Parameter); updated after each good step."""

    def __init__(self, named_params: list, decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # shadow += (1 - decay) * (param - shadow), one fused kernel per tensor list
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the live parameters (for previews)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
