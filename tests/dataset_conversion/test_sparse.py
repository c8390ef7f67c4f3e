"""Sparse annotations: the ignore label at conversion, sparse labels made from dense ones, and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samnnu.cli import convert_main
from samnnu.dataset_conversion.folder import convert_folder
from samnnu.dataset_conversion.hippocampus import convert_hippocampus
from samnnu.dataset_conversion.sparse import (
    annotation_axis,
    choose_slices,
    end_slices,
    make_sparse_dataset,
    scribbles,
    sparse_info,
    sparse_slices,
    with_ignore,
)
from samnnu.errors import SamnnuError

LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dense_label(shape=(20, 16, 16)) -> np.ndarray:
    """Two blocks (labels 1 and 2) spanning slices 5..14 along axis 0."""
    label = np.zeros(shape, dtype=np.uint8)
    label[5:10, 4:12, 4:12] = 1
    label[10:15, 4:12, 4:12] = 2
    return label


def make_source(root: Path, n: int = 3, label=None, ignore_value=None) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        lab = dense_label() if label is None else label.copy()
        if ignore_value is not None:
            lab[:5] = ignore_value  # the first five slices were not annotated
        write_volume(root / "images" / f"hippocampus_{i:03d}.nii.gz", rng.random(lab.shape).astype(np.float32))
        write_volume(root / "labels" / f"hippocampus_{i:03d}.nii.gz", lab)
    return root


# ----------------------------------------------------------------------------------------------- one volume

def test_evenly_spaced_slices_go_through_the_structures_and_random_ones_are_seeded():
    label = dense_label()
    assert choose_slices(label, 3, axis=0) == [7, 10, 12]  # quartiles of the extent 5..14
    assert choose_slices(label, 1, axis=0) == [10]
    a = choose_slices(label, 4, axis=0, random_state=np.random.default_rng(1))
    b = choose_slices(label, 4, axis=0, random_state=np.random.default_rng(1))
    assert a == b and len(set(a)) == 4 and all(5 <= i <= 14 for i in a)
    assert choose_slices(np.zeros((6, 4, 4), np.uint8), 2, axis=0) == [2, 3]  # no structure: spread over the axis
    with pytest.raises(SamnnuError, match="at least 1"):
        choose_slices(label, 0, axis=0)


def test_sparse_slices_keep_only_the_chosen_slices_exactly():
    label = dense_label()
    sparse = sparse_slices(label, [7, 12], axis=0, ignore=3)
    kept = np.flatnonzero((sparse != 3).any(axis=(1, 2)))
    assert kept.tolist() == [7, 12]
    assert np.array_equal(sparse[[7, 12]], label[[7, 12]])  # every voxel of a drawn slice, background too
    along_x = sparse_slices(label, [8], axis=2, ignore=3)
    assert np.array_equal(along_x[:, :, 8], label[:, :, 8]) and (np.delete(along_x, 8, axis=2) == 3).all()


def test_scribbles_only_mark_voxels_with_the_same_dense_label():
    label = dense_label()
    strokes = scribbles(label, axis=0, ignore=3)
    drawn = strokes != 3
    assert np.array_equal(strokes[drawn], label[drawn])  # a stroke never contradicts the dense label
    for value in (1, 2):  # each structure has a stroke inside it, thinner than the structure
        assert 0 < np.count_nonzero(strokes == value) < np.count_nonzero(label == value) / 4
    assert np.count_nonzero(strokes == 0) > 0  # the background stroke around the structures
    assert not drawn[:5].any() and not drawn[15:].any()  # slices without a structure stay unannotated
    only = scribbles(label, axis=0, ignore=3, slices=[6])
    assert np.flatnonzero((only != 3).any(axis=(1, 2))).tolist() == [6]


def test_annotation_axis_is_the_coarsest_one_and_the_first_on_a_tie():
    assert annotation_axis((1.0, 1.0, 1.0)) == 0
    assert annotation_axis((0.8, 0.8, 3.0)) == 2
    assert annotation_axis((5.0, 0.7, 0.7)) == 0


def test_labels_map_gets_the_ignore_label_one_above_the_highest_class():
    assert with_ignore(LABELS) == dict(LABELS, ignore=3)
    assert sparse_info({"labels": dict(LABELS, ignore=3)}) == {"ignore_label": 3}
    assert sparse_info({"labels": LABELS}) is None


# ----------------------------------------------------------------------------------------------- conversion

def test_convert_sparse_maps_the_users_unannotated_value_to_the_ignore_label(tmp_path, nnunet_env):
    src = make_source(tmp_path / "src", ignore_value=255)
    result = convert_hippocampus(src, 4, raw_root=nnunet_env, sparse=255)
    assert len(result.converted) == 3 and not result.refused
    folder = result.dataset_folder
    assert json.loads((folder / "dataset.json").read_text())["labels"] == dict(LABELS, ignore=3)
    label = read(folder / "labelsTr" / "hippocampus_000.nii.gz")
    assert (label[:5] == 3).all() and np.array_equal(label[5:], dense_label()[5:])
    assert np.unique(read(src / "labels" / "hippocampus_000.nii.gz")).tolist() == [0, 1, 2, 255]  # input untouched


def test_convert_sparse_default_value_and_bad_values(tmp_path, nnunet_env, capsys):
    src = make_source(tmp_path / "src", ignore_value=3)
    assert convert_main(["folder", str(src / "images"), str(src / "labels"), "-d", "7", "-n", "Sp",
                         "--labels", "background=0,a=1,b=2", "--sparse", "--data-root", str(tmp_path / "data")]) == 0
    dataset = json.loads((nnunet_env / "Dataset007_Sp" / "dataset.json").read_text())
    assert dataset["labels"]["ignore"] == 3
    # without --sparse, the unannotated value is an unknown label: every case is refused
    assert convert_main(["folder", str(src / "images"), str(src / "labels"), "-d", "8", "-n", "Dense",
                         "--labels", "background=0,a=1,b=2", "--data-root", str(tmp_path / "data")]) == 1
    capsys.readouterr()
    with pytest.raises(SamnnuError, match="no class uses"):  # a class's value cannot mean "not annotated"
        convert_folder(src / "images", src / "labels", 9, "Bad", dict(LABELS), raw_root=nnunet_env, sparse=2)


# ----------------------------------------------------------------------------------------------- make_sparse_dataset

def test_make_sparse_dataset_writes_a_new_dataset_and_leaves_the_source_alone(tmp_path, nnunet_env):
    src = make_source(tmp_path / "src", n=4)
    convert_hippocampus(src, 4, raw_root=nnunet_env, hold_out="*3")
    dense_dir = nnunet_env / "Dataset004_Hippocampus"
    before = {p: p.read_bytes() for p in dense_dir.rglob("*") if p.is_file()}
    result = make_sparse_dataset(4, 40, slices=2)
    target = result.dataset_folder
    assert target.name == "Dataset040_HippocampusSparse2" and result.held_out == ["hippocampus_003"]
    dataset = json.loads((target / "dataset.json").read_text())
    assert dataset["labels"]["ignore"] == 3 and dataset["numTraining"] == 3
    record = dataset["samnnu_sparse"]
    assert record["source_dataset"] == "Dataset004_Hippocampus" and record["slices_per_volume"] == 2
    assert record["annotated_fraction"] == pytest.approx(2 / 20)
    for f in (target / "labelsTr").iterdir():
        assert np.flatnonzero((read(f) != 3).any(axis=(1, 2))).tolist() == [8, 11]
    assert sorted(p.name for p in (target / "imagesTr").iterdir()) == \
        sorted(p.name for p in (dense_dir / "imagesTr").iterdir())
    # the held-out test set keeps its dense labels: they are the references
    assert np.array_equal(read(target / "labelsTs" / "hippocampus_003.nii.gz"), dense_label())
    assert {p: p.read_bytes() for p in dense_dir.rglob("*") if p.is_file()} == before
    scribbled = make_sparse_dataset(4, 41, scribble=True)
    assert scribbled.dataset_folder.name == "Dataset041_HippocampusScribble"
    assert json.loads((scribbled.dataset_folder / "dataset.json").read_text())["samnnu_sparse"]["mode"] == "scribbles"


def test_end_slices_are_the_background_slices_just_past_the_structures():
    label = dense_label()  # structures on slices 5..14 of 20 along axis 0
    assert end_slices(label, 0) == [4, 15] and end_slices(label, 1) == [3, 12]
    assert end_slices(label[5:], 0) == [10]  # the structures start at the border: one end only
    assert end_slices(np.zeros((4, 4, 4), np.uint8), 0) == []


def test_make_sparse_dataset_with_end_slices_draws_them_as_background(tmp_path, nnunet_env, capsys):
    src = make_source(tmp_path / "src", n=2)
    convert_hippocampus(src, 4, raw_root=nnunet_env)
    result = make_sparse_dataset(4, 42, slices=2, end_slices_too=True)
    assert result.dataset_folder.name == "Dataset042_HippocampusSparse2Ends"
    record = json.loads((result.dataset_folder / "dataset.json").read_text())["samnnu_sparse"]
    assert record["end_slices"] is True and record["annotated_fraction"] == pytest.approx(4 / 20)
    for f in (result.dataset_folder / "labelsTr").iterdir():
        sparse = read(f)
        assert np.flatnonzero((sparse != 3).any(axis=(1, 2))).tolist() == [4, 8, 11, 15]
        assert not sparse[[4, 15]].any() and np.array_equal(sparse[[8, 11]], dense_label()[[8, 11]])
    assert convert_main(["sparse", "4", "-d", "43", "--scribbles", "--end-slices",
                         "--data-root", str(tmp_path / "data")]) == 1
    assert "--end-slices" in capsys.readouterr().err


def test_make_sparse_dataset_refuses_bad_requests_in_one_line(tmp_path, nnunet_env, capsys):
    src = make_source(tmp_path / "src", n=2)
    convert_hippocampus(src, 4, raw_root=nnunet_env)
    root = ["--data-root", str(tmp_path / "data")]
    for args, expected in ((["sparse", "4", "-d", "50"], "--slices N"),
                           (["sparse", "4", "-d", "50", "--slices", "0"], "at least 1"),
                           (["sparse", "77", "-d", "50", "--slices", "2"], "unknown dataset ID 77"),
                           (["sparse", "4", "-d", "4", "--slices", "2"], "dataset ID 4 is taken")):
        assert convert_main(args + root) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("samnnu_convert: error:") and expected in err and len(err.splitlines()) == 1
    assert convert_main(["sparse", "4", "-d", "50", "--slices", "2"] + root) == 0
    assert convert_main(["sparse", "50", "-d", "51", "--slices", "1"] + root) == 1
    assert "already has an ignore label" in capsys.readouterr().err
