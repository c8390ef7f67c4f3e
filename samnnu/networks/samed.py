"""SAMed's network: a SAM encoder with LoRA, prompt-free multi-class masks from SAM's mask decoder."""
from __future__ import annotations

import torch.nn as nn

from samnnu.lora import apply_lora, is_lora_parameter
from samnnu.networks.prompt_free import PromptFreeSAMNet


class SAMedNet(PromptFreeSAMNet):
    """SAM encoder with LoRA on q and v, mask decoder with one mask token per class (background included).

    Trainable in the encoder: the LoRA matrices only (see :class:`PromptFreeSAMNet` for the rest).

    x: (B, C, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W)
    """

    def __init__(self, *, lora_rank: int = 4, **kwargs):
        self.lora_rank = lora_rank
        super().__init__(**kwargs)
        self.num_lora_layers = self.num_adapted

    def adapt_encoder(self, encoder: nn.Module) -> int:
        return apply_lora(encoder, self.lora_rank)

    def is_encoder_trainable(self, name: str) -> bool:
        return is_lora_parameter(name)
