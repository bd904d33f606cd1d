"""Adam for the few tensors of one pair's optimisation (affine parameters, a velocity field).

:class:`torch.optim.Adam` imports ``torch._dynamo`` the first time an optimiser is built (its
methods are wrapped by ``torch._compile._disable_dynamo``): 1.3-1.6 s of CPU, several seconds of
wall time on a busy 2-core machine, paid once by every ``mambamorph register`` process, more
than the whole affine stage costs. This is the same update (Kingma & Ba 2015, with the bias
corrections as torch computes them; tests/test_optimize.py checks it against
``torch.optim.Adam``) without that import. Training keeps ``torch.optim.Adam`` (its state is in
the checkpoints, and a training run pays the import once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["Adam", "cosine_lr"]


class Adam:
    """Adam on a list of tensors that require gradients.

    Args:
        params: the tensors (leaf tensors with ``requires_grad``); each is updated in place.
        lr: step size per tensor (one value for all, or one per tensor), in the tensor's units.
        betas: decay rates of the first and second moment estimates.
        eps: added to the root of the second moment (after bias correction).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float | Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        lrs = [lr] * len(self.params) if isinstance(lr, (int, float)) else list(lr)
        if len(lrs) != len(self.params):
            raise ValueError(f"Adam: {len(lrs)} step sizes for {len(self.params)} tensors")
        self.lr = [float(v) for v in lrs]
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.steps = 0
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        """Drop the gradients (``None``), as ``torch.optim``'s ``set_to_none=True`` does."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        """One update from the tensors' ``.grad`` (a tensor without one is left alone), with
        every step size multiplied by ``scale`` (a schedule, e.g. :func:`cosine_lr`)."""
        self.steps += 1
        b1, b2 = self.betas
        c1 = 1.0 - b1 ** self.steps
        c2_sqrt = math.sqrt(1.0 - b2 ** self.steps)
        for p, m, v, lr in zip(self.params, self._m, self._v, self.lr):
            if p.grad is None:
                continue
            g = p.grad
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / c2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr * scale / c1)


def cosine_lr(step: int, total: int) -> float:
    """Step-size factor of a cosine decay from 1 at ``step`` 0 to 0 at ``step == total``
    (``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``eta_min=0``, in closed form)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))
