"""A full-resolution convolutional branch beside a frozen SAM encoder, and a decoder fusing both (SAM-UNet's idea).

A frozen SAM encoder sees the image only at its embedding grid (input / 4 for TinyViT, input / 16
for ViT): too coarse for small structures. :class:`ConvBranch` is a ResNet-like CNN trained from
scratch on the same input at full resolution; it returns one feature map per scale, from full
resolution down to the embedding grid. :class:`FusionDecoder` adds the (projected) SAM embedding to
the branch's coarsest features, then upsamples step by step to full resolution, concatenating the
branch's feature map of each scale (skip connections), and ends in a 1x1 segmentation head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class ResidualBlock(nn.Module):
    """Two 3x3 conv + InstanceNorm + LeakyReLU with a (projected when needed) shortcut.

    x: (B, c_in, H, W) -> (B, c_out, H / stride, W / stride)
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(x))


def branch_widths(stride: int, base: int = 32, max_width: int = 256) -> list[int]:
    """Channels per scale: full resolution, /2, ..., /stride (doubling, capped)."""
    n = int(round(math.log2(stride)))
    if 2 ** n != stride:
        raise ValueError(f"encoder stride {stride} is not a power of two")
    return [min(base * 2 ** i, max_width) for i in range(n + 1)]


class ConvBranch(nn.Module):
    """ResNet-like stages from full resolution down to the encoder's embedding grid.

    x: (B, c_in, S, S) -> [(B, widths[i], S / 2^i, S / 2^i) for i = 0 .. log2(stride)]
    """

    def __init__(self, c_in: int, widths: list[int], blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, widths[0], 3, padding=1, bias=False), _norm(widths[0]),
                                  nn.LeakyReLU(0.01, inplace=True))
        self.stages = nn.ModuleList()
        for i, width in enumerate(widths):
            prev = widths[max(0, i - 1)]
            blocks = [ResidualBlock(prev, width, stride=1 if i == 0 else 2)]
            blocks += [ResidualBlock(width, width) for _ in range(blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class FusionDecoder(nn.Module):
    """Adds the SAM embedding to the coarsest branch features, then upsamples with skip connections.

    With ``deep_supervision_heads``, every coarser level (the fused grid g and each upsampling step
    below full resolution) gets its own 1x1 segmentation head, as nnU-Net's decoder has; they are
    returned while ``deep_supervision`` is on (training), and never computed otherwise.

    embedding: (B, D, g, g) frozen encoder output; features: ConvBranch output (coarsest at g)
    -> logits (B, num_classes, S, S); with ``deep_supervision`` on, a list of logits from full
       resolution to the coarsest: [(B, K, S, S), (B, K, S / 2, S / 2), ..., (B, K, g, g)]
    """

    def __init__(self, embed_dim: int, widths: list[int], num_classes: int, deep_supervision_heads: bool = False):
        super().__init__()
        self.embed_proj = nn.Sequential(nn.Conv2d(embed_dim, widths[-1], 1, bias=False), _norm(widths[-1]))
        self.fuse = ResidualBlock(widths[-1], widths[-1])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.blocks.append(ResidualBlock(2 * widths[i - 1], widths[i - 1]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        # coarsest first: the fused grid, then the output of every upsampling step but the last
        self.aux_heads = (nn.ModuleList(nn.Conv2d(widths[i], num_classes, 1) for i in range(len(widths) - 1, 0, -1))
                          if deep_supervision_heads else None)
        self.deep_supervision = False

    def forward(self, embedding: torch.Tensor,
                features: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = self.fuse(features[-1] + self.embed_proj(embedding))
        levels = []
        for up, block, skip in zip(self.ups, self.blocks, reversed(features[:-1])):
            levels.append(x)
            x = block(torch.cat([up(x), skip], dim=1))
        if not (self.deep_supervision and self.aux_heads is not None):
            return self.head(x)
        return [self.head(x)] + [head(level) for head, level in zip(self.aux_heads, levels)][::-1]
