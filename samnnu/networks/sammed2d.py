"""SAM-Med2D's network: a SAM encoder with parallel bottleneck adapters, prompt-free multi-class masks."""
from __future__ import annotations

import torch.nn as nn

from samnnu.adapters import apply_adapters, is_adapter_parameter
from samnnu.networks.prompt_free import PromptFreeSAMNet


class SAMMed2DNet(PromptFreeSAMNet):
    """SAM encoder with a :class:`~samnnu.adapters.ParallelAdapter` beside every block's MLP.

    Trainable in the encoder: the adapters only; the decoder side is the same as
    :class:`~samnnu.networks.samed.SAMedNet` (see :class:`PromptFreeSAMNet`).

    x: (B, C, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W)
    """

    def __init__(self, *, adapter_reduction: int = 4, **kwargs):
        self.adapter_reduction = adapter_reduction
        super().__init__(**kwargs)
        self.num_adapters = self.num_adapted

    def adapt_encoder(self, encoder: nn.Module) -> int:
        return apply_adapters(encoder, reduction=self.adapter_reduction)

    def is_encoder_trainable(self, name: str) -> bool:
        return is_adapter_parameter(name)
