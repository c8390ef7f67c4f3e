"""SAMedLoRATrainer (SAMed): the shared SAM recipe of :class:`~samnnu.trainers.base.SAMTrainerBase`
with :class:`samnnu.modeling.samed.SAMedNet`, LoRA of rank ``lora_rank`` on the encoder's q and v.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.modeling.samed import SAMedNet
from samnnu.trainers.base import SAMTrainerBase


class SAMedLoRATrainer(SAMTrainerBase):
    """SAMed: LoRA (rank 4) on q and v of every encoder attention block, prompt-free multi-class decoder."""

    lora_rank = 4

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        sam = configuration_manager.configuration["sam"]
        return SAMedNet(encoder=sam["encoder"], input_size=sam["input_size"], in_channels=num_input_channels,
                        num_classes=num_output_channels, intensity_windows=sam["intensity_windows"],
                        lora_rank=cls.lora_rank)
