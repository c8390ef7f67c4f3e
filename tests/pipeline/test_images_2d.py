"""2D RGB photos with JPEG masks, as a new user has them: convert (noisy masks), plan, train, predict
single-file RGB JPEG and PNG inputs, and get PNG masks in the values the user's masks store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import use_data_root

N_CASES = 10


def _photo_and_mask(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A reddish disc (the 'polyp') on a textured pinkish background; the mask is 0/255."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(18, size - 18, 2).tolist() + [int(rng.integers(8, 14))]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    photo = np.stack([150 + 30 * rng.random((size, size)), 90 + 30 * rng.random((size, size)),
                      110 + 30 * rng.random((size, size))], axis=-1)
    photo[disc] = [210, 60, 50]
    return photo.astype(np.uint8), (disc * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def polyp_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("polyps")
    rng = np.random.default_rng(7)
    for sub in ("images", "masks", "new"):
        (root / sub).mkdir()
    for i in range(N_CASES):
        photo, mask = _photo_and_mask(rng)
        Image.fromarray(photo).save(root / "images" / f"polyp{i:02d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"polyp{i:02d}.jpg", quality=75)  # noisy 0/255
    for i in range(2):  # unseen photos, one JPEG and one PNG, in different sizes
        photo, _ = _photo_and_mask(rng, size=64 + 16 * i)
        Image.fromarray(photo).save(root / "new" / (f"new{i}.jpg" if i == 0 else f"new{i}_0000.png"))
    return root


@pytest.mark.slow
def test_rgb_jpeg_photos_with_jpeg_masks_from_conversion_to_viewable_predictions(polyp_folders, tmp_path, monkeypatch,
                                                                                capsys):
    from samnnu.cli import convert_main, predict_main
    from samnnu.pipeline.planning import plan_and_preprocess
    from samnnu.pipeline.training import train

    data = tmp_path / "data"
    use_data_root(monkeypatch, data)
    masks = [np.asarray(Image.open(p)) for p in sorted((polyp_folders / "masks").glob("*.jpg"))]
    noisy = sum(int(np.count_nonzero((m != 0) & (m != 255))) for m in masks)
    assert noisy > 0  # JPEG really made the masks noisy
    assert convert_main(["folder", str(polyp_folders / "images"), str(polyp_folders / "masks"), "-d", "501",
                         "-n", "Polyp", "--labels", "background=0,polyp=255", "--mask-threshold", "128",
                         "--data-root", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"converted {N_CASES} cases" in out and "mask threshold 128:" in out
    changed = int(out.split("mask threshold 128: ")[1].split(" pixel")[0])
    assert changed == sum(int(np.count_nonzero(np.where(m >= 128, 255, 0) != m)) for m in masks)
    raw = data / "nnUNet_raw" / "Dataset501_Polyp"
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "polyp": 1} and ds["samnnu_stored_label_values"] == {
        "background": 0, "polyp": 255}
    assert ds["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    for label in (raw / "labelsTr").glob("*.png"):
        assert set(np.unique(np.asarray(Image.open(label))).tolist()) == {0, 1}

    plan_and_preprocess(501, encoder="tiny", configurations=("2d",), device_type="cpu", device_memory_gb=8)
    result = train(501, 0, epochs=1, iters_per_epoch=2, mirroring=False, device="cpu")
    # the fold report fits photos: pixel units, no slices, and the photo (not grey) under the contours
    report = Path(result["report"]).read_text()
    assert "HD95 (px)" in report and "HD95 (mm)" not in report and "axial" not in report
    import base64
    import io
    import re

    overlays = [m for m in re.findall(r'<figure><img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', report)
                if m[1].startswith(("best case", "median case", "worst case"))]
    assert len(overlays) == 3
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlays[0][0]))).convert("RGB")).astype(int)
    pinkish = (np.abs(rgb - [165, 105, 125]) <= 25).all(-1)  # the photos' background colour
    assert pinkish.sum() > 500, "the overlay does not show the photo"

    # the converter's own single-file RGB PNGs (CASE_0000.png), and unseen JPEG/PNG photos, predict as they are
    before = {p.name: p.read_bytes() for p in (polyp_folders / "new").iterdir()}
    for inputs in (raw / "imagesTr", polyp_folders / "new"):
        pred = tmp_path / f"pred_{inputs.name}"  # pred_imagesTr, pred_new
        assert predict_main(["-i", str(inputs), "-o", str(pred), "-d", "501", "-f", "0", "--disable-tta",
                             "--overlay", "--data-root", str(data)]) == 0, capsys.readouterr().err
        written = sorted(p.name for p in pred.iterdir() if p.is_file() and not p.name.startswith("."))
        if inputs.name == "new":
            assert written == ["new0.png", "new1.png"]
            sizes = {"new0.png": (64, 64), "new1.png": (80, 80)}
        else:
            assert len(written) == N_CASES
            sizes = {n: (64, 64) for n in written}
        for name in written:
            mask = np.asarray(Image.open(pred / name))
            assert mask.shape == sizes[name]  # one value per pixel, the photo's size
            assert set(np.unique(mask).tolist()) <= {0, 255}  # the user's stored values, visible in a viewer
            # the overlay is the photo itself wherever nothing was predicted, tinted where something was
            source = next(p for p in inputs.iterdir() if p.name.split(".")[0].removesuffix("_0000") == name[:-4])
            photo = np.asarray(Image.open(source).convert("RGB"))
            overlay = np.asarray(Image.open(pred / "overlays" / name))
            assert overlay.shape == photo.shape
            assert np.array_equal(overlay[mask == 0], photo[mask == 0])
            assert not np.any(np.all(overlay[mask != 0] == photo[mask != 0], axis=-1))
    assert {p.name: p.read_bytes() for p in (polyp_folders / "new").iterdir()} == before  # inputs untouched
    # the user's own JPEG masks are the references: matched by case name, thresholded as at conversion
    from samnnu.cli import evaluate_main

    capsys.readouterr()
    assert evaluate_main(["--reference", str(polyp_folders / "masks"), "--prediction", str(tmp_path / "pred_imagesTr"),
                          "-d", "501", "--mask-threshold", "128", "--data-root", str(data),
                          "-o", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["n_cases"] == N_CASES and 0 <= evaluation["mean"]["polyp"]["dice"] <= 1


@pytest.mark.slow
def test_demo_2d_runs_on_the_shipped_photos(tmp_path, monkeypatch):
    from samnnu.demo import run_demo_2d
    from samnnu.demo_data import demo_photos_path

    use_data_root(monkeypatch, tmp_path / "unused")  # restores the environment run_demo_2d sets
    before = {p.name: p.read_bytes() for p in (demo_photos_path() / "images").iterdir()}
    result = run_demo_2d(str(tmp_path / "demo"), iterations=2, encoder="tiny", device="cpu")
    assert set(result["dice"]) == {"polyp"} and 0 <= result["dice"]["polyp"] <= 1
    written = sorted(Path(result["predictions"]).glob("*.png"))
    assert written and all(set(np.unique(np.asarray(Image.open(p))).tolist()) <= {0, 255} for p in written)
    assert Path(result["report"]).is_file()
    assert {p.name: p.read_bytes() for p in (demo_photos_path() / "images").iterdir()} == before
