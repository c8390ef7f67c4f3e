"""Points in continuous image coordinates: sampling feature maps and labels there, and choosing where.

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

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


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
