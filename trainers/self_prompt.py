"""SelfPromptTrainer: SAM that prompts itself (ESP-MedSAM's idea), prompt-free at inference.

Recipe of :class:`~samnnu.trainers.base.SAMTrainerBase` (LoRA rank 4 on q/v, AdamW on the
trainable parameters, warm-up + poly, 0.2 CE + 0.8 Dice, batch size from the ``sam`` block); two
overrides: the network is :class:`~samnnu.modeling.self_prompt.SelfPromptSAMNet`, and the loss adds
``coarse_loss_weight`` times the same loss on the coarse head's logits (resized to the patch).
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.modeling.self_prompt import CoarseAuxiliaryLoss, SelfPromptSAMNet
from samnnu.trainers.base import SAMTrainerBase


class SelfPromptTrainer(SAMTrainerBase):
    """Coarse mask head -> dense prompt, learned query tokens; LoRA encoder; auxiliary coarse loss."""

    lora_rank = 4  # LoRA on q and v, as SAMed
    num_query_tokens = 4
    coarse_loss_weight = 0.4

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        sam = configuration_manager.configuration["sam"]
        return SelfPromptSAMNet(encoder=sam["encoder"], input_size=sam["input_size"], in_channels=num_input_channels,
                                num_classes=num_output_channels, intensity_windows=sam["intensity_windows"],
                                lora_rank=cls.lora_rank, num_query_tokens=cls.num_query_tokens, return_coarse=True)

    def _build_loss(self):
        return CoarseAuxiliaryLoss(super()._build_loss(), self.coarse_loss_weight)
