"""SAM with an implicit decoder (I-MedSAM's idea): class logits at any continuous point, so any output size.

The decoder is an MLP evaluated point by point. At a point (y, x) in [-1, 1] over the patch (see
:mod:`samnnu.modeling.implicit_decoder` for the convention) it reads, by bilinear sampling, the SAM embedding
(projected to fewer channels) and two higher-resolution feature maps of a small conv stem run on the
patch (full and half resolution), plus a Fourier encoding of the point, and returns K class logits.

Training (``sample_points``): the MLP is evaluated on a regular coarse grid (one point per
``coarse_stride`` x ``coarse_stride`` pixels), and then at points where that coarse prediction is least
certain, plus random points (PointRend's rule); the loss compares logits and labels at those points.
Inference: the MLP is evaluated at every pixel centre of the requested output grid.

The encoder is adapted with LoRA on q and v as in SAMed; SAM's prompt encoder and mask decoder are
not used.

Points in continuous image coordinates: sampling feature maps and labels there, and choosing where.

Coordinates are (y, x) in [-1, 1] over the image, with the convention of ``grid_sample`` with
``align_corners=False``: -1 and 1 are the outer edges of the border pixels, and the centre of pixel
i of n is at (2 i + 1) / n - 1. A dense grid of any size is the set of its pixel centres, so grids
of different sizes cover exactly the same area.

:func:`uncertain_points` is PointRend's training-point rule: oversample random points, keep the
ones where a coarse prediction is least certain (near class boundaries), and add uniformly random
ones. :class:`PointSampledLoss` applies a dense segmentation loss to logits at points, against the
label at the same points.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from samnnu.modeling.common import IntensityToSAM, fit_square, freeze_batchnorm_stats
from samnnu.modeling.conv_branch import ConvBranch
from samnnu.modeling.encoders import SAMParts, build_sam_parts, load_pretrained
from samnnu.modeling.samed import apply_lora, is_lora_parameter


class PointLogits(NamedTuple):
    """Logits at points. logits: (B, K, N); coords: (B, N, 2) as (y, x) in [-1, 1]."""

    logits: torch.Tensor
    coords: torch.Tensor


def pixel_centers(size: tuple[int, int], *, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres of an (h, w) pixel grid, row-major: (h * w, 2) as (y, x) in (-1, 1)."""
    h, w = size
    ys = (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h - 1
    xs = (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def _grid(coords: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) (y, x) -> (B, 1, N, 2) (x, y), the layout grid_sample reads."""
    return coords.flip(-1).unsqueeze(1)


def sample_features(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a feature map at points (border values outside).

    features: (B, C, H, W); coords: (B, N, 2) -> (B, C, N)
    """
    out = F.grid_sample(features, _grid(coords).to(features.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[:, :, 0]


def sample_labels(target: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The label of the pixel each point falls in (nearest), in the target's dtype.

    target: (B, 1, H, W); coords: (B, N, 2) -> (B, 1, N)
    """
    out = F.grid_sample(target.float(), _grid(coords).float(), mode="nearest", padding_mode="border",
                        align_corners=False)
    return out[:, :, 0].to(target.dtype)


def margin_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """How uncertain a prediction is: minus the gap between the two largest logits (-|logit| for K = 1).

    logits: (B, K, N) -> (B, N), larger = less certain.
    """
    if logits.shape[1] == 1:
        return -logits[:, 0].abs()
    top2 = logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


@torch.no_grad()
def uncertain_points(coarse_logits: torch.Tensor, num_points: int, *, oversample: float = 3.0,
                     importance: float = 0.75) -> torch.Tensor:
    """PointRend's training points: ``importance * num_points`` of the most uncertain among
    ``oversample * num_points`` uniformly random candidates, the rest uniformly random.

    coarse_logits: (B, K, h, w) a coarse prediction over the whole image -> coords (B, num_points, 2)
    """
    b = coarse_logits.shape[0]
    device = coarse_logits.device
    n_candidates = max(num_points, int(oversample * num_points))
    n_uncertain = min(num_points, int(importance * num_points))
    candidates = torch.rand(b, n_candidates, 2, device=device) * 2 - 1
    scores = margin_uncertainty(sample_features(coarse_logits.float(), candidates))
    idx = scores.topk(n_uncertain, dim=1).indices
    chosen = candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    uniform = torch.rand(b, num_points - n_uncertain, 2, device=device) * 2 - 1
    return torch.cat([chosen, uniform], dim=1)


class PointSampledLoss(nn.Module):
    """A dense segmentation loss applied at points: for :class:`PointLogits`, the label is sampled at the
    same points (nearest) and both are passed on as (B, K, N, 1) and (B, 1, N, 1) images; dense logits
    (B, K, H, W) go to the loss unchanged (validation).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output: torch.Tensor | PointLogits, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, PointLogits):
            labels = sample_labels(target, output.coords)
            return self.loss(output.logits.unsqueeze(-1), labels.unsqueeze(-1))
        return self.loss(output, target)


class FourierEncoding(nn.Module):
    """Coordinates and their sines and cosines at frequencies pi * 2^k, k < num_frequencies.

    coords: (..., 2) -> (..., 2 + 4 * num_frequencies)
    """

    def __init__(self, num_frequencies: int = 4):
        super().__init__()
        freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = 2 + 4 * num_frequencies

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        angles = (coords.unsqueeze(-1) * self.freqs.to(coords.dtype)).flatten(-2)
        return torch.cat([coords, angles.sin(), angles.cos()], dim=-1)


class ImplicitMLP(nn.Module):
    """Per-point MLP: Linear + GELU layers, then a linear layer to K logits.

    features: (B, N, in_dim) -> logits (B, K, N)
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).transpose(1, 2)


class ImplicitDecoderNet(nn.Module):
    """LoRA-adapted SAM encoder + conv stem + implicit (per-point MLP) decoder.

    Trainable: LoRA matrices, channel mix, the embedding projection, the conv stem and the MLP.
    Frozen: the rest of the encoder (its BatchNorm statistics too).

    forward(x): x (B, C, H, W) patch after nnU-Net normalisation -> logits (B, K, H, W); in training mode
    with ``sample_points``, :class:`~samnnu.modeling.implicit_decoder.PointLogits` at the training points instead.
    predict_at(x, (Ho, Wo)) -> logits (B, K, Ho, Wo) for any output size.
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int, num_classes: int,
                 intensity_windows: list[tuple[float, float]], lora_rank: int = 4, embed_channels: int = 64,
                 stem_widths: tuple[int, ...] = (16, 32), hidden: int = 256, depth: int = 3,
                 num_frequencies: int = 4, sample_points: bool = False, coarse_stride: int = 4,
                 point_fraction: float = 0.25, oversample: float = 3.0, importance: float = 0.75,
                 points_per_chunk: int = 1 << 16):
        super().__init__()
        parts = build_sam_parts(encoder, input_size=input_size, num_mask_tokens=1)
        self.encoder_name = encoder
        self.input_size = input_size
        self.stride = parts.stride
        self.embed_dim = parts.embed_dim
        self.intensity = IntensityToSAM(in_channels, intensity_windows)
        self.image_encoder = parts.image_encoder
        self.num_lora_layers = apply_lora(self.image_encoder, lora_rank)
        for name, p in self.image_encoder.named_parameters():
            p.requires_grad = is_lora_parameter(name)
        self.embed_proj = nn.Conv2d(parts.embed_dim, embed_channels, 1)
        self.stem = ConvBranch(in_channels, list(stem_widths))
        self.position = FourierEncoding(num_frequencies)
        self.mlp = ImplicitMLP(embed_channels + sum(stem_widths) + self.position.out_dim, num_classes, hidden,
                               depth)
        self.sample_points = sample_points
        self.coarse_stride = coarse_stride
        self.point_fraction = point_fraction
        self.oversample = oversample
        self.importance = importance
        self.points_per_chunk = points_per_chunk

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        """Load the encoder's pretrained SAM weights (training start only); LoRA keeps its init."""
        parts = SAMParts(self.image_encoder, None, None, self.input_size, self.stride, self.embed_dim)
        return load_pretrained(self.encoder_name, parts, checkpoint=checkpoint, new_encoder_keys=is_lora_parameter)

    def train(self, mode: bool = True):
        super().train(mode)
        freeze_batchnorm_stats(self.image_encoder)
        return self

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Feature maps over the square-fitted patch and the patch's content size in the square.

        x: (B, C, H, W) -> ([(B, embed_channels, g, g), (B, stem_widths[i], S / 2^i, S / 2^i) ...], (h, w))
        """
        square, content = fit_square(x, self.input_size)
        embedding = self.image_encoder(fit_square(self.intensity(x), self.input_size)[0])
        return [self.embed_proj(embedding), *self.stem(square)], content

    def decode(self, features: list[torch.Tensor], content: tuple[int, int], coords: torch.Tensor) -> torch.Tensor:
        """Logits at points given in the patch's frame.

        features, content: from :meth:`features`; coords: (B, N, 2) (y, x) in [-1, 1] -> (B, K, N)
        """
        scale = coords.new_tensor([content[0] / self.input_size, content[1] / self.input_size])
        square = (coords + 1) * scale - 1  # the same points in the square the features cover
        sampled = [sample_features(f, square) for f in features]
        point_features = torch.cat([s.transpose(1, 2) for s in sampled] + [self.position(square)], dim=-1)
        return self.mlp(point_features)

    def decode_grid(self, features: list[torch.Tensor], content: tuple[int, int],
                    out_size: tuple[int, int]) -> torch.Tensor:
        """Logits at every pixel centre of an out_size grid over the patch: (B, K, *out_size)."""
        b = features[0].shape[0]
        coords = pixel_centers(out_size, device=features[0].device, dtype=features[0].dtype)
        chunks = [self.decode(features, content, c.unsqueeze(0).expand(b, -1, -1))
                  for c in coords.split(self.points_per_chunk)]
        return torch.cat(chunks, dim=2).view(b, -1, *out_size)

    def predict_at(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, K, *out_size), the patch seen at any output resolution."""
        features, content = self.features(x)
        return self.decode_grid(features, content, tuple(out_size))

    def training_points(self, x: torch.Tensor) -> PointLogits:
        """Logits at a coarse regular grid and at uncertainty-guided points (see the module docstring).

        x: (B, C, H, W) -> PointLogits with N = (H / coarse_stride) (W / coarse_stride) + point_fraction H W
        """
        h, w = x.shape[-2:]
        features, content = self.features(x)
        coarse_size = (max(1, round(h / self.coarse_stride)), max(1, round(w / self.coarse_stride)))
        coarse = self.decode_grid(features, content, coarse_size)
        fine_coords = uncertain_points(coarse.detach(), max(1, round(self.point_fraction * h * w)),
                                       oversample=self.oversample, importance=self.importance)
        fine = self.decode(features, content, fine_coords.to(coarse.dtype))
        coarse_coords = pixel_centers(coarse_size, device=x.device, dtype=coarse.dtype)
        coords = torch.cat([coarse_coords.unsqueeze(0).expand(x.shape[0], -1, -1), fine_coords.to(coarse.dtype)], 1)
        return PointLogits(torch.cat([coarse.flatten(2), fine], dim=2), coords)

    def forward(self, x: torch.Tensor) -> torch.Tensor | PointLogits:
        if self.training and self.sample_points:
            return self.training_points(x)
        return self.predict_at(x, tuple(x.shape[-2:]))
