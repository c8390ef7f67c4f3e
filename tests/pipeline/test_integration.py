"""The whole chain on the shipped hippocampus demo data with the tiny encoder, on the CPU:
convert -> plan and preprocess (conftest.py) -> train one fold (1 epoch of 3 iterations) with the
fixed chain (validation, postprocessing, evaluation, report) -> predict raw images -> evaluate;
plus the console entry points' one-line errors and resuming a finished training."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import demo_cases, use_data_root
from samnnu.cli import predict_main, train_main
from samnnu.defaults import DEFAULT_TRAINER
from samnnu.demo_data import demo_dataset_path

DATASET = "Dataset004_Hippocampus"
MODEL = f"{DEFAULT_TRAINER}__samnnuPlans__2d"
BUDGET = dict(epochs=1, iters_per_epoch=3, device="cpu", mirroring=False)


@pytest.fixture(scope="module")
def trained(prepared_root) -> dict:
    """Fold 0 trained on the prepared demo subset, with the chain run; returns train()'s result."""
    from samnnu.pipeline.training import train

    with pytest.MonkeyPatch.context() as mp:
        use_data_root(mp, prepared_root)
        return train(4, 0, **BUDGET)


@pytest.fixture(scope="module")
def raw_inputs(tmp_path_factory, demo_subset) -> tuple[Path, Path]:
    """(images, labels): two demo cases not used in training, as CASE.nii.gz (no _0000 suffix).

    The second case is given an unusual geometry (anisotropic spacing, shifted origin, rotated
    direction), image and label alike, so that restoring the input grid is really exercised.
    """
    _, used = demo_subset
    held_out = [c for c in demo_cases() if c not in used][:2]
    root = tmp_path_factory.mktemp("raw_inputs")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    src = demo_dataset_path()
    for case in held_out:
        shutil.copy2(src / "images" / f"{case}.nii.gz", images / f"{case}.nii.gz")
        shutil.copy2(src / "labels" / f"{case}.nii.gz", labels / f"{case}.nii.gz")
    case = held_out[1]
    c, s = np.cos(0.3), np.sin(0.3)
    for folder in (images, labels):
        image = sitk.ReadImage(str(folder / f"{case}.nii.gz"))
        image.SetSpacing((1.3, 0.8, 2.0))
        image.SetOrigin((12.5, -40.0, 7.25))
        image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(image, str(folder / f"{case}.nii.gz"), useCompression=True)
    return images, labels


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_same_grid_and_labels(pred_dir: Path, images: Path) -> None:
    """Every input has a prediction of the same name on exactly the input's grid, with labels 0, 1, 2."""
    inputs = sorted(p.name for p in images.iterdir())
    assert sorted(p.name for p in pred_dir.iterdir()) == inputs  # no temporary files left behind
    for name in inputs:
        image, pred = sitk.ReadImage(str(images / name)), sitk.ReadImage(str(pred_dir / name))
        assert pred.GetSize() == image.GetSize(), name
        assert pred.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-6), name
        assert pred.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-6), name
        assert pred.GetDirection() == pytest.approx(image.GetDirection(), abs=1e-6), name
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2}, name


def one_line_error(capsys, prog: str) -> str:
    """The single ``<prog>: error: ...`` line a failing command printed to stderr (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------
# nnU-Net finds samnnu's trainer by name
# --------------------------------------------------------------------------------------------
def test_nnunet_finds_trainer_through_ext_trainer(tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError):  # nnU-Net alone does not know it
        recursive_find_trainer_class_by_name("SAMedLoRATrainer")
    use_data_root(monkeypatch, tmp_path)
    cls = recursive_find_trainer_class_by_name("SAMedLoRATrainer")
    assert cls.__name__ == "SAMedLoRATrainer" and issubclass(cls, nnUNetTrainer)
    assert cls.lora_rank == 4 and hasattr(cls, "build_network_architecture")


# --------------------------------------------------------------------------------------------
# training and the fixed chain
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_runs_the_chain(trained, data_root):
    fold_dir = data_root / "nnUNet_results" / DATASET / MODEL / "fold_0"
    assert Path(trained["fold_dir"]) == fold_dir
    assert (fold_dir / "checkpoint_final.pth").is_file()
    settings = json.loads((fold_dir / "samnnu_training.json").read_text())
    assert settings["epochs"] == 1 and settings["iters_per_epoch"] == 3 and settings["mirroring"] is False

    split = json.loads((data_root / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())[0]
    val_files = sorted(f"{k}.nii.gz" for k in split["val"])
    assert sorted(p.name for p in (fold_dir / "validation").glob("*.nii.gz")) == val_files
    assert (fold_dir / "validation" / "postprocessing.pkl").is_file()

    evaluation = json.loads((fold_dir / "evaluation.json").read_text())
    assert sorted(f"{k}.nii.gz" for k in evaluation["per_case"]) == val_files
    assert set(trained["dice"]) == {"Anterior", "Posterior"}
    assert all(0.0 <= d <= 1.0 for d in trained["dice"].values())
    assert trained["dice"] == {k: v["dice"] for k, v in evaluation["mean"].items()}

    report = (fold_dir / "report.html").read_text()
    assert report.lstrip().lower().startswith("<!doctype html") and "Anterior" in report and "tiny" in report


def test_continue_after_finished_training_does_not_retrain(trained, data_root, capsys):
    from samnnu.pipeline.training import train

    fold_dir = Path(trained["fold_dir"])
    final = fold_dir / "checkpoint_final.pth"
    stamp = (final.stat().st_mtime_ns, hashlib.sha256(final.read_bytes()).hexdigest())
    capsys.readouterr()
    result = train(4, 0, continue_training=True, run_chain=False, **BUDGET)
    out = capsys.readouterr().out
    assert f"resuming from {final}" in out and "(epoch 1)" in out
    assert (final.stat().st_mtime_ns, hashlib.sha256(final.read_bytes()).hexdigest()) == stamp
    assert not (fold_dir / "checkpoint_latest.pth").exists() or \
        (fold_dir / "checkpoint_latest.pth").stat().st_mtime_ns <= stamp[0]
    assert result["train_seconds"] < 1.0 and "dice" not in result


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_restores_input_grid(trained, data_root, raw_inputs, tmp_path):
    from samnnu.evaluation.folders import evaluate_folders
    from samnnu.pipeline.prediction import predict

    images, labels = raw_inputs
    before = digest(images)
    out = tmp_path / "pred"
    written = predict(images, out, 4, folds=(0,), device="cpu")
    assert sorted(written) == sorted(out / p.name for p in images.iterdir())
    assert digest(images) == before, "inputs were modified"
    assert_same_grid_and_labels(out, images)

    evaluation = evaluate_folders(labels, out, dataset_json=data_root / "nnUNet_raw" / DATASET / "dataset.json")
    assert evaluation["n_cases"] == 2 and set(evaluation["per_case"]) == {p.name[:-7] for p in images.iterdir()}
    for per_class in evaluation["per_case"].values():
        assert set(per_class) == {"Anterior", "Posterior"}
        assert all(0.0 <= m["dice"] <= 1.0 for m in per_class.values())


@pytest.mark.slow
def test_predict_cli(trained, data_root, raw_inputs, tmp_path, capsys):
    images, _ = raw_inputs
    one = tmp_path / "in"
    one.mkdir()
    first = sorted(images.iterdir())[1]  # the case with the rotated, anisotropic grid
    shutil.copy2(first, one / first.name)
    out = tmp_path / "out"
    assert predict_main(["-i", str(one), "-o", str(out), "-d", "4", "-f", "0", "--device", "cpu",
                         "--disable-tta"]) == 0
    captured = capsys.readouterr()
    assert "wrote 1 segmentations" in captured.out
    # one progress bar over the cases, not nnU-Net's bars per volume (tiles) and per export
    assert "predicting: 100%" in captured.err and "1/1 [" in captured.err
    assert "tile" not in captured.err and "Collecting results" not in captured.err
    assert_same_grid_and_labels(out, one)


# --------------------------------------------------------------------------------------------
# one-line errors from the console entry points
# --------------------------------------------------------------------------------------------
def _two_channel_case(folder: Path) -> None:
    src = sorted((demo_dataset_path() / "images").glob("*.nii.gz"))[0]
    for ch in (0, 1):
        shutil.copy2(src, folder / f"case_{ch:04d}.nii.gz")


def _corrupt_case(folder: Path) -> None:
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI volume")


@pytest.mark.parametrize("problem,args,make_input,expected", [
    ("output == input", ["-o", "{in}"], None, "must differ from the input folder"),
    ("unknown dataset", ["-d", "999"], None, "unknown dataset ID 999"),
    ("unknown trainer", ["-tr", "NoSuchTrainer"], None, "no trained model for trainer NoSuchTrainer"),
    ("fold not trained", ["-f", "3"], None, "checkpoint missing (is fold 3 trained?)"),
    ("corrupt input", [], _corrupt_case, "broken.nii.gz: not a readable image"),
    ("2 channels for a 1-channel model", [], _two_channel_case, "case 'case' has channels [0, 1] but the model expects 1"),
], ids=["output-is-input", "unknown-dataset", "unknown-trainer", "fold-not-trained", "corrupt-input", "two-channels"])
def test_predict_cli_errors(trained, data_root, tmp_path, capsys, problem, args, make_input, expected):
    inp = tmp_path / "in"
    inp.mkdir()
    if make_input is None:
        shutil.copy2(sorted((demo_dataset_path() / "images").glob("*.nii.gz"))[-1], inp / "case.nii.gz")
    else:
        make_input(inp)
    out = tmp_path / "out"
    opts = {"-i": str(inp), "-o": str(out), "-d": "4", "-f": "0"}
    opts.update({flag: value.replace("{in}", str(inp)) for flag, value in zip(args[::2], args[1::2])})
    argv = [x for kv in opts.items() for x in kv] + ["--device", "cpu", "--disable-tta"]
    assert predict_main(argv) == 1, problem
    line = one_line_error(capsys, "samnnu_predict")
    assert expected in line, line
    assert not out.exists() or not any(out.iterdir()), "a failed prediction wrote output"


def test_train_cli_unknown_trainer(data_root, capsys):
    # -p: without it an unknown trainer defaults to nnUNetPlans, which this dataset has not been planned with
    assert train_main(["4", "0", "-tr", "NoSuchTrainer", "-p", "samnnuPlans", "--device", "cpu", "--epochs", "1"]) == 1
    line = one_line_error(capsys, "samnnu_train")
    assert "unknown trainer 'NoSuchTrainer'" in line
