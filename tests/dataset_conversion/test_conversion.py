"""Tests of samnnu.dataset_conversion: synthetic volumes and images built in tmp_path, plus the
shipped demo data and (when present) the shared hippocampus folder."""
from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from samnnu.cli import convert_main
from samnnu.dataset_conversion.common import CaseRefused, integer_label_array
from samnnu.dataset_conversion.folder import convert_folder
from samnnu.dataset_conversion.hippocampus import convert_hippocampus
from samnnu.demo_data import demo_dataset_path
from samnnu.errors import SamnnuError
from samnnu.safe_io import check_image_file

SHARED_HIPPOCAMPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "hippocampus"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write a (Z, Y, X) array as a volume with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def label_array(shape=(6, 8, 7), dtype=np.uint8) -> np.ndarray:
    label = np.zeros(shape, dtype=dtype)
    label[1:3, 2:5, 2:5] = 1
    label[3:5, 2:5, 2:5] = 2
    return label


def image_array(shape=(6, 8, 7), dtype=np.float32, scale=1.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(shape) * scale).astype(dtype)


def make_case(root: Path, case: str, image=None, label=None, images="images", labels="labels", **geometry):
    """One hippocampus-style case under root/images and root/labels."""
    name = f"{case}.nii.gz"
    write_volume(root / images / name, image_array() if image is None else image, **geometry)
    if label is not False:
        write_volume(root / labels / name, label_array() if label is None else label)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def shared_reason(path: Path) -> str:
    """The reason the converter gives for a damaged file: samnnu.safe_io.check_image_file's message,
    with the file named ``folder/file``."""
    with pytest.raises(SamnnuError) as shared:
        check_image_file(path)
    return " ".join(str(shared.value).replace(str(path), f"{path.parent.name}/{path.name}").split())


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def pixel_type(path: Path) -> str:
    return sitk.ReadImage(str(path)).GetPixelIDTypeAsString()


# --------------------------------------------------------------------------------------------
# hippocampus: the real quirks
# --------------------------------------------------------------------------------------------
def test_float_label_with_integral_values_is_written_as_integers(tmp_path):
    src = tmp_path / "src"
    make_case(src, "hippocampus_003", label=label_array(dtype=np.float32))
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    out = result.dataset_folder / "labelsTr" / "hippocampus_003.nii.gz"
    assert result.converted == ["hippocampus_003"] and result.refused == {}
    assert pixel_type(out) == "8-bit unsigned integer"
    np.testing.assert_array_equal(read(out), label_array())


def test_float_label_with_non_integral_values_is_refused(tmp_path):
    src = tmp_path / "src"
    bad = label_array(dtype=np.float32)
    bad[0, 0, 0] = 0.5
    make_case(src, "hippocampus_001")
    make_case(src, "hippocampus_002", label=bad)
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    assert result.converted == ["hippocampus_001"]
    reason = result.refused["hippocampus_002"]
    assert "labels/hippocampus_002.nii.gz" in reason and "not integral" in reason and "0.5" in reason
    assert not (result.dataset_folder / "labelsTr" / "hippocampus_002.nii.gz").exists()


def test_mixed_uint8_and_float32_images_are_stored_as_float32_with_values_kept(tmp_path):
    src = tmp_path / "src"
    small = image_array(dtype=np.uint8, scale=200)
    large = image_array(dtype=np.float32, scale=1.5e6)
    make_case(src, "hippocampus_001", image=small)
    make_case(src, "hippocampus_004", image=large)
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    images = result.dataset_folder / "imagesTr"
    assert sorted(p.name for p in images.iterdir()) == ["hippocampus_001_0000.nii.gz", "hippocampus_004_0000.nii.gz"]
    for case, original in (("hippocampus_001", small), ("hippocampus_004", large)):
        out = images / f"{case}_0000.nii.gz"
        assert pixel_type(out) == "32-bit float"
        np.testing.assert_array_equal(read(out), original.astype(np.float32))


@pytest.mark.parametrize(
    "geometry, label, expected",
    [
        ({"spacing": (1.0, 1.0, 2.0)}, None, "spacing"),
        ({}, label_array(shape=(6, 8, 8)), "size"),
        ({"origin": (5.0, 0.0, 0.0)}, None, "origin"),
    ],
)
def test_mismatched_grid_is_refused_with_reason_naming_the_case(tmp_path, geometry, label, expected):
    src = tmp_path / "src"
    make_case(src, "hippocampus_001")
    make_case(src, "hippocampus_007", label=label, **geometry)
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    assert result.converted == ["hippocampus_001"]
    reason = result.refused["hippocampus_007"]
    assert "hippocampus_007.nii.gz" in reason and expected in reason
    assert "\n" not in reason


def test_tiny_grid_difference_is_tolerated_and_label_takes_image_geometry(tmp_path):
    src = tmp_path / "src"
    write_volume(src / "images" / "c.nii.gz", image_array(), origin=(0.0, 0.0, 0.0))
    write_volume(src / "labels" / "c.nii.gz", label_array(), origin=(1e-5, 0.0, 0.0))
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    assert result.converted == ["c"]
    label = sitk.ReadImage(str(result.dataset_folder / "labelsTr" / "c.nii.gz"))
    image = sitk.ReadImage(str(result.dataset_folder / "imagesTr" / "c_0000.nii.gz"))
    assert label.GetOrigin() == image.GetOrigin()


def test_missing_label_file_is_refused(tmp_path):
    src = tmp_path / "src"
    make_case(src, "hippocampus_001")
    make_case(src, "hippocampus_002", label=False)
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    assert result.converted == ["hippocampus_001"]
    assert "no matching label" in result.refused["hippocampus_002"]
    assert json.loads((result.dataset_folder / "dataset.json").read_text())["numTraining"] == 1


def test_label_value_absent_from_labels_map_is_refused(tmp_path):
    src = tmp_path / "src"
    bad = label_array()
    bad[0, 0, 0] = 3
    make_case(src, "hippocampus_001")
    make_case(src, "hippocampus_002", label=bad)
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    reason = result.refused["hippocampus_002"]
    assert "label value(s) 3 not in the labels map" in reason and "Posterior=2" in reason


def test_corrupt_file_is_refused_and_inputs_are_untouched(tmp_path):
    src = tmp_path / "src"
    for case in ("hippocampus_001", "hippocampus_002"):
        make_case(src, case)
    big = (20, 20, 20)
    make_case(src, "hippocampus_003", image=image_array(shape=big), label=label_array(shape=big))
    broken_header = src / "images" / "hippocampus_002.nii.gz"
    broken_header.write_bytes(broken_header.read_bytes()[:40])
    # cut inside the voxel data: SimpleITK alone would read the missing voxels as zeros
    truncated = src / "images" / "hippocampus_003.nii.gz"  # random voxels: the header survives the cut
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    before = tree_digest(src)
    result = convert_hippocampus(src, raw_root=tmp_path / "raw")
    assert result.converted == ["hippocampus_001"]
    assert result.refused["hippocampus_002"] == shared_reason(broken_header)
    assert result.refused["hippocampus_003"] == shared_reason(truncated)
    assert result.refused["hippocampus_003"].startswith("images/hippocampus_003.nii.gz: damaged or truncated")
    assert tree_digest(src) == before


def test_truncated_uncompressed_nifti_is_refused(tmp_path):
    images, labels_dir = tmp_path / "img", tmp_path / "lab"
    write_volume(images / "a.nii", image_array(shape=(20, 20, 20)))
    write_volume(labels_dir / "a.nii", label_array(shape=(20, 20, 20)))
    write_volume(images / "b.nii", image_array(shape=(20, 20, 20)))
    write_volume(labels_dir / "b.nii", label_array(shape=(20, 20, 20)))
    cut = images / "b.nii"
    cut.write_bytes(cut.read_bytes()[:20_000])
    result = convert_folder(images, labels_dir, 16, "Nii", LABELS, raw_root=tmp_path / "raw")
    assert result.converted == ["a"]
    assert result.refused["b"] == "img/b.nii: truncated (20000 of 32352 bytes)"


def test_msd_layout_ignores_dot_underscore_files_and_checks_its_labels(tmp_path):
    src = tmp_path / "Task04_Hippocampus"
    make_case(src, "hippocampus_001", images="imagesTr", labels="labelsTr")
    make_case(src, "hippocampus_003", images="imagesTr", labels="labelsTr")
    (src / "imagesTr" / "._hippocampus_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (src / "labelsTr" / "._hippocampus_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    msd = {"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "modality": {"0": "MRI"}}
    (src / "dataset.json").write_text(json.dumps(msd))
    result = convert_hippocampus(src, dataset_id=4, raw_root=tmp_path / "raw")
    assert result.dataset_folder.name == "Dataset004_Hippocampus"
    assert result.converted == ["hippocampus_001", "hippocampus_003"] and result.refused == {}
    written = json.loads((result.dataset_folder / "dataset.json").read_text())
    assert written["channel_names"] == {"0": "MRI"}
    assert written["labels"] == LABELS and written["file_ending"] == ".nii.gz"

    msd["labels"]["2"] = "Tail"
    (src / "dataset.json").write_text(json.dumps(msd))
    with pytest.raises(SamnnuError, match="dataset.json: labels .* not Task04"):
        convert_hippocampus(src, dataset_id=5, raw_root=tmp_path / "raw")


def test_nothing_convertible_raises_and_leaves_no_folder(tmp_path):
    src = tmp_path / "src"
    make_case(src, "hippocampus_001", label=False)
    (src / "labels").mkdir()
    raw = tmp_path / "raw"
    with pytest.raises(SamnnuError, match="no convertible case"):
        convert_hippocampus(src, raw_root=raw)
    assert list(raw.iterdir()) == []


def test_existing_target_needs_overwrite_and_same_id_other_name_is_refused(tmp_path):
    src, raw = tmp_path / "src", tmp_path / "raw"
    make_case(src, "hippocampus_001")
    first = convert_hippocampus(src, raw_root=raw)
    with pytest.raises(SamnnuError, match="already exists; pass overwrite=True"):
        convert_hippocampus(src, raw_root=raw)
    make_case(src, "hippocampus_002")
    second = convert_hippocampus(src, raw_root=raw, overwrite=True)
    assert second.dataset_folder == first.dataset_folder
    assert second.converted == ["hippocampus_001", "hippocampus_002"]
    assert [p.name for p in raw.iterdir()] == ["Dataset004_Hippocampus"]  # no temporary leftovers
    with pytest.raises(SamnnuError, match="Dataset004_Hippocampus: dataset ID 4 is taken"):
        convert_folder(src / "images", src / "labels", 4, "Other", LABELS, raw_root=raw, overwrite=True)


def test_integer_label_array_casts_only_checked_values():
    values = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    out = integer_label_array(values, LABELS, "x.nii.gz")
    assert out.dtype == np.uint8 and out.tolist() == [0, 1, 2]
    with pytest.raises(CaseRefused, match="NaN"):
        integer_label_array(np.array([0.0, np.nan]), LABELS, "x.nii.gz")


# --------------------------------------------------------------------------------------------
# folder converter
# --------------------------------------------------------------------------------------------
def test_folder_png_grey_and_rgb_with_0_255_masks(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    grey_dir, rgb_dir, masks = tmp_path / "grey", tmp_path / "rgb", tmp_path / "masks"
    for d in (grey_dir, rgb_dir, masks):
        d.mkdir()
    rng = np.random.default_rng(1)
    mask = np.zeros((16, 20), np.uint8)
    mask[4:10, 5:12] = 255
    for case in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (16, 20), dtype=np.uint8)).save(grey_dir / f"{case}.png")
        Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(rgb_dir / f"{case}.png")
        Image.fromarray(mask).save(masks / f"{case}.png")
    bad = mask.copy()
    bad[0, 0] = 128
    Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(rgb_dir / "c.png")
    Image.fromarray(bad).save(masks / "c.png")
    labels = {"background": 0, "lesion": 1}

    grey = convert_folder(grey_dir, masks, 10, "Grey", labels, raw_root=tmp_path / "raw")
    rgb = convert_folder(rgb_dir, masks, 11, "Rgb", labels, raw_root=tmp_path / "raw")

    assert grey.converted == ["a", "b"] and "no matching image" in grey.refused["c"]
    assert rgb.converted == ["a", "b"]
    assert "masks/c.png: label value(s) 128, 255 not in the labels map" in rgb.refused["c"]
    grey_json = json.loads((grey.dataset_folder / "dataset.json").read_text())
    rgb_json = json.loads((rgb.dataset_folder / "dataset.json").read_text())
    assert grey_json["file_ending"] == ".png" and grey_json["channel_names"] == {"0": "image"}
    assert rgb_json["channel_names"] == {"0": "R", "1": "G", "2": "B"}

    io = NaturalImage2DIO()
    image, _ = io.read_images([str(rgb.dataset_folder / "imagesTr" / "a_0000.png")])
    seg, _ = io.read_seg(str(rgb.dataset_folder / "labelsTr" / "a.png"))
    assert image.shape == (3, 1, 16, 20)
    np.testing.assert_array_equal(image[:, 0].transpose(1, 2, 0), np.asarray(Image.open(rgb_dir / "a.png")))
    assert seg.shape == (1, 1, 16, 20) and set(np.unique(seg).tolist()) == {0.0, 1.0}
    assert seg.sum() == (mask == 255).sum()


def test_folder_jpeg_image_becomes_png_and_class_index_masks_are_kept(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(images / "x.jpg")
    Image.fromarray(np.array([[0, 1, 2, 3] * 2] * 8, np.uint8)).save(masks / "x.png")
    labels = {"background": 0, "a": 1, "b": 2, "c": 3}
    result = convert_folder(images, masks, 12, "Jpeg", labels, raw_root=tmp_path / "raw")
    assert result.converted == ["x"]
    assert (result.dataset_folder / "imagesTr" / "x_0000.png").is_file()
    written = np.asarray(Image.open(result.dataset_folder / "labelsTr" / "x.png"))
    assert written.tolist()[0] == [0, 1, 2, 3] * 2


def test_folder_nrrd_volumes_with_channel_naming(tmp_path):
    images, labels_dir = tmp_path / "img", tmp_path / "lab"
    for case in ("p1", "p2"):
        write_volume(images / f"{case}_0000.nrrd", image_array(dtype=np.int16, scale=1000))
        write_volume(images / f"{case}_0001.nrrd", image_array(dtype=np.int16, scale=1000))
        write_volume(labels_dir / f"{case}.nrrd", label_array())
    (images / "p2_0001.nrrd").unlink()
    result = convert_folder(images, labels_dir, 13, "Nrrd", LABELS, channel_names=["T1", "T2"],
                            raw_root=tmp_path / "raw")
    assert result.converted == ["p1"]
    assert "expected 2 image file(s), found 1" in result.refused["p2"]
    assert sorted(p.name for p in (result.dataset_folder / "imagesTr").iterdir()) == [
        "p1_0000.nii.gz", "p1_0001.nii.gz"]
    assert json.loads((result.dataset_folder / "dataset.json").read_text())["channel_names"] == {"0": "T1", "1": "T2"}


def test_folder_rejects_bad_labels_map(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    with pytest.raises(SamnnuError, match="named 'background'"):  # before any file is read
        convert_folder(tmp_path / "i", tmp_path / "l", 14, "X", {"bg": 0, "a": 1}, raw_root=tmp_path)
    make_case(tmp_path, "case1", images="i", labels="l")
    with pytest.raises(SamnnuError, match="consecutive from 0 for volumes"):  # stored values: 2D masks only
        convert_folder(tmp_path / "i", tmp_path / "l", 14, "X", {"background": 0, "a": 2}, raw_root=tmp_path)
    with pytest.raises(SamnnuError, match="could be read as another class"):  # 0, 2, 4 -> 0, 1, 2: ambiguous
        convert_folder(tmp_path / "i", tmp_path / "l", 14, "X", {"background": 0, "a": 2, "b": 4}, raw_root=tmp_path)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_error_returns_1_and_prints_one_line(tmp_path, capsys, nnunet_env):
    code = convert_main(["hippocampus", str(tmp_path / "missing"), "-d", "4", "--data-root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("samnnu_convert: error: ") and "missing: source folder not found" in err


def test_cli_bad_labels_option_is_a_one_line_error(tmp_path, capsys, nnunet_env):
    code = convert_main(["folder", str(tmp_path), str(tmp_path), "-d", "9", "-n", "X", "--labels", "background:0",
                     "--data-root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "expected name=integer pairs" in err


def test_cli_converts_into_data_root_and_prints_summary(tmp_path, capsys, nnunet_env):
    src = tmp_path / "src"
    make_case(src, "hippocampus_001")
    make_case(src, "hippocampus_002", label=False)
    code = convert_main(["hippocampus", str(src), "-d", "4", "--data-root", str(tmp_path / "data")])
    out = capsys.readouterr().out
    target = tmp_path / "data" / "nnUNet_raw" / "Dataset004_Hippocampus"
    assert code == 0 and (target / "dataset.json").is_file()
    assert f"converted 1 cases into {target}" in out
    assert "refused 1 cases:" in out and "hippocampus_002: " in out


def test_hold_out_pattern_writes_a_fixed_test_set_that_training_never_sees(tmp_path, capsys, nnunet_env):
    src = tmp_path / "src"
    for n in (1, 7, 12, 17, 20):
        make_case(src, f"hippocampus_{n:03d}")
    code = convert_main(["hippocampus", str(src), "-d", "4", "--hold-out", "*7", "--data-root", str(tmp_path / "data")])
    out = capsys.readouterr().out
    target = tmp_path / "data" / "nnUNet_raw" / "Dataset004_Hippocampus"
    assert code == 0 and "held out 2 of them as a test set" in out
    names = {sub: sorted(p.name for p in (target / sub).iterdir())
             for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    assert names["imagesTs"] == ["hippocampus_007_0000.nii.gz", "hippocampus_017_0000.nii.gz"]
    assert names["labelsTs"] == ["hippocampus_007.nii.gz", "hippocampus_017.nii.gz"]
    assert names["labelsTr"] == ["hippocampus_001.nii.gz", "hippocampus_012.nii.gz", "hippocampus_020.nii.gz"]
    assert len(names["imagesTr"]) == 3
    assert json.loads((target / "dataset.json").read_text())["numTraining"] == 3  # what nnU-Net plans from
    # a pattern that leaves nothing to train on is refused, and no dataset is installed
    code, _, err = run_convert(capsys, "hippocampus", src, "-d", "5", "--hold-out", "hippo*",
                               "--data-root", tmp_path / "data")
    assert "matches every case" in assert_one_line_error(code, err)
    assert not (tmp_path / "data" / "nnUNet_raw" / "Dataset005_Hippocampus").exists()


# --------------------------------------------------------------------------------------------
# adversarial input through samnnu_convert: one-line errors, refused cases, untouched sources
# --------------------------------------------------------------------------------------------
def run_convert(capsys, *argv) -> tuple[int, str, str]:
    """Run ``samnnu_convert`` (the console script's function); return (exit status, stdout, stderr)."""
    code = convert_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> str:
    """The run failed with exactly one ``samnnu_convert: error: ...`` line; return that line."""
    assert code != 0
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("samnnu_convert: error: ")
    return err.rstrip("\n")


def refused_line(out: str, case: str) -> str:
    """The summary line of a refused case, without the case id."""
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(f"{case}: ")]
    assert len(lines) == 1, out
    return lines[0][len(case) + 2:]


def write_series(path: Path, arrays: list[np.ndarray]) -> Path:
    """Write (Z, Y, X) arrays as one 4D image (x, y, z, t)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arrays]), str(path), useCompression=True)
    return path


def test_cli_4d_case_is_refused_and_the_other_cases_converted(tmp_path, capsys, nnunet_env):
    images, labels_dir = tmp_path / "img", tmp_path / "lab"
    write_volume(images / "a.nii.gz", image_array())
    write_volume(labels_dir / "a.nii.gz", label_array())
    write_series(images / "b.nii.gz", [image_array()] * 3)
    write_series(labels_dir / "b.nii.gz", [label_array()] * 3)
    before = tree_digest(tmp_path)
    code, out, err = run_convert(capsys, "folder", images, labels_dir, "-d", 21, "-n", "Series",
                                 "--labels", "background=0,a=1,p=2", "--data-root", tmp_path / "data")
    assert code == 0 and err == ""
    assert refused_line(out, "b") == (
        "img/b.nii.gz: is 4D (size (7, 8, 6, 3)); samnnu converts 2D and 3D images, one file per channel")
    target = nnunet_env / "Dataset021_Series"
    assert sorted(p.name for p in (target / "imagesTr").iterdir()) == ["a_0000.nii.gz"]
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("data")} == before


def test_cli_2d_slice_among_3d_volumes_is_refused_by_majority(tmp_path, capsys, nnunet_env):
    images, labels_dir = tmp_path / "img", tmp_path / "lab"
    write_volume(images / "a.nii.gz", image_array(shape=(8, 7)), spacing=(1.0, 1.0), origin=(0.0, 0.0))
    write_volume(labels_dir / "a.nii.gz", label_array(shape=(6, 8, 7))[2], spacing=(1.0, 1.0), origin=(0.0, 0.0))
    for case in ("b", "c"):
        write_volume(images / f"{case}.nii.gz", image_array())
        write_volume(labels_dir / f"{case}.nii.gz", label_array())
    before = tree_digest(tmp_path)
    code, out, err = run_convert(capsys, "folder", images, labels_dir, "-d", 22, "-n", "Mixed",
                                 "--labels", "background=0,a=1,p=2", "--data-root", tmp_path / "data")
    assert code == 0 and err == ""
    assert refused_line(out, "a") == (
        "img/a.nii.gz: is 2D (size (7, 8)), 3D expected (the dimension of the dataset's other cases)")
    target = nnunet_env / "Dataset022_Mixed"
    assert sorted(p.name for p in (target / "labelsTr").iterdir()) == ["b.nii.gz", "c.nii.gz"]
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("data")} == before


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"labels": {"background": 0, "Anterior": 1, "Posterior": 2}},  # inverted: name -> value
         "\"labels\" key 'background' is not a label value"),
        ({"labels": {"a": "x"}}, "\"labels\" key 'a' is not a label value"),
        ({"labels": ["background", "Anterior", "Posterior"]}, "\"labels\" is a JSON list; MSD maps label values"),
        ({"labels": {"0": "background", "1": ["Anterior"]}},
         "\"labels\" name of label 1 is ['Anterior'], not a string"),
        (["labels"], "holds a JSON list, not an object"),
    ],
)
def test_cli_malformed_msd_dataset_json_is_a_one_line_error(tmp_path, capsys, nnunet_env, content, problem):
    src = tmp_path / "Task04_Hippocampus"
    make_case(src, "hippocampus_001", images="imagesTr", labels="labelsTr")
    (src / "dataset.json").write_text(json.dumps(content))
    before = tree_digest(src)
    code, out, err = run_convert(capsys, "hippocampus", src, "--data-root", tmp_path / "data")
    line = assert_one_line_error(code, err)
    assert f"{src / 'dataset.json'}: {problem}" in line
    assert list(nnunet_env.iterdir()) == [] and tree_digest(src) == before


def _empty_image_write(image, fileName, *args, **kwargs):
    """What SimpleITK's WriteImage does on a full disk: leaves an empty file and reports nothing."""
    Path(fileName).write_bytes(b"")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_space_for_writes(real_open):
    """``open`` that reads as usual and fails every write with ENOSPC."""
    def fake_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)
    return fake_open


@pytest.mark.parametrize("where", ["image", "json", "staging"])
def test_cli_full_disk_is_a_one_line_error_and_leaves_no_dataset(tmp_path, capsys, nnunet_env, monkeypatch, where):
    src = tmp_path / "src"
    for case in ("hippocampus_001", "hippocampus_002"):
        make_case(src, case)
    before = tree_digest(src)
    with monkeypatch.context() as mp:
        if where == "image":
            mp.setattr(sitk, "WriteImage", _empty_image_write)
            expected = ("imagesTr/hippocampus_001_0000.nii.gz: cannot be written "
                        "(the written file is empty (disk full?))")
        elif where == "json":
            mp.setattr(builtins, "open", _no_space_for_writes(builtins.open))
            expected = "dataset.json: cannot be written (no space left on device)"
        else:
            mp.setattr(tempfile, "mkdtemp", _disk_full)
            expected = f"{nnunet_env}: no space left on device"
        code, out, err = run_convert(capsys, "hippocampus", src, "-d", 23, "--data-root", tmp_path / "data")
    line = assert_one_line_error(code, err)
    assert line.endswith(expected), line
    assert list(nnunet_env.iterdir()) == []  # neither Dataset023_Hippocampus nor a .partial folder
    assert tree_digest(src) == before


def test_cli_damaged_files_are_refused_with_the_shared_file_check(tmp_path, capsys, nnunet_env):
    images, labels_dir = tmp_path / "img", tmp_path / "lab"
    big = (20, 20, 20)
    for case in ("a", "b", "c"):
        write_volume(images / f"{case}.nii.gz", image_array(shape=big))
        write_volume(labels_dir / f"{case}.nii.gz", label_array(shape=big))
    write_volume(images / "d.nii", image_array(shape=big))
    write_volume(labels_dir / "d.nii", label_array(shape=big))
    damaged = {
        "b": images / "b.nii.gz",  # empty: what a full disk leaves behind
        "c": labels_dir / "c.nii.gz",  # cut inside the compressed voxels
        "d": images / "d.nii",  # uncompressed, cut inside the voxels
    }
    damaged["b"].write_bytes(b"")
    for path in (damaged["c"], damaged["d"]):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = tree_digest(tmp_path)
    code, out, err = run_convert(capsys, "folder", images, labels_dir, "-d", 24, "-n", "Damaged",
                                 "--labels", "background=0,a=1,p=2", "--data-root", tmp_path / "data")
    assert code == 0 and err == ""
    for case, path in damaged.items():
        assert refused_line(out, case) == shared_reason(path)
    assert refused_line(out, "b") == "img/b.nii.gz: empty file"
    assert sorted(p.name for p in (nnunet_env / "Dataset024_Damaged" / "labelsTr").iterdir()) == ["a.nii.gz"]
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("data")} == before


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------
def test_demo_data_converts_completely_and_passes_nnunet_integrity_check(tmp_path, nnunet_env):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    src = demo_dataset_path()
    before = tree_digest(src)
    result = convert_hippocampus(src, raw_root=nnunet_env)
    assert len(result.converted) == 24 and result.refused == {}
    assert tree_digest(src) == before
    assert pixel_type(result.dataset_folder / "labelsTr" / "hippocampus_243.nii.gz") == "8-bit unsigned integer"
    verify_dataset_integrity(str(result.dataset_folder), num_processes=1)  # raises on any problem


def test_png_dataset_passes_nnunet_integrity_check(tmp_path, nnunet_env):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    for case in ("a", "b"):
        Image.fromarray(np.full((12, 10, 3), 50, np.uint8)).save(images / f"{case}.png")
        Image.fromarray(np.eye(12, 10, dtype=np.uint8) * 255).save(masks / f"{case}.png")
    result = convert_folder(images, masks, 15, "Png", {"background": 0, "fg": 1}, raw_root=nnunet_env)
    verify_dataset_integrity(str(result.dataset_folder), num_processes=1)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_HIPPOCAMPUS.is_dir(), reason="shared hippocampus data not present")
def test_shared_hippocampus_folder_converts_every_case(tmp_path):
    result = convert_hippocampus(SHARED_HIPPOCAMPUS, raw_root=tmp_path / "raw")
    n_images = len([p for p in (SHARED_HIPPOCAMPUS / "images").iterdir() if p.name.endswith(".nii.gz")])
    assert len(result.converted) == n_images and result.refused == {}
    for case in ("hippocampus_003", "hippocampus_243"):  # the float32 label files
        assert pixel_type(result.dataset_folder / "labelsTr" / f"{case}.nii.gz") == "8-bit unsigned integer"
