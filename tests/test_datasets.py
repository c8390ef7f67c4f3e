"""samnnu.datasets (dataset lookup, model folder names) and safe_io's JSON helpers: fast, no training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from samnnu.datasets import (
    UnknownDataset,
    dataset_folder_name,
    dataset_name,
    datasets_with_id,
    model_folder,
    model_folder_name,
    split_model_folder_name,
)
from samnnu.errors import SamnnuError
from samnnu.safe_io import read_json, to_jsonable, write_json_atomic


@pytest.fixture
def roots(tmp_path, monkeypatch) -> Path:
    from conftest import use_data_root

    paths = use_data_root(monkeypatch, tmp_path)
    (paths.raw / "Dataset004_Hippocampus").mkdir()
    (paths.results / "Dataset007_Liver").mkdir()
    (paths.preprocessed / "Dataset009_A").mkdir()
    (paths.results / "Dataset009_B").mkdir()
    (paths.raw / "Dataset011_File").write_text("not a dataset folder")
    return tmp_path


@pytest.mark.parametrize("given", [4, "4", " 4", "004", "Dataset004_Hippocampus"])
def test_dataset_name_by_id_or_name(roots, given):
    assert dataset_name(given) == "Dataset004_Hippocampus"


def test_dataset_name_searches_all_three_folders(roots):
    assert dataset_name(7) == "Dataset007_Liver"  # only under nnUNet_results


@pytest.mark.parametrize("given, message", [
    (5, "unknown dataset ID 5: no Dataset005_* folder in "),
    (11, "unknown dataset ID 11"),  # a file is not a dataset
    ("Dataset005_Nothing", "unknown dataset 'Dataset005_Nothing': not found under "),
    ("hippo", "dataset 'hippo' is neither an ID (e.g. 4) nor a name (DatasetNNN_Name)"),
    ("-4", "is neither an ID"),
])
def test_dataset_name_unknown_is_one_line(roots, given, message):
    with pytest.raises(UnknownDataset) as err:
        dataset_name(given)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dataset_name_ambiguous_id(roots):
    with pytest.raises(SamnnuError, match="dataset ID 9 is ambiguous: Dataset009_A, Dataset009_B") as err:
        dataset_name(9)
    assert not isinstance(err.value, UnknownDataset)


def test_dataset_name_in_given_roots_creates_nothing(tmp_path):
    raw = tmp_path / "elsewhere" / "nnUNet_raw"
    with pytest.raises(UnknownDataset, match=str(raw)):
        dataset_name(4, roots=[raw])
    assert not (tmp_path / "elsewhere").exists()
    (raw / "Dataset004_Hippocampus").mkdir(parents=True)
    assert dataset_name("4", roots=[raw]) == "Dataset004_Hippocampus"
    assert datasets_with_id(4, [raw, tmp_path / "missing"]) == ["Dataset004_Hippocampus"]


def test_model_folder_is_nnunets_output_folder(roots):
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    folder = model_folder("Dataset004_Hippocampus", "SAMedLoRATrainer", "samnnuPlans", "2d")
    assert str(folder) == get_output_folder("Dataset004_Hippocampus", "SAMedLoRATrainer", "samnnuPlans", "2d")
    assert str(model_folder("Dataset004_Hippocampus", "T", "P", "3d_fullres", fold=1)) == \
        get_output_folder(4, "T", "P", "3d_fullres", fold=1)
    other = model_folder("Dataset004_Hippocampus", "T", "P", "2d", fold="all", results=roots / "x")
    assert other == roots / "x" / "Dataset004_Hippocampus" / "T__P__2d" / "fold_all"


def test_model_folder_names_round_trip():
    assert model_folder_name("nnUNetTrainer", "nnUNetPlans", "3d_fullres") == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert split_model_folder_name("nnUNetTrainer__nnUNetPlans__3d_fullres") == \
        ("nnUNetTrainer", "nnUNetPlans", "3d_fullres")
    assert split_model_folder_name("/r/Dataset004_X/A__B__2d") == ("A", "B", "2d")
    for name in ("summary", "A__B", "A__B__C__D", "A____2d"):
        assert split_model_folder_name(name) is None
    assert dataset_folder_name(4, "Hippocampus") == "Dataset004_Hippocampus"


def test_read_json_errors_name_the_file(tmp_path):
    path = tmp_path / "plans.json"
    with pytest.raises(SamnnuError, match=f"^{path}: plans is missing$"):
        read_json(path, "plans")
    path.write_text("{not json")
    with pytest.raises(SamnnuError, match=f"^{path}: cannot read plans \\(Expecting property name"):
        read_json(path, "plans")
    assert read_json(path, default=None) is None and read_json(tmp_path / "nope.json", default={}) == {}
    with pytest.raises(SamnnuError, match="cannot read"):
        read_json(tmp_path, "a folder")


def test_json_round_trip_through_to_jsonable(tmp_path):
    obj = {"a": np.float32(0.5), "b": [np.int64(3), math.nan, math.inf], "c": np.arange(2), 1: (True, np.bool_(0)),
           "p": tmp_path}
    path = write_json_atomic(tmp_path / "x.json", to_jsonable(obj))
    assert read_json(path) == {"a": 0.5, "b": [3, None, None], "c": [0, 1], "1": [True, False], "p": str(tmp_path)}
    assert path.read_text().endswith("}\n") and json.loads(path.read_text())["a"] == 0.5
    with pytest.raises(ValueError, match="Out of range float values"):
        write_json_atomic(tmp_path / "nan.json", {"x": math.nan})  # NaN must be converted first
    assert not (tmp_path / "nan.json").exists()
