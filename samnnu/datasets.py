"""Finding datasets and trained models in nnU-Net's folders, with one-line errors when they are missing."""
from __future__ import annotations

import json
from pathlib import Path

from samnnu.config import current_paths
from samnnu.errors import SamnnuError


def dataset_name(dataset: str | int) -> str:
    """``4`` / ``"4"`` / ``"Dataset004_Hippocampus"`` -> ``"Dataset004_Hippocampus"`` (SamnnuError if unknown)."""
    paths = current_paths()
    text = str(dataset)
    if text.startswith("Dataset"):
        name = text
    else:
        try:
            ident = int(text)
        except ValueError:
            raise SamnnuError(f"dataset '{dataset}' is neither an ID (e.g. 4) nor a name (DatasetNNN_Name)") from None
        prefix = f"Dataset{ident:03d}_"
        found = sorted({p.name for root in (paths.raw, paths.preprocessed, paths.results) if root.is_dir()
                        for p in root.iterdir() if p.name.startswith(prefix)})
        if not found:
            raise SamnnuError(f"unknown dataset ID {ident}: no {prefix}* folder in {paths.raw}, {paths.preprocessed} "
                              f"or {paths.results} (convert it first with samnnu_convert)")
        if len(found) > 1:
            raise SamnnuError(f"dataset ID {ident} is ambiguous: {', '.join(found)}")
        name = found[0]
    if not any((root / name).is_dir() for root in (paths.raw, paths.preprocessed, paths.results)):
        raise SamnnuError(f"unknown dataset '{name}': not found under {paths.raw}, {paths.preprocessed} "
                          f"or {paths.results}")
    return name


def load_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SamnnuError(f"{path}: {what} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SamnnuError(f"{path}: cannot read {what} ({e})") from None


def model_folder(name: str, trainer: str, plans: str, configuration: str) -> Path:
    return current_paths().results / name / f"{trainer}__{plans}__{configuration}"


def ensure_splits(name: str, configuration: str, plans_name: str) -> list[dict]:
    """The dataset's cross-validation splits (``splits_final.json``), created when missing.

    nnU-Net's default is 5 folds; a dataset of fewer than 5 cases gets one fold per case (at least 2
    cases are needed), and samnnu says so. The split is nnU-Net's own (seeded) function, so for 5 or more
    cases it is the split nnU-Net would make.
    """
    from samnnu.safe_io import write_json_atomic

    pre = current_paths().preprocessed / name
    splits_file = pre / "splits_final.json"
    if splits_file.is_file():
        splits = load_json_file(splits_file, "cross-validation splits")
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s)
                                                   for s in splits):
            raise SamnnuError(f"{splits_file}: not a list of {{'train': [...], 'val': [...]}} splits")
        return splits
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
