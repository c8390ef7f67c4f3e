"""A 3D click corrector trained on the dataset: one click edits the whole 3D error region it lands in.

The refiner (:mod:`samnnu.interactive.refiner`) decodes 2D slices, so a click corrects the slice it is on.
The errors of a prompt-free prediction are 3D regions spanning many slices. Measured on fold 0's validation
predictions of the hippocampus (docs/benchmarks.md, "A 3D click corrector"), fixing the whole 3D error
region of each click would add about 10 Dice points after 5 clicks, and fixing only its part on the
click's slice about 2. The corrector closes that gap, as nnInteractive does, with a small 3D network
that sees the image, the current mask and the clicks, and answers the corrected mask.

- **Input**, a crop of :data:`CROP` voxels (z, y, x) centred on the newest click, padded with zeros at the
  volume's border: 4 channels, the image (mapped to [0, 1] between its 0.5 and 99.5 percentiles, as the
  refiner maps it), the current mask of one label, and balls of radius :data:`CLICK_RADIUS` at the
  positive and at the negative clicks so far.
- **Output**: one logit per voxel of the crop; the voxels with a positive logit replace the mask inside
  the crop, and every clicked voxel is set as its click says. Outside the crop nothing else changes.
- **Network**: nnU-Net's plain 3D U-Net (``dynamic_network_architectures``), 4 stages of 8-64 features
  with instance norm (:func:`build_network`).
- **Mirroring**: a corrector trained on mirrored crops (the record's ``mirror``) answers with the mean
  probability over the crop and its mirror images along every axis (:func:`mirrored_probabilities`), as
  nnU-Net's test-time mirroring does.
- **Training** (:mod:`samnnu.interactive.corrector_training`, ``samnnu_train_prompts --corrector``): on the labels of a fold's
  training cases, never its validation cases. Each sample is one label of one case, starting from an
  imperfect copy of its mask (:func:`imperfect_volume`: the kinds of error a prediction makes, in 3D).
  A simulated user clicks ``rounds`` times on the largest connected error of the current answer (at its
  deepest voxel, or at a random voxel of it), each click is answered, and the answer becomes the next
  current mask. With ``mirror``, each crop is mirrored along randomly chosen axes. Loss: binary cross-entropy plus soft
  Dice on the crop, averaged over the rounds.
- **Boxes**: a corrector trained with a share of box starts (the record's ``box_share``) also answers a box
  drawn on one slice, with no other input (:meth:`ClickCorrector.box`): the mask channel holds the filled
  rectangle on its slice, the click channels are empty, and the answer is the structure in 3D. In training,
  such a sample's first round is the box (on a slice holding at least half the label's largest slice area,
  each side loosened by up to a voxel, the window's centre shifted by up to a quarter of the crop); its
  later rounds are clicks on the answer's errors.
- The file, ``fold_F/click_corrector.pth`` beside the fold's checkpoints, holds the network's weights and
  a record (:data:`samnnu.defaults.CLICK_CORRECTOR_RECORD`); it loads with weights only.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from samnnu.defaults import CLICK_CORRECTOR_RECORD
from samnnu.errors import SamnnuError
from samnnu.interactive.prompts import Point
from samnnu.safe_io import load_torch_safely

#: the crop (z, y, x) voxels the corrector sees and may change around the newest click
CROP = (32, 48, 48)
#: clicks are drawn into their channel as balls of this radius (voxels)
CLICK_RADIUS = 1.5
#: features of the U-Net's stages
FEATURES = (8, 16, 32, 64)


#: the current mask enters the logits as +-MASK_PRIOR: the network learns the correction, not a copy
MASK_PRIOR = 3.0


class CorrectorNet(torch.nn.Module):
    """nnU-Net's plain 3D U-Net whose answer is a correction of the current mask: (N, 4, *crop) -> (N, 1,
    *crop) logits, the U-Net's output plus ``MASK_PRIOR`` (inside the mask) or minus it (outside), so an
    untrained network answers the mask it was given. Each stage halves y and x; z is halved from the second
    downsampling on (crops are flatter in z)."""

    def __init__(self, features: Sequence[int] = FEATURES):
        super().__init__()
        from dynamic_network_architectures.architectures.unet import PlainConvUNet  # local: slow to import

        n = len(features)
        strides = [(1, 1, 1)] + [(1 if i == 0 else 2, 2, 2) for i in range(n - 1)]
        self.unet = PlainConvUNet(4, n, list(features), torch.nn.Conv3d, 3, strides, 2, 1, 2, conv_bias=True,
                                  norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x) + MASK_PRIOR * (2 * x[:, 1:2] - 1)


def mirror_sets(axes: int = 3) -> list[tuple[int, ...]]:
    """Every subset of the crop's ``axes`` spatial axes (as axes of a (N, C, *crop) tensor), the empty one first."""
    from itertools import combinations

    return [tuple(a + 2 for a in c) for k in range(axes + 1) for c in combinations(range(axes), k)]


def mirrored_probabilities(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 4, *crop) inputs -> (N, 1, *crop) probabilities: the mean sigmoid of the network's logits over the
    input and its mirror images along every subset of the spatial axes (each answer mirrored back), in one
    batch of 8 N."""
    sets = mirror_sets(x.ndim - 2)
    logits = network(torch.cat([x.flip(s) if s else x for s in sets])).float()
    answers = [chunk.flip(s) if s else chunk for chunk, s in zip(logits.split(len(x)), sets)]
    return torch.stack([torch.sigmoid(a) for a in answers]).mean(0)


def build_network(features: Sequence[int] = FEATURES) -> torch.nn.Module:
    """The corrector's network (:class:`CorrectorNet`)."""
    return CorrectorNet(features)


def normalize_image(image: np.ndarray) -> np.ndarray:
    """(Z, Y, X) intensities -> float32 in [0, 1] between the 0.5 and 99.5 percentiles (the refiner's map)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, (0.5, 99.5))
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def crop_window(center: Sequence[int], shape: Sequence[int], crop: Sequence[int] = CROP) -> tuple[slice, ...]:
    """The window of size ``crop`` centred on ``center``, shifted to lie inside a volume of ``shape`` where
    it can (where the volume is smaller than the crop, the whole axis): slices into the volume."""
    out = []
    for c, s, k in zip(center, shape, crop):
        start = int(np.clip(int(c) - k // 2, 0, max(0, s - k)))
        out.append(slice(start, min(s, start + k)))
    return tuple(out)


def padded(array: np.ndarray, crop: Sequence[int]) -> np.ndarray:
    return np.pad(array, [(0, k - s) for s, k in zip(array.shape, crop)])


def ball(shape: Sequence[int], center: Sequence[float], radius: float) -> np.ndarray:
    """A bool array of ``shape``: the voxels within ``radius`` of ``center`` (which may lie outside)."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def click_channels(shape: Sequence[int], window: tuple[slice, ...], clicks: Sequence[Point],
                   radius: float = CLICK_RADIUS) -> np.ndarray:
    """(2, *shape of the window) float32: balls of ``radius`` at the positive (channel 0) and negative
    (channel 1) clicks, in the window's coordinates (clicks outside it still reach in if close)."""
    size = [w.stop - w.start for w in window]
    out = np.zeros((2, *size), dtype=np.float32)
    for p in clicks:
        local = [i - w.start for i, w in zip(p.index, window)]
        if all(-radius <= v < s + radius for v, s in zip(local, size)):
            out[0 if p.positive else 1][ball(size, local, radius)] = 1.0
    return out


def corrector_input(image: np.ndarray, mask: np.ndarray, clicks: Sequence[Point],
                    crop: Sequence[int] = CROP) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The network's input for the newest of ``clicks`` (last in the list): (4, *crop) float32 and the
    window of the volume it covers. image: (Z, Y, X) normalized (:func:`normalize_image`); mask: (Z, Y, X)."""
    window = crop_window(clicks[-1].index, image.shape, crop)
    return window_input(image, window, mask[window], click_channels(image.shape, window, clicks), crop), window


def window_input(image: np.ndarray, window: tuple[slice, ...], mask: np.ndarray, clicks: np.ndarray,
                 crop: Sequence[int] = CROP) -> np.ndarray:
    """(4, *crop) float32, zero-padded where the window is smaller than the crop: the (Z, Y, X) ``image``
    inside ``window``, then ``mask`` (the window's size) and the (2, *window size) ``clicks`` channels."""
    channels = np.concatenate([image[window][None], np.asarray(mask, dtype=np.float32)[None], clicks])
    return np.stack([padded(c, crop) for c in channels])


def box_input(image: np.ndarray, z: int, rect: Sequence[int], center: Sequence[int] | None = None,
              crop: Sequence[int] = CROP) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The network's input for a box drawn on slice ``z``: (4, *crop) float32 and the window of the volume
    it covers. image: (Z, Y, X) normalized; rect: (y0, x0, y1, x1) inclusive. The mask channel holds the
    filled rectangle on slice z and nothing else, the click channels are empty (no other input has no
    click). center: (z, y, x) the window's centre (default the box's centre)."""
    y0, x0, y1, x1 = (int(v) for v in rect)
    window = crop_window(box_center(z, rect) if center is None else center, image.shape, crop)
    size = [w.stop - w.start for w in window]
    drawn = np.zeros(size, dtype=np.float32)
    lz = int(z) - window[0].start
    if 0 <= lz < size[0]:
        (wy, wx) = window[1].start, window[2].start
        drawn[lz, max(0, y0 - wy):max(0, y1 + 1 - wy), max(0, x0 - wx):max(0, x1 + 1 - wx)] = 1.0
    return window_input(image, window, drawn, np.zeros((2, *size), dtype=np.float32), crop), window


def box_center(z: int, rect: Sequence[int]) -> tuple[int, int, int]:
    """(z, y, x) the voxel at the centre of a box (y0, x0, y1, x1) on slice z."""
    y0, x0, y1, x1 = (int(v) for v in rect)
    return int(z), (y0 + y1) // 2, (x0 + x1) // 2


def box_window_shifts(crop: Sequence[int] = CROP) -> tuple[int, ...]:
    """How far (voxels, per axis) a box's window centre may lie from the box's centre: a quarter of the crop.
    Training draws the shift within it; a second run (:meth:`ClickCorrector.box`) stays within it."""
    return tuple(k // 4 for k in crop)


def reaches_inner_face(inside: np.ndarray, window: tuple[slice, ...], shape: Sequence[int]) -> bool:
    """Whether a (Z, Y, X) answer of the window ``window`` has voxels on a face of the window that is not the
    volume's border (the structure may go on past the window)."""
    for axis, w in enumerate(window):
        along = inside.any(axis=tuple(a for a in range(inside.ndim) if a != axis))
        if (along[0] and w.start > 0) or (along[-1] and w.stop < shape[axis]):
            return True
    return False


class ClickCorrector:
    """A trained corrector: call it with a normalized image, a label's current mask and its clicks."""

    def __init__(self, network: torch.nn.Module, record: dict, device: str | torch.device = "cpu"):
        self.network = network.to(device).eval()
        self.record = record
        self.crop = tuple(record.get("crop", CROP))
        #: trained on mirrored crops, so it may answer with test-time mirroring
        self.mirrored = bool(record.get("mirror", False))
        self.device = torch.device(device)
        self.stats = {"runs": 0, "seconds": 0.0}
        # {(image digest, starting mask digest, clicks so far): mask after them}, the newest last
        self._answers: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @property
    def boxes(self) -> bool:
        """Trained on box starts too (the record's ``box_share``), so it may answer a box on one slice."""
        return float(self.record.get("box_share", 0.0)) > 0

    @property
    def description(self) -> str:
        r = self.record
        return (f"3D click corrector trained on this dataset ({r['file']}: {r['steps']} steps on fold "
                f"{r['fold']}'s {r['cases']} training cases)")

    def _inside(self, x: np.ndarray, window: tuple[slice, ...], mirroring: bool) -> np.ndarray:
        """(4, *crop) input -> the window's (z, y, x) bool answer (positive logit, or mean probability over
        the mirror images above 0.5)."""
        with torch.inference_mode():
            x = torch.from_numpy(x)[None].to(self.device)
            if mirroring and self.mirrored:
                inside = mirrored_probabilities(self.network, x)[0, 0].cpu().numpy() > 0.5
            else:
                inside = self.network(x)[0, 0].float().cpu().numpy() > 0
        return inside[tuple(slice(0, w.stop - w.start) for w in window)]

    def box(self, image: np.ndarray, z: int, rect: Sequence[int], mirroring: bool = True) -> np.ndarray:
        """The (Z, Y, X) bool mask of the structure a box on slice ``z`` outlines, in 3D, with no other input.
        image: (Z, Y, X) normalized; rect: (y0, x0, y1, x1) inclusive. The network runs on the window centred
        on the box; when its answer reaches a face of the window inside the volume, it runs once more on the
        window centred on the answer's extent (at most :func:`box_window_shifts` from the box's centre),
        whose answer replaces the first inside that window. Only corrector files trained on box starts
        (:attr:`boxes`) answer boxes."""
        if not self.boxes:
            raise SamnnuError(f"{self.record['file']}: this corrector was not trained on boxes")
        start = time.perf_counter()
        out = np.zeros(image.shape, dtype=bool)
        x, window = box_input(image, z, rect, crop=self.crop)
        out[window] = inside = self._inside(x, window, mirroring)
        self.stats["runs"] += 1
        if inside.any() and reaches_inner_face(inside, window, image.shape):
            found = np.argwhere(out)
            middle = (found.min(0) + found.max(0) + 1) // 2  # a window's own middle gives that window back
            centre = np.asarray(box_center(z, rect))
            limit = np.asarray(box_window_shifts(self.crop))
            moved = tuple(int(v) for v in np.clip(middle, centre - limit, centre + limit))
            if crop_window(moved, image.shape, self.crop) != window:
                x, window = box_input(image, z, rect, center=moved, crop=self.crop)
                out[window] = self._inside(x, window, mirroring)
                self.stats["runs"] += 1
        self.stats["seconds"] += time.perf_counter() - start
        return out

    def __call__(self, image: np.ndarray, mask: np.ndarray, clicks: Sequence[Point],
                 mirroring: bool = True) -> np.ndarray:
        """image: (Z, Y, X) normalized; mask: (Z, Y, X) bool; clicks: this label's clicks, newest last.
        Returns the corrected (Z, Y, X) bool mask: changed only inside the crop around the newest click, and
        every clicked voxel as its click says. ``mirroring``: answer with test-time mirroring when the
        corrector was trained on mirrored crops (8 network inputs in one batch), else one run."""
        start = time.perf_counter()
        x, window = corrector_input(image, mask, clicks, self.crop)
        out = np.array(mask, dtype=bool, copy=True)
        out[window] = self._inside(x, window, mirroring)
        for p in clicks:  # a click says what its voxel is
            out[tuple(p.index)] = p.positive
        self.stats["runs"] += 1
        self.stats["seconds"] += time.perf_counter() - start
        return out

    def apply(self, image: np.ndarray, mask: np.ndarray, clicks: Sequence[Point],
              mirroring: bool = True) -> np.ndarray:
        """The mask after each click in turn (each answer is the next click's current mask), as the
        corrector was trained and as a person clicks. The answers to the first clicks are remembered
        (:data:`REMEMBERED` of them), so adding a click to an object costs one network run, not one per click."""
        out = np.asarray(mask, dtype=bool)
        mirroring = mirroring and self.mirrored
        start = (_digest(image), _digest(out), mirroring)
        clicks = tuple(clicks)
        done = next((i for i in range(len(clicks), 0, -1) if start + (clicks[:i],) in self._answers), 0)
        if done:
            out = self._answers[start + (clicks[:done],)]
            self._answers.move_to_end(start + (clicks[:done],))
        for i in range(done, len(clicks)):
            out = self(image, out, clicks[:i + 1], mirroring)
            self._answers[start + (clicks[:i + 1],)] = out
            while len(self._answers) > REMEMBERED:
                self._answers.popitem(last=False)
        return out.copy()


#: answers a corrector remembers (:meth:`ClickCorrector.apply`)
REMEMBERED = 64


def _digest(array: np.ndarray) -> tuple:
    a = np.ascontiguousarray(array)
    return a.shape, str(a.dtype), hashlib.sha1(a.view(np.uint8).ravel()).hexdigest()


def load_corrector(path: str | Path, device: str | torch.device = "cpu") -> ClickCorrector:
    """A trained corrector from its file, weights only; a one-line SamnnuError for a damaged file, a file
    holding code, or one that is not a corrector."""
    path = Path(path)
    state = load_torch_safely(path)
    if not isinstance(state, dict) or CLICK_CORRECTOR_RECORD not in state:
        raise SamnnuError(f"{path}: not a trained click corrector (no '{CLICK_CORRECTOR_RECORD}' record)")
    record = dict(json.loads(state[CLICK_CORRECTOR_RECORD]), file=str(path))
    network = build_network(record.get("features", FEATURES))
    try:
        network.load_state_dict({k: v for k, v in state.items() if k != CLICK_CORRECTOR_RECORD})
    except RuntimeError as e:
        raise SamnnuError(f"{path}: its weights do not fit the corrector ({str(e).splitlines()[0]})") from None
    return ClickCorrector(network, record, device)

