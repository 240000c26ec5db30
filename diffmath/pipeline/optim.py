"""The optimisation pieces of the training loop: the learning-rate schedule, the EMA of the
weights and the flag that Ctrl-C / SIGTERM set.

Optimisation: AdamW, linear warm-up then a constant learning rate (optionally a cosine decay
over ``lr_decay_steps``; neither depends on ``steps``, so extending a run with ``--resume``
gives the same trajectory as planning the longer run), gradient-norm clipping, EMA weights
(decay min(ema_decay, (1 + step)/(10 + step))), bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
import signal
import threading

import torch

from .config import TrainConfig


def lr_schedule(lr: float, warmup: int, decay_steps: int, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant, or a cosine decay to 0 at
    ``decay_steps`` (if > 0)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay_steps:
        frac = min(1.0, step / decay_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr


def learning_rate(config: TrainConfig, step: int) -> float:
    """``lr_schedule`` with the run's lr, warmup and lr_decay_steps."""
    return lr_schedule(config.lr, config.warmup, config.lr_decay_steps, step)


class StopFlag:
    """Set by SIGINT / SIGTERM while installed (the loop then checkpoints and returns); a second
    Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # pragma: no cover
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}


@torch.no_grad()
def ema_update(ema, model, decay: float):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (in place)."""
    ep = list(ema.parameters())
    mp = list(model.parameters())
    torch._foreach_lerp_(ep, mp, 1.0 - decay)
