"""A simulated user for interactive segmentation benchmarks: where the next click or scribble goes.

The user looks at the current mask and the reference (and only uses the reference to choose where to
act): the largest connected error region, false negative or false positive (face connectivity), gets
- a click on its voxel deepest inside it (largest distance to the region's surface; the image border counts
  as surface), or
- a scribble: a stroke along the middle of the region on the slice where the region is largest (the longest
  path through the 2D skeleton of its largest piece there, every voxel inside the region);
positive for a missed region, negative for a spurious one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from samnnu.interactive.auto_prompts import deepest_voxel
from samnnu.interactive.prompts import Point, Stroke


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


def noisy_click(pred: np.ndarray, ref: np.ndarray, rng: np.random.Generator, deepest: float = 0.5) -> Point | None:
    """A training click on the largest connected error of a mask (any dimension; positive on missed voxels,
    negative on spurious ones): at its deepest voxel with probability ``deepest``, else at a random voxel
    of it. None when the mask equals the reference. Its index has the mask's dimension."""
    found = largest_error(pred, ref)
    if found is None:
        return None
    positive, region = found
    index = deepest_voxel(region) if rng.random() < deepest else np.argwhere(region)[rng.integers(region.sum())]
    return Point(tuple(int(i) for i in index), positive)


def largest_error(pred: np.ndarray, ref: np.ndarray) -> tuple[bool, np.ndarray] | None:
    """(positive, region): the largest connected error component of a mask against its reference (any
    dimension; face connectivity; a false-negative one on equal size), positive when it is a false
    negative; None when the mask equals the reference."""
    best = None
    for positive, errors in zip((True, False), error_regions(pred, ref)):
        found = largest_component(errors)
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], positive, found[1])
    return None if best is None else best[1:]


def largest_component(mask: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(size, component): the largest connected component of a bool mask (any dimension, face connectivity;
    the first in label order on equal size), or None when the mask is empty."""
    components, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    i = int(np.argmax(sizes))
    return int(sizes[i]), components == i + 1


def next_scribble(pred: np.ndarray, ref: np.ndarray) -> Stroke | None:
    """The simulated user's next scribble on a (Z, Y, X) mask, or None when the mask equals the reference.

    On the slice where the largest connected error component (as for :func:`next_click`) has most voxels,
    the stroke runs along the longest path through the skeleton of that slice's largest piece of the
    component (8-connected, in drawing order, from one end to the other; a single voxel for a piece too thin
    to have a longer skeleton). Positive on a false negative, negative on a false positive. Every voxel of the
    stroke lies in the error region, so the scribble never says anything the reference contradicts.
    """
    from skimage.morphology import skeletonize

    found = largest_error(pred, ref)
    if found is None:
        return None
    positive, region = found
    z = int(np.argmax(region.sum(axis=(1, 2))))
    _, piece = largest_component(region[z])  # face connectivity on the slice, as for the 3D regions
    skeleton = skeletonize(piece) & piece
    if not skeleton.any():
        skeleton = np.zeros_like(piece)
        skeleton[tuple(deepest_voxel(piece))] = True
    path = longest_path(skeleton)
    return Stroke(tuple((z, y, x) for y, x in path), positive)


def longest_path(skeleton: np.ndarray) -> list[tuple[int, int]]:
    """The (y, x) voxels of a path between the two ends of a 2D skeleton that lie farthest apart along it
    (8-connectivity; two breadth-first searches, exact on a tree, a good approximation on a skeleton with
    loops), in order from one end to the other. The skeleton must be non-empty; on several pieces the path
    stays in the piece of its first voxel (C order)."""
    voxels = [tuple(int(i) for i in v) for v in np.argwhere(skeleton)]
    if not voxels:
        raise ValueError("empty skeleton has no path")
    members = set(voxels)

    def farthest(start: tuple[int, int]) -> tuple[tuple[int, int], dict]:
        parent = {start: None}
        frontier, last = [start], start
        while frontier:
            nxt = []
            for y, x in frontier:
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v = (y + dy, x + dx)
                        if v in members and v not in parent:
                            parent[v] = (y, x)
                            nxt.append(v)
            if nxt:
                last = nxt[-1]
            frontier = nxt
        return last, parent

    a, _ = farthest(voxels[0])
    b, parent = farthest(a)
    path = [b]
    while parent[path[-1]] is not None:
        path.append(parent[path[-1]])
    return path[::-1]
