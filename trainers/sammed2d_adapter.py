"""SAMMed2DAdapterTrainer: SAM-Med2D's parallel adapters in a prompt-free multi-class network.

Same recipe as :class:`~samnnu.trainers.base.SAMTrainerBase` (AdamW, warm-up + poly, 0.2 CE +
0.8 Dice, no deep supervision, batch size from the ``sam`` block); only the network differs:
:class:`samnnu.modeling.sammed2d.SAMMed2DNet`.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.modeling.sammed2d import SAMMed2DNet
from samnnu.trainers.base import SAMTrainerBase


class SAMMed2DAdapterTrainer(SAMTrainerBase):
    """SAM-Med2D: a bottleneck adapter beside every encoder block's MLP; only adapters train in the encoder."""

    adapter_reduction = 4  # adapter bottleneck = block width / adapter_reduction

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        sam = configuration_manager.configuration["sam"]
        return SAMMed2DNet(encoder=sam["encoder"], input_size=sam["input_size"], in_channels=num_input_channels,
                           num_classes=num_output_channels, intensity_windows=sam["intensity_windows"],
                           adapter_reduction=cls.adapter_reduction)
