"""nnSAM's network: nnU-Net's own U-Net from the plans, with a frozen SAM embedding fused at the bottleneck.

The U-Net is exactly what nnU-Net builds from the plans' ``architecture`` entry (PlainConvUNet, or
whatever class the plans name, via ``get_network_from_plans``), deep supervision included. The frozen
SAM encoder embeds the same patch; the embedding of the patch's region is resized to the bottleneck's
spatial size, projected by a trainable 1x1 convolution to ``sam_channels`` channels and concatenated
to the bottleneck features; the decoder's first transposed convolution is rebuilt to take the wider
input. Everything else of the U-Net is untouched.

2D and 3D: in 3D the encoder embeds the patch slice by slice along the first spatial axis
(:class:`~samnnu.modeling.frozen_encoder.FrozenSAMEncoder`) and the embedding is resized trilinearly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from samnnu.modeling.frozen_encoder import FrozenSAMEncoder


def crop_to_content(embedding: torch.Tensor, content: tuple[int, int], input_size: int) -> torch.Tensor:
    """Keep the embedding cells covering the un-padded image: (..., g, g) -> (..., gh, gw)."""
    g = embedding.shape[-1]
    gh = max(1, round(content[0] * g / input_size))
    gw = max(1, round(content[1] * g / input_size))
    return embedding[..., :gh, :gw]


class NNSAMNet(nn.Module):
    """A U-Net built by nnU-Net from the plans, plus a frozen SAM embedding concatenated at its bottleneck.

    ``encoder`` and ``decoder`` are the U-Net's own modules (so nnU-Net's deep-supervision switch,
    ``network.decoder.deep_supervision``, works unchanged). Trainable: the whole U-Net and the 1x1
    projection. Frozen: the SAM encoder (run without autograd, BatchNorm statistics fixed).

    x: (B, C, *patch) after nnU-Net normalisation -> logits (B, K, *patch), or with deep supervision
    a list of logits from full resolution down, as nnU-Net's U-Net returns.
    """

    def __init__(self, unet: nn.Module, *, encoder: str, input_size: int, in_channels: int,
                 intensity_windows: list[tuple[float, float]], sam_channels: int = 64):
        super().__init__()
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.sam = FrozenSAMEncoder(encoder=encoder, input_size=input_size, in_channels=in_channels,
                                    intensity_windows=intensity_windows)
        self.encoder_name = encoder
        conv_op = self.encoder.conv_op
        self.sam_proj = conv_op(self.sam.embed_dim, sam_channels, kernel_size=1, bias=True)
        self.sam_channels = sam_channels
        old = self.decoder.transpconvs[0]
        self.decoder.transpconvs[0] = type(old)(old.in_channels + sam_channels, old.out_channels,
                                                old.kernel_size, old.stride, bias=old.bias is not None)
        # the new layers get nnU-Net's initialisation, like the rest of the U-Net
        init = InitWeights_He(1e-2)
        self.sam_proj.apply(init)
        self.decoder.transpconvs[0].apply(init)

    @classmethod
    def from_plans(cls, configuration_manager, num_input_channels: int, num_output_channels: int,
                   enable_deep_supervision: bool, sam: dict, sam_channels: int = 64) -> "NNSAMNet":
        """Build nnU-Net's network from the configuration's ``architecture`` entry and add the SAM fusion."""
        unet = get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
        return cls(unet, encoder=sam["encoder"], input_size=sam["input_size"], in_channels=num_input_channels,
                   intensity_windows=sam["intensity_windows"], sam_channels=sam_channels)

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        return self.sam.load_pretrained(checkpoint)

    def sam_features(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """SAM embedding of x's region, resized to ``size`` and projected: (B, sam_channels, *size)."""
        embedding, content = self.sam(x)
        embedding = crop_to_content(embedding, content, self.sam.input_size)
        mode = "bilinear" if embedding.dim() == 4 else "trilinear"
        embedding = F.interpolate(embedding, size=size, mode=mode, align_corners=False)
        return self.sam_proj(embedding)

    def forward(self, x: torch.Tensor):
        skips = self.encoder(x)
        bottleneck = skips[-1]
        fused = torch.cat([bottleneck, self.sam_features(x, tuple(bottleneck.shape[2:]))], dim=1)
        return self.decoder(skips[:-1] + [fused])

    def compute_conv_feature_map_size(self, input_size):
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)
