"""Any pair of images/labels folders as an nnU-Net v2 raw dataset.

File naming: either the same name in both folders (``case.nii.gz`` / ``case.nii.gz``; the
extension of image and label may differ, e.g. ``case.jpg`` / ``case.png``), or nnU-Net's channel
naming in the images folder (``case_0000.nii.gz``, ``case_0001.nii.gz`` / label ``case.nii.gz``).
Hidden files (``.*``, macOS ``._*``) and files of other types are ignored.

Volumes (NIfTI ``.nii``/``.nii.gz``, NRRD ``.nrrd``) are read with SimpleITK and written as
``.nii.gz`` with the checks of :func:`samnnu.dataset_conversion.common.prepare_volume_case`. All
cases must have the same dimension: a 2D file among 3D volumes (or the reverse) is refused, the
dimension of most cases being the expected one.

2D images (PNG, JPEG, TIFF, BMP; grey or RGB) are written the way nnU-Net's
``NaturalImage2DIO`` reads them: one lossless ``.png`` per input file, an RGB file holding the three
channels R, G, B (the reader moves the colour axis to the front), grey files one channel each.
Masks stored as 0/255 with a two-entry labels map become 0/1; masks stored as class indices are
kept; anything else is refused with the reason.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from samnnu.dataset_conversion.common import (
    CaseFiles,
    CaseRefused,
    ConversionResult,
    DatasetSpec,
    PreparedCase,
    checked_labels,
    convert_cases,
    default_raw_root,
    normalise_channel_names,
    prepare_volume_case,
    short_name,
    typical_dimension,
    validate_labels_map,
)
from samnnu.dataset_conversion.sparse import sparse_labels
from samnnu.errors import SamnnuError
from samnnu.safe_io import check_image_file, reported_os_errors, write_atomic

VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd")
IMAGE_2D_ENDINGS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_CHANNEL_SUFFIX = re.compile(r"(.+)_(\d{4})")
# PIL modes whose pixels are one grey value / three colour values after conversion.
_GREY_MODES = {"L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# --------------------------------------------------------------------------------------------
# Listing files
# --------------------------------------------------------------------------------------------
def split_ending(name: str) -> tuple[str, str]:
    """``("case", ".nii.gz")`` for ``case.nii.gz``; ending is lower case, "" when unsupported."""
    lower = name.lower()
    for ending in VOLUME_ENDINGS + IMAGE_2D_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], ending
    return name, ""


def list_supported(folder: Path) -> dict[str, list[Path]]:
    """``{stem: [files]}`` for the supported, non-hidden files of ``folder``."""
    found: dict[str, list[Path]] = {}
    with reported_os_errors(folder):
        for path in sorted(folder.iterdir()):
            stem, ending = split_ending(path.name)
            if path.is_file() and ending and not path.name.startswith("."):
                found.setdefault(stem, []).append(path)
    return found


def uses_channel_naming(image_stems: Sequence[str], label_stems: Sequence[str]) -> bool:
    """True when every image is named ``case_XXXX`` and no image name is itself a label name."""
    return bool(image_stems) and all(_CHANNEL_SUFFIX.fullmatch(s) for s in image_stems) and not (
        set(image_stems) & set(label_stems)
    )


def _several(paths: Sequence[Path]) -> str:
    return f"several files for one entry ({', '.join(short_name(p) for p in paths)})"


def find_cases(images_dir: Path, labels_dir: Path) -> list[CaseFiles]:
    """Pair image files with label files (see module docstring for the naming)."""
    images, labels = list_supported(images_dir), list_supported(labels_dir)
    if not images:
        raise SamnnuError(f"{images_dir}: no supported image files ({', '.join(VOLUME_ENDINGS + IMAGE_2D_ENDINGS)})")
    channels: dict[str, dict[int, list[Path]]] = {}
    if uses_channel_naming(list(images), list(labels)):
        for stem, paths in images.items():
            match = _CHANNEL_SUFFIX.fullmatch(stem)
            channels.setdefault(match.group(1), {})[int(match.group(2))] = paths
    else:
        channels = {stem: {0: paths} for stem, paths in images.items()}

    cases = []
    for case_id in sorted(set(channels) | set(labels)):
        label_paths = labels.get(case_id, [])
        case_channels = channels.get(case_id, {})
        image_paths = tuple(case_channels[i][0] for i in sorted(case_channels))
        problem = _case_problem(case_id, case_channels, label_paths, images_dir, labels_dir)
        label = label_paths[0] if label_paths else None
        cases.append(CaseFiles(case_id, image_paths, label, problem))
    return cases


def _case_problem(
    case_id: str,
    channels: Mapping[int, list[Path]],
    label_paths: list[Path],
    images_dir: Path,
    labels_dir: Path,
) -> str | None:
    if not channels:
        return f"{short_name(label_paths[0])}: no matching image in {images_dir.name}/"
    if not label_paths:
        return f"{case_id}: no label file in {labels_dir.name}/"
    for paths in list(channels.values()) + [label_paths]:
        if len(paths) > 1:
            return _several(paths)
    missing = sorted(set(range(max(channels) + 1)) - set(channels))
    if missing:
        return f"{case_id}: missing channel file(s) {', '.join(f'_{i:04d}' for i in missing)}"
    return None


def data_kind(cases: Sequence[CaseFiles], images_dir: Path) -> str:
    """``"2d"`` or ``"3d"`` from the image file endings; SamnnuError when both are present."""
    endings = {split_ending(p.name)[1] for c in cases for p in c.images}
    is_2d = {e in IMAGE_2D_ENDINGS for e in endings}
    if len(is_2d) > 1:
        raise SamnnuError(f"{images_dir}: mixes 2D images and 3D volumes ({', '.join(sorted(endings))})")
    return "2d" if is_2d == {True} else "3d"


# --------------------------------------------------------------------------------------------
# 2D natural images
# --------------------------------------------------------------------------------------------
def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise CaseRefused(f"{short_name(path)}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CaseRefused(f"{short_name(path)}: cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if getattr(image, "n_frames", 1) > 1:
        raise CaseRefused(f"{short_name(path)}: has {image.n_frames} frames; single 2D images only")
    return image


def peek_channel_count(path: Path) -> int | None:
    """Channels a 2D file will contribute (1 grey, 3 colour), from its header; None if unreadable."""
    try:
        with Image.open(path) as image:
            return 1 if image.mode in _GREY_MODES else 3
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def read_2d_image(path: Path) -> np.ndarray:
    """Read a 2D image as uint8/uint16 ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB).

    A fully opaque alpha channel is dropped; real transparency, float pixels and values that do
    not fit 16 bits refuse the case (PNG output must be lossless).
    """
    image = _open(path)
    where = short_name(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA" if image.mode != "LA" else "LA"))
        if np.any(rgba[..., -1] != 255):
            raise CaseRefused(f"{where}: has a transparent alpha channel; store plain grey or RGB")
        return np.ascontiguousarray(rgba[..., :-1] if image.mode != "LA" else rgba[..., 0])
    if image.mode in ("P", "CMYK", "YCbCr", "HSV", "LAB"):
        image = image.convert("RGB")
    if image.mode == "1":
        image = image.convert("L")
    array = np.asarray(image)
    if np.issubdtype(array.dtype, np.floating):
        raise CaseRefused(f"{where}: float pixels ({array.dtype}) cannot be stored losslessly as PNG")
    if array.dtype not in (np.uint8, np.uint16):
        if array.min() < 0 or array.max() > 65535:
            raise CaseRefused(f"{where}: pixel values outside 0..65535 cannot be stored as PNG")
        array = array.astype(np.uint16)
    if array.ndim == 3 and array.shape[-1] != 3:
        raise CaseRefused(f"{where}: {array.shape[-1]} colour channels; grey or RGB expected")
    return array


def read_2d_mask(path: Path) -> np.ndarray:
    """Read a mask as one value per pixel ``(H, W)``; palette masks give their indices.

    A colour-stored mask is accepted when its R, G and B are equal (grey saved as RGB).
    """
    image = _open(path)
    array = np.asarray(image)
    if image.mode == "P":
        return array
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
        if np.any(colour != colour[..., :1]):
            raise CaseRefused(f"{short_name(path)}: colour mask; store one class index per pixel")
        array = colour[..., 0]
    return array


def map_binary_255(mask: np.ndarray, labels: Mapping[str, int]) -> np.ndarray:
    """0/255 masks with a two-entry labels map become 0/(the foreground value); others unchanged."""
    values = set(np.unique(mask).tolist())
    if len(labels) == 2 and 255 not in labels.values() and 255 in values and values <= {0, 255}:
        foreground = max(labels.values())
        return np.where(mask == 255, foreground, 0).astype(np.uint8)
    return mask


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8/uint16 grey or RGB array as PNG, atomically and checked."""
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), check_image_file)


def consecutive_labels(labels: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int] | None]:
    """(nnU-Net's labels map, the values stored in the mask files or None): a map whose values are not
    0, 1, 2, ... (``background=0,polyp=255``) keeps its order and gets consecutive values; the stored
    values are returned so that masks can be mapped and predictions written back in them."""
    values = sorted(labels.values())
    if values == list(range(len(values))):
        return dict(labels), None
    if len(set(values)) != len(values) or values[0] != 0 or any(v < 0 for v in values):
        return dict(labels), None  # validate_labels_map says what is wrong
    if any(0 < v < len(values) for v in values):
        # e.g. 0, 2, 4 would become 0, 1, 2: a stored 2 and a label 2 would mean different classes
        raise SamnnuError(f"labels map {dict(labels)}: stored values other than 0 must all be at least "
                          f"{len(values)} (such as 255), or the values must be 0, 1, 2, ...; otherwise a stored "
                          f"value could be read as another class's label")
    ordered = sorted(labels.items(), key=lambda kv: kv[1])
    return {k: i for i, (k, _) in enumerate(ordered)}, dict(ordered)


class MaskCleaning:
    """What conversion does to stored mask values, and how many pixels it changed.

    ``source``: the values the mask files store for each label (``None``: the labels map's own);
    ``threshold``: for a two-label map, stored values at or above it are foreground and the rest
    background (JPEG-compressed 0/255 masks hold values in between).
    """

    def __init__(self, labels: Mapping[str, int], source: Mapping[str, int] | None, threshold: float | None):
        self.labels, self.source, self.threshold = dict(labels), dict(source or labels), threshold
        self.changed_pixels = 0
        self.masks_changed = 0

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        if self.threshold is not None:
            background, foreground = sorted(self.source.values())
            snapped = np.where(mask >= self.threshold, foreground, background)
            changed = int(np.count_nonzero(snapped != mask))
            self.changed_pixels += changed
            self.masks_changed += bool(changed)
            mask = snapped
        if self.source != self.labels:
            out = np.full(mask.shape, -1, dtype=np.int32)  # -1: a stored value the map does not list
            for name, stored in self.source.items():
                out[mask == stored] = self.labels[name]
            unknown = np.unique(mask[out < 0])
            if unknown.size:
                return mask  # integer_label_array refuses it, naming the values
            mask = out
        return mask


def prepare_image_case(case: CaseFiles, *, labels: Mapping[str, int], num_channels: int,
                       cleaning: MaskCleaning | None = None, ignore_source: int | None = None) -> PreparedCase:
    """Read and check one 2D case: channel count, equal sizes, mask values; refuse otherwise."""
    if case.label is None:
        raise CaseRefused("no label file")
    arrays = [read_2d_image(p) for p in case.images]
    found = sum(1 if a.ndim == 2 else a.shape[-1] for a in arrays)
    if found != num_channels:
        names = ", ".join(short_name(p) for p in case.images)
        raise CaseRefused(f"expected {num_channels} channel(s), found {found} ({names})")
    mask = read_2d_mask(case.label)
    reference, reference_path = arrays[0].shape[:2], case.images[0]
    for array, path in list(zip(arrays, case.images)) + [(mask, case.label)]:
        if array.shape[:2] != reference:
            raise CaseRefused(
                f"{short_name(path)}: size {array.shape[1]}x{array.shape[0]} differs from "
                f"{reference[1]}x{reference[0]} of {short_name(reference_path)}"
            )
    mask = cleaning(mask) if cleaning is not None else map_binary_255(mask, labels)
    label = checked_labels(mask, labels, short_name(case.label), ignore_source)
    return PreparedCase(images=arrays, label=label, save=save_png)


# --------------------------------------------------------------------------------------------
# Channel names and the entry point
# --------------------------------------------------------------------------------------------
def default_channel_names(num_channels: int, kind: str) -> dict[str, str]:
    """Names used when none are given: R/G/B for one colour 2D file, else image / channelN."""
    if kind == "2d" and num_channels == 3:
        return {"0": "R", "1": "G", "2": "B"}
    if num_channels == 1:
        return {"0": "image"}
    return {str(i): f"channel{i}" for i in range(num_channels)}


def typical_channel_count(cases: Sequence[CaseFiles], kind: str) -> int:
    """The most common number of channels per case (files for 3D, colour channels for 2D)."""
    counts = []
    for case in cases:
        if case.problem:
            continue
        if kind == "3d":
            counts.append(len(case.images))
        else:
            peeked = [peek_channel_count(p) for p in case.images]
            if None not in peeked:
                counts.append(sum(peeked))
    if not counts:
        return 1
    ranked = Counter(counts).most_common()
    best = ranked[0][1]
    return min(n for n, c in ranked if c == best)


def convert_folder(
    images_dir: str | Path,
    labels_dir: str | Path,
    dataset_id: int,
    name: str,
    labels: dict[str, int],
    channel_names: Mapping[str | int, str] | Sequence[str] | None = None,
    raw_root: str | Path | None = None,
    overwrite: bool = False,
    hold_out: str | None = None,
    mask_threshold: float | None = None,
    sparse: bool | int | None = None,
) -> ConversionResult:
    """Convert an images/labels folder pair into ``DatasetNNN_Name``.

    Args:
        images_dir: folder of images (NIfTI/NRRD volumes or PNG/JPEG/TIFF/BMP 2D images).
        labels_dir: folder of label files with matching names.
        dataset_id: nnU-Net dataset ID (1..999).
        name: dataset name (letters, digits, ``_``, ``-``).
        labels: labels map, e.g. ``{"background": 0, "liver": 1}``. For 2D masks the values may be the
            ones the files store (``{"background": 0, "polyp": 255}``): they become 0, 1, ... in order,
            and ``dataset.json`` records the stored values (``samnnu_stored_label_values``) so that
            predictions are written back in them.
        channel_names: one name per channel (``["T1", "T2"]`` or ``{"0": "CT"}``); default
            ``image`` for one channel, ``R``/``G``/``B`` for colour 2D images.
        raw_root: nnU-Net raw folder; default from :func:`samnnu.config.setup_environment`.
        hold_out: case-id pattern of a fixed test set (``*7``), written to ``imagesTs/`` + ``labelsTs/``.
        overwrite: replace an existing dataset folder with the same ID and name.
        mask_threshold: 2D masks with two labels only: stored values at or above it are foreground,
            the rest background (for masks saved as JPEG, whose 0/255 become noisy); the result says
            how many pixels this changed.
        sparse: the labels are sparse: unannotated voxels hold this value (True: one above the highest
            class), written as nnU-Net's ignore label (:mod:`samnnu.dataset_conversion.sparse`).

    Returns:
        ConversionResult (folder, converted case ids, refused {case: reason}).
    """
    images_dir, labels_dir = Path(images_dir).expanduser(), Path(labels_dir).expanduser()
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise SamnnuError(f"{folder}: folder not found")
    remapped, stored = consecutive_labels(labels)
    validate_labels_map(remapped)  # a malformed map is refused before any file is read
    cases = find_cases(images_dir, labels_dir)
    kind = data_kind(cases, images_dir)
    if kind == "3d" and stored:
        raise SamnnuError(f"labels map {dict(labels)}: values must be distinct and consecutive from 0 for volumes "
                          f"(stored values such as 255 are for 2D masks)")
    labels = validate_labels_map(remapped)
    if mask_threshold is not None and (kind != "2d" or len(labels) != 2):
        raise SamnnuError("--mask-threshold applies to 2D masks with two labels (background and one class)")
    source = None
    if sparse not in (None, False):
        if stored or mask_threshold is not None:
            raise SamnnuError("--sparse: give the labels map as 0, 1, 2, ... (stored values and --mask-threshold "
                              "are for dense masks)")
        labels, source = sparse_labels(labels, sparse)
    if channel_names is None:
        names = default_channel_names(typical_channel_count(cases, kind), kind)
    else:
        names = normalise_channel_names(channel_names)
    if kind == "3d":
        prepare = partial(
            prepare_volume_case, labels=labels, num_channels=len(names), dimension=typical_dimension(cases),
            ignore_source=source,
        )
        spec = DatasetSpec(dataset_id, name, names, labels, ".nii.gz")
    else:
        cleaning = MaskCleaning(labels, stored, mask_threshold) if (stored or mask_threshold is not None) else None
        prepare = partial(prepare_image_case, labels=labels, num_channels=len(names), cleaning=cleaning,
                          ignore_source=source)
        extra = {"overwrite_image_reader_writer": "NaturalImage2DIO"}
        if stored:
            extra["samnnu_stored_label_values"] = stored
        spec = DatasetSpec(dataset_id, name, names, labels, ".png", extra)
    result = convert_cases(
        cases, spec, prepare, default_raw_root(raw_root), overwrite=overwrite,
        hold_out=hold_out, source=str(images_dir)
    )
    if kind == "2d" and stored:
        result.notes.append("labels " + ", ".join(f"{k}={v}" for k, v in stored.items()) + " are stored as "
                            + ", ".join(f"{k}={v}" for k, v in labels.items()) + "; predictions are written back "
                            "in the stored values")
    if mask_threshold is not None:
        background, foreground = sorted(cleaning.source.values())
        result.notes.append(f"mask threshold {mask_threshold:g}: {cleaning.changed_pixels} pixel(s) in "
                            f"{cleaning.masks_changed} mask(s) changed value (stored values >= {mask_threshold:g} "
                            f"became {foreground}, the others {background})")
    return result
