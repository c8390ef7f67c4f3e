"""Sparse annotations: label maps in which unannotated voxels carry nnU-Net's ignore label.

A clinical team rarely has time to draw every slice. samnnu trains from partial labels the way
nnU-Net does (its ``ignore`` label: the highest label value, left out of the loss, the Dice and the
patch sampling). Two ways in:

- ``samnnu_convert hippocampus|folder ... --sparse [VALUE]``: the user's label files already mark
  unannotated voxels with VALUE (default: one above the highest class);
- ``samnnu_convert sparse SOURCE -d ID --slices N | --scribbles``: for experiments, a new dataset whose
  labels are made sparse from the dense labels of a converted dataset (:func:`make_sparse_dataset`):
  N annotated slices per volume (evenly spaced through the labelled structures, or at random with a
  seed), optionally with the empty slice just past each end of the structures (``--end-slices``: drawn
  as background, it tells a 2D model where the structures stop), or scribbles (each structure's skeleton
  plus a background stroke around the structures).

Images are linked (or copied) unchanged; the held-out test set (``imagesTs``/``labelsTs``) keeps its
dense labels, which are the references of every evaluation. ``dataset.json`` declares the ignore
label and records how the labels were made (``samnnu_sparse``), including the source dataset, whose
dense labels the benchmark evaluates against.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from samnnu.config import current_paths
from samnnu.dataset_conversion.common import (
    ConversionResult,
    check_target,
    install_dataset,
    validate_dataset_id_and_name,
)
from samnnu.datasets import dataset_name
from samnnu.errors import SamnnuError
from samnnu.safe_io import read_json, reported_os_errors, write_image_atomic, write_json_atomic

IGNORE = "ignore"
#: dataset.json key recording how sparse labels were made
SPARSE_KEY = "samnnu_sparse"
#: scribbles: the background stroke runs this many voxels outside the structures
BACKGROUND_MARGIN = 3


def ignore_value(labels: Mapping[str, int]) -> int:
    """The ignore label nnU-Net expects for a labels map: one above its highest class."""
    return max(int(v) for k, v in labels.items() if k != IGNORE) + 1


def with_ignore(labels: Mapping[str, int]) -> dict[str, int]:
    """``labels`` plus ``{"ignore": highest + 1}`` (nnU-Net's convention: the ignore label is the highest value)."""
    clean = {k: int(v) for k, v in labels.items() if k != IGNORE}
    return dict(clean, **{IGNORE: ignore_value(clean)})


def sparse_labels(labels: Mapping[str, int], sparse: bool | int) -> tuple[dict[str, int], int]:
    """(the dataset's labels map with its ignore label, the value the user's label files mark unannotated
    voxels with): ``sparse`` True means that value is the ignore label itself (one above the highest class)."""
    out = with_ignore(labels)
    source = out[IGNORE] if sparse is True else int(sparse)
    if source < 0 or source in {v for k, v in out.items() if k != IGNORE}:
        raise SamnnuError(f"--sparse {source}: the value of unannotated voxels must be a non-negative value "
                          f"that no class uses (classes: {', '.join(f'{k}={v}' for k, v in labels.items())})")
    return out, source


def sparse_info(dataset_json: Mapping) -> dict | None:
    """``{"ignore_label": int, ...how the labels were made}`` for a dataset with an ignore label, else None."""
    labels = dataset_json.get("labels", {})
    if IGNORE not in labels:
        return None
    return dict(dataset_json.get(SPARSE_KEY, {}), ignore_label=int(labels[IGNORE]))


# ----------------------------------------------------------------------------------------------- one volume

def annotation_axis(spacing: tuple[float, ...]) -> int:
    """The axis a volume is annotated along (array order): the one with the largest spacing, as nnU-Net's
    2D configuration slices it; on a tie the first (SimpleITK's z)."""
    spacing = [float(s) for s in spacing]
    return int(np.argmax(np.round(spacing, 6)))


def structure_extent(label: np.ndarray, axis: int, ignore: int | None = None) -> tuple[int, int] | None:
    """First and last index along ``axis`` of slices holding a structure (label > 0, not ignore); None if none."""
    fg = label > 0
    if ignore is not None:
        fg &= label != ignore
    other = tuple(a for a in range(label.ndim) if a != axis)
    idx = np.flatnonzero(fg.any(axis=other))
    return (int(idx[0]), int(idx[-1])) if idx.size else None


def choose_slices(label: np.ndarray, n: int, axis: int, *, random_state: np.random.Generator | None = None) -> list[int]:
    """Indices of ``n`` slices along ``axis`` through the labelled structures.

    Evenly spaced (``random_state`` None): at the (i + 1) / (n + 1) quantiles of the structures' extent,
    the way an annotator spreads a few slices over an organ. Random: ``n`` distinct slices of the
    extent. A volume without structures gets ``n`` slices spread over the whole axis (background only).
    Fewer slices come back when the extent has fewer than ``n``.
    """
    if n < 1:
        raise SamnnuError(f"annotated slices per volume: {n}; must be at least 1")
    extent = structure_extent(label, axis) or (0, label.shape[axis] - 1)
    lo, hi = extent
    if random_state is not None:
        candidates = np.arange(lo, hi + 1)
        return sorted(int(i) for i in random_state.choice(candidates, size=min(n, candidates.size), replace=False))
    picks = [int(round(lo + (hi - lo) * (i + 1) / (n + 1))) for i in range(n)]
    return sorted(set(picks))


def end_slices(label: np.ndarray, axis: int) -> list[int]:
    """The slice just before the structures' first slice and just after their last, along ``axis``: both hold
    background only. Ends at the volume's border are left out; a volume without structures has none."""
    extent = structure_extent(label, axis)
    if extent is None:
        return []
    return [i for i in (extent[0] - 1, extent[1] + 1) if 0 <= i < label.shape[axis]]


def sparse_slices(label: np.ndarray, slices: list[int], axis: int, ignore: int) -> np.ndarray:
    """A copy of ``label`` in which every voxel outside the given slices along ``axis`` is ``ignore``."""
    out = np.full_like(label, ignore)
    index = [slice(None)] * label.ndim
    index[axis] = slices
    out[tuple(index)] = label[tuple(index)]
    return out


def _skeleton_2d(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize  # local: slow to import, used here only

    return skeletonize(mask) if mask.any() else mask


def scribbles(label: np.ndarray, axis: int, ignore: int, *, slices: list[int] | None = None,
              margin: int = BACKGROUND_MARGIN) -> np.ndarray:
    """Scribble annotations drawn slice by slice along ``axis`` (every slice with a structure, or ``slices``).

    On each such slice: every structure's skeleton (a one-voxel stroke inside it; a structure too thin to
    skeletonise keeps its pixels) and a background stroke, the ring ``margin`` voxels outside all
    structures. Everything else is ``ignore``. Only voxels whose dense label is the stroke's label are
    ever written.
    """
    out = np.full_like(label, ignore)
    if slices is None:
        other = tuple(a for a in range(label.ndim) if a != axis)
        slices = [int(i) for i in np.flatnonzero((label > 0).any(axis=other))]
    moved, target = np.moveaxis(label, axis, 0), np.moveaxis(out, axis, 0)  # views: writes land in ``out``
    ring_struct = ndimage.generate_binary_structure(moved.ndim - 1, 1)
    for i in slices:
        plane = moved[i]
        for value in np.unique(plane):
            if value == 0:
                continue
            mask = plane == value
            skeleton = _skeleton_2d(mask)
            target[i][skeleton if skeleton.any() else mask] = value
        fg = plane > 0
        outer = ndimage.binary_dilation(fg, ring_struct, iterations=margin + 1) if fg.any() else fg
        inner = ndimage.binary_dilation(fg, ring_struct, iterations=margin) if fg.any() else fg
        ring = outer & ~inner & (plane == 0)
        target[i][ring] = 0
    return out


# ----------------------------------------------------------------------------------------------- a dataset

def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sparse_dataset_name(source: str, slices: int | None, *, scribble: bool = False,
                        end_slices: bool = False) -> str:
    """The default name (without ``DatasetNNN_``) of a sparse copy of the dataset folder ``source``:
    ``<name>Sparse<N>``, ``<name>Sparse<N>Ends`` or ``<name>Scribble``."""
    base = source.split("_", 1)[1]
    return f"{base}Scribble" if scribble else f"{base}Sparse{slices}{'Ends' if end_slices else ''}"


def make_sparse_dataset(source: str | int, dataset_id: int, *, slices: int | None = None, scribble: bool = False,
                        random_slices: bool = False, seed: int = 0, axis: int | None = None,
                        end_slices_too: bool = False, name: str | None = None,
                        overwrite: bool = False) -> ConversionResult:
    """Write a new raw dataset whose training labels are sparse versions of ``source``'s dense ones.

    Args:
        source: a converted dataset (ID or name) with dense labels.
        dataset_id: the new dataset's ID.
        slices: annotated slices per volume (:func:`choose_slices`); with ``scribble``, the slices the
            scribbles are drawn on (default every slice with a structure).
        scribble: scribbles (:func:`scribbles`) instead of fully drawn slices.
        random_slices: random slices (seeded) instead of evenly spaced ones.
        axis: the annotation axis in array order; default :func:`annotation_axis` of each volume.
        end_slices_too: with ``slices``, also annotate the empty slice past each end of the structures
            (:func:`end_slices`), all background.
        name: the new dataset's name; default ``<source name>Sparse<N>`` (``...Sparse<N>Ends`` with
            ``end_slices_too``) / ``<source name>Scribble``.

    Returns:
        ConversionResult: the new folder, its cases, and a note with the fraction of training voxels that
        are annotated. ``dataset.json`` records mode, slices, axis, seed, source and that fraction
        (``samnnu_sparse``).
    """
    if slices is None and not scribble:
        raise SamnnuError("say how to sparsify: --slices N (annotated slices per volume) or --scribbles")
    if slices is not None and slices < 1:
        raise SamnnuError(f"--slices {slices}: must be at least 1")
    if end_slices_too and (slices is None or scribble):
        raise SamnnuError("--end-slices adds two background slices to drawn slices: give --slices N, without --scribbles")
    src_name = dataset_name(source)
    raw = current_paths().raw
    src = raw / src_name
    dataset_json = read_json(src / "dataset.json", "dataset.json")
    if IGNORE in dataset_json.get("labels", {}):
        raise SamnnuError(f"{src / 'dataset.json'}: already has an ignore label; sparsify a dataset with dense labels")
    if dataset_json.get("overwrite_image_reader_writer") == "NaturalImage2DIO":
        raise SamnnuError(f"{src}: sparse labels are made for volumes; this dataset holds 2D images")
    ending = dataset_json["file_ending"]
    labels = {k: int(v) for k, v in dataset_json["labels"].items()}
    ignore = ignore_value(labels)
    name = name or sparse_dataset_name(src_name, slices, scribble=scribble, end_slices=end_slices_too)
    validate_dataset_id_and_name(dataset_id, name)
    label_files = sorted((src / "labelsTr").glob(f"*{ending}"))
    if not label_files:
        raise SamnnuError(f"{src / 'labelsTr'}: no label files ({ending}); nothing to sparsify")
    rng = np.random.default_rng(seed) if random_slices else None
    with reported_os_errors(raw):
        target = check_target(raw, dataset_id, name, overwrite)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=raw))
        try:
            annotated, total = 0, 0
            for sub in ("imagesTr", "labelsTr"):
                (staging / sub).mkdir()
            for f in sorted((src / "imagesTr").glob(f"*{ending}")):
                _link_or_copy(f, staging / "imagesTr" / f.name)
            for f in label_files:
                image = sitk.ReadImage(str(f))
                dense = sitk.GetArrayFromImage(image)
                ax = axis if axis is not None else annotation_axis(image.GetSpacing()[::-1])
                if not 0 <= ax < dense.ndim:
                    raise SamnnuError(f"--axis {ax}: {f.name} has {dense.ndim} axes")
                chosen = choose_slices(dense, slices, ax, random_state=rng) if slices is not None else None
                if end_slices_too:
                    chosen = sorted(set(chosen) | set(end_slices(dense, ax)))
                sparse = scribbles(dense, ax, ignore, slices=chosen) if scribble else \
                    sparse_slices(dense, chosen, ax, ignore)
                annotated += int(np.count_nonzero(sparse != ignore))
                total += sparse.size
                out = sitk.GetImageFromArray(sparse.astype(np.uint8 if ignore <= 255 else np.uint16))
                out.CopyInformation(image)
                write_image_atomic(out, staging / "labelsTr" / f.name)
            for sub in ("imagesTs", "labelsTs"):  # the held-out set keeps its dense labels: the references
                if (src / sub).is_dir():
                    (staging / sub).mkdir()
                    for f in sorted((src / sub).iterdir()):
                        _link_or_copy(f, staging / sub / f.name)
            record = {"source_dataset": src_name, "mode": "scribbles" if scribble else "slices",
                      "slices_per_volume": slices, "random": bool(random_slices), "seed": seed if random_slices else None,
                      "axis": "largest spacing" if axis is None else axis, "end_slices": bool(end_slices_too),
                      "annotated_fraction": round(annotated / max(1, total), 5)}
            content = dict(dataset_json, name=name, labels=dict(labels, **{IGNORE: ignore}), **{SPARSE_KEY: record})
            write_json_atomic(staging / "dataset.json", content, indent=4)
            install_dataset(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    what = (f"scribbles on {'every slice with a structure' if slices is None else f'{slices} slices per volume'}"
            if scribble else f"{slices} {'random' if random_slices else 'evenly spaced'} slices per volume"
            + (" and the empty slice past each end of the structures" if end_slices_too else ""))
    held = sorted(f.name[: -len(ending)] for f in (target / "labelsTs").glob(f"*{ending}"))
    return ConversionResult(dataset_folder=target, converted=[f.name[: -len(ending)] for f in label_files] + held,
                            refused={}, held_out=held,
                            notes=[f"sparse labels from {src_name}: {what}; {record['annotated_fraction']:.1%} of "
                                   f"the training voxels are annotated, the rest carry the ignore label {ignore}"])
