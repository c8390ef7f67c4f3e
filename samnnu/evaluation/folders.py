"""Evaluation of a folder of predictions against a folder of references (files in, JSON/CSV out).

The metrics themselves are :mod:`samnnu.evaluation.metrics`.

defined.

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
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samnnu.config import default_data_root, setup_environment
from samnnu.datasets import UnknownDataset, dataset_name
from samnnu.errors import SamnnuError
from samnnu.evaluation.metrics import METRICS, WORST, evaluate_case, evaluate_masks
from samnnu.safe_io import check_image_file, read_json, to_jsonable, write_json_atomic, write_text_atomic

# --------------------------------------------------------------------------- folders


def _read(path: Path):
    """The image at ``path``, refused with one line naming the file when it is damaged or truncated
    (SimpleITK would read the missing part of a cut-off ``.nii.gz`` as zeros), not 2D/3D, or not a
    single-channel image."""
    import SimpleITK as sitk  # local: SimpleITK is slow to import

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


#: file types a label map may come in (a reference is matched to a prediction by case name, whatever its type)
LABEL_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _case_name(file_name: str, ending: str | None) -> str | None:
    """The case a file holds: its name without ``ending`` (any of :data:`LABEL_ENDINGS` when None)."""
    for e in (ending,) if ending else LABEL_ENDINGS:
        if file_name.lower().endswith(e.lower()) and len(file_name) > len(e):
            return file_name[: -len(e)]
    return None


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


def to_label_values(array: np.ndarray, stored: Mapping[int, int] | None, threshold: float | None = None) -> np.ndarray:
    """Label values from the values a 2D mask file stores.

    ``stored``: {stored value: label value} (``dataset.json``'s ``samnnu_stored_label_values``, e.g.
    {0: 0, 255: 1}); applied when the array holds a stored value that is not itself a label value (a
    mask as the user keeps it, or a samnnu prediction written back in those values). ``threshold``
    (two labels only, as ``samnnu_convert --mask-threshold``): values at or above it are foreground,
    the rest background, for masks saved as JPEG.
    """
    if threshold is not None:
        if not stored or len(stored) != 2:
            raise SamnnuError("a mask threshold needs a dataset with two labels (give -d)")
        background, foreground = sorted(stored)
        array = np.where(array >= threshold, foreground, background)
    if stored:
        present = set(np.unique(array).tolist())
        if present & (set(stored) - set(stored.values())):
            out = np.array(array, dtype=np.int64, copy=True)
            for value, label in stored.items():
                out[array == value] = label
            return out
    return array


def _evaluate_file(
    pred_path: Path,
    ref_path: Path,
    labels: Mapping[str, Any] | None,
    tolerance_mm: float,
    known_values: set[int] | None = None,
    stored: Mapping[int, int] | None = None,
    ref_threshold: float | None = None,
) -> tuple[dict[str, dict[str, float]], list[int]]:
    """Evaluate one file pair; with ``labels=None`` the classes are the labels found in either.

    known_values: the label values a prediction may hold (from the dataset.json); others are refused.
    stored, ref_threshold: see :func:`to_label_values` (the threshold applies to the reference only).
    """
    import SimpleITK as sitk  # local: SimpleITK is slow to import

    pred_img, ref_img = _read(pred_path), _read(ref_path)
    _check_same_grid(pred_img, ref_img, pred_path, ref_path)
    pred = to_label_values(sitk.GetArrayViewFromImage(pred_img), stored)
    ref = sitk.GetArrayViewFromImage(ref_img)
    if ref_threshold is not None and 0 < ref.max() < ref_threshold:
        raise SamnnuError(f"{ref_path}: every value is below the mask threshold {ref_threshold:g} (maximum "
                          f"{ref.max():g}): it already holds labels; evaluate it without --mask-threshold")
    ref = to_label_values(ref, stored, ref_threshold)
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
    return read_json(path / "dataset.json" if path.is_dir() else path, "dataset.json")


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
    reference_threshold: float | None = None,
) -> dict[str, Any]:
    """Evaluate every prediction file in ``pred_dir`` against the reference of the same case name in
    ``ref_dir``, whatever the reference's file type (``case.png`` against ``case.jpg`` or ``case.nii.gz``).

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
        reference_threshold: references saved as JPEG masks: stored values at or above it are
            foreground (as ``samnnu_convert --mask-threshold``; needs the dataset.json). Masks kept in
            the values recorded at conversion (0/255) are read as their labels either way.

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

    stored_names = ds.get("samnnu_stored_label_values")
    stored = {int(v): int(ds["labels"][k]) for k, v in stored_names.items()} if stored_names else None
    if reference_threshold is not None and not stored and "labels" in ds:
        stored = {v: v for v in sorted(_label_values(ds["labels"]))}
    if reference_threshold is not None and (not stored or len(stored) != 2):
        raise SamnnuError("a reference threshold needs the dataset.json (-d) of a dataset with two labels")
    if known_values is not None and stored:
        known_values = known_values | set(stored)

    def case_files(folder: Path, ending: str | None) -> dict[str, Path]:
        out = {}
        for p in sorted(folder.iterdir()):
            case = _case_name(p.name, ending)
            if case is None or not p.is_file() or p.name.startswith("."):
                continue
            if case in out:
                raise SamnnuError(f"{folder}: case '{case}' has two files ({out[case].name}, {p.name})")
            out[case] = p
        return out

    preds, refs = case_files(pred_dir, file_ending), case_files(ref_dir, None)
    if not preds:
        raise SamnnuError(f"{pred_dir}: no prediction files ending in {file_ending}")
    jobs = []
    for case, p in preds.items():
        if case not in refs:
            raise SamnnuError(f"{p}: no reference for case '{case}' in {ref_dir}")
        jobs.append((p, refs[case], labels, tolerance_mm, known_values, stored, reference_threshold))

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
    if data_root is not None:
        return Path(data_root).expanduser().resolve() / "nnUNet_raw"
    return Path(os.environ.get("nnUNet_raw") or default_data_root() / "nnUNet_raw")


def dataset_json_from_arg(value: str, data_root: str | os.PathLike | None = None) -> dict:
    """``-d``: a dataset.json file, its folder, or a dataset ID/name found under nnUNet_raw.

    Only a dataset that is found sets up the nnU-Net environment (:func:`samnnu.config.setup_environment`
    with ``data_root``); an unknown one is a SamnnuError and creates no folder.
    """
    path = Path(value).expanduser()
    if path.exists():
        return _load_dataset_json(path)
    raw = _raw_folder(data_root)
    try:
        name = dataset_name(value, roots=(raw,))  # looks only: creates no folder
    except UnknownDataset:
        name = None
    if name is None or not (raw / name / "dataset.json").is_file():
        raise SamnnuError(f"{value}: neither a dataset.json file nor a dataset ID found in nnUNet_raw ({raw})")
    paths = setup_environment(data_root)
    return _load_dataset_json(paths.raw / name / "dataset.json")


def check_output_path(path: Path) -> None:
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


def missing_line(result: Mapping[str, Any], shown: int = 5) -> str | None:
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
