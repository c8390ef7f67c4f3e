"""samnnu_predict split into parts (--num-parts/--part-id), as nnUNetv2_predict splits work across machines."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import demo_cases
from samnnu.cli import predict_main
from samnnu.defaults import DEFAULT_TRAINER
from samnnu.demo_data import demo_dataset_path
from samnnu.errors import SamnnuError


def _cases(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True)
    names = demo_cases()[-n:]
    for case in names:
        shutil.copy2(demo_dataset_path() / "images" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
    return names


@pytest.mark.slow
def test_parts_cover_every_case_exactly_once(trained_folds, data_root, tmp_path, monkeypatch):
    from samnnu.pipeline import prediction

    names = _cases(tmp_path / "in", 5)
    out = tmp_path / "out"
    predicted: dict[int, list[str]] = {}
    original = prediction._run_model

    def recording(model, cases, work, probabilities):
        predicted.setdefault(part, []).extend(cases)
        assert work.name == f".samnnu_partial.part{part}of3"  # each part keeps its own raw predictions
        return original(model, cases, work, probabilities)

    monkeypatch.setattr(prediction, "_run_model", recording)
    for part in (2, 0, 1):  # any order; in practice at the same time, on several machines
        written = prediction.predict(tmp_path / "in", out, 4, trainer=DEFAULT_TRAINER, configuration="2d",
                                     mirroring=False, num_parts=3, part_id=part)
        assert sorted(p.name for p in written) == sorted(f"{c}.nii.gz" for c in predicted[part])
    every = [c for part in predicted.values() for c in part]
    assert sorted(every) == sorted(names) and len(every) == len(set(every))
    assert predicted[0] == sorted(names)[0::3] and predicted[1] == sorted(names)[1::3]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}.nii.gz" for c in names)  # no records left


@pytest.mark.parametrize("argv,expected", [
    (["--num-parts", "0"], "--num-parts: must be at least 1, got 0"),
    (["--num-parts", "2", "--part-id", "2"], "--part-id 2 must be one of 0 .. 1"),
    (["--part-id", "-1"], "--part-id -1 must be one of 0 .. 0"),
])
def test_bad_parts_are_one_line_errors(tmp_path, capsys, argv, expected):
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "4", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_bad_parts_refused_by_the_api(tmp_path):
    from samnnu.pipeline.prediction import predict

    with pytest.raises(SamnnuError, match="part 3 of 3"):
        predict(tmp_path, tmp_path / "out", 4, num_parts=3, part_id=3)


def test_2d_inputs_group_channel_files_only_when_they_run_from_0000(tmp_path):
    """CASE_0000.png (+ _0001 ...) is one case's channels; IMG_0001.jpg, IMG_0002.jpg or a lone
    scan_0001.jpg are cases of their own, named as the file (as samnnu_convert names them)."""
    from PIL import Image

    from samnnu.pipeline.prediction import collect_2d_cases

    rgb = np.zeros((8, 8, 3), np.uint8)
    for name in ("CASE_0000.png", "IMG_0001.jpg", "IMG_0002.jpg", "scan_0001.jpg", "plain.bmp"):
        Image.fromarray(rgb).save(tmp_path / name)
    cases = collect_2d_cases(tmp_path, 3)
    assert {c: [p.name for p in ps] for c, ps in cases.items()} == {
        "CASE": ["CASE_0000.png"], "IMG_0001": ["IMG_0001.jpg"], "IMG_0002": ["IMG_0002.jpg"],
        "scan_0001": ["scan_0001.jpg"], "plain": ["plain.bmp"]}
    # three grey channel files are one 3-channel case; a grey photo for an RGB model is refused, named
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(grey / f"g_{i:04d}.png")
    assert [p.name for p in collect_2d_cases(grey, 3)["g"]] == ["g_0000.png", "g_0001.png", "g_0002.png"]
    with pytest.raises(SamnnuError, match="case 'g' holds 3 channel"):
        collect_2d_cases(grey, 1)


def test_bf16_prediction_without_native_bfloat16_is_refused(trained_folds, data_root, tmp_path, monkeypatch, capsys):
    """samnnu_predict --precision bf16 on a CPU that would emulate bfloat16: a one-line error naming the problem,
    before anything is predicted or written."""
    import samnnu.pipeline.inference as inference

    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda: False)
    _cases(tmp_path / "in", 1)
    argv = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "4", "-tr", DEFAULT_TRAINER, "-c", "2d",
            "--device", "cpu", "--precision", "bf16", "--data-root", str(data_root)]
    assert predict_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bfloat16 natively" in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_resumes_only_with_the_same_precision(trained_folds, data_root, monkeypatch):
    """The resume record tells fp32 and bf16 runs apart: their probabilities differ, so one never completes the other."""
    import samnnu.pipeline.inference as inference
    from samnnu.pipeline.prediction import _open_model, _run_signature

    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda: True)
    signatures = [_run_signature(_open_model(4, folds=(0,), trainer=DEFAULT_TRAINER, configuration="2d", plans=None,
                                             device="cpu", checkpoint="checkpoint_final.pth", mirroring=False,
                                             postprocess=False, precision=precision), None, False, "litemedsam", None)
                  for precision in ("fp32", "fp32", "bf16")]
    assert signatures[0] == signatures[1] != signatures[2]
