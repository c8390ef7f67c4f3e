"""Automatic first prompts from the prompt-free prediction (SqueezeSAM's idea: the user starts from a result
rather than from an empty image, then adds clicks).

For every foreground label, each connected component of the prompt-free label map (face connectivity)
that holds at least ``min_fraction`` of the label's largest component becomes one object prompt:

- its key slice is that of the component's most confident voxel: the highest probability of the label
  (voxels within ``tie`` of the maximum count as tied; among those the one deepest inside the component,
  by the distance to its surface, wins); without probabilities, the deepest voxel;
- a positive click on that voxel;
- a box on the key slice: the component's bounding rectangle on that slice (a box drawn on one slice,
  which the refiner propagates outward).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

from samnnu.interactive.prompts import Box, ObjectPrompt, Point


def deepest_voxel(mask: np.ndarray, weights: np.ndarray | None = None, *, tie: float = 0.01,
                  spacing: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """The voxel of a non-empty ``mask`` (Z, Y, X) farthest from its surface, optionally among the most
    weighted ones first.

    weights: (Z, Y, X) scores (e.g. probabilities); when given, only voxels scoring at least
    ``max - tie`` inside the mask are candidates. The image border counts as surface. Ties go to the
    first voxel in C order. Returns the (z, y, x) index.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("empty mask has no deepest voxel")
    (sl,) = ndimage.find_objects(mask.astype(np.int8))
    crop = mask[sl]
    depth = ndimage.distance_transform_edt(np.pad(crop, 1), sampling=spacing)[(slice(1, -1),) * crop.ndim]
    depth = np.where(crop, depth, -1.0)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)[sl]
        best = w[crop].max()
        depth = np.where(crop & (w >= best - tie), depth, -1.0)
    flat = int(np.argmax(depth))
    local = np.unravel_index(flat, crop.shape)
    return tuple(int(i + s.start) for i, s in zip(local, sl))


def bounding_rectangle(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), inclusive, of a non-empty (Y, X) mask."""
    ys, xs = np.nonzero(mask2d)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def auto_prompts(segmentation: np.ndarray, labels: Iterable[int], probabilities: np.ndarray | None = None, *,
                 min_fraction: float = 0.1, spacing: tuple[float, ...] | None = None) -> list[ObjectPrompt]:
    """Object prompts (box on one slice + one positive click) for the components of a prompt-free label map.

    segmentation: (Z, Y, X) integer labels. probabilities: (C, Z, Y, X) softmax outputs, channel = label
    value, or None. spacing: (z, y, x) mm for the depth measure (None: voxels). Components smaller than
    ``min_fraction`` of their label's largest component get no prompt. Returns prompts ordered by label,
    then by component size (largest first).
    """
    segmentation = np.asarray(segmentation)
    out = []
    for label in sorted(set(int(v) for v in labels)):
        components, n = ndimage.label(segmentation == label)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_fraction * sizes.max()]
        for number, comp in enumerate(keep, 1):
            mask = components == comp
            weights = probabilities[label] if probabilities is not None else None
            z, y, x = deepest_voxel(mask, weights, spacing=spacing)
            y0, x0, y1, x1 = bounding_rectangle(mask[z])
            out.append(ObjectPrompt(label, Box((z, y0, x0), (z, y1, x1)), (Point((z, y, x), True),),
                                    source=f"automatic prompt {number} of label {label}", automatic=True))
    return out
