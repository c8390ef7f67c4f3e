"""Volumetric adapters that make a 2D SAM encoder see neighbouring slices (3DSAM-adapter / MA-SAM's idea).

A 3D patch (B, C, D, H, W) goes through the 2D encoder as B*D slices. :func:`apply_adapters3d` puts a
:class:`DepthwiseAdapter3D` at the start of every transformer block, so the block runs on
``x + adapter(x)`` instead of ``x``. The adapter:

    down   linear C -> r                                     (tokens as a (B, r, D, h, w) volume)
    conv   depth-wise 3x3x3 convolution across neighbouring slices and tokens
    act    GELU
    up     linear r -> C, initialised to zero

and :class:`DepthEmbedding` adds a learned per-slice vector to the patch embedding. Both start at
zero, so a freshly adapted encoder computes exactly the 2D encoder's features, slice by slice.

The new modules are children of the blocks (``...blocks.N.adapter3d.*``) and of the patch embedding
(``patch_embed.depth_embed.*``); they run from forward hooks, so pretrained parameter names are
unchanged and SAM checkpoints load as they are. The adapters need the number of slices D per volume:
:func:`set_depth` writes it on them before each forward (the batch axis holds B*D slices, volume-major).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT

from samnnu.adapters import _blocks


class DepthwiseAdapter3D(nn.Module):
    """Bottleneck adapter with a depth-wise 3x3x3 convolution over the (D, h, w) token grid.

    x: (B*D, h*w, C) tokens (then ``resolution`` = (h, w)) or (B*D, h, w, C) -> ``x + delta``, same shape.
    ``depth`` (D) must be set before the forward (:func:`set_depth`); 1 treats every slice on its own.
    """

    def __init__(self, dim: int, bottleneck: int, resolution: tuple[int, int] | None = None):
        super().__init__()
        self.resolution = tuple(resolution) if resolution is not None else None
        self.depth = 1
        self.down = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size=3, padding=1, groups=bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 3:
            h, w = self.resolution
        else:
            h, w = shape[1:3]
        n, d = shape[0], self.depth
        if n % d:
            raise ValueError(f"{n} slices are not a whole number of volumes of depth {d}")
        z = self.down(x.reshape(n // d, d, h, w, shape[-1]))                  # (B, D, h, w, r)
        z = self.act(self.conv(z.permute(0, 4, 1, 2, 3)))                      # (B, r, D, h, w)
        return x + self.up(z.permute(0, 2, 3, 4, 1)).reshape(shape)


class DepthEmbedding(nn.Module):
    """A learned vector per slice position, added to the patch embedding's tokens; zero-initialised.

    ``depth`` learned positions; volumes of another depth get them linearly interpolated.
    tokens: (B*D, C, h, w) (``channels_last`` False) or (B*D, h, w, C) -> same shape.
    """

    def __init__(self, dim: int, depth: int, *, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.depth = 1
        self.weight = nn.Parameter(torch.zeros(1, dim, depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        d = self.depth
        emb = self.weight if self.weight.shape[-1] == d else F.interpolate(self.weight, size=d, mode="linear",
                                                                           align_corners=True)
        emb = emb[0].t()                                                       # (D, C)
        n = tokens.shape[0]
        if self.channels_last:
            out = tokens.view(n // d, d, *tokens.shape[1:]) + emb.view(1, d, 1, 1, -1)
        else:
            out = tokens.view(n // d, d, *tokens.shape[1:]) + emb.view(1, d, -1, 1, 1)
        return out.view(tokens.shape)


def _run_adapter_first(block: nn.Module, args: tuple) -> tuple:
    return (block.adapter3d(args[0]),) + tuple(args[1:])


def _add_depth_embedding(patch_embed: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return patch_embed.depth_embed(output)


def _patch_embed_dim(encoder: nn.Module) -> int:
    if isinstance(encoder, ImageEncoderViT):
        return int(encoder.patch_embed.proj.out_channels)
    return int(encoder.layers[0].dim)  # TinyViT: the first stage runs at the patch embedding's width


def apply_adapters3d(encoder: nn.Module, *, depth: int, reduction: int = 4, min_bottleneck: int = 8) -> int:
    """Make a SAM ViT or TinyViT encoder volumetric, in place.

    Attaches a :class:`DepthwiseAdapter3D` (bottleneck ``max(dim // reduction, min_bottleneck)``) at the
    start of every transformer block and a :class:`DepthEmbedding` of ``depth`` positions to the patch
    embedding. Returns how many adapters were attached.
    """
    count = 0
    for block, dim, resolution in list(_blocks(encoder)):
        if hasattr(block, "adapter3d"):
            continue
        block.adapter3d = DepthwiseAdapter3D(dim, max(dim // reduction, min_bottleneck), resolution)
        block.register_forward_pre_hook(_run_adapter_first)
        count += 1
    if not hasattr(encoder.patch_embed, "depth_embed"):
        encoder.patch_embed.depth_embed = DepthEmbedding(_patch_embed_dim(encoder), depth,
                                                         channels_last=isinstance(encoder, ImageEncoderViT))
        encoder.patch_embed.register_forward_hook(_add_depth_embedding)
    return count


def set_depth(module: nn.Module, depth: int) -> None:
    """Tell every volumetric adapter and depth embedding in ``module`` that volumes have ``depth`` slices."""
    for m in module.modules():
        if isinstance(m, (DepthwiseAdapter3D, DepthEmbedding)):
            m.depth = int(depth)


def is_adapter3d_parameter(name: str) -> bool:
    """Whether an encoder parameter belongs to the volumetric adaptation (adapters, depth embedding)."""
    return ".adapter3d." in name or ".depth_embed." in name


def adapter3d_modules(encoder: nn.Module) -> list[DepthwiseAdapter3D]:
    return [m for m in encoder.modules() if isinstance(m, DepthwiseAdapter3D)]


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm (also SAM/TinyViT's LayerNorm2d), GroupNorm and BatchNorm layers."""
    return (isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            or type(module).__name__ == "LayerNorm2d")


def norm_parameter_names(encoder: nn.Module) -> set[str]:
    """Names (relative to ``encoder``) of the affine parameters of its normalisation layers."""
    return {f"{mname}.{pname}" if mname else pname
            for mname, m in encoder.named_modules() if is_norm_module(m)
            for pname, _ in m.named_parameters(recurse=False)}


__all__ = ["DepthwiseAdapter3D", "DepthEmbedding", "apply_adapters3d", "set_depth", "is_adapter3d_parameter",
           "adapter3d_modules", "is_norm_module", "norm_parameter_names"]
