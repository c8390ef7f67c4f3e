"""SAM3DAdapterTrainer: a 2D SAM encoder made volumetric (3DSAM-adapter / MA-SAM's idea) for ``3d_fullres``.

Same recipe as :class:`~samnnu.trainers.base.SAMTrainerBase` (AdamW on the trainable parameters,
warm-up + poly, 0.2 CE + 0.8 Dice, no deep supervision, batch size from the ``sam`` block, pretrained
encoder weights loaded when training starts); only the network differs:
:class:`samnnu.modeling.sam3d.SAM3DAdapterNet`, built for the configuration's 3D patch (its depth is the
``sam`` block's ``slices_per_sample``).
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.errors import SamnnuError
from samnnu.modeling.sam3d import SAM3DAdapterNet
from samnnu.trainers.base import SAMTrainerBase


class SAM3DAdapterTrainer(SAMTrainerBase):
    """3D adapters (depth-wise 3x3x3 bottleneck) at the start of every encoder block, a 3D conv decoder."""

    patch_dimensions = (3,)
    adapter_reduction = 4  # adapter bottleneck = block width / adapter_reduction
    stem_channels = (16, 32, 64, 128)  # full-resolution stem / decoder widths, finest first

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = False) -> torch.nn.Module:
        if len(configuration_manager.patch_size) != 3:
            raise SamnnuError(f"SAM3DAdapterTrainer trains 3D configurations (3d_fullres), not a "
                              f"{len(configuration_manager.patch_size)}D patch")
        sam = configuration_manager.configuration["sam"]
        depth = int(sam.get("slices_per_sample") or configuration_manager.patch_size[0])
        return SAM3DAdapterNet(encoder=sam["encoder"], input_size=sam["input_size"], in_channels=num_input_channels,
                               num_classes=num_output_channels, intensity_windows=sam["intensity_windows"],
                               depth=depth, adapter_reduction=cls.adapter_reduction,
                               stem_channels=tuple(cls.stem_channels))
