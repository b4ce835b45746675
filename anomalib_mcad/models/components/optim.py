"""Optimizers and learning-rate schedules shared by the models.

``StableAdamW`` is anomalib's (``anomalib.models.image.dinomaly.components``), itself a
line-for-line port of the Dinomaly authors' optimizer; anomalib is pinned to 2.7.x, so the
import is stable and we do not keep a second copy.
"""

from __future__ import annotations

import math

from anomalib.models.image.dinomaly.components import StableAdamW
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["StableAdamW", "WarmupCosineLR"]


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from ``start_lr`` to the base lr, then cosine annealing to ``final_lr``.

    Counted in optimizer steps (iterations), as the Dinomaly and INP-Former recipes are, so
    it must be stepped every iteration (Lightning ``interval="step"``). The values equal the
    authors' precomputed schedule: ``linspace(start, base, warmup)`` then
    ``final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2``; after ``total_iters``
    the rate stays at ``final_lr``. Closed form, so its state dict holds only numbers.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int,
        warmup_iters: int = 100,
        final_lr: float = 2e-4,
        start_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_iters <= warmup_iters:
            msg = f"total_iters ({total_iters}) must exceed warmup_iters ({warmup_iters})"
            raise ValueError(msg)
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.final_lr = final_lr
        self.start_lr = start_lr
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int, base_lr: float) -> float:
        """Learning rate at iteration ``step`` for a group whose peak rate is ``base_lr``."""
        if step >= self.total_iters:
            return self.final_lr
        if step < self.warmup_iters:
            if self.warmup_iters == 1:
                return base_lr
            return self.start_lr + (base_lr - self.start_lr) * step / (self.warmup_iters - 1)
        progress = (step - self.warmup_iters) / (self.total_iters - self.warmup_iters)
        return self.final_lr + 0.5 * (base_lr - self.final_lr) * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        """Rates for the current iteration (``self.last_epoch`` counts iterations here)."""
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]


def stable_adamw_warmup_cosine(
    params: object,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    warmup_iters: int,
    final_lr: float,
    total_steps: float,
    length_hint: str,
) -> dict:
    """Lightning optimizer config: StableAdamW with warm-up + cosine stepped every iteration.

    ``total_steps`` is the trainer's ``estimated_stepping_batches``; an unbounded run is an
    error whose message ends with ``length_hint`` (what to set, and the paper's value).
    """
    if total_steps <= 0 or total_steps == float("inf"):
        msg = f"A finite training length is needed: {length_hint}"
        raise ValueError(msg)
    total = int(total_steps)
    optimizer = StableAdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    warmup = min(warmup_iters, max(total - 1, 0))
    scheduler = WarmupCosineLR(optimizer, total_iters=total, warmup_iters=warmup, final_lr=final_lr)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
