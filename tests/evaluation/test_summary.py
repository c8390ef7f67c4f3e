"""samnnu_summarize on real trained folds of the tiny model plus plain nnU-Net-style model folders built
here from the reference segmentations (so their Dice is known)."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL
from samnnu.cli import summarize_main
from samnnu.errors import SamnnuError
from samnnu.reporting.summary import summarize

DATASET = "Dataset004_Hippocampus"
PERFECT = "nnUNetTrainer__nnUNetPlans__2d"       # validation = the references: Dice 1
ANTERIOR = "nnUNetTrainerA__nnUNetPlans__2d"     # keeps only label 1
POSTERIOR = "nnUNetTrainerB__nnUNetPlans__2d"    # keeps only label 2


class Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h2, self.pre, self.rows, self._tag = [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "pre", "td", "th"):
            self._tag = tag
            if tag in ("h2", "pre"):
                getattr(self, tag).append("")
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        self._tag = None

    def handle_data(self, data):
        if self._tag in ("h2", "pre"):
            getattr(self, self._tag)[-1] += data
        elif self._tag in ("td", "th"):
            self.rows[-1][-1] += data


def fake_nnunet_model(results: Path, name: str, keep: set[int] | None, probabilities: bool = False) -> Path:
    """A plain nnU-Net model folder: folds 0 and 1 with validation/ predictions (the references with only
    the labels in ``keep``), nnU-Net's validation/summary.json marker, plans.json and dataset.json; with
    ``probabilities`` also CASE.npz/CASE.pkl whose argmax is the full reference (so an ensemble is perfect)."""
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    tiny = results / DATASET / TINY_MODEL
    model = results / DATASET / name
    for f in ("plans.json", "dataset.json"):
        (model).mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny / f, model / f)
    gt = results.parent / "nnUNet_preprocessed" / DATASET / "gt_segmentations"
    for fold in (0, 1):
        val = model / f"fold_{fold}" / "validation"
        val.mkdir(parents=True, exist_ok=True)
        for p in (tiny / f"fold_{fold}" / "validation").glob("*.nii.gz"):
            img = sitk.ReadImage(str(gt / p.name))
            arr = sitk.GetArrayFromImage(img)
            if keep is not None:
                arr = np.where(np.isin(arr, list(keep)), arr, 0).astype(arr.dtype)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            sitk.WriteImage(out, str(val / p.name))
            if probabilities:
                seg, props = SimpleITKIO().read_seg(str(gt / p.name))
                full = np.eye(3, dtype=np.float32)[seg[0].astype(int)].transpose(3, 0, 1, 2)
                own = np.eye(3, dtype=np.float32)[arr.astype(int)].transpose(3, 0, 1, 2)
                np.savez_compressed(val / p.name.replace(".nii.gz", ".npz"), probabilities=0.6 * full + 0.4 * own)
                save_pickle(props, str(val / p.name.replace(".nii.gz", ".pkl")))
        (val / "summary.json").write_text("{}")
    return model


def fold_dice(model_dir: Path, fold: int) -> dict:
    return json.loads((model_dir / f"fold_{fold}" / "evaluation.json").read_text())


@pytest.mark.slow
def test_summarize_models_and_ranking(trained_folds, data_root, tmp_path, capsys):
    results = data_root / "nnUNet_results"
    perfect = fake_nnunet_model(results, PERFECT, keep=None)
    unfinished = results / DATASET / "nnUNetTrainerX__nnUNetPlans__2d" / "fold_0" / "validation"
    unfinished.mkdir(parents=True, exist_ok=True)
    try:
        out = tmp_path / "summary"
        assert summarize_main(["-d", "4", "-o", str(out)]) == 0
        printed = capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

        models = {m["name"]: m for m in summary["models"]}
        assert set(models) == {TINY_MODEL, PERFECT}  # the unfinished model is left out, with a note
        assert any("nnUNetTrainerX" in n and "left out" in n for n in summary["notes"])
        tiny = models[TINY_MODEL]
        assert tiny["folds"] == [0, 1] and tiny["n_folds"] == 2
        evals = [fold_dice(trained_folds, k) for k in (0, 1)]
        for cls in ("Anterior", "Posterior"):
            expected = np.mean([e["mean"][cls]["dice"] for e in evals])
            assert tiny["dice"][cls]["mean"] == pytest.approx(expected)
        fg = np.mean([e["foreground_mean"]["dice"] for e in evals])
        assert tiny["foreground_dice"]["mean"] == pytest.approx(fg)
        assert [f["source"] for f in tiny["per_fold"]] == ["evaluation.json"] * 2
        # the plain nnU-Net model was evaluated here from its validation/ folder
        assert models[PERFECT]["foreground_dice"]["mean"] == pytest.approx(1.0)
        assert all("evaluated validation" in f["source"] for f in models[PERFECT]["per_fold"])
        assert (out / "evaluations" / PERFECT / "fold_0.json").is_file()

        assert [r["name"] for r in summary["ranking"]] == [PERFECT, TINY_MODEL]
        assert summary["ensembles_considered"] == []
        assert any("probabilities missing" in n for n in summary["notes"])
        command = ("samnnu_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d Dataset004_Hippocampus -f 0 1 "
                   "-tr nnUNetTrainer -c 2d -p nnUNetPlans")
        assert summary["best"]["name"] == PERFECT and summary["best"]["predict_command"] == command
        assert command in printed

        page = Tables()
        page.feed((out / "summary.html").read_text())
        assert page.h2 == ["Best model", "Ranking", "Models", "Notes"]
        assert page.pre == [command]
        tiny_fg_row = [r for r in page.rows if r and r[0] == "foreground (mean of classes)"]
        assert f"{fg:.4f}" in [c for row in tiny_fg_row for c in row]
        ranking_rows = [r for r in page.rows if len(r) == 5 and r[0] in ("1", "2")]
        assert [r[1] for r in ranking_rows] == [PERFECT, TINY_MODEL]
        assert "http://" not in (out / "summary.html").read_text()
    finally:
        shutil.rmtree(perfect)
        shutil.rmtree(unfinished.parent.parent)


@pytest.mark.slow
def test_summarize_ensemble_wins(trained_folds, data_root, tmp_path):
    """Two models that each find one class; with probabilities their ensemble is perfect and is chosen."""
    results = data_root / "nnUNet_results"
    a = fake_nnunet_model(results, ANTERIOR, keep={1}, probabilities=True)
    b = fake_nnunet_model(results, POSTERIOR, keep={2}, probabilities=True)
    try:
        summary = summarize(4, output_dir=tmp_path / "s")
        name = f"ensemble___{ANTERIOR}___{POSTERIOR}"
        assert summary["ensembles_considered"] == [name]
        assert summary["ranking"][0]["name"] == name
        assert summary["ranking"][0]["foreground_dice_mean"] == pytest.approx(1.0)
        models = {m["name"]: m for m in summary["models"]}
        assert models[ANTERIOR]["dice"]["Anterior"]["mean"] == pytest.approx(1.0)
        assert models[ANTERIOR]["dice"]["Posterior"]["mean"] == pytest.approx(0.0)
        # the tiny model has no probabilities: its pairs are not ensembled, and that is said
        assert any(TINY_MODEL in n and "probabilities missing" in n for n in summary["notes"])
        command = summary["best"]["predict_command"]
        assert "nnUNetv2_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER" in command
        assert "-tr nnUNetTrainerA -c 2d -p nnUNetPlans --save_probabilities" in command
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


def test_summarize_without_trained_folds(tmp_path, monkeypatch, capsys):
    from conftest import use_data_root

    paths = use_data_root(monkeypatch, tmp_path)
    (paths.raw / "Dataset009_Empty").mkdir()
    with pytest.raises(SamnnuError, match="no trained folds"):
        summarize(9)
    assert summarize_main(["-d", "9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("samnnu_summarize: error: ") and "Traceback" not in err


def test_printed_predict_commands_carry_the_chosen_data_root():
    from samnnu.evaluation.summary import predict_commands

    best = {"kind": "model", "folds": [0, 1], "trainer": "T", "configuration": "2d", "plans": "P"}
    assert predict_commands("D", best, {}) == "samnnu_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d D -f 0 1 -tr T -c 2d -p P"
    assert predict_commands("D", best, {}, "/data/my root").endswith(" -p P --data-root '/data/my root'")
    pair = {"kind": "ensemble", "folds": [0], "members": ["a", "b"]}
    models = {m: {"trainer": "T", "configuration": "2d", "plans": "P"} for m in "ab"}
    lines = predict_commands("D", pair, models, "/data/root").splitlines()
    assert lines[1] == ("export nnUNet_raw=/data/root/nnUNet_raw nnUNet_preprocessed=/data/root/nnUNet_preprocessed "
                        "nnUNet_results=/data/root/nnUNet_results")
    assert lines[-1].startswith("nnUNetv2_ensemble")
