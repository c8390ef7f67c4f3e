"""Training from sparse labels: no leakage through augmentation, a masked loss, planning notes, dense predictions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import use_data_root

IGNORE = 3


def _augment(get_transforms, seg: np.ndarray, draws: int, seed: int = 0) -> list[np.ndarray]:
    """Labels after ``draws`` runs of the 2D training augmentation (rotation, scaling, mirroring ...)."""
    from math import pi

    transforms = get_transforms((40, 40), (-pi, pi), None, (0, 1), False, ignore_label=IGNORE)
    torch.manual_seed(seed)
    np.random.seed(seed)
    image = torch.rand(1, 48, 48)
    out = []
    for _ in range(draws):
        result = transforms(image=image.clone(), segmentation=torch.from_numpy(seg.copy()))
        out.append(result["segmentation"].numpy())
    return out


@pytest.mark.parametrize("trainer", ["SAMedLoRATrainer", "SAM3DAdapterTrainer", "nnSAMTrainer"])
def test_augmentation_never_invents_labels_where_nothing_was_annotated(trainer):
    """Voxels from outside the image (padding, rotation, zoom-out) stay ignored in samnnu's trainers; with
    nnU-Net's own transforms they become background, a label nobody drew."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from samnnu.pipeline.training import get_trainer_class

    cls = get_trainer_class(trainer)
    unannotated = np.full((1, 48, 48), IGNORE, dtype=np.int16)
    ours = _augment(cls.get_training_transforms, unannotated, draws=60)
    assert all((seg == IGNORE).all() for seg in ours)
    theirs = _augment(nnUNetTrainer.get_training_transforms, unannotated, draws=60)
    assert any((seg == 0).any() for seg in theirs)  # the draws did bring in outside voxels
    # an annotated band: a label only ever appears where the band (moved by the same transform) was drawn
    band = unannotated.copy()
    band[0, 20:28, :] = 0
    band[0, 22:26, 10:30] = 1
    for seg in _augment(cls.get_training_transforms, band, draws=60, seed=1):
        assert set(np.unique(seg).tolist()) <= {0, 1, IGNORE}
        assert np.count_nonzero(seg != IGNORE) <= 2.5 * 8 * 48  # at most the band, scaled by up to 1.4 (and rotated)


@pytest.fixture(scope="module")
def sparse_root(prepared_root, tmp_path_factory) -> Path:
    """A data root with the demo hippocampus and its sparse twin (3 slices per volume), planned (tiny) and
    preprocessed (2d)."""
    from samnnu.dataset_conversion.sparse import make_sparse_dataset
    from samnnu.pipeline.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("sparse_root")
    shutil.copytree(prepared_root / "nnUNet_raw", root / "nnUNet_raw")
    with pytest.MonkeyPatch.context() as mp:
        use_data_root(mp, root)
        make_sparse_dataset(4, 44, slices=3)
        plan_and_preprocess(44, encoder="tiny", configurations=("2d",), device_type="cpu", device_memory_gb=8)
    return root


@pytest.mark.slow
def test_sparse_dataset_is_planned_trained_with_a_masked_loss_and_predicted_densely(sparse_root, monkeypatch,
                                                                                    tmp_path, capsys):
    from samnnu.pipeline.planning import summarize_plans
    from samnnu.pipeline.prediction import predict
    from samnnu.pipeline.training import train

    use_data_root(monkeypatch, sparse_root)
    name = "Dataset044_HippocampusSparse3"
    plans = json.loads((sparse_root / "nnUNet_preprocessed" / name / "samnnuPlans.json").read_text())
    note = plans["samnnu"]["sparse_annotations"]
    assert note["ignore_label"] == IGNORE and 0.03 < note["annotated_fraction"] < 0.2
    assert "sparse annotations:" in summarize_plans(plans)
    # labels converted with --sparse carry no record of how they were made: the planner counts
    from samnnu.plans.samnnu_planner import SAMnnUPlanner

    planner = SAMnnUPlanner(44, encoder="tiny")
    del planner.dataset_json["samnnu_sparse"]
    counted = planner.sparse_annotations()
    assert counted["ignore_label"] == IGNORE and counted["annotated_fraction"] == pytest.approx(
        note["annotated_fraction"], rel=0.3)

    result = train(44, 0, epochs=1, iters_per_epoch=2, mirroring=False, device="cpu", return_trainer=True)
    trainer = result["trainer_object"]
    assert trainer.label_manager.ignore_label == IGNORE and trainer.label_manager.num_segmentation_heads == 3
    # the loss leaves ignored voxels out: logits there do not change it, logits elsewhere do
    target = torch.full((2, 1, 16, 16), IGNORE)
    target[:, :, 4:8] = torch.randint(0, 3, (2, 1, 4, 16))
    logits = torch.randn(2, 3, 16, 16)
    changed = logits.clone()
    changed[:, :, 10:] += 5 * torch.randn(2, 3, 6, 16)
    loss = trainer.loss
    assert torch.isclose(loss(logits, target), loss(changed, target))
    changed[:, 0, 5] += 5  # one class only (a shift of every class leaves the softmax alone)
    assert not torch.isclose(loss(logits, target), loss(changed, target))
    evaluation = json.loads(Path(result["evaluation"]).read_text())
    assert set(evaluation["mean"]) == {"Anterior", "Posterior"}  # the ignore label is no class
    assert (Path(result["fold_dir"]) / "report.html").is_file()

    # prediction is dense: every voxel gets a class, never the ignore label
    case = json.loads((sparse_root / "nnUNet_preprocessed" / name / "splits_final.json").read_text())[0]["val"][0]
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy2(sparse_root / "nnUNet_raw" / name / "imagesTr" / f"{case}_0000.nii.gz", images)
    predict(images, tmp_path / "out", 44, folds=(0,), device="cpu", mirroring=False)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz")))
    assert set(np.unique(predicted).tolist()) <= {0, 1, 2}
