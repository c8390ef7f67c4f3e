"""Weight averaging for a run that may be stopped at any time: a power-function average of the trainable weights.

A samnnu trainer runs its normal schedule (warm-up, then poly decay over 1000 epochs) and a user, or the
benchmark's budget, often stops it long before the learning rate has decayed. The last weights then carry
the noise of a full learning rate. An exponential moving average (EMA) of the weights removes that noise,
but a fixed decay suits one run length only: 0.999 averages over the last 1000 iterations, half of a
60-minute CPU run and a blink of a converged one. :class:`PowerAverage` averages over a fixed *share* of
the run so far instead: after update ``t``

    average <- beta_t * average + (1 - beta_t) * weights,   beta_t = (1 - 1 / t) ** (gamma + 1)

which weights update ``s`` in proportion to ``s ** gamma``, whenever the run stops: the average is
centred ``t / (gamma + 2)`` iterations before the end and spread over a fixed share of the run (standard
deviation :func:`relative_width` times ``t``; 0.10 for ``gamma`` 7, so it draws on roughly the last
tenth to fifth of the iterations). This is the "power function EMA" of Karras et al., *Analyzing and
improving the training dynamics of diffusion models* (2024).

Only parameters that train are averaged; frozen ones (a frozen SAM encoder) do not change, and the
SAM networks' normalisation layers keep no running statistics outside the frozen encoder.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from samnnu.errors import SamnnuError

#: key of a checkpoint that holds the averaged weights as ``network_weights``: the weights training
#: continues from (``weights``) and how many updates the average has seen (``updates``)
CHECKPOINT_KEY = "samnnu_weight_average"


def relative_width(gamma: float) -> float:
    """Standard deviation of the averaging profile as a share of the run length (0.10 for gamma 7)."""
    return (gamma + 1) ** 0.5 / ((gamma + 2) * (gamma + 3) ** 0.5)


class PowerAverage:
    """The power-function average of ``module``'s trainable parameters (see the module docstring).

    The average and the training weights can trade places (:meth:`swap`, :meth:`applied`): the network
    then computes with the average (validation, checkpoints for inference) and the training weights wait
    beside it, to be put back before the next training step.

    Args:
        module: the network, without DDP or compile wrappers (their parameters are the same tensors).
        gamma: the exponent; larger averages over a shorter tail of the run.
    """

    def __init__(self, module: torch.nn.Module, gamma: float):
        if gamma <= 0:
            raise SamnnuError(f"weight averaging: gamma must be positive, got {gamma}")
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]
        self.gamma = float(gamma)
        self.updates = 0
        self.swapped = False  # True while the network holds the average and ``self.average`` the training weights

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current training weights into the average (call after each optimiser step)."""
        if self.swapped:
            raise SamnnuError("weight averaging: update() while the network holds the average")
        self.updates += 1
        beta = (1.0 - 1.0 / self.updates) ** (self.gamma + 1.0)
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - beta)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the network's weights and the stored ones (the average <-> the training weights)."""
        for p, a in zip(self.params, self.average):
            held = p.detach().clone()
            p.copy_(a)
            a.copy_(held)
        self.swapped = not self.swapped

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the network computes with the averaged weights; training weights come back after."""
        if self.swapped:  # already applied (nested use)
            yield
            return
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def training_state(self) -> dict:
        """What a checkpoint that stores the average as the network's weights needs to resume training:
        ``{"updates": int, "gamma": float, "weights": {name: tensor}}`` (the training weights, on the CPU)."""
        weights = self.average if self.swapped else self.params
        return {"updates": self.updates, "gamma": self.gamma,
                "weights": {n: w.detach().to("cpu", copy=True) for n, w in zip(self.names, weights)}}

    @torch.no_grad()
    def load_training_state(self, state: dict) -> None:
        """After the network was loaded with a checkpoint's (averaged) weights: keep those as the average
        and put the training weights of ``state`` (:meth:`training_state`) back into the network."""
        if self.swapped:
            raise SamnnuError("weight averaging: cannot load while the network holds the average")
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise SamnnuError(f"weight averaging: the checkpoint's training weights lack {missing[0]} "
                              f"(and {len(missing) - 1} more): not this network's")
        for p, a, n in zip(self.params, self.average, self.names):
            a.copy_(p.detach())
            p.copy_(weights[n].to(p.device, p.dtype))
        self.updates = int(state["updates"])

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average afresh from the current weights (a checkpoint without an average was loaded)."""
        for p, a in zip(self.params, self.average):
            a.copy_(p.detach())
        self.updates = 0
