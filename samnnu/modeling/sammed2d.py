"""SAM-Med2D's network: a SAM encoder with parallel bottleneck adapters, prompt-free multi-class masks.

Bottleneck adapters in parallel with each encoder block's MLP (SAM-Med2D's idea).

Every transformer block of a SAM-family encoder computes ``x = x + mlp(x')`` (``x'`` the normalised
tokens for SAM's ViT, the raw tokens for TinyViT whose MLP normalises inside). :func:`apply_adapters`
attaches a :class:`ParallelAdapter` to each block's MLP, so the block computes
``x = x + mlp(x') + adapter(x')`` instead. The adapter:

    down   LayerNorm, linear C -> r, GELU                  (tokens as a (B, r, H, W) map)
    channel attention: squeeze (spatial mean) -> r/4 -> r -> sigmoid, multiplies the map
    spatial branch: 3x3 conv stride 2 (down), GELU, 2x2 transposed conv stride 2 (up), added back
    up     linear r -> C, initialised to zero

Because ``up`` starts at zero, a freshly adapted encoder computes exactly what the pretrained one
computes; only the adapters (and what the network trains beside the encoder) learn.

The adapter is a child module of the MLP (``...mlp.adapter.*``) and runs from a forward hook, so
the MLP's own parameter names are unchanged and pretrained checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from samnnu.modeling.common import transformer_blocks
from samnnu.modeling.prompt_free import PromptFreeSAMNet


class ParallelAdapter(nn.Module):
    """Channel-attention + spatial down/up bottleneck adapter with a zero-initialised output.

    x: (B, H, W, C) or (B, H*W, C) tokens (then ``resolution`` = (H, W)) -> same shape.
    """

    def __init__(self, dim: int, bottleneck: int, resolution: tuple[int, int] | None = None):
        super().__init__()
        self.resolution = tuple(resolution) if resolution is not None else None
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        squeeze = max(1, bottleneck // 4)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(bottleneck, squeeze, 1), nn.ReLU(),
                                     nn.Conv2d(squeeze, bottleneck, 1), nn.Sigmoid())
        self.spatial_down = nn.Conv2d(bottleneck, bottleneck, 3, stride=2, padding=1)
        self.spatial_up = nn.ConvTranspose2d(bottleneck, bottleneck, 2, stride=2)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 3:
            h, w = self.resolution
            x = x.view(shape[0], h, w, shape[-1])
        h, w = x.shape[1:3]
        z = self.act(self.down(self.norm(x))).permute(0, 3, 1, 2)          # (B, r, H, W)
        z = z * self.channel(z)
        s = self.spatial_up(self.act(self.spatial_down(z)))
        z = z + F.pad(s, (0, max(0, w - s.shape[-1]), 0, max(0, h - s.shape[-2])))[..., :h, :w]
        return self.up(z.permute(0, 2, 3, 1)).reshape(shape)


def _add_adapter_output(mlp: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + mlp.adapter(inputs[0])




def apply_adapters(encoder: nn.Module, *, reduction: int = 4, min_bottleneck: int = 8) -> int:
    """Attach a ParallelAdapter (bottleneck ``max(dim // reduction, min_bottleneck)``) to every block's MLP.

    Works in place on SAM ViT blocks and TinyViT blocks; returns how many adapters were attached.
    """
    count = 0
    for block, dim, resolution in list(transformer_blocks(encoder)):
        if hasattr(block.mlp, "adapter"):
            continue
        block.mlp.adapter = ParallelAdapter(dim, max(dim // reduction, min_bottleneck), resolution)
        block.mlp.register_forward_hook(_add_adapter_output)
        count += 1
    return count


def is_adapter_parameter(name: str) -> bool:
    return ".adapter." in name or name.startswith("adapter.")


def adapter_modules(encoder: nn.Module) -> list[ParallelAdapter]:
    return [m for m in encoder.modules() if isinstance(m, ParallelAdapter)]


def adapter_parameter_count(encoder: nn.Module) -> int:
    return sum(p.numel() for m in adapter_modules(encoder) for p in m.parameters())


__all__ = ["ParallelAdapter", "apply_adapters", "is_adapter_parameter", "adapter_modules",
           "adapter_parameter_count"]


class SAMMed2DNet(PromptFreeSAMNet):
    """SAM encoder with a :class:`~samnnu.modeling.sammed2d.ParallelAdapter` beside every block's MLP.

    Trainable in the encoder: the adapters only; the decoder side is the same as
    :class:`~samnnu.modeling.samed.SAMedNet` (see :class:`PromptFreeSAMNet`).

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
