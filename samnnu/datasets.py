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
