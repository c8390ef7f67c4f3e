"""2.5D context: a 2D network sees each slice together with its neighbours along the first spatial axis.

The neighbours become extra input channels, offset-major: for ``k`` context slices on each side and C
image channels, channel ``j * C + c`` is channel c of slice ``z + j - k`` (j = 0 .. 2k). Slices beyond
the volume's ends repeat its first or last slice. Training (:class:`ContextDataset`, around nnU-Net's
dataset) and inference (:func:`with_context`, before nnU-Net's sliding window) build the same channels.
"""
from __future__ import annotations

import numpy as np
import torch


def context_indices(z0: int, z1: int, offset: int, depth: int) -> np.ndarray:
    """Slice indices ``z0 + offset`` .. ``z1 - 1 + offset`` clamped to [0, depth - 1]."""
    return np.clip(np.arange(z0, z1) + offset, 0, depth - 1)


def with_context(x: torch.Tensor, k: int) -> torch.Tensor:
    """(C, Z, Y, X) -> (C * (2k + 1), Z, Y, X): every slice with its ``k`` neighbours on each side as channels."""
    if k == 0:
        return x
    depth = x.shape[1]
    return torch.cat([x[:, torch.from_numpy(context_indices(0, depth, o, depth)).to(x.device)]
                      for o in range(-k, k + 1)])


class ContextVolume:
    """A (C, Z, Y, X) array (numpy, memory map or blosc2) seen as (C * (2k + 1), Z, Y, X) with
    :func:`with_context`'s channels, built only for the region asked for: nnU-Net's 2D loader crops one
    slice, so only 2k + 1 slices are read, not the volume.

    Supports what nnU-Net's loader does with a case's image: ``shape``, ``dtype`` and indexing by a tuple
    of slices (step 1) over all four axes.
    """

    def __init__(self, data, k: int):
        self.data, self.k = data, k
        c, *spatial = data.shape
        self.shape = (c * (2 * k + 1), *spatial)
        self.dtype = data.dtype

    def __getitem__(self, index) -> np.ndarray:
        index = tuple(index) if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (4 - len(index))
        if not all(isinstance(s, slice) and s.step in (None, 1) for s in index):
            raise TypeError("ContextVolume takes a tuple of slices (step 1)")
        ch, zs, ys, xs = index
        depth = self.data.shape[1]
        z0, z1, _ = zs.indices(depth)
        blocks = []
        for o in range(-self.k, self.k + 1):
            rows = [np.asarray(self.data[:, z:z + 1, ys, xs]) for z in context_indices(z0, z1, o, depth)]
            blocks.append(np.concatenate(rows, axis=1) if rows else
                          np.zeros((self.data.shape[0], 0, *np.asarray(self.data[:, :1, ys, xs]).shape[2:]),
                                   self.dtype))
        return np.concatenate(blocks)[ch]


class ContextDataset:
    """nnU-Net's dataset (anything with ``load_case``) whose images come as :class:`ContextVolume`;
    labels and everything else are unchanged."""

    def __init__(self, dataset, k: int):
        self.dataset, self.k = dataset, k

    def __getattr__(self, name):
        if name.startswith("__") or name == "dataset":  # unpickling asks before ``dataset`` is set
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        return ContextVolume(data, self.k), seg, seg_prev, properties
