"""Metrics on hand-made volumes with answers worked out by hand, and folder evaluation."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from samnnu.cli import evaluate_main as main
from samnnu.errors import SamnnuError
from samnnu.evaluation.folders import evaluate_folders, write_evaluation
from samnnu.evaluation.metrics import (
    assd,
    dice,
    evaluate_case,
    hd95,
    iou,
    surface_dice,
    surface_distances,
    volume_abs_error_ml,
    volume_ml,
    volume_rel_error,
)


def shifted_boxes(shift: int = 1):
    """Two 4x6x6 boxes (z, y, x), the second shifted by ``shift`` voxels along z."""
    a = np.zeros((12, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:8, 2:8] = True
    b[2 + shift : 6 + shift, 2:8, 2:8] = True
    return a, b


def test_dice_and_iou_of_shifted_boxes():
    a, b = shifted_boxes(1)
    # overlap 3 layers of 36 voxels, each box 4 layers: dice = 2*108/288, iou = 108/180
    assert dice(a, b) == pytest.approx(0.75)
    assert iou(a, b) == pytest.approx(0.6)
    a2, b2 = shifted_boxes(2)
    assert dice(a2, b2) == pytest.approx(0.5)
    assert iou(a2, b2) == pytest.approx(1 / 3)


def test_volume_in_ml_uses_spacing():
    a, b = shifted_boxes(1)
    # 144 voxels of 3 x 1 x 1 mm = 432 mm^3
    assert volume_ml(a, (3.0, 1.0, 1.0)) == pytest.approx(0.432)
    c = np.zeros_like(a)
    c[2:7, 2:8, 2:8] = True  # 180 voxels
    assert volume_abs_error_ml(c, a, (3.0, 1.0, 1.0)) == pytest.approx(36 * 3 / 1000)
    assert volume_rel_error(c, a) == pytest.approx(0.25)
    assert volume_rel_error(a, c) == pytest.approx(-0.2)


def test_hd95_of_a_shift_along_the_coarse_axis():
    a, b = shifted_boxes(1)
    # the top and bottom faces are one voxel = 3 mm from the other box's faces
    assert hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(b, a, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    # the same shift along an axis of 1 mm spacing gives 1 mm
    assert hd95(a.transpose(2, 1, 0), b.transpose(2, 1, 0), (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert hd95(a, a, (3.0, 1.0, 1.0)) == 0.0


def test_assd_and_surface_distances_by_hand():
    a, b = shifted_boxes(1)
    d_ab, d_ba = surface_distances(a, b, (3.0, 1.0, 1.0))
    # surface of a 4x6x6 box: two full 6x6 faces + two 20-voxel rings = 112 voxels
    assert d_ab.size == d_ba.size == 112
    # 36 voxels of one face at 3 mm; of the other face's 4x4 inner part 12 at 1 mm, 4 at 2 mm
    assert sorted(np.unique(d_ab)) == [0.0, 1.0, 2.0, 3.0]
    assert d_ab.sum() == pytest.approx(36 * 3 + 12 * 1 + 4 * 2)
    assert assd(a, b, (3.0, 1.0, 1.0)) == pytest.approx(256 / 224)


def test_surface_dice_within_and_outside_tolerance():
    a, b = shifted_boxes(1)
    sp = (3.0, 1.0, 1.0)
    # at 1 mm the 36 face voxels at 3 mm and the 4 at 2 mm miss, per direction: (112-40)*2/224
    assert surface_dice(a, b, sp, 1.0) == pytest.approx(144 / 224)
    assert surface_dice(a, b, sp, 2.0) == pytest.approx(152 / 224)
    assert surface_dice(a, b, sp, 3.0) == pytest.approx(1.0)
    # at 0.5 mm only coinciding surface voxels count: 112 - 36 - 16 = 60 per direction
    assert surface_dice(a, b, sp, 0.5) == pytest.approx(120 / 224)
    assert surface_dice(a, a, sp, 0.0) == 1.0


def test_empty_rules():
    a, _ = shifted_boxes()
    empty = np.zeros_like(a)
    sp = (3.0, 1.0, 1.0)
    # non-empty prediction on an empty reference never scores 1
    assert dice(a, empty) == 0.0 and iou(a, empty) == 0.0
    assert surface_dice(a, empty, sp) == 0.0
    assert math.isnan(hd95(a, empty, sp)) and math.isnan(assd(a, empty, sp))
    assert math.isnan(volume_rel_error(a, empty))
    # missed structure
    assert dice(empty, a) == 0.0 and surface_dice(empty, a, sp) == 0.0
    assert math.isnan(hd95(empty, a, sp)) and volume_rel_error(empty, a) == -1.0
    # correctly predicted absence
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert surface_dice(empty, empty, sp) == 1.0 and volume_rel_error(empty, empty) == 0.0
    assert math.isnan(hd95(empty, empty, sp)) and math.isnan(assd(empty, empty, sp))


def test_2d_masks_and_image_edge():
    a = np.zeros((5, 5), bool)
    a[:, :2] = True  # touches the image edge: those voxels are surface too
    b = np.zeros_like(a)
    b[:, :3] = True
    assert dice(a, b) == pytest.approx(0.8)
    assert hd95(a, b, (1.0, 2.0)) == pytest.approx(2.0)


def test_bad_arguments():
    a, b = shifted_boxes()
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:-1])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, (1.0, 1.0))


def test_evaluate_case_classes_regions_and_ignore():
    a, b = shifted_boxes(1)
    ref = a.astype(np.uint8)
    pred = b.astype(np.uint8)
    ref[0, 0, 0] = 2  # class 2 only in the reference
    labels = {"background": 0, "organ": 1, "small": 2, "both": [1, 2]}
    out = evaluate_case(pred, ref, (3.0, 1.0, 1.0), labels)
    assert list(out) == ["organ", "small", "both"]
    assert out["organ"]["dice"] == pytest.approx(0.75)
    assert out["organ"]["hd95"] == pytest.approx(3.0)
    assert out["organ"]["volume_ref_ml"] == pytest.approx(0.432)
    assert out["small"]["dice"] == 0.0 and math.isnan(out["small"]["hd95"])
    assert out["both"]["dice"] == pytest.approx(2 * 108 / 289)
    # an ignore label removes those reference voxels from every class
    ref[6, 2:8, 2:8] = 3
    out = evaluate_case(pred, ref, (3.0, 1.0, 1.0), {"organ": 1, "ignore": 3})
    assert out["organ"]["dice"] == pytest.approx(2 * 108 / (144 + 108))


def write_image(path, arr, spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    a, b = shifted_boxes(1)
    ref = a.astype(np.uint8)
    ref[8:10, 2:4, 2:4] = 2
    # case_a: organ shifted by one 3 mm slice, class 2 perfect
    pred = b.astype(np.uint8)
    pred[8:10, 2:4, 2:4] = 2
    write_image(ref_dir / "case_a.nii.gz", ref)
    write_image(pred_dir / "case_a.nii.gz", pred)
    # case_b: perfect organ, class 2 missed
    write_image(ref_dir / "case_b.nii.gz", ref)
    write_image(pred_dir / "case_b.nii.gz", a.astype(np.uint8))
    # case_c: no class 2 anywhere, organ perfect
    write_image(ref_dir / "case_c.nii.gz", a.astype(np.uint8))
    write_image(pred_dir / "case_c.nii.gz", a.astype(np.uint8))
    return ref_dir, pred_dir


def test_evaluate_folders(folders, tmp_path):
    ref_dir, pred_dir = folders
    labels = {"background": 0, "organ": 1, "lesion": 2}
    res = evaluate_folders(ref_dir, pred_dir, labels=labels)
    assert res["n_cases"] == 3
    assert set(res["per_case"]) == {"case_a", "case_b", "case_c"}
    # spacing reversed from SimpleITK's (x, y, z): z is the 3 mm axis
    assert res["per_case"]["case_a"]["organ"]["hd95"] == pytest.approx(3.0)
    assert res["per_case"]["case_a"]["organ"]["volume_ref_ml"] == pytest.approx(0.432)
    assert res["mean"]["organ"]["dice"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert res["median"]["organ"]["dice"] == 1.0
    assert res["worst"]["organ"]["dice"] == 0.75
    assert res["worst_case"]["organ"]["dice"] == "case_a"
    assert res["worst"]["organ"]["hd95"] == pytest.approx(3.0)
    # lesion: perfect, missed (dice 0, hd95 NaN), absent on both sides (dice 1, hd95 NaN)
    assert res["mean"]["lesion"]["dice"] == pytest.approx(2 / 3)
    assert res["mean"]["lesion"]["hd95"] == 0.0
    assert res["n_nan"]["lesion"]["hd95"] == 2
    assert res["n_nan"]["organ"]["hd95"] == 0
    assert res["foreground_mean"]["dice"] == pytest.approx(((0.75 + 2) / 3 + 2 / 3) / 2)

    # the same from a dataset.json, and labels inferred when none are given
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    res2 = evaluate_folders(ref_dir, pred_dir, dataset_json=tmp_path / "dataset.json", num_processes=2)
    assert res2["mean"]["lesion"]["dice"] == pytest.approx(2 / 3)
    res3 = evaluate_folders(ref_dir, pred_dir)
    assert list(res3["mean"]) == ["label_1", "label_2"]
    assert res3["per_case"]["case_c"]["label_2"]["dice"] == 1.0
    assert math.isnan(res3["per_case"]["case_c"]["label_2"]["hd95"])

    out_json, out_csv = write_evaluation(res, tmp_path / "out" / "evaluation.json")
    loaded = json.loads(out_json.read_text())
    assert loaded["per_case"]["case_b"]["lesion"]["hd95"] is None
    assert loaded["mean"]["organ"]["dice"] == pytest.approx(2.75 / 3)
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6
    row = next(r for r in rows if r["case"] == "case_b" and r["class"] == "lesion")
    assert row["dice"] == "0.0" and row["hd95"] == ""
    assert not [p for p in out_json.parent.iterdir() if p.name.endswith(".tmp")]


def test_missing_reference_is_named(folders):
    ref_dir, pred_dir = folders
    (ref_dir / "case_b.nii.gz").unlink()
    with pytest.raises(SamnnuError, match=r"case_b\.nii\.gz: no reference"):
        evaluate_folders(ref_dir, pred_dir, labels={"organ": 1})


def test_grid_mismatch_is_named(folders):
    ref_dir, pred_dir = folders
    a, _ = shifted_boxes()
    write_image(pred_dir / "case_c.nii.gz", a.astype(np.uint8), spacing=(1.0, 1.0, 2.5))
    with pytest.raises(SamnnuError, match=r"case_c\.nii\.gz: spacing .* differs"):
        evaluate_folders(ref_dir, pred_dir, labels={"organ": 1})
    write_image(pred_dir / "case_c.nii.gz", a[:-1].astype(np.uint8))
    with pytest.raises(SamnnuError, match=r"case_c\.nii\.gz: size"):
        evaluate_folders(ref_dir, pred_dir, labels={"organ": 1})


def test_cli(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    out = tmp_path / "eval.json"
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-d", str(ds), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "organ" in text and "0.9167" in text
    assert json.loads(out.read_text())["n_cases"] == 3
    assert out.with_suffix(".csv").is_file()

    assert main(["-ref", str(tmp_path / "nope"), "-pred", str(pred_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("samnnu_evaluate: error: ") and "nope" in err and len(err.strip().splitlines()) == 1


def test_cli_dataset_id(folders, tmp_path, monkeypatch, capsys):
    ref_dir, pred_dir = folders
    root = tmp_path / "data"
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(root / name))
    for name in ("nnUNet_extTrainer", "nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(name, "0" if name != "nnUNet_extTrainer" else "")
    ds = root / "nnUNet_raw" / "Dataset042_Boxes"
    ds.mkdir(parents=True)
    labels = {"background": 0, "organ": 1, "lesion": 2}
    (ds / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    out = tmp_path / "eval.json"
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-d", "42", "-o", str(out)]) == 0
    assert list(json.loads(out.read_text())["mean"]) == ["organ", "lesion"]
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-d", "43", "-o", str(out)]) == 1
    assert "samnnu_evaluate: error: 43: neither a dataset.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input on the command line


def snapshot(*folders):
    """{path: bytes} of every file under the folders, to show that a command left its inputs alone."""
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    """The one ``samnnu_evaluate: error:`` line on stderr; fails on a traceback or more lines."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("samnnu_evaluate: error: "), err
    return err.strip()


def run_cli(ref_dir, pred_dir, *extra) -> int:
    return main(["-ref", str(ref_dir), "-pred", str(pred_dir), *map(str, extra)])


def test_cli_refuses_truncated_and_4d_images(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    out = tmp_path / "eval.json"
    # half of a .nii.gz reference: SimpleITK alone would read the rest as zeros and score a perfect case badly
    reference = ref_dir / "case_c.nii.gz"
    reference.write_bytes(reference.read_bytes()[: reference.stat().st_size // 2])
    before = snapshot(ref_dir, pred_dir)
    assert run_cli(ref_dir, pred_dir, "-o", out) == 1
    line = error_line(capsys)
    assert str(reference) in line and "truncated" in line, line
    assert not out.exists() and snapshot(ref_dir, pred_dir) == before

    write_image(reference, shifted_boxes()[0].astype(np.uint8))
    volume = sitk.GetImageFromArray(shifted_boxes()[0].astype(np.uint8))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(pred_dir / "case_c.nii.gz"))  # (x, y, z, t)
    before = snapshot(ref_dir, pred_dir)
    assert run_cli(ref_dir, pred_dir, "-o", out) == 1
    line = error_line(capsys)
    assert str(pred_dir / "case_c.nii.gz") in line and "4D image" in line, line
    assert not out.exists() and snapshot(ref_dir, pred_dir) == before


def test_cli_names_references_without_a_prediction(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    (pred_dir / "case_b.nii.gz").unlink()
    before = snapshot(ref_dir, pred_dir)
    out = tmp_path / "eval.json"
    assert run_cli(ref_dir, pred_dir, "-o", out) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "1 reference case(s)" in captured.err and "case_b" in captured.err, captured.err
    result = json.loads(out.read_text())
    assert result["missing_predictions"] == ["case_b"] and sorted(result["per_case"]) == ["case_a", "case_c"]
    assert snapshot(ref_dir, pred_dir) == before
    # nothing missing: no line, an empty list
    assert run_cli(ref_dir, ref_dir, "-o", out) == 0
    assert capsys.readouterr().err == "" and json.loads(out.read_text())["missing_predictions"] == []


def test_cli_refuses_label_values_the_dataset_does_not_name(folders, tmp_path, capsys):
    ref_dir, pred_dir = folders
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    pred = shifted_boxes()[0].astype(np.uint8)
    pred[0, 0, 0], pred[0, 0, 1] = 7, 9
    write_image(pred_dir / "case_c.nii.gz", pred)
    before = snapshot(ref_dir, pred_dir)
    out = tmp_path / "eval.json"
    assert run_cli(ref_dir, pred_dir, "-d", ds, "-o", out) == 1
    line = error_line(capsys)
    assert str(pred_dir / "case_c.nii.gz") in line and "label value(s) 7, 9 not in the dataset's labels" in line
    assert not out.exists() and snapshot(ref_dir, pred_dir) == before
    # explicit labels may select some of the classes: the other values are then not an error
    assert list(evaluate_folders(ref_dir, pred_dir, labels={"organ": 1})["mean"]) == ["organ"]


def test_cli_data_root_and_an_unknown_dataset_creates_no_folder(folders, tmp_path, monkeypatch, capsys):
    from conftest import NNUNET_ENV

    ref_dir, pred_dir = folders
    for name in NNUNET_ENV:
        monkeypatch.delenv(name, raising=False)  # restored after the test
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = tmp_path / "eval.json"
    assert run_cli(ref_dir, pred_dir, "-d", "501", "-o", out) == 1
    assert "501: neither a dataset.json file nor a dataset ID" in error_line(capsys)
    assert list(home.iterdir()) == [], "a failed -d created folders"
    root = tmp_path / "data"
    assert run_cli(ref_dir, pred_dir, "-d", "501", "--data-root", root, "-o", out) == 1
    assert str(root / "nnUNet_raw") in error_line(capsys) and not root.exists()
    # a dataset found under --data-root gives the class names, and sets up that root
    ds = root / "nnUNet_raw" / "Dataset042_Boxes"
    ds.mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
    before = snapshot(ref_dir, pred_dir, root)
    for dataset in ("42", "Dataset042_Boxes"):
        assert run_cli(ref_dir, pred_dir, "-d", dataset, "--data-root", root, "-o", out) == 0
        assert list(json.loads(out.read_text())["mean"]) == ["organ", "lesion"]
    assert snapshot(ref_dir, pred_dir, root) == before and list(home.iterdir()) == []
    assert (root / "nnUNet_results").is_dir()


def test_cli_output_that_cannot_be_written(folders, tmp_path, monkeypatch, capsys):
    import errno

    import samnnu.safe_io

    ref_dir, pred_dir = folders
    before = snapshot(ref_dir, pred_dir)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("keep me\n")
    for out, expected in ((tmp_path / "a_folder", "is a folder"),
                          (tmp_path / "a_file" / "eval.json", "is not a folder"),
                          (tmp_path / "eval.csv", "must not end in .csv")):
        assert run_cli(ref_dir, pred_dir, "-o", out) == 1, out
        line = error_line(capsys)
        assert str(out) in line and expected in line, line
    assert (tmp_path / "a_file").read_text() == "keep me\n" and list((tmp_path / "a_folder").iterdir()) == []

    # a full disk: one line, the previous output kept, no temporary file left
    out = tmp_path / "eval.json"
    assert run_cli(ref_dir, pred_dir, "-o", out) == 0
    capsys.readouterr()
    previous = out.read_bytes()

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(samnnu.safe_io, "_fsync", disk_full)
    assert run_cli(ref_dir, pred_dir, "-o", out) == 1
    line = error_line(capsys)
    assert str(out) in line and "no space left on device" in line, line
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder", "eval.csv", "eval.json", "pred", "ref"]
    assert snapshot(ref_dir, pred_dir) == before


def test_png_predictions_against_jpeg_masks_by_case_name_with_threshold_and_stored_values(tmp_path):
    """A user's JPEG masks (0/255 with compression noise) as references, samnnu's PNG predictions in the
    stored values (0/255): cases are matched by name across file types, the references thresholded."""
    from PIL import Image

    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 20) ** 2 <= 100).astype(np.uint8) * 255
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    Image.fromarray(disc).save(tmp_path / "ref" / "photo1.jpg", quality=90)
    Image.fromarray(disc).save(tmp_path / "pred" / "photo1.png")
    noisy = np.asarray(Image.open(tmp_path / "ref" / "photo1.jpg"))
    assert set(np.unique(noisy).tolist()) - {0, 255}  # JPEG made it noisy
    ds = {"labels": {"background": 0, "polyp": 1}, "file_ending": ".png",
          "samnnu_stored_label_values": {"background": 0, "polyp": 255}}
    result = evaluate_folders(tmp_path / "ref", tmp_path / "pred", dataset_json=ds, reference_threshold=128)
    assert result["n_cases"] == 1 and result["per_case"]["photo1"]["polyp"]["dice"] == pytest.approx(1.0)
    # references already in label values (0/1) are not thresholded into nothing: refused, naming the file
    (tmp_path / "ref01").mkdir()
    Image.fromarray((disc > 0).astype(np.uint8)).save(tmp_path / "ref01" / "photo1.png")
    with pytest.raises(SamnnuError, match="already holds labels"):
        evaluate_folders(tmp_path / "ref01", tmp_path / "pred", dataset_json=ds, reference_threshold=128)
    # a threshold needs the dataset's two labels to know what foreground is
    with pytest.raises(SamnnuError, match="threshold needs"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", reference_threshold=128)
