"""ImplicitDecoderTrainer: SAM encoder + implicit per-point decoder (I-MedSAM's idea), any output size.

Recipe of :class:`~samnnu.trainers.base.SAMTrainerBase` (LoRA rank 4 on q/v, AdamW on the
trainable parameters, warm-up + poly, batch size from the ``sam`` block) with a 1:1 CE + Dice loss
(the decoder trains from scratch); two overrides: the network is
:class:`~samnnu.modeling.implicit_decoder.ImplicitDecoderNet`, which in training returns logits at
uncertainty-guided points, and the loss is computed at those points against the labels there.
Validation and prediction see dense logits at the patch size, so nnU-Net's inference is unchanged.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.modeling.implicit_decoder import ImplicitDecoderNet, PointSampledLoss
from samnnu.trainers.base import SAMTrainerBase


class ImplicitDecoderTrainer(SAMTrainerBase):
    """LoRA encoder, conv stem and an MLP decoder trained on uncertainty-guided points."""

    lora_rank = 4  # LoRA on q and v, as SAMed
    loss_weights = (1.0, 1.0)  # (cross-entropy, Dice), on the sampled points
    coarse_stride = 4  # training: one coarse-grid point per 4 x 4 pixels ...
    point_fraction = 0.25  # ... plus this fraction of the patch's pixel count as guided points
    importance = 0.75  # share of the guided points chosen by uncertainty (the rest uniform)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        sam = configuration_manager.configuration["sam"]
        return ImplicitDecoderNet(encoder=sam["encoder"], input_size=sam["input_size"],
                                  in_channels=num_input_channels, num_classes=num_output_channels,
                                  intensity_windows=sam["intensity_windows"], lora_rank=cls.lora_rank,
                                  sample_points=True, coarse_stride=cls.coarse_stride,
                                  point_fraction=cls.point_fraction, importance=cls.importance)

    def _build_loss(self):
        return PointSampledLoss(super()._build_loss())
