"""Variants of SAMUNetTrainer, each changing one thing, kept so that their measurements can be rerun.

``docs/benchmarks.md`` ("Recipe") records each against SAMUNetTrainer at an equal CPU-time budget; none
of them is the default. Everything not named here is SAMUNetTrainer's.
"""
from __future__ import annotations

from samnnu.trainers.samunet import SAMUNetTrainer


class SAMUNetDeepSupervisionTrainer(SAMUNetTrainer):
    """Deep supervision in the fusion decoder: a loss at every decoder level, nnU-Net's weights (1, 1/2, 1/4, ...)."""

    deep_supervision = True


class SAMUNetLoRATrainer(SAMUNetTrainer):
    """LoRA (rank 4) on q and v of the SAM encoder's attention, trained with the conv branch and decoder."""

    lora_rank = 4


class SAMUNetInput2xTrainer(SAMUNetTrainer):
    """The SAM encoder's input at twice the planned size (a finer embedding grid, four times the encoder cost)."""

    input_size_factor = 2


class SAMUNetHalfEncoderTrainer(SAMUNetTrainer):
    """The SAM encoder alone at half the planned input (a coarser embedding grid, about a third of the encoder
    cost); the conv branch and decoder keep the planned size and gain one stage down to the encoder's grid."""

    encoder_size_divisor = 2
