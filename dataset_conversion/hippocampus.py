"""Hippocampus MRI (Medical Segmentation Decathlon Task04) as ``Dataset004_Hippocampus``.

Two source layouts are accepted:

- ``images/hippocampus_NNN.nii.gz`` + ``labels/hippocampus_NNN.nii.gz`` (the course re-packaging
  and ``samnnu``'s demo data);
- MSD ``Task04_Hippocampus``: ``imagesTr/`` + ``labelsTr/`` + ``dataset.json`` (macOS ``._*``
  files are ignored; ``imagesTs/`` has no labels and is not converted).

All cases must be 3D volumes (a 2D slice or a 4D series is refused). Images are written as float32
whatever they were stored as (the data mix uint8 and float32 with very different intensity ranges;
nnU-Net normalises per case). Labels stored as float are accepted when their values are exactly
0, 1, 2 and are written as integers.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import SimpleITK as sitk

from samnnu.dataset_conversion.common import (
    CaseFiles,
    ConversionResult,
    DatasetSpec,
    convert_cases,
    default_raw_root,
    prepare_volume_case,
    reported_os_errors,
)
from samnnu.dataset_conversion.sparse import sparse_labels
from samnnu.errors import SamnnuError
from samnnu.safe_io import read_json

NAME = "Hippocampus"
CHANNEL_NAMES = {"0": "MRI"}
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
FILE_ENDING = ".nii.gz"
DIMENSION = 3
EXTRA = {
    "description": "Hippocampus MRI, left/right hippocampus crops (Vanderbilt University Medical Center)",
    "reference": "Medical Segmentation Decathlon, Task04_Hippocampus (http://medicaldecathlon.com/)",
    "licence": "CC-BY-SA 4.0",
}


def find_layout(src: Path) -> tuple[Path, Path]:
    """Return (images folder, labels folder) of either accepted layout; SamnnuError otherwise."""
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (src / images).is_dir() and (src / labels).is_dir():
            return src / images, src / labels
    raise SamnnuError(f"{src}: expected images/ + labels/ or imagesTr/ + labelsTr/ (MSD Task04) folders")


def check_msd_labels(src: Path) -> None:
    """If ``src/dataset.json`` (MSD) exists, make sure its labels are Task04's.

    Raises:
        SamnnuError: one line naming the file when it is not JSON, not in the MSD form (see
            :func:`msd_labels_map`) or lists other labels.
    """
    path = src / "dataset.json"
    if not path.is_file():
        return
    content = read_json(path, "MSD dataset.json")
    if not isinstance(content, dict):
        raise SamnnuError(f"{path}: holds a JSON {type(content).__name__}, not an object with a \"labels\" entry")
    msd_labels = content.get("labels")
    if msd_labels is not None:
        found = msd_labels_map(msd_labels, path)
        if {k.lower(): v for k, v in found.items()} != {k.lower(): v for k, v in LABELS.items()}:
            raise SamnnuError(f"{path}: labels {msd_labels} are not Task04's background/Anterior/Posterior")


def msd_labels_map(msd_labels: object, path: Path) -> dict[str, int]:
    """MSD's ``"labels"`` (label value -> name, ``{"0": "background", "1": "Anterior"}``) as an
    nnU-Net labels map (name -> value, ``{"background": 0, "Anterior": 1}``).

    Raises:
        SamnnuError: naming ``path`` when ``msd_labels`` is not an object, a key is not a label
            value (0, 1, 2, ...) or a name is not a string.
    """
    example = '{"0": "background", "1": "Anterior", "2": "Posterior"}'
    if not isinstance(msd_labels, dict):
        raise SamnnuError(
            f'{path}: "labels" is a JSON {type(msd_labels).__name__}; MSD maps label values to names, e.g. {example}'
        )
    found: dict[str, int] = {}
    for value, name in msd_labels.items():
        if not re.fullmatch(r"[0-9]+", value):
            raise SamnnuError(
                f'{path}: "labels" key {value!r} is not a label value; MSD maps label values to names, e.g. {example}'
            )
        if not isinstance(name, str):
            raise SamnnuError(f'{path}: "labels" name of label {value} is {name!r}, not a string')
        found[name] = int(value)
    return found


def _nifti_files(folder: Path) -> dict[str, Path]:
    """``{case_id: path}`` for the ``*.nii.gz`` files of a folder, skipping ``._*`` and hidden files."""
    with reported_os_errors(folder):
        return {
            p.name[: -len(FILE_ENDING)]: p
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(FILE_ENDING) and not p.name.startswith(".")
        }


def find_cases(src: Path) -> list[CaseFiles]:
    """One :class:`CaseFiles` per case found in images or labels (a missing half refuses it)."""
    images_dir, labels_dir = find_layout(src)
    images, labels = _nifti_files(images_dir), _nifti_files(labels_dir)
    cases = []
    for case_id in sorted(set(images) | set(labels)):
        image, label = images.get(case_id), labels.get(case_id)
        problem = None
        if image is None:
            problem = f"{labels_dir.name}/{case_id}{FILE_ENDING}: no matching image in {images_dir.name}/"
        elif label is None:
            problem = f"{images_dir.name}/{case_id}{FILE_ENDING}: no matching label in {labels_dir.name}/"
        cases.append(CaseFiles(case_id, (image,) if image else (), label, problem))
    return cases


def convert_hippocampus(
    src: str | Path,
    dataset_id: int = 4,
    raw_root: str | Path | None = None,
    overwrite: bool = False,
    hold_out: str | None = None,
    sparse: bool | int | None = None,
) -> ConversionResult:
    """Convert the hippocampus data in ``src`` into ``DatasetNNN_Hippocampus``.

    Args:
        src: folder in either accepted layout (see module docstring).
        dataset_id: nnU-Net dataset ID (default 4, as in the MSD task number).
        raw_root: nnU-Net raw folder; default from :func:`samnnu.config.setup_environment`.
        hold_out: case-id pattern of a fixed test set (``*7``), written to ``imagesTs/`` + ``labelsTs/``.
        overwrite: replace an existing dataset folder with the same ID.
        sparse: the labels are sparse: unannotated voxels hold this value (True: 3, one above the highest
            class), written as nnU-Net's ignore label (:mod:`samnnu.dataset_conversion.sparse`).

    Returns:
        ConversionResult (folder, converted case ids, refused {case: reason}).
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise SamnnuError(f"{src}: source folder not found")
    check_msd_labels(src)
    labels, source = sparse_labels(LABELS, sparse) if sparse not in (None, False) else (dict(LABELS), None)
    spec = DatasetSpec(
        dataset_id=dataset_id,
        name=NAME,
        channel_names=dict(CHANNEL_NAMES),
        labels=labels,
        file_ending=FILE_ENDING,
        extra=dict(EXTRA),
    )
    prepare = partial(
        prepare_volume_case,
        labels=labels,
        ignore_source=source,
        num_channels=1,
        image_pixel_type=sitk.sitkFloat32,
        dimension=DIMENSION,
    )
    return convert_cases(
        find_cases(src), spec, prepare, default_raw_root(raw_root), overwrite=overwrite,
        hold_out=hold_out, source=str(src)
    )
