"""The fold report from a real evaluation of tiny synthetic files."""
import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import SimpleITK as sitk

from samnnu.defaults import DEFAULT_TRAINER
from samnnu.evaluation.folders import evaluate_folders
from samnnu.reporting.report import SECTIONS, pick_cases, write_fold_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h2, self.images, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.h2[-1] += data


def write_image(path, arr, spacing=(1.0, 1.0, 2.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def fold(tmp_path):
    """Three cases: organ (1) shifted by 0, 1 and 2 slices; lesion (2) found only in case_0."""
    dirs = {k: tmp_path / k for k in ("ref", "pred", "images", "fold_0")}
    for d in dirs.values():
        d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        ref = np.zeros((10, 16, 16), np.uint8)
        ref[2:6, 4:12, 4:12] = 1
        ref[3:5, 1:3, 1:3] = 2
        pred = np.zeros_like(ref)
        pred[2 + i : 6 + i, 4:12, 4:12] = 1
        if i == 0:
            pred[3:5, 1:3, 1:3] = 2
        image = (ref * 100 + rng.normal(0, 10, ref.shape)).astype(np.float32)
        write_image(dirs["ref"] / f"case_{i}.nii.gz", ref)
        write_image(dirs["pred"] / f"case_{i}.nii.gz", pred)
        write_image(dirs["images"] / f"case_{i}_0000.nii.gz", image)
    return dirs


def test_fold_report(fold):
    evaluation = evaluate_folders(fold["ref"], fold["pred"], labels={"background": 0, "organ": 1, "lesion": 2})
    assert pick_cases(evaluation, ["organ", "lesion"]) == {"best": "case_0", "median": "case_1", "worst": "case_2"}
    training = {
        "train_losses": [-0.2, -0.5, -0.7],
        "val_losses": [-0.1, -0.4, None],
        "dice_per_class_or_region": [[0.2, 0.1], [0.5, 0.3], [0.8, 0.6]],
        "ema_fg_dice": [0.15, 0.25, 0.4],
        "epoch_start_timestamps": [100.0, 112.0, 125.0],
        "epoch_end_timestamps": [110.0, 124.0, 136.0],
    }
    plans = {"configuration": "3d_fullres", "spacing": [2.0, 1.0, 1.0], "patch_size": [8, 64, 64],
             "sam_input_size": 256, "encoder": "tiny", "trainer": "samnnuTrainer", "trainable_parameters": 123456}
    extra = {"device": "cpu", "inference_time_per_case_s": {"case_0": 1.5, "case_1": 2.5, "case_2": 2.0}}
    report = write_fold_report(
        fold["fold_0"], evaluation, plans_summary=plans, training=training,
        val_pred_dir=fold["pred"], val_ref_dir=fold["ref"], images_dir=fold["images"], extra=extra,
    )
    on_disk = json.loads((fold["fold_0"] / "report.json").read_text())
    assert on_disk == report
    assert report["cases_shown"]["worst"]["case"] == "case_2"
    # case_2: organ shifted 2 of 4 slices -> dice 0.5; lesion missed -> 0
    assert report["cases_shown"]["worst"]["mean_fg_dice"] == pytest.approx(0.25)
    assert report["training_summary"]["training_time_s"] == 36.0
    assert report["training_summary"]["mean_epoch_time_s"] == pytest.approx((10 + 12 + 11) / 3)
    assert report["training_summary"]["best_ema_fg_dice_epoch"] == 2
    assert report["evaluation"]["mean"]["organ"]["dice"] == pytest.approx((1 + 0.75 + 0.5) / 3)
    assert report["evaluation"]["per_case"]["case_1"]["lesion"]["hd95"] is None
    assert report["training"]["val_losses"][2] is None

    text = (fold["fold_0"] / "report.html").read_text()
    parser = ReportParser()
    parser.feed(text)
    assert parser.h2 == list(SECTIONS)
    assert "samnnuTrainer" in text and "123,456" in text and "3d_fullres" in text
    assert "case_2" in text and "cpu" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched when viewed offline
    # 3 training figures + 7 per-metric plots + 3 overlays
    assert len(parser.images) == 13
    from PIL import Image

    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == PNG_SIGNATURE
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
    import matplotlib.image

    first = matplotlib.image.imread(io.BytesIO(base64.b64decode(parser.images[0].split(",", 1)[1])), format="png")
    assert first.ndim == 3 and first.shape[0] > 100


def test_report_with_one_epoch_and_missing_keys(fold):
    evaluation = evaluate_folders(fold["ref"], fold["pred"], labels={"organ": 1})
    report = write_fold_report(
        fold["fold_0"], evaluation, plans_summary={}, training={"train_losses": [0.9]},
        val_pred_dir=fold["pred"], val_ref_dir=fold["ref"],
    )
    assert report["training_summary"] == {"epochs_logged": 1, "final_train_loss": 0.9}
    assert report["extra"] == {}
    parser = ReportParser()
    parser.feed((fold["fold_0"] / "report.html").read_text())
    assert parser.h2 == list(SECTIONS)
    # 1 loss figure + 7 metric plots + 3 overlays over the label maps
    assert len(parser.images) == 11
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == PNG_SIGNATURE for s in parser.images)
    assert not [p for p in fold["fold_0"].iterdir() if p.name.endswith(".tmp")]


def test_render_fold_report_from_disk(trained_folds, data_root, capsys):
    """samnnu_report rebuilds a real fold's report from its files; every section, every image decodes."""
    import torch

    from samnnu.cli import report_main

    fold_dir = trained_folds / "fold_0"
    before = json.loads((fold_dir / "report.json").read_text())
    (fold_dir / "report.html").unlink()
    assert report_main([str(fold_dir)]) == 0
    assert str(fold_dir / "report.html") in capsys.readouterr().out
    report = json.loads((fold_dir / "report.json").read_text())
    evaluation = json.loads((fold_dir / "evaluation.json").read_text())
    logging = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert report["evaluation"]["mean"] == evaluation["mean"]
    assert report["training"]["train_losses"] == pytest.approx(logging["train_losses"])
    # the chain's plans summary (parameter counts) is kept; plans.json adds the labels
    assert {k: report["plans_summary"][k] for k in before["plans_summary"]} == before["plans_summary"]
    assert report["plans_summary"]["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert report["extra"] == before["extra"]
    assert report["images_dir"] == before["images_dir"]

    text = (fold_dir / "report.html").read_text()
    parser = ReportParser()
    parser.feed(text)
    assert parser.h2 == list(SECTIONS)
    assert DEFAULT_TRAINER in text and "tiny" in text
    # loss, pseudo Dice, epoch time + per-case plots (at least Dice, IoU, surface Dice, volumes) + 3 overlays
    assert len(parser.images) >= 3 + 5 + 3
    from PIL import Image

    for src in parser.images:
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            assert im.width >= 250 and im.height >= 150
    # the overlays are drawn over the image (raw imagesTr found), not over the label map
    assert "over the image" in text


def test_render_fold_report_errors(tmp_path, capsys):
    from samnnu.cli import report_main

    assert report_main([str(tmp_path / "missing")]) == 1
    assert "fold folder not found" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluation.json: missing" in err
