"""Finding datasets and trained models in nnU-Net's folders, with one-line errors when they are missing."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from samnnu.config import current_paths
from samnnu.errors import SamnnuError
from samnnu.safe_io import read_json, write_json_atomic


class UnknownDataset(SamnnuError):
    """No dataset of that ID or name in the folders searched (a one-line message naming them)."""


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetNNN_Name`` as nnU-Net expects it."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def dataset_id(name: str) -> int:
    """``"Dataset004_Hippocampus"`` -> ``4``."""
    return int(name[len("Dataset"):len("Dataset") + 3])


def datasets_with_id(ident: int, roots: Iterable[Path]) -> list[str]:
    """The ``DatasetNNN_*`` folder names of dataset ID ``ident`` in any of ``roots``, sorted (nothing is created)."""
    prefix = dataset_folder_name(ident, "")
    return sorted({p.name for root in roots if root.is_dir() for p in root.iterdir()
                   if p.is_dir() and p.name.startswith(prefix)})


def dataset_name(dataset: str | int, *, roots: Iterable[Path] | None = None) -> str:
    """``4`` / ``"4"`` / ``"Dataset004_Hippocampus"`` -> ``"Dataset004_Hippocampus"``: samnnu's one dataset lookup.

    Args:
        roots: the folders to look in; default nnU-Net's three (``nnUNet_raw``, ``nnUNet_preprocessed``,
            ``nnUNet_results``), as nnU-Net's ``maybe_convert_to_dataset_name`` does. Nothing is created,
            so a caller can look a dataset up under a folder it has not set up yet.
    Raises:
        UnknownDataset: (a SamnnuError) neither an ID nor a name, or no such dataset in ``roots``.
        SamnnuError: an ID that several dataset folders share.
    """
    if roots is None:
        paths = current_paths()
        roots = (paths.raw, paths.preprocessed, paths.results)
    roots = tuple(roots)
    where = ", ".join(map(str, roots[:-1])) + (" or " if len(roots) > 1 else "") + str(roots[-1])
    text = str(dataset).strip()
    if text.startswith("Dataset"):
        if not any((root / text).is_dir() for root in roots):
            raise UnknownDataset(f"unknown dataset '{text}': not found under {where}")
        return text
    if not (text.isascii() and text.isdigit()):
        raise UnknownDataset(f"dataset '{dataset}' is neither an ID (e.g. 4) nor a name (DatasetNNN_Name)")
    ident = int(text)
    found = datasets_with_id(ident, roots)
    if not found:
        raise UnknownDataset(f"unknown dataset ID {ident}: no {dataset_folder_name(ident, '*')} folder in {where} "
                             f"(convert it first with samnnu_convert)")
    if len(found) > 1:
        raise SamnnuError(f"dataset ID {ident} is ambiguous: {', '.join(found)} (in {where})")
    return found[0]


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """``TRAINER__PLANS__CONFIGURATION``, the name of a trained model's folder (nnU-Net's own rule)."""
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    return convert_trainer_plans_config_to_identifier(trainer, plans, configuration)


def split_model_folder_name(name: str) -> tuple[str, str, str] | None:
    """(trainer, plans, configuration) of a model folder's name (or path), None when it is not one."""
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config

    parts = convert_identifier_to_trainer_plans_config(str(name))
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def model_folder(name: str, trainer: str, plans: str, configuration: str, *, fold: int | str | None = None,
                 results: Path | None = None) -> Path:
    """``RESULTS/DATASET/TRAINER__PLANS__CONFIGURATION[/fold_F]``; ``results`` defaults to nnUNet_results."""
    folder = Path(results if results is not None else current_paths().results) / name / \
        model_folder_name(trainer, plans, configuration)
    return folder if fold is None else folder / f"fold_{fold}"


def first_fold_file(folder: Path, folds: Sequence, filename: str) -> Path | None:
    """``FOLDER/fold_F/FILENAME`` of the first of ``folds`` whose fold folder holds it (a model folder's
    trained prompt path or click corrector), else None."""
    for fold in folds:
        candidate = Path(folder) / f"fold_{fold}" / filename
        if candidate.is_file():
            return candidate
    return None


def ensure_splits(name: str, configuration: str, plans_name: str) -> list[dict]:
    """The dataset's cross-validation splits (``splits_final.json``), created when missing.

    nnU-Net's default is 5 folds; a dataset of fewer than 5 cases gets one fold per case (at least 2
    cases are needed), and samnnu says so. The split is nnU-Net's own (seeded) function, so for 5 or more
    cases it is the split nnU-Net would make.
    """
    pre = current_paths().preprocessed / name
    splits_file = pre / "splits_final.json"
    if splits_file.is_file():
        splits = read_json(splits_file, "cross-validation splits")
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s)
                                                   for s in splits):
            raise SamnnuError(f"{splits_file}: not a list of {{'train': [...], 'val': [...]}} splits")
        return splits
    # local: nnU-Net reads nnUNet_* at import (after setup_environment)
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(str(pre / f"{plans_name}.json"))
    data_folder = pre / plans.get_configuration(configuration).data_identifier
    if not data_folder.is_dir():
        raise SamnnuError(f"{data_folder}: configuration '{configuration}' is not preprocessed "
                          f"(run samnnu_plan_and_preprocess -d {name} -c {configuration})")
    keys = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    if len(keys) < 2:
        raise SamnnuError(f"{data_folder}: {len(keys)} case(s); cross-validation needs at least 2")
    n_folds = min(5, len(keys))
    if n_folds < 5:
        print(f"samnnu: {name} has {len(keys)} cases: {n_folds}-fold cross-validation instead of 5 "
              f"(folds 0-{n_folds - 1})")
    splits = generate_crossval_split(keys, seed=12345, n_splits=n_folds)
    write_json_atomic(splits_file, splits)
    return splits
