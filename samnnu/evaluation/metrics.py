"""Segmentation metrics as pure functions of label arrays: no files, no state.

All metric functions take boolean masks of the same shape, 3D ``(Z, Y, X)`` or 2D ``(Y, X)``
(any array is cast to ``bool``), and a voxel ``spacing`` in millimetres given in the same axis
order as the array. Images read with SimpleITK give arrays ordered ``(z, y, x)`` while
``GetSpacing()`` is ``(x, y, z)``: reverse the spacing (:func:`evaluate_folders` does).

Surfaces
    The surface of a mask is the set of its voxels that have at least one face neighbour
    (6-neighbourhood in 3D, 4 in 2D) outside the mask; voxels on the edge of the image count as
    surface. Distances are Euclidean distances in millimetres between voxel centres, computed with
    :func:`scipy.ndimage.distance_transform_edt` using ``sampling=spacing`` so anisotropic voxels
    are honoured. HD95 is the larger of the two directed 95th percentiles (pred -> ref and
    ref -> pred), as in MONAI and DeepMind's ``surface-distance``; ASSD is the mean over both
    directed sets together; surface Dice (normalised surface distance, Nikolov et al.) counts the
    surface voxels of each mask lying within ``tolerance_mm`` of the other surface, divided by the
    number of surface voxels of both. It counts voxels, it does not weight them by surface area.

Empty masks (the rules every function here follows)
    ============================  =============  ==========  ============  =================
    reference / prediction        dice, iou      hd95, assd  surface_dice  volume_rel_error
    ============================  =============  ==========  ============  =================
    both non-empty                computed       computed    computed      computed
    reference empty, pred not     0.0            NaN         0.0           NaN
    reference not, pred empty     0.0            NaN         0.0           -1.0
    both empty                    1.0            NaN         1.0           0.0
    ============================  =============  ==========  ============  =================

    * A non-empty prediction on an empty reference never scores 1.0: its Dice is 0.
    * Both empty means the structure was correctly predicted absent, which scores 1.0 for the
      overlap metrics. (nnU-Net's own ``summary.json`` reports NaN there instead, so its mean
      Dice over classes that are often absent can differ from ours.)
    * A distance to or from an empty surface is undefined and is NaN, never a silent 0.
    * Volumes and the absolute volume error are always defined.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

#: Per-class metrics reported by :func:`evaluate_case`, in this order.
METRICS = (
    "dice",
    "iou",
    "hd95",
    "assd",
    "surface_dice",
    "volume_ref_ml",
    "volume_pred_ml",
    "volume_abs_error_ml",
    "volume_rel_error",
)

#: How to find the worst value of a metric: "min", "max" or "absmax". Metrics not listed have none.
WORST = {
    "dice": "min",
    "iou": "min",
    "surface_dice": "min",
    "hd95": "max",
    "assd": "max",
    "volume_abs_error_ml": "max",
    "volume_rel_error": "absmax",
}


# --------------------------------------------------------------------------- metrics


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def _as_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {ndim}D mask")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {spacing} must be positive and finite")
    return spacing


def dice(pred: np.ndarray, ref: np.ndarray, *, both_empty: float = 1.0) -> float:
    """Dice overlap ``2|P & R| / (|P| + |R|)``.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
        both_empty: the score when both masks are empty (see the module docstring).

    Returns:
        A float in [0, 1]; 0.0 when exactly one mask is empty.
    """
    pred, ref = _as_masks(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float(both_empty)
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray, *, both_empty: float = 1.0) -> float:
    """Intersection over union (Jaccard) ``|P & R| / |P | R|``; same empty rules as :func:`dice`.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
    """
    pred, ref = _as_masks(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return float(both_empty)
    return int(np.logical_and(pred, ref).sum()) / union


def volume_ml(mask: np.ndarray, spacing: Sequence[float] | None) -> float:
    """Volume of a mask in millilitres (1 ml = 1000 mm^3).

    Args:
        mask: (Z, Y, X) mask; for a 2D (Y, X) mask the result is the area in mm^2 / 1000.
        spacing: voxel size in mm, in the array's axis order.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    spacing = _as_spacing(spacing, mask.ndim)
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0


def volume_abs_error_ml(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None) -> float:
    """``|V(pred) - V(ref)|`` in ml; always defined. Masks are (Z, Y, X) or (Y, X)."""
    pred, ref = _as_masks(pred, ref)
    return abs(volume_ml(pred, spacing) - volume_ml(ref, spacing))


def volume_rel_error(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Signed relative volume error ``(V(pred) - V(ref)) / V(ref)``.

    Positive means over-segmentation. 0.0 when both masks are empty; NaN when only the reference is
    empty (the ratio is undefined; the absolute error still shows the mistake). The spacing cancels
    out and is accepted for symmetry with the other functions.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
    """
    pred, ref = _as_masks(pred, ref)
    _as_spacing(spacing, ref.ndim)
    n_ref, n_pred = int(ref.sum()), int(pred.sum())
    if n_ref == 0:
        return 0.0 if n_pred == 0 else math.nan
    return (n_pred - n_ref) / n_ref


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances in mm between the surfaces of two masks.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
        spacing: voxel size in mm in the array's axis order, e.g. (3.0, 0.8, 0.8).

    Returns:
        ``(pred_to_ref, ref_to_pred)``: 1D float arrays with, for every surface voxel of ``pred``
        (resp. ``ref``), the distance to the nearest surface voxel of the other mask. Both arrays
        are empty when either mask is empty.
    """
    pred, ref = _as_masks(pred, ref)
    spacing = _as_spacing(spacing, ref.ndim)
    if not pred.any() or not ref.any():
        return np.zeros(0), np.zeros(0)
    # Work inside the bounding box of both masks grown by one voxel: every surface voxel lies in
    # it, so the distances are exact, and the distance transforms stay small.
    coords = np.argwhere(pred | ref)
    lo = np.maximum(coords.min(0) - 1, 0)
    hi = np.minimum(coords.max(0) + 2, ref.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    # Erode the uncropped-but-boxed masks; the one-voxel margin keeps interior voxels interior
    # except where the box meets the real image edge, which counts as outside by definition.
    pred_s, ref_s = _surface(pred[box]), _surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~ref_s, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_s, sampling=spacing)
    return to_ref[pred_s].astype(float), to_pred[ref_s].astype(float)


def _distance_metrics(
    d_pr: np.ndarray, d_rp: np.ndarray, n_pred: int, n_ref: int, tolerance_mm: float
) -> dict[str, float]:
    if n_pred == 0 or n_ref == 0:
        nsd = 1.0 if n_pred == 0 and n_ref == 0 else 0.0
        return {"hd95": math.nan, "assd": math.nan, "surface_dice": nsd}
    hd = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    assd_value = float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    within = int((d_pr <= tolerance_mm).sum()) + int((d_rp <= tolerance_mm).sum())
    return {"hd95": hd, "assd": assd_value, "surface_dice": within / (d_pr.size + d_rp.size)}


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None) -> float:
    """95th-percentile Hausdorff distance in mm; NaN when either mask is empty.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
        spacing: voxel size in mm in the array's axis order.
    """
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return _distance_metrics(d_pr, d_rp, d_pr.size, d_rp.size, 0.0)["hd95"]


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None) -> float:
    """Average symmetric surface distance in mm; NaN when either mask is empty.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
        spacing: voxel size in mm in the array's axis order.
    """
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return _distance_metrics(d_pr, d_rp, d_pr.size, d_rp.size, 0.0)["assd"]


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None, tolerance_mm: float = 1.0
) -> float:
    """Surface Dice at a tolerance (normalised surface distance), in [0, 1].

    1.0 when both masks are empty, 0.0 when exactly one is.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
        spacing: voxel size in mm in the array's axis order.
        tolerance_mm: a surface voxel counts as matched when the other surface is at most this far.
    """
    pred, ref = _as_masks(pred, ref)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return _distance_metrics(d_pr, d_rp, int(pred.any()), int(ref.any()), tolerance_mm)["surface_dice"]


def evaluate_masks(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None, tolerance_mm: float = 1.0
) -> dict[str, float]:
    """All of :data:`METRICS` for one pair of masks, computing the surface distances once.

    Args:
        pred, ref: masks of the same shape, (Z, Y, X) or (Y, X).
        spacing: voxel size in mm in the array's axis order.
    """
    pred, ref = _as_masks(pred, ref)
    spacing = _as_spacing(spacing, ref.ndim)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    v_ref, v_pred = volume_ml(ref, spacing), volume_ml(pred, spacing)
    out = {"dice": dice(pred, ref), "iou": iou(pred, ref)}
    out.update(_distance_metrics(d_pr, d_rp, int(pred.any()), int(ref.any()), tolerance_mm))
    out.update(
        volume_ref_ml=v_ref,
        volume_pred_ml=v_pred,
        volume_abs_error_ml=abs(v_pred - v_ref),
        volume_rel_error=volume_rel_error(pred, ref),
    )
    return {m: out[m] for m in METRICS}


# --------------------------------------------------------------------------- one case


def _class_mask(labels: np.ndarray, value: int | Sequence[int]) -> np.ndarray:
    """Mask of a label (an int) or of an nnU-Net region (a list of labels)."""
    if isinstance(value, (list, tuple)):
        return np.isin(labels, [int(v) for v in value])
    return labels == int(value)


def foreground_classes(labels: Mapping[str, Any]) -> dict[str, int | list[int]]:
    """The classes to evaluate from a dataset.json-style ``labels`` dict (name -> label or region).

    Drops ``background`` (value 0) and nnU-Net's ``ignore`` label.
    """
    out = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            value = [int(v) for v in value]
            if value == [0]:
                continue
        else:
            value = int(value)
            if value == 0:
                continue
        out[str(name)] = value
    return out


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float] | None,
    labels: Mapping[str, Any],
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Metrics of every foreground class of one case.

    Args:
        pred_labels, ref_labels: integer label maps of the same shape, (Z, Y, X) or (Y, X).
        spacing: voxel size in mm in the array's axis order.
        labels: class name -> label value, or a list of values for an nnU-Net region. A
            ``background``/0 entry is skipped; an ``ignore`` entry marks reference voxels that are
            left out of every metric.
        tolerance_mm: tolerance of the surface Dice.

    Returns:
        ``{class_name: {metric: value}}`` with the metrics of :data:`METRICS`.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference {ref_labels.shape}")
    keep = None
    if "ignore" in labels:
        keep = ~_class_mask(ref_labels, labels["ignore"])
    out = {}
    for name, value in foreground_classes(labels).items():
        pred, ref = _class_mask(pred_labels, value), _class_mask(ref_labels, value)
        if keep is not None:
            pred, ref = pred & keep, ref & keep
        out[name] = evaluate_masks(pred, ref, spacing, tolerance_mm)
    return out
