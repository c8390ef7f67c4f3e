"""SAM3DAdapterNet: a 2D SAM encoder made volumetric by 3D adapters, with a 3D convolutional decoder.

Volumetric adapters that make a 2D SAM encoder see neighbouring slices (3DSAM-adapter / MA-SAM's idea).

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

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT

from samnnu.modeling.common import IntensityToSAM, fit_square, freeze_batchnorm_stats, transformer_blocks, unfit_square
from samnnu.modeling.encoders import SAMParts, build_sam_parts, load_pretrained


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
    for block, dim, resolution in list(transformer_blocks(encoder)):
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


class ConvBlock3d(nn.Module):
    """3x3x3 convolution (in-plane stride ``stride``), instance norm, leaky ReLU: (B, C, D, H, W) -> (B, F, D, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=(1, stride, stride), padding=1)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class FullResStem3d(nn.Module):
    """A light 3D conv path on the square-fitted input: one stage per in-plane scale, each halving H, W.

    x: (B, C, D, S, S) -> [(B, F_0, D, S, S), (B, F_1, D, S/2, S/2), ...]
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.stages = nn.ModuleList(ConvBlock3d(cin, cout, stride=1 if i == 0 else 2)
                                    for i, (cin, cout) in enumerate(zip((in_channels,) + channels[:-1], channels)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder3d(nn.Module):
    """SAM embeddings on the token grid, upsampled in-plane x2 per stage with the stem's skips, to K logits.

    embeddings: (B, E, D, g, g), skips from :class:`FullResStem3d` (finest first, the coarsest at 2g)
    -> logits (B, K, D, S, S) with S = g * 2**len(skips).
    """

    def __init__(self, embed_dim: int, channels: tuple[int, ...], num_classes: int):
        super().__init__()
        top = 2 * channels[-1]
        self.project = ConvBlock3d(embed_dim, top)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        cin = top
        for c in reversed(channels):
            self.up.append(nn.ConvTranspose3d(cin, c, kernel_size=(1, 2, 2), stride=(1, 2, 2)))
            self.fuse.append(ConvBlock3d(2 * c, c))
            cin = c
        self.head = nn.Conv3d(channels[0], num_classes, kernel_size=1)

    def forward(self, embeddings: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.project(embeddings)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class SAM3DAdapterNet(nn.Module):
    """A SAM encoder run slice by slice with volumetric adapters, and a 3D decoder with a full-resolution stem.

    Each slice is mapped to SAM's intensity range and fitted into the encoder's square input; the encoder
    (3D adapters at the start of every block, a learned depth embedding) turns the D slices of a patch into
    embeddings (B, E, D, g, g); a 3D decoder upsamples them in-plane to the square input grid, fusing a
    full-resolution 3D conv stem run on the fitted input; the square is undone per slice.

    Trainable: the 3D adapters, the depth embedding, the encoder's normalisation affines, the channel mix,
    the stem and the decoder. Frozen: the rest of the encoder (its BatchNorm statistics too).

    x: (B, C, D, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, D, H, W)
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int, num_classes: int,
                 intensity_windows: list[tuple[float, float]], depth: int, adapter_reduction: int = 4,
                 stem_channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        parts = build_sam_parts(encoder, input_size=input_size, num_mask_tokens=1)
        self.encoder_name = encoder
        self.input_size = input_size
        self.stride = parts.stride
        self.embed_dim = parts.embed_dim
        self.depth = depth
        self.intensity = IntensityToSAM(in_channels, intensity_windows)
        self.image_encoder = parts.image_encoder
        self.num_adapted = apply_adapters3d(self.image_encoder, depth=depth, reduction=adapter_reduction)
        levels = int(round(math.log2(parts.stride)))
        channels = tuple(stem_channels[i] if i < len(stem_channels) else stem_channels[-1] for i in range(levels))
        self.stem = FullResStem3d(in_channels, channels)
        self.decoder = Decoder3d(parts.embed_dim, channels, num_classes)
        self._norm_names = norm_parameter_names(self.image_encoder)
        for name, p in self.image_encoder.named_parameters():
            p.requires_grad = self.is_encoder_trainable(name)

    def is_encoder_trainable(self, name: str) -> bool:
        """Encoder parameters that train: the volumetric adaptation and the normalisation affines."""
        return is_adapter3d_parameter(name) or name in self._norm_names

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        """Load the encoder's pretrained SAM weights (training start only); the adapters keep their init."""
        parts = SAMParts(self.image_encoder, None, None, self.input_size, self.stride, self.embed_dim)
        return load_pretrained(self.encoder_name, parts, checkpoint=checkpoint,
                               new_encoder_keys=is_adapter3d_parameter)

    def train(self, mode: bool = True):
        super().train(mode)
        freeze_batchnorm_stats(self.image_encoder)
        return self

    def fit_slices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(B, C, D, H, W) -> SAM input slices (B*D, 3, S, S), fitted raw volume (B, C, D, S, S), content (h, w)."""
        b, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * d, c, h, w)
        sam_in, content = fit_square(self.intensity(slices), self.input_size)
        raw, _ = fit_square(slices, self.input_size)
        return sam_in, raw.view(b, d, c, self.input_size, self.input_size).transpose(1, 2), content

    def encode(self, sam_in: torch.Tensor, depth: int) -> torch.Tensor:
        """(B*D, 3, S, S) slices of volumes of ``depth`` slices -> embeddings (B, E, D, g, g)."""
        set_depth(self.image_encoder, depth)
        emb = self.image_encoder(sam_in)
        return emb.view(-1, depth, *emb.shape[1:]).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        sam_in, raw, content = self.fit_slices(x)
        logits = self.decoder(self.encode(sam_in, d), self.stem(raw))        # (B, K, D, S, S)
        k = logits.shape[1]
        logits = unfit_square(logits.reshape(b, k * d, self.input_size, self.input_size), content,
                              self.input_size, (h, w))
        return logits.reshape(b, k, d, h, w)
