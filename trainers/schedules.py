"""Learning-rate schedules stepped per iteration (nnU-Net's own poly schedule steps per epoch)."""
from __future__ import annotations

import math

import torch


def set_cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, steps: int,
                  floor: float = 0.05) -> float:
    """Set every parameter group's learning rate for step ``step`` of ``steps`` (0-based): cosine decay from
    ``base_lr`` to ``floor * base_lr``; the rate set. Used by the step-driven trainings outside nnU-Net's
    trainers (``samnnu_distill``, the prompt path, the click corrector)."""
    lr = base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class WarmupPolyLR:
    """Linear warm-up over the first ``warmup`` iterations, then lr * (1 - t)^0.9 (t: fraction of the rest).

    nnU-Net calls :meth:`step` with the epoch at each epoch start (which re-synchronises the iteration
    count after a resumed run); the trainer calls :meth:`step_iteration` after every training step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, total_iterations: int,
                 warmup: int, exponent: float = 0.9):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.total = max(1, total_iterations)
        self.warmup = max(0, min(warmup, self.total - 1))
        self.exponent = exponent
        self.iteration = 0
        self._apply()

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup:
            return self.initial_lr * (iteration + 1) / (self.warmup + 1)
        t = (iteration - self.warmup) / max(1, self.total - self.warmup)
        return self.initial_lr * max(0.0, 1.0 - t) ** self.exponent

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.iteration)

    def step(self, epoch: int | None = None, iterations_per_epoch: int | None = None) -> None:
        """With ``epoch`` (nnU-Net calls this at each epoch start): jump to that epoch's first iteration."""
        if epoch is not None and iterations_per_epoch is not None:
            self.iteration = epoch * iterations_per_epoch
        self._apply()

    def step_iteration(self) -> None:
        self.iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self._apply()
