"""Shared machinery to write an nnU-Net v2 raw dataset ``DatasetNNN_Name`` from checked cases.

A dataset-specific script finds its cases (:class:`CaseFiles`: the image file of each channel and
the label file) and hands them to :func:`convert_cases` with a ``prepare`` function that reads and
checks one case. Every case that fails a check is refused with a one-line reason; the others are
written. Nothing in the source folders is ever modified.

The dataset is built in a hidden temporary folder next to the target
(``nnUNet_raw/.DatasetNNN_Name.partial-*``) and renamed into place only when it is complete, so an
interrupted conversion never leaves a half-written ``DatasetNNN_Name`` for nnU-Net to find.

The 3D checks (SimpleITK: NIfTI, NRRD, ...) live here in :func:`prepare_volume_case`; the 2D
natural-image checks live in :mod:`samnnu.dataset_conversion.folder`. Both use the label-value
checks of this module (:func:`integer_label_array`).

Files are read and written through :mod:`samnnu.safe_io`: a truncated or damaged source file refuses
its case (:func:`inspect_image`), every output file is written atomically and checked, and an
``OSError`` (full disk, no permission) becomes a one-line :class:`SamnnuError` naming the file
(:func:`reported_os_errors`).
"""
from __future__ import annotations

import fnmatch
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from samnnu.config import setup_environment
from samnnu.datasets import dataset_folder_name, datasets_with_id
from samnnu.errors import SamnnuError
from samnnu.safe_io import (
    ImageInfo,
    check_image_file,
    describe_os_error,
    reported_os_errors,
    write_image_atomic,
    write_json_atomic,
)

# Two grids are "the same" when they agree within these tolerances (physical units, mm).
SPACING_RTOL = 1e-4
ORIGIN_ATOL = 1e-3
DIRECTION_ATOL = 1e-4

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")

# Image dimensions the converter writes (nnU-Net reads 2D and 3D images, channels as separate files).
SUPPORTED_DIMENSIONS = (2, 3)


class CaseRefused(Exception):
    """One case cannot be converted; the message is a one-line reason naming the file."""


@dataclass(frozen=True)
class CaseFiles:
    """The source files of one case.

    Attributes:
        case_id: identifier used for the output files (``case_id_0000.nii.gz``).
        images: one file per input file of the case, in channel order (may be empty).
        label: the label file, or None when there is none.
        problem: a reason found while listing files (e.g. a missing channel); refuses the case.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    problem: str | None = None


@dataclass
class PreparedCase:
    """A checked case, ready to write.

    Attributes:
        images: one object per output channel file, in channel order.
        label: the label object (integer valued).
        save: writes one of these objects to a path.
    """

    images: list[Any]
    label: Any
    save: Callable[[Any, Path], None]


@dataclass(frozen=True)
class DatasetSpec:
    """What goes into ``dataset.json`` (besides ``numTraining``) and the folder name."""

    dataset_id: int
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str = ".nii.gz"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)


@dataclass
class ConversionResult:
    """Outcome of a conversion: where the dataset is, which cases went in, which were refused."""

    dataset_folder: Path
    converted: list[str]
    refused: dict[str, str]
    held_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """Human-readable summary: one line for the totals, one per note and one per refused case."""
        lines = [f"converted {len(self.converted)} cases into {self.dataset_folder}"] + list(self.notes)
        if self.held_out:
            lines.append(f"held out {len(self.held_out)} of them as a test set (imagesTs/, labelsTs/; never "
                         f"planned, trained or validated on)")
        if self.refused:
            lines.append(f"refused {len(self.refused)} cases:")
            lines.extend(f"  {case}: {reason}" for case, reason in sorted(self.refused.items()))
        return lines


# --------------------------------------------------------------------------------------------
# Validation of names, labels maps and channel names
# --------------------------------------------------------------------------------------------
def validate_dataset_id_and_name(dataset_id: int, name: str) -> None:
    """Raise SamnnuError unless ``dataset_id`` is in 1..999 and ``name`` is a plain word."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)):
        raise SamnnuError(f"dataset id {dataset_id!r}: not an integer")
    if not 1 <= int(dataset_id) <= 999:
        raise SamnnuError(f"dataset id {dataset_id}: must be between 1 and 999")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise SamnnuError(
            f"dataset name {name!r}: use letters, digits, '_' and '-' only, starting with a letter or digit"
        )


def validate_labels_map(labels: Mapping[str, int]) -> dict[str, int]:
    """Check an nnU-Net labels map ``{"background": 0, "liver": 1, ...}``; return a clean copy.

    Values must be distinct integers 0, 1, 2, ... (consecutive, as nnU-Net requires) and 0 must be
    called ``background``. An ``ignore`` entry (sparse annotations) must be one above the highest class.
    """
    if not labels:
        raise SamnnuError("labels map is empty; give at least background=0 and one class")
    clean: dict[str, int] = {}
    for key, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SamnnuError(f"labels map: value of {key!r} is {value!r}, not an integer")
        clean[str(key)] = int(value)
    ignore = clean.pop("ignore", None)
    values = sorted(clean.values())
    if ignore is not None and values and ignore != values[-1] + 1:
        raise SamnnuError(f"labels map {clean}: the ignore label must be one above the highest class "
                          f"({values[-1] + 1}), got {ignore}")
    if values != list(range(len(values))):
        raise SamnnuError(f"labels map {clean}: values must be distinct and consecutive from 0")
    if clean.get("background") != 0:
        raise SamnnuError(f"labels map {clean}: label 0 must be named 'background'")
    if len(clean) < 2:
        raise SamnnuError(f"labels map {clean}: needs at least one class besides background")
    return clean if ignore is None else dict(clean, ignore=ignore)


def normalise_channel_names(channel_names: Mapping[str | int, str] | Sequence[str]) -> dict[str, str]:
    """Turn ``["T1", "T2"]`` or ``{0: "T1", 1: "T2"}`` into ``{"0": "T1", "1": "T2"}``."""
    if isinstance(channel_names, Mapping):
        items = {int(k): str(v) for k, v in channel_names.items()}
    else:
        items = {i: str(v) for i, v in enumerate(channel_names)}
    if not items or sorted(items) != list(range(len(items))):
        raise SamnnuError(f"channel names {channel_names!r}: need names for channels 0, 1, 2, ... in order")
    if any(not v.strip() for v in items.values()):
        raise SamnnuError(f"channel names {channel_names!r}: a channel name is empty")
    return {str(k): items[k] for k in sorted(items)}


# --------------------------------------------------------------------------------------------
# Label values
# --------------------------------------------------------------------------------------------
def short_name(path: Path) -> str:
    """``parent/file`` for messages: enough to find the file without a long absolute path."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def one_line(text: str, limit: int = 200) -> str:
    """Collapse an error text into one short line (whitespace runs become single spaces)."""
    text = " ".join(str(text).split()) or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_summary(text: str) -> str:
    """The useful sentence of a reader's exception, without SimpleITK source locations and paths."""
    text = one_line(text, limit=10_000)
    if "ERROR:" in text:
        text = text.rsplit("ERROR:", 1)[1]
    if "[nrrd]" in text:  # NRRD's reader stacks "[nrrd] f: trouble" lines; the last says why
        text = text.rsplit("[nrrd]", 1)[1].split(":", 1)[-1]
    text = re.sub(r'\s*(for|reading)?\s*"[^"]*"', "", text).strip(" .:")
    return one_line(text or "unreadable file", limit=160)


def _format_values(values: Sequence[float], limit: int = 5) -> str:
    shown = [f"{v:g}" for v in values[:limit]]
    return ", ".join(shown) + (", ..." if len(values) > limit else "")


def integer_label_array(array: np.ndarray, labels: Mapping[str, int], where: str) -> np.ndarray:
    """Check label values and return them as uint8 (uint16 when a value exceeds 255).

    A float array is cast only after checking that every value is finite, integral and listed in
    ``labels``; an integer array must also only hold listed values.

    Args:
        array: label values, any shape.
        labels: the dataset's labels map.
        where: file name for the reason.

    Raises:
        CaseRefused: with a one-line reason when a value is not integral or not listed.
    """
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise CaseRefused(f"{where}: label pixel type {array.dtype} is not numeric")
    values = np.unique(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise CaseRefused(f"{where}: label contains NaN or infinite values")
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise CaseRefused(
                f"{where}: label values are not integral ({_format_values(fractional.tolist())})"
            )
    allowed = set(labels.values())
    unknown = [v for v in values.tolist() if v not in allowed]
    if unknown:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(labels.items(), key=lambda kv: kv[1]))
        raise CaseRefused(
            f"{where}: label value(s) {_format_values(unknown)} not in the labels map ({listed})"
        )
    dtype = np.uint8 if max(allowed) <= 255 else np.uint16
    return array.astype(dtype)


def checked_labels(array: np.ndarray, labels: Mapping[str, int], where: str,
                   ignore_source: int | None = None) -> np.ndarray:
    """:func:`integer_label_array` for label files that mark unannotated voxels with ``ignore_source``
    (sparse annotations, e.g. 255): those voxels become the labels map's ``ignore`` value."""
    if ignore_source is None or "ignore" not in labels or ignore_source == labels["ignore"]:
        return integer_label_array(array, labels, where)
    values = integer_label_array(array, dict(labels, ignore=ignore_source), where)
    out = values.astype(np.uint8 if labels["ignore"] <= 255 else np.uint16)
    out[values == ignore_source] = labels["ignore"]
    return out


# --------------------------------------------------------------------------------------------
# 3D volumes (SimpleITK)
# --------------------------------------------------------------------------------------------
def inspect_image(path: Path) -> ImageInfo:
    """Check a source image file with :func:`samnnu.safe_io.check_image_file`; return its header facts.

    A missing, unreadable, truncated (SimpleITK would read the missing voxels as zeros) or damaged
    file, and an image that is neither 2D nor 3D (e.g. a 4D time series), refuse the case.

    Raises:
        CaseRefused: ``"<folder>/<file>: <problem>"``.
    """
    where = short_name(path)
    try:
        info = check_image_file(path)
    except SamnnuError as err:  # "<path>: <problem>", the path possibly repeated in the problem
        raise CaseRefused(str(err).replace(str(path), where)) from None
    except OSError as err:
        raise CaseRefused(f"{where}: cannot be read ({describe_os_error(err)})") from None
    if info.dimension not in SUPPORTED_DIMENSIONS:
        raise CaseRefused(
            f"{where}: is {info.dimension}D (size {info.size}); "
            "samnnu converts 2D and 3D images, one file per channel"
        )
    return info


def read_volume(path: Path) -> sitk.Image:
    """Read a 2D or 3D image with SimpleITK after :func:`inspect_image`; a bad file refuses the case."""
    inspect_image(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise CaseRefused(f"{short_name(path)}: cannot be read ({error_summary(str(err))})") from None


def peek_dimension(path: Path) -> int | None:
    """The dimension an image file's header states (header only, cheap); None if it cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetDimension()


def typical_dimension(cases: Sequence[CaseFiles]) -> int | None:
    """The most common dimension (2 or 3) of the cases' first image file, from the headers.

    Cases with a listing problem and unreadable or unsupported headers do not vote (they are refused
    later with their own reason); a tie goes to the first case in the given order. None when no
    case votes.
    """
    votes: Counter[int] = Counter()
    for case in cases:
        if not case.problem and case.images:
            dimension = peek_dimension(case.images[0])
            if dimension in SUPPORTED_DIMENSIONS:
                votes[dimension] += 1
    return votes.most_common(1)[0][0] if votes else None


def grid_difference(image: sitk.Image, reference: sitk.Image) -> str | None:
    """Describe how the voxel grid of ``image`` differs from ``reference``; None if it does not."""
    if image.GetDimension() != reference.GetDimension():
        return f"is {image.GetDimension()}D, {reference.GetDimension()}D expected"
    if image.GetSize() != reference.GetSize():
        return f"size {image.GetSize()} differs from {reference.GetSize()}"
    if not np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        return f"spacing {_rounded(image.GetSpacing())} differs from {_rounded(reference.GetSpacing())}"
    if not np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=ORIGIN_ATOL):
        return f"origin {_rounded(image.GetOrigin())} differs from {_rounded(reference.GetOrigin())}"
    if not np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        return "direction (orientation) differs"
    return None


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def save_volume(image: sitk.Image, path: Path) -> None:
    """Write a volume atomically (compressed when the file ending asks for it) and check it."""
    write_image_atomic(image, path)


def prepare_volume_case(
    case: CaseFiles,
    *,
    labels: Mapping[str, int],
    num_channels: int,
    image_pixel_type: int | None = None,
    dimension: int | None = None,
    ignore_source: int | None = None,
) -> PreparedCase:
    """Read and check one 3D (or 2D medical) case with SimpleITK.

    Checks: the case has ``num_channels`` complete, readable, 2D or 3D scalar images without NaN
    (of ``dimension`` when given), a readable label, and the same grid everywhere; label values
    integral and listed. The written label takes the geometry of channel 0, so grids that agree
    within tolerance become exactly equal.

    Args:
        case: the files of the case.
        labels: the dataset's labels map.
        num_channels: expected number of image files.
        image_pixel_type: a SimpleITK pixel type (e.g. ``sitk.sitkFloat32``) to cast images to;
            None keeps the stored type.
        dimension: the dimension (2 or 3) every case of the dataset must have, e.g. from
            :func:`typical_dimension`; None accepts either.
        ignore_source: sparse annotations: the value the label files give unannotated voxels, written
            as the labels map's ``ignore`` value (:func:`checked_labels`).

    Raises:
        CaseRefused: with the reason.
    """
    if case.label is None:
        raise CaseRefused("no label file")
    if len(case.images) != num_channels:
        found = ", ".join(short_name(p) for p in case.images) or "none"
        raise CaseRefused(f"expected {num_channels} image file(s), found {len(case.images)} ({found})")
    images = [read_volume(p) for p in case.images]
    label = read_volume(case.label)
    reference, reference_path = images[0], case.images[0]
    if dimension is not None and reference.GetDimension() != dimension:
        raise CaseRefused(
            f"{short_name(reference_path)}: is {reference.GetDimension()}D (size {reference.GetSize()}), "
            f"{dimension}D expected (the dimension of the dataset's other cases)"
        )
    for image, path in zip(images, case.images):
        _check_scalar_finite(image, path)
        difference = grid_difference(image, reference)
        if difference:
            raise CaseRefused(f"{short_name(path)}: {difference} of {short_name(reference_path)}")
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise CaseRefused(f"{short_name(case.label)}: label has several components per voxel")
    difference = grid_difference(label, reference)
    if difference:
        raise CaseRefused(f"{short_name(case.label)}: {difference} of {short_name(reference_path)}")

    values = checked_labels(sitk.GetArrayViewFromImage(label), labels, short_name(case.label), ignore_source)
    clean_label = sitk.GetImageFromArray(values)
    clean_label.CopyInformation(reference)
    if image_pixel_type is not None:
        images = [sitk.Cast(im, image_pixel_type) for im in images]
    for image in images[1:]:
        image.CopyInformation(reference)
    return PreparedCase(images=images, label=clean_label, save=save_volume)


def _check_scalar_finite(image: sitk.Image, path: Path) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseRefused(
            f"{short_name(path)}: {image.GetNumberOfComponentsPerPixel()} components per voxel, "
            "one expected (store each channel as its own file)"
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise CaseRefused(f"{short_name(path)}: image contains NaN or infinite values")


# --------------------------------------------------------------------------------------------
# Target folder and the conversion loop
# --------------------------------------------------------------------------------------------
def check_target(raw_root: Path, dataset_id: int, name: str, overwrite: bool) -> Path:
    """Return the target folder after checking that writing it is allowed.

    Refuses (SamnnuError) when another ``DatasetNNN_*`` folder uses the same ID under a different
    name, or when the target exists and ``overwrite`` is False.
    """
    target = raw_root / dataset_folder_name(dataset_id, name)
    for other in datasets_with_id(dataset_id, [raw_root]):
        if other != target.name:
            raise SamnnuError(f"{raw_root / other}: dataset ID {dataset_id} is taken by this dataset; choose another ID")
    if target.exists() and not overwrite:
        raise SamnnuError(f"{target}: already exists; pass overwrite=True (--overwrite) to replace it")
    return target


def write_dataset_json(folder: Path, spec: DatasetSpec, num_training: int) -> None:
    """Write ``dataset.json`` (atomically) with the keys nnU-Net requires plus ``spec.extra``."""
    content = {
        "name": spec.name,
        "channel_names": spec.channel_names,
        "labels": spec.labels,
        "numTraining": num_training,
        "file_ending": spec.file_ending,
        **spec.extra,
    }
    write_json_atomic(folder / "dataset.json", content, indent=4)


def convert_cases(
    cases: Sequence[CaseFiles],
    spec: DatasetSpec,
    prepare: Callable[[CaseFiles], PreparedCase],
    raw_root: Path,
    overwrite: bool = False,
    source: str = "source",
    hold_out: str | None = None,
) -> ConversionResult:
    """Check every case, write the convertible ones, install the dataset atomically.

    Args:
        cases: the cases found in the source (unique ``case_id`` each).
        spec: dataset ID, name, channel names, labels map, file ending, extra dataset.json keys.
        prepare: reads and checks one case; raises :class:`CaseRefused` with the reason.
        raw_root: the nnU-Net raw folder (``nnUNet_raw``); created if missing.
        overwrite: replace an existing dataset folder with the same ID and name.
        source: name of the source, for the error raised when nothing converts.
        hold_out: a shell pattern of case ids (``*7``: every case whose id ends in 7) written to
            ``imagesTs/`` + ``labelsTs/`` instead: a fixed test set that planning, the folds and
            training never see.

    Returns:
        ConversionResult with the installed folder, converted case ids (held-out ones included),
        refused {case: reason} and the held-out case ids.

    Raises:
        SamnnuError: bad spec, target conflicts, no convertible case, or a file that cannot be
            written (full disk, ...); the temporary folder is removed and no dataset is installed.
    """
    validate_dataset_id_and_name(spec.dataset_id, spec.name)
    validate_labels_map(spec.labels)
    raw_root = Path(raw_root).expanduser().resolve()
    with reported_os_errors(raw_root):
        target = check_target(raw_root, spec.dataset_id, spec.name, overwrite)
        if not cases:
            raise SamnnuError(f"{source}: no cases found")
        ids = [c.case_id for c in cases]
        if len(set(ids)) != len(ids):
            raise SamnnuError(f"{source}: duplicate case ids {sorted({i for i in ids if ids.count(i) > 1})}")

        raw_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=raw_root))
        try:
            held = {c.case_id for c in cases if hold_out is not None and fnmatch.fnmatchcase(c.case_id, hold_out)}
            converted, refused = _write_cases(cases, spec, prepare, staging, held)
            held_out = [c for c in converted if c in held]
            if len(converted) == len(held_out):
                if held_out:
                    raise SamnnuError(f"--hold-out {hold_out!r}: matches every case; nothing is left to train on")
                first = next(iter(sorted(refused.items())))
                raise SamnnuError(
                    f"{source}: no convertible case ({len(refused)} refused; e.g. {first[0]}: {first[1]})"
                )
            write_dataset_json(staging, spec, len(converted) - len(held_out))
            install_dataset(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return ConversionResult(dataset_folder=target, converted=converted, refused=refused, held_out=held_out)


def _write_cases(
    cases: Sequence[CaseFiles],
    spec: DatasetSpec,
    prepare: Callable[[CaseFiles], PreparedCase],
    folder: Path,
    held_out: set[str] = frozenset(),
) -> tuple[list[str], dict[str, str]]:
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if held_out else ()):
        (folder / sub).mkdir()
    converted: list[str] = []
    refused: dict[str, str] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        if case.problem:
            refused[case.case_id] = case.problem
            continue
        try:
            prepared = prepare(case)
        except CaseRefused as err:
            refused[case.case_id] = one_line(str(err), limit=300)
            continue
        images_dir, labels_dir = (folder / "imagesTs", folder / "labelsTs") if case.case_id in held_out \
            else (folder / "imagesTr", folder / "labelsTr")
        for channel, image in enumerate(prepared.images):
            prepared.save(image, images_dir / f"{case.case_id}_{channel:04d}{spec.file_ending}")
        prepared.save(prepared.label, labels_dir / f"{case.case_id}{spec.file_ending}")
        converted.append(case.case_id)
    return converted, refused


def install_dataset(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is moved aside first, then deleted."""
    if not target.exists():
        staging.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def default_raw_root(raw_root: str | Path | None) -> Path:
    """``raw_root`` if given, else nnU-Net's raw folder from :func:`samnnu.config.setup_environment`."""
    if raw_root is not None:
        return Path(raw_root).expanduser()
    return setup_environment().raw
