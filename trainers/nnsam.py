"""nnSAMTrainer: nnU-Net's own trainer and U-Net, with a frozen SAM embedding at the bottleneck (nnSAM).

Everything is nnUNetTrainer's - SGD with Nesterov momentum and poly learning rate, 1:1 CE + Dice,
deep supervision, batch size and patch from nnU-Net's plans - except the network
(:class:`samnnu.modeling.nnsam.NNSAMNet`, built from the plans' ``architecture`` entry plus the ``sam``
block) and loading the SAM encoder's pretrained weights when training starts.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from samnnu.modeling.nnsam import NNSAMNet
from samnnu.trainers.base import IgnoreOutsideImage, load_sam_pretrained


class nnSAMTrainer(IgnoreOutsideImage, nnUNetTrainer):
    """nnSAM: nnU-Net's U-Net and recipe, frozen SAM embedding concatenated into the bottleneck."""

    patch_dimensions = (2, 3)  # nnU-Net's U-Net takes either
    sam_channels = 64  # channels of the projected SAM embedding concatenated to the bottleneck

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.load_pretrained_weights = True

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        return NNSAMNet.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision, configuration_manager.configuration["sam"],
                                   sam_channels=cls.sam_channels)

    def initialize(self):
        super().initialize()
        load_sam_pretrained(self)
