"""A simulated user for interactive segmentation benchmarks: where the next click goes.

The user looks at the current mask and the reference (and only uses the reference to choose where to
click): the largest connected error region, false negative or false positive (face connectivity), gets
a click on its voxel deepest inside it (largest distance to the region's surface; the image border counts
as surface); positive for a missed region, negative for a spurious one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from samnnu.interactive.auto_prompts import deepest_voxel
from samnnu.interactive.prompts import Point


def error_regions(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false negatives, false positives) of a (Z, Y, X) mask against its reference, as bool arrays."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    return ref & ~pred, pred & ~ref


def next_click(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> Point | None:
    """The simulated user's next click on a (Z, Y, X) mask, or None when the mask equals the reference.

    The largest connected error component wins (a false-negative one on equal size); the click is at its
    deepest voxel (spacing: (z, y, x) mm for that distance; None: voxels). Positive on a false negative,
    negative on a false positive.
    """
    found = largest_error(pred, ref)
    if found is None:
        return None
    positive, region = found
    return Point(deepest_voxel(region, spacing=None if spacing is None else tuple(spacing)), positive)


def largest_error(pred: np.ndarray, ref: np.ndarray) -> tuple[bool, np.ndarray] | None:
    """(positive, region): the largest connected error component of a mask against its reference (any
    dimension; face connectivity; a false-negative one on equal size), positive when it is a false
    negative; None when the mask equals the reference."""
    best = None
    for positive, errors in zip((True, False), error_regions(pred, ref)):
        components, n = ndimage.label(errors)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        i = int(np.argmax(sizes))
        if best is None or sizes[i] > best[0]:
            best = (int(sizes[i]), positive, components == i + 1)
    return None if best is None else best[1:]
