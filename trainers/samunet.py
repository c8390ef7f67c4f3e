"""SAMUNetTrainer: frozen SAM encoder + full-resolution conv branch + fusion decoder (SAM-UNet's idea).

Recipe of :class:`~samnnu.trainers.base.SAMTrainerBase` (AdamW on the trainable parameters,
warm-up + poly, no deep supervision, batch size from the ``sam`` block) with an equal CE/Dice loss,
since most of the network (conv branch, decoder) trains from scratch, and the trainable weights averaged
over roughly the last tenth to fifth of the run (:class:`~samnnu.trainers.averaging.PowerAverage`, gamma 7): validation,
checkpoints and prediction use the average. The class attributes below are
what the measured variants of :mod:`samnnu.trainers.samunet_variants` change.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.modeling.samunet import SAMUNet
from samnnu.trainers.base import SAMTrainerBase


class SAMUNetTrainer(SAMTrainerBase):
    """SAM-UNet: the SAM encoder frozen; a ResNet-like conv branch and a multi-scale decoder trained."""

    base_width = 32
    max_width = 256
    loss_weights = (1.0, 1.0)  # (cross-entropy, Dice)
    context_slices = 0
    #: LoRA rank on the SAM encoder's attention (0: the encoder stays wholly frozen)
    lora_rank = 0
    #: the encoder's square input is the planned ``sam.input_size`` times this
    input_size_factor = 1
    #: the encoder alone sees the input at the network's input size divided by this (the conv branch and
    #: decoder keep the full size)
    encoder_size_divisor = 1
    weight_average_gamma = 7.0

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        sam = configuration_manager.configuration["sam"]
        net = SAMUNet(encoder=sam["encoder"], input_size=sam["input_size"] * cls.input_size_factor,
                      in_channels=num_input_channels, num_classes=num_output_channels,
                      intensity_windows=sam["intensity_windows"], base_width=cls.base_width, max_width=cls.max_width,
                      context_slices=cls.context_slices, lora_rank=cls.lora_rank,
                      deep_supervision_heads=cls.deep_supervision,
                      encoder_input_size=sam["input_size"] * cls.input_size_factor // cls.encoder_size_divisor)
        net.deep_supervision = enable_deep_supervision
        return net
