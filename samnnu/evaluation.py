"""Segmentation metrics as pure functions, and the evaluation of a folder of predictions.

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

Summaries
    :func:`evaluate_folders` reports the mean, the median and the worst value per class and
    metric. They skip NaN values and say how many were skipped in ``"n_nan"``. "Worst" is the
    minimum for ``dice``, ``iou`` and ``surface_dice``, the maximum for ``hd95``, ``assd`` and
    ``volume_abs_error_ml``, and the value of largest magnitude for the signed
    ``volume_rel_error``; the volumes themselves have no worst value.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from samnnu.errors import SamnnuError
# write_text_atomic is re-exported: other modules import it from here.
from samnnu.safe_io import check_image_file, write_json_atomic, write_text_atomic

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


# --------------------------------------------------------------------------- folders


def _read(path: Path):
    """The image at ``path``, refused with one line naming the file when it is damaged or truncated
    (SimpleITK would read the missing part of a cut-off ``.nii.gz`` as zeros), not 2D/3D, or not a
    single-channel image."""
    import SimpleITK as sitk

    info = check_image_file(path)
    if info.dimension not in (2, 3):
        raise SamnnuError(f"{path}: a {info.dimension}D image; expected a 2D or 3D label map")
    if info.components != 1:
        raise SamnnuError(f"{path}: {info.components} components per voxel; expected a single-channel label map")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise SamnnuError(f"{path}: cannot read image ({first})") from None


def _fmt_tuple(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in values) + ")"


def _check_same_grid(pred_img, ref_img, pred_path: Path, ref_path: Path) -> None:
    checks = (
        ("size", pred_img.GetSize(), ref_img.GetSize()),
        ("spacing", pred_img.GetSpacing(), ref_img.GetSpacing()),
        ("origin", pred_img.GetOrigin(), ref_img.GetOrigin()),
        ("direction", pred_img.GetDirection(), ref_img.GetDirection()),
    )
    for what, a, b in checks:
        if len(a) != len(b) or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise SamnnuError(
                f"{pred_path}: {what} {_fmt_tuple(a)} differs from the reference {ref_path} "
                f"{_fmt_tuple(b)}; "
                "prediction and reference must lie on the same voxel grid"
            )


def _label_values(labels: Mapping[str, Any]) -> set[int]:
    """Every label value a dataset.json ``labels`` dict names (regions contribute their members), with 0."""
    values = {0}
    for value in labels.values():
        if isinstance(value, (list, tuple)):
            values.update(int(v) for v in value)
        else:
            values.add(int(value))
    return values


def _format_values(values: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _evaluate_file(
    pred_path: Path,
    ref_path: Path,
    labels: Mapping[str, Any] | None,
    tolerance_mm: float,
    known_values: set[int] | None = None,
) -> tuple[dict[str, dict[str, float]], list[int]]:
    """Evaluate one file pair; with ``labels=None`` the classes are the labels found in either.

    known_values: the label values a prediction may hold (from the dataset.json); others are refused.
    """
    import SimpleITK as sitk

    pred_img, ref_img = _read(pred_path), _read(ref_path)
    _check_same_grid(pred_img, ref_img, pred_path, ref_path)
    pred = sitk.GetArrayViewFromImage(pred_img)
    ref = sitk.GetArrayViewFromImage(ref_img)
    for arr, path in ((pred, pred_path), (ref, ref_path)):
        if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
            raise SamnnuError(f"{path}: contains non-integer values; expected a label map")
    if known_values is not None:
        unknown = sorted(int(v) for v in np.unique(pred) if int(v) not in known_values)
        if unknown:
            raise SamnnuError(
                f"{pred_path}: label value(s) {_format_values(unknown)} not in the dataset's labels "
                f"({_format_values(sorted(known_values))})"
            )
    spacing = tuple(reversed(ref_img.GetSpacing()))
    found = []
    if labels is None:
        found = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
        labels = {f"label_{v}": v for v in found}
    return evaluate_case(pred, ref, spacing, labels, tolerance_mm), found


def _evaluate_file_star(args):
    return _evaluate_file(*args)


def _load_dataset_json(dataset_json) -> dict:
    if isinstance(dataset_json, Mapping):
        return dict(dataset_json)
    path = Path(dataset_json)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise SamnnuError(f"{path}: dataset.json not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SamnnuError(f"{path}: cannot read dataset.json ({e})") from None


def _nan_summary(values: list[float], how: str) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan
    if how == "mean":
        return float(arr.mean())
    if how == "median":
        return float(np.median(arr))
    if how == "min":
        return float(arr.min())
    if how == "max":
        return float(arr.max())
    if how == "absmax":
        return float(arr[np.argmax(np.abs(arr))])
    raise ValueError(how)


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Mean, median and worst per class and metric over cases, skipping NaN.

    Args:
        per_case: ``{case: {class_name: {metric: value}}}``, every case having the same classes.

    Returns:
        ``{"mean", "median", "worst": {class: {metric: value}}, "worst_case": {class: {metric:
        case}}, "n_nan": {class: {metric: number of NaN values skipped}}, "foreground_mean":
        {metric: mean over classes of the class means}}``.
    """
    cases = sorted(per_case)
    classes = list(per_case[cases[0]]) if cases else []
    out: dict[str, Any] = {k: {} for k in ("mean", "median", "worst", "worst_case", "n_nan")}
    for cls in classes:
        for key in out:
            out[key][cls] = {}
        for metric in METRICS:
            values = [float(per_case[c][cls][metric]) for c in cases]
            out["mean"][cls][metric] = _nan_summary(values, "mean")
            out["median"][cls][metric] = _nan_summary(values, "median")
            out["n_nan"][cls][metric] = int(sum(math.isnan(v) for v in values))
            if metric in WORST:
                worst = _nan_summary(values, WORST[metric])
                out["worst"][cls][metric] = worst
                out["worst_case"][cls][metric] = next(
                    (c for c, v in zip(cases, values) if v == worst), None
                )
    out["foreground_mean"] = {
        m: _nan_summary([out["mean"][cls][m] for cls in classes], "mean") for m in METRICS
    }
    return out


def evaluate_folders(
    ref_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    labels: Mapping[str, Any] | None = None,
    dataset_json: str | os.PathLike | Mapping | None = None,
    file_ending: str | None = None,
    tolerance_mm: float = 1.0,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Evaluate every prediction file in ``pred_dir`` against the file of the same name in ``ref_dir``.

    Args:
        ref_dir: folder of reference label maps (e.g. nnU-Net's ``gt_segmentations``).
        pred_dir: folder of predicted label maps; every file ending in ``file_ending`` is evaluated.
        labels: class name -> label value (or list of values for a region); may name only some of the
            dataset's classes. When neither this nor ``dataset_json`` is given, the classes are all
            non-zero labels found, named ``label_N``.
        dataset_json: a dataset.json path, its folder, or its parsed dict; gives ``labels`` and
            ``file_ending`` when those are not passed, and the label values a prediction may hold.
        file_ending: defaults to the dataset.json's ``file_ending``, else ``.nii.gz``.
        tolerance_mm: tolerance of the surface Dice.
        num_processes: worker processes; 1 evaluates in this process.

    Returns:
        ``{"per_case": {case: {class: {metric: value}}}, "mean", "median", "worst",
        "worst_case", "n_nan", "foreground_mean", "n_cases", "missing_predictions", "labels",
        "file_ending", "tolerance_mm", "ref_dir", "pred_dir"}`` (see :func:`summarize`);
        ``missing_predictions`` lists the reference cases that have no prediction (not scored).

    Raises:
        SamnnuError: a folder is missing or holds no predictions, a reference is missing for a
            prediction, an image is unreadable, truncated, damaged or not 2D/3D, a prediction lies on
            a different voxel grid, or a prediction holds a label value the dataset.json does not name.
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    ds = _load_dataset_json(dataset_json) if dataset_json is not None else {}
    if labels is None and ds:
        if "labels" not in ds:
            raise SamnnuError(f"{dataset_json}: dataset.json has no 'labels'")
        labels = ds["labels"]
    known_values = _label_values(ds["labels"]) if "labels" in ds else None
    file_ending = file_ending or ds.get("file_ending") or ".nii.gz"
    for d, what in ((ref_dir, "reference"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise SamnnuError(f"{d}: {what} folder not found")

    def case_files(folder: Path) -> dict[str, Path]:
        return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
                if p.name.endswith(file_ending) and p.is_file()}

    preds, refs = case_files(pred_dir), case_files(ref_dir)
    if not preds:
        raise SamnnuError(f"{pred_dir}: no prediction files ending in {file_ending}")
    jobs = []
    for case, p in preds.items():
        if case not in refs:
            raise SamnnuError(f"{p}: no reference {ref_dir / p.name}")
        jobs.append((p, refs[case], labels, tolerance_mm, known_values))

    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs))) as pool:
            results = list(pool.map(_evaluate_file_star, jobs))
    else:
        results = [_evaluate_file(*job) for job in jobs]

    cases = list(preds)
    per_case = {c: r[0] for c, r in zip(cases, results)}
    if labels is None:
        # Classes inferred per case: a class absent from a case is empty on both sides there.
        found = sorted(set().union(*(r[1] for r in results)))
        labels = {f"label_{v}": v for v in found}
        empty = evaluate_masks(np.zeros((1, 1), bool), np.zeros((1, 1), bool), None, tolerance_mm)
        per_case = {
            c: {f"label_{v}": metrics.get(f"label_{v}", dict(empty)) for v in found}
            for c, metrics in per_case.items()
        }
    result = {"per_case": per_case}
    result.update(summarize(per_case))
    result.update(
        n_cases=len(cases),
        missing_predictions=sorted(set(refs) - set(preds)),
        labels={str(k): v for k, v in labels.items()},
        file_ending=file_ending,
        tolerance_mm=float(tolerance_mm),
        ref_dir=str(ref_dir),
        pred_dir=str(pred_dir),
    )
    return result


# --------------------------------------------------------------------------- writing


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays converted, NaN and infinities become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, np.ndarray)):
        return [to_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_evaluation(result: Mapping[str, Any], out_json: str | os.PathLike) -> tuple[Path, Path]:
    """Write an :func:`evaluate_folders` result as JSON (NaN as null) and a CSV beside it.

    The CSV (same name, ``.csv``) has one row per case and class: ``case,class,<metrics...>``,
    with NaN written as an empty field. Both files are written atomically.

    Returns:
        The paths of the JSON and the CSV file.

    Raises:
        SamnnuError: one line naming the file that cannot be written (a folder there, no permission,
            disk full); a previous file of that name is kept.
    """
    out_json = Path(out_json)
    write_json_atomic(out_json, to_jsonable(result))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", *METRICS])
    for case, classes in result["per_case"].items():
        for cls, metrics in classes.items():
            row = []
            for m in METRICS:
                v = metrics.get(m)
                row.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v)))
            writer.writerow([case, cls, *row])
    out_csv = out_json.with_suffix(".csv")
    write_text_atomic(out_csv, buf.getvalue())
    return out_json, out_csv


# --------------------------------------------------------------------------- command line


def _raw_folder(data_root: str | os.PathLike | None) -> Path:
    """The nnUNet_raw folder :func:`samnnu.config.setup_environment` would choose, without creating it.

    setup_environment creates all three nnU-Net folders; a mistyped ``-d`` must not leave them behind, so
    the dataset is looked up here first (the same rule: ``data_root`` overrides the environment, which
    overrides the default data root).
    """
    from samnnu.config import default_data_root

    if data_root is not None:
        return Path(data_root).expanduser().resolve() / "nnUNet_raw"
    return Path(os.environ.get("nnUNet_raw") or default_data_root() / "nnUNet_raw")


def _dataset_json_from_arg(value: str, data_root: str | os.PathLike | None = None) -> dict:
    """``-d``: a dataset.json file, its folder, or a dataset ID/name found under nnUNet_raw.

    Only a dataset that is found sets up the nnU-Net environment (:func:`samnnu.config.setup_environment`
    with ``data_root``); an unknown one is a SamnnuError and creates no folder.
    """
    path = Path(value).expanduser()
    if path.exists():
        return _load_dataset_json(path)
    raw = _raw_folder(data_root)
    if value.startswith("Dataset"):
        found = [raw / value]
    elif value.isascii() and value.isdigit() and raw.is_dir():
        prefix = f"Dataset{int(value):03d}_"
        found = sorted(p for p in raw.iterdir() if p.name.startswith(prefix))
    else:
        found = []
    found = [p for p in found if (p / "dataset.json").is_file()]
    if not found:
        raise SamnnuError(f"{value}: neither a dataset.json file nor a dataset ID found in nnUNet_raw ({raw})")
    if len(found) > 1:
        raise SamnnuError(f"{value}: dataset ID is ambiguous in {raw}: {', '.join(p.name for p in found)}")
    from samnnu.config import setup_environment

    paths = setup_environment(data_root)
    return _load_dataset_json(paths.raw / found[0].name / "dataset.json")


def _check_output(path: Path) -> None:
    """Refuse, before anything is evaluated, an output JSON that cannot be written: an existing folder
    (for it or for the CSV beside it), a name ending in ``.csv``, or a place under a file or without
    write permission. Missing folders are fine: they are created."""
    if path.is_dir():
        raise SamnnuError(f"{path}: is a folder; -o takes the name of the JSON file to write")
    csv_path = path.with_suffix(".csv")
    if csv_path == path:
        raise SamnnuError(f"{path}: the output JSON must not end in .csv (the CSV is written beside it)")
    if csv_path.is_dir():
        raise SamnnuError(f"{csv_path}: is a folder; the CSV beside the output JSON cannot be written")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise SamnnuError(f"{path}: cannot be written ({folder} is not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SamnnuError(f"{path}: cannot be written (no permission to write in {folder})")


def _missing_line(result: Mapping[str, Any], shown: int = 5) -> str | None:
    """One line naming the reference cases without a prediction, or None when there are none."""
    missing = result["missing_predictions"]
    if not missing:
        return None
    names = ", ".join(missing[:shown]) + (", ..." if len(missing) > shown else "")
    return (f"{len(missing)} reference case(s) in {result['ref_dir']} have no prediction in {result['pred_dir']} "
            f"and were not scored: {names}")


def format_dice_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of Dice per class: mean, median, worst and the number of cases."""
    rows = [("class", "mean", "median", "worst", "n")]
    fmt = lambda v: "nan" if v is None or math.isnan(v) else f"{v:.4f}"  # noqa: E731
    for cls in result["mean"]:
        rows.append(
            (
                cls,
                fmt(result["mean"][cls]["dice"]),
                fmt(result["median"][cls]["dice"]),
                fmt(result["worst"][cls]["dice"]),
                str(result["n_cases"] - result["n_nan"][cls]["dice"]),
            )
        )
    rows.append(("foreground", fmt(result["foreground_mean"]["dice"]), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``samnnu_evaluate -ref DIR -pred DIR [-d DATASET_JSON_OR_ID] [-o OUT.json] [--tolerance MM]
    [--data-root DIR]``; problems are one ``samnnu_evaluate: error:`` line and exit status 1."""
    from samnnu.cli import _data_root, _Parser, _run

    parser = _Parser(
        prog="samnnu_evaluate",
        description="Dice, IoU, HD95, ASSD, surface Dice and volume errors of a folder of predictions.",
    )
    parser.add_argument("-ref", required=True, help="folder of reference label maps")
    parser.add_argument("-pred", required=True, help="folder of predicted label maps")
    parser.add_argument(
        "-d", dest="dataset", default=None,
        help="dataset.json (file or folder) or dataset ID/name under nnUNet_raw; gives class names",
    )
    parser.add_argument("-o", dest="out", default=None, help="output JSON (default: PRED/evaluation.json)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance in mm (default 1)")
    parser.add_argument("-np", dest="num_processes", type=int, default=1, help="worker processes (default 1)")
    _data_root(parser)
    args = parser.parse_args(argv)

    def go():
        out = Path(args.out) if args.out else Path(args.pred) / "evaluation.json"
        _check_output(out)
        ds = _dataset_json_from_arg(args.dataset, args.data_root) if args.dataset is not None else None
        result = evaluate_folders(
            args.ref, args.pred, dataset_json=ds, tolerance_mm=args.tolerance,
            num_processes=max(1, args.num_processes),
        )
        missing = _missing_line(result)
        if missing:
            print(f"{parser.prog}: {missing}", file=sys.stderr)
        out_json, out_csv = write_evaluation(result, out)
        print(f"{result['n_cases']} cases; Dice per class:")
        print(format_dice_table(result))
        print(f"wrote {out_json} and {out_csv}")

    return _run(parser.prog, go)


evaluate_main = main

if __name__ == "__main__":
    sys.exit(main())
