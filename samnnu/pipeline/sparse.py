"""A sparse-label twin of a planned dataset, for experiments: the same images, plans, folds and test set,
training labels reduced to a few annotated slices per volume.

The twin is what ``samnnu_benchmark --sparse-slices N`` trains on. Its plans are the dense dataset's
(copied, so patch, spacing, batch and normalisation are exactly the same, and nothing is re-planned
from sparse labels), its folds are the dense dataset's ``splits_final.json``, and its held-out test set
keeps dense labels. Models trained on it are evaluated against the dense labels.
"""
from __future__ import annotations

import shutil

from samnnu.config import current_paths, num_processes
from samnnu.dataset_conversion.sparse import SPARSE_KEY, make_sparse_dataset, sparse_dataset_name, sparse_info
from samnnu.datasets import dataset_folder_name, dataset_id, datasets_with_id
from samnnu.defaults import PLANS_NAME
from samnnu.errors import SamnnuError
from samnnu.safe_io import read_json, write_json_atomic

#: marks a preprocessed configuration of the twin as complete (preprocessing is redone when missing)
DONE = ".samnnu_preprocessed_{plans}_{configuration}"


def _find_or_pick_id(name: str) -> int:
    """The ID of an existing twin called ``name`` (reused), else the highest free ID."""
    paths = current_paths()
    roots = (paths.raw, paths.preprocessed, paths.results)
    for root in roots:
        if root.is_dir():
            for p in root.glob(f"Dataset[0-9][0-9][0-9]_{name}"):
                return dataset_id(p.name)
    for ident in range(999, 0, -1):
        if not datasets_with_id(ident, roots):
            return ident
    raise SamnnuError("no free dataset ID for the sparse-label dataset")


def sparse_twin(dense: str, slices: int, configurations: dict[str, list[str]], end_slices: bool = False) -> str:
    """Make (or reuse) the twin of ``dense`` with ``slices`` evenly spaced annotated slices per training
    volume (and, with ``end_slices``, the empty slice past each end of the structures), preprocessed for
    ``configurations`` (plans name -> configurations); return its name.

    Raises:
        SamnnuError: ``dense`` is not planned with every plans name asked for, or has sparse labels itself.
    """
    paths = current_paths()
    pre_dense = paths.preprocessed / dense
    if sparse_info(read_json(paths.raw / dense / "dataset.json", "dataset.json")) is not None:
        raise SamnnuError(f"{paths.raw / dense}: has sparse labels already; the benchmark's dense runs need dense labels")
    name = sparse_dataset_name(dense, slices, end_slices=end_slices)
    ident = _find_or_pick_id(name)
    full = dataset_folder_name(ident, name)
    raw_json = paths.raw / full / "dataset.json"
    if not raw_json.is_file() or read_json(raw_json, "dataset.json").get(SPARSE_KEY, {}).get("source_dataset") != dense:
        make_sparse_dataset(dense, ident, slices=slices, end_slices_too=end_slices, name=name, overwrite=True)
    pre = paths.preprocessed / full
    pre.mkdir(parents=True, exist_ok=True)
    dataset_json = read_json(raw_json, "dataset.json")
    write_json_atomic(pre / "dataset.json", dataset_json, indent=4)
    for f in ("dataset_fingerprint.json", "splits_final.json"):  # the dense folds: the same validation cases
        if not (pre_dense / f).is_file():
            raise SamnnuError(f"{pre_dense / f}: missing; plan the dense dataset (and create its splits) first")
        shutil.copyfile(pre_dense / f, pre / f)
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    for plans_name, configs in configurations.items():
        plans = read_json(pre_dense / f"{plans_name}.json", f"plans '{plans_name}' of {dense}")
        plans["dataset_name"] = full
        if plans_name == PLANS_NAME:
            info = sparse_info(dataset_json)
            plans.setdefault("samnnu", {})["sparse_annotations"] = info
        write_json_atomic(pre / f"{plans_name}.json", plans, indent=4)
        todo = [c for c in configs if not (pre / DONE.format(plans=plans_name, configuration=c)).is_file()]
        if todo:
            preprocess_dataset(ident, plans_name, todo, [num_processes()] * len(todo), verbose=False)
            for c in todo:
                (pre / DONE.format(plans=plans_name, configuration=c)).touch()
    return full
