"""The planner's decisions on synthetic datasets: hand-written nnU-Net fingerprints (so a 512 x 512 x 40
CT costs nothing) over a few tiny real image files (the intensity windows are computed from them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import use_data_root


def _props(lo: float, hi: float, mean: float, std: float) -> dict:
    return {"mean": mean, "median": mean, "std": std, "min": lo, "max": hi,
            "percentile_99_5": hi, "percentile_00_5": lo}


def make_dataset(root: Path, ident: int, name: str, *, n_cases: int, channels: dict, spacing, shape,
                 props: dict | None = None, two_d: bool = False, seed: int = 0) -> str:
    """Raw dataset of ``n_cases`` tiny images + a fingerprint claiming ``spacing``/``shape`` ((z, y, x))."""
    rng = np.random.default_rng(seed)
    dname = f"Dataset{ident:03d}_{name}"
    raw = root / "nnUNet_raw" / dname
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    ending = ".png" if two_d else ".nii.gz"
    for i in range(n_cases):
        case = f"case_{i:03d}"
        if two_d:
            from PIL import Image

            img = (rng.random((16, 16)) * 255).astype(np.uint8)
            Image.fromarray(img).save(raw / "imagesTr" / f"{case}_0000.png")
            seg = np.zeros((16, 16), np.uint8)
            seg[4:9, 4:9] = 1
            Image.fromarray(seg).save(raw / "labelsTr" / f"{case}.png")
            continue
        for c, cname in enumerate(channels.values()):
            scale = 1000.0 if cname == "CT" else 10.0 ** (i % 4)  # MRI: raw scales spread over 10^3
            arr = (rng.normal(0.3, 0.2, (8, 8, 8)) * scale).astype(np.float32)
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            sitk.WriteImage(img, str(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
        seg = np.zeros((8, 8, 8), np.uint8)
        seg[2:5, 2:5, 2:5] = 1
        lab = sitk.GetImageFromArray(seg)
        lab.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        sitk.WriteImage(lab, str(raw / "labelsTr" / f"{case}.nii.gz"))
    dataset_json = {"channel_names": channels, "labels": {"background": 0, "target": 1},
                    "numTraining": n_cases, "file_ending": ending}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    pre = root / "nnUNet_preprocessed" / dname
    pre.mkdir(parents=True)
    fingerprint = {
        "spacings": [list(spacing)] * n_cases,
        "shapes_after_crop": [list(shape)] * n_cases,
        "foreground_intensity_properties_per_channel": props or {
            str(c): _props(0.0, 1.0, 0.5, 0.2) for c in range(len(channels))},
        "median_relative_size_after_cropping": 1.0,
    }
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return dname


@pytest.fixture
def root(tmp_path, monkeypatch):
    use_data_root(monkeypatch, tmp_path)
    return tmp_path


def plan(ident: int, **kw) -> dict:
    from samnnu.plans.samnnu_planner import SAMnnUPlanner

    return SAMnnUPlanner(ident, **kw).plan_experiment()


@pytest.mark.slow
def test_anisotropic_ct_plans_2d_reduced_input_on_cpu_and_ct_window(root):
    ct = {"0": _props(-1000.0, 1500.0, 40.0, 200.0)}
    make_dataset(root, 11, "AnisoCT", n_cases=30, channels={"0": "CT"}, spacing=(5.0, 0.8, 0.8),
                 shape=(40, 512, 512), props=ct)
    cpu = plan(11, device_type="cpu", device_memory_gb=8)
    assert cpu["samnnu"]["recommended_configuration"] == "2d"
    assert "thicker" in cpu["samnnu"]["reason"]
    sam = cpu["configurations"]["2d"]["sam"]
    assert max(cpu["configurations"]["2d"]["patch_size"]) == 512
    # 256 (native) would cost 2 x 225 GFLOP per iteration on the CPU: reduced to 144
    assert (sam["input_size"], sam["input_reduced_for_cpu"]) == (144, True)
    assert sam["batch_size_bound_by"] in ("cpu_compute", "minimum")
    # CT: nnU-Net clips to the foreground percentiles and z-scores with the dataset's mean/std
    # 16 evenly spaced of the 30 cases (all 512 voxels of each) go into the pooled percentiles
    raw = sorted((root / "nnUNet_raw" / "Dataset011_AnisoCT" / "imagesTr").iterdir())
    picked = [raw[i] for i in np.unique(np.linspace(0, 29, 16).astype(int))]
    values = np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(f))).ravel() for f in picked])
    normed = (np.clip(values, -1000.0, 1500.0) - 40.0) / 200.0
    assert sam["intensity_windows"] == [[pytest.approx(np.percentile(normed, 0.5), abs=2e-4),
                                         pytest.approx(np.percentile(normed, 99.5), abs=2e-4)]]
    gpu = plan(11, device_type="cuda", device_memory_gb=80)
    gsam = gpu["configurations"]["2d"]["sam"]
    assert (gsam["input_size"], gsam["input_reduced_for_cpu"]) == (256, False)
    assert gsam["batch_size"] > sam["batch_size"] and "cpu_compute" not in gsam["batch_size_limits"]


@pytest.mark.slow
def test_large_isotropic_ct_recommends_3d_with_slices_per_sample(root):
    make_dataset(root, 12, "LargeCT", n_cases=50, channels={"0": "CT"}, spacing=(1.5, 1.5, 1.5),
                 shape=(300, 300, 300), props={"0": _props(-1000.0, 1000.0, 0.0, 300.0)})
    plans = plan(12, device_type="cuda", device_memory_gb=2000)
    assert plans["samnnu"]["recommended_configuration"] == "3d_fullres"
    full = plans["configurations"]["3d_fullres"]
    assert full["sam"]["fits_device_memory"] is True
    # the same data on an 80 GB GPU: 3D would not fit, so 2D is recommended, and the reason says why
    small = plan(12, device_type="cuda", device_memory_gb=80)
    assert small["configurations"]["3d_fullres"]["sam"]["fits_device_memory"] is False
    assert small["samnnu"]["recommended_configuration"] == "2d"
    assert "the data favour 3D" in small["samnnu"]["reason"] and "exceed the device memory" in small["samnnu"]["reason"]
    assert full["sam"]["slices_per_sample"] == full["patch_size"][0] > 1
    side = max(full["patch_size"][1:])
    from samnnu.modeling.encoders import get_encoder_spec
    from samnnu.plans.samnnu_planner import plan_input_size

    assert full["sam"]["input_size"] == plan_input_size(full["patch_size"][1:], get_encoder_spec("litemedsam"))
    assert side <= full["sam"]["input_size"] <= min(256, -(-side // 16) * 16)  # in-plane side fits, capped
    assert full["sam"]["batch_size"] >= 2
    # the 3D batch is planned for depth x the 2D memory of one image
    from samnnu.modeling.encoders import ENCODERS
    from samnnu.plans.samnnu_planner import estimate_training_memory_gb

    est = estimate_training_memory_gb(ENCODERS["litemedsam"], full["sam"]["input_size"], full["sam"]["batch_size"],
                                      full["patch_size"][0])
    assert full["sam"]["estimated_training_memory_gb"] == pytest.approx(est, abs=0.01)


def test_2d_png_dataset_plans_only_2d(root):
    make_dataset(root, 13, "Photos", n_cases=12, channels={"0": "R"}, spacing=(999.0, 1.0, 1.0),
                 shape=(1, 120, 90), two_d=True)
    plans = plan(13, device_type="cpu", device_memory_gb=8)
    assert set(plans["configurations"]) == {"2d"}
    assert plans["samnnu"] == {"recommended_configuration": "2d", "reason": "the data are 2D",
                               "encoder": "litemedsam"}
    # nnU-Net's patch for the 120 x 90 images is 128 x 96; 128 is a multiple of 16, so there is nothing to choose
    assert tuple(plans["configurations"]["2d"]["patch_size"]) == (128, 96)
    assert plans["configurations"]["2d"]["sam"]["input_size"] == 128


def test_four_channel_mri_gets_a_window_per_channel(root):
    channels = {"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"}
    make_dataset(root, 14, "Brain", n_cases=24, channels=channels, spacing=(1.0, 1.0, 1.0), shape=(140, 170, 140))
    plans = plan(14, device_type="cpu", device_memory_gb=8)
    windows = plans["configurations"]["2d"]["sam"]["intensity_windows"]
    assert len(windows) == 4
    for lo, hi in windows:
        # per-image z-score: the raw scales (1 to 1000) no longer matter
        assert -4.0 < lo < 0.0 < hi < 4.0


def test_five_cases_recommend_2d_and_keep_minimum_batch(root):
    make_dataset(root, 15, "Few", n_cases=5, channels={"0": "MRI"}, spacing=(1.0, 1.0, 1.0), shape=(36, 50, 35))
    plans = plan(15, device_type="cpu", device_memory_gb=8)
    assert plans["samnnu"]["recommended_configuration"] == "2d"
    assert "only 5 training cases" in plans["samnnu"]["reason"]
    for c in plans["configurations"].values():
        if "sam" in c:
            assert c["sam"]["batch_size"] >= 2
    # a 2D batch fits 8 GB; two 3D samples of many slices each do not, and the summary says so
    from samnnu.pipeline.planning import summarize_plans

    assert plans["configurations"]["2d"]["sam"]["fits_device_memory"] is True
    full = plans["configurations"]["3d_fullres"]["sam"]
    assert full["fits_device_memory"] is False and full["estimated_training_memory_gb"] > 8.0
    assert "WARNING: even the minimum batch" in summarize_plans(plans)


def test_recommendation_rule_thresholds():
    from samnnu.plans.samnnu_planner import recommend_configuration

    assert recommend_configuration((3.1, 1.0, 1.0), (40, 200, 200), 100, True)[0] == "2d"
    assert recommend_configuration((2.9, 1.0, 1.0), (40, 200, 200), 100, True)[0] == "3d_fullres"
    assert recommend_configuration((1.0, 1.0, 1.0), (15, 200, 200), 100, True)[0] == "2d"
    assert recommend_configuration((1.0, 1.0, 1.0), (16, 200, 200), 19, True)[0] == "2d"
    assert recommend_configuration((1.0, 1.0, 1.0), (16, 200, 200), 20, True)[0] == "3d_fullres"
    assert recommend_configuration((1.0, 1.0), (1, 200), 100, False) == ("2d", "the data are 2D")


@pytest.mark.slow
def test_sam_checkpoint_picks_the_variant_and_rejects_garbage(root, tmp_path):
    import torch

    from samnnu.errors import SamnnuError
    from samnnu.modeling.encoders import build_sam_parts
    from samnnu.plans.samnnu_planner import encoder_for_checkpoint

    make_dataset(root, 16, "Ckpt", n_cases=6, channels={"0": "MRI"}, spacing=(1.0, 1.0, 1.0), shape=(36, 50, 35))
    parts = build_sam_parts("mobilesam", input_size=64, num_mask_tokens=4)
    state = {f"image_encoder.{k}": v for k, v in parts.image_encoder.state_dict().items()}
    ckpt = tmp_path / "mobile_sam.pt"
    torch.save(state, ckpt)
    assert encoder_for_checkpoint(ckpt) == "mobilesam"
    plans = plan(16, sam_checkpoint=str(ckpt), device_type="cpu", device_memory_gb=8)
    sam = plans["configurations"]["2d"]["sam"]
    assert sam["encoder"] == "mobilesam" and sam["sam_checkpoint"] == str(ckpt.resolve())
    with pytest.raises(SamnnuError, match="not 'vit_b'"):
        plan(16, encoder="vit_b", sam_checkpoint=str(ckpt), device_type="cpu", device_memory_gb=8)
    with pytest.raises(SamnnuError, match="needs its weights"):
        plan(16, encoder="vit_b", device_type="cpu", device_memory_gb=8)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SamnnuError, match="garbage.pth"):
        encoder_for_checkpoint(garbage)


def test_cpu_plans_2d_when_a_minimum_3d_batch_exceeds_the_cpu_work_budget(root):
    """The same isotropic volumes: 3D on a GPU with room; 2D on a CPU with plenty of memory, because
    two 3D samples of many slices are far over the CPU's per-iteration work budget."""
    from samnnu.plans.samnnu_planner import CPU_GFLOP_PER_ITERATION, MIN_BATCH_SIZE

    make_dataset(root, 13, "IsoMRI", n_cases=40, channels={"0": "MRI"}, spacing=(1.0, 1.0, 1.0),
                 shape=(48, 48, 48))
    gpu = plan(13, device_type="cuda", device_memory_gb=2000)
    assert gpu["samnnu"]["recommended_configuration"] == "3d_fullres"
    cpu = plan(13, device_type="cpu", device_memory_gb=2000)
    sam = cpu["configurations"]["3d_fullres"]["sam"]
    assert sam["batch_size_limits"]["cpu_compute"] < MIN_BATCH_SIZE
    assert sam["estimated_gflop_per_iteration"] > CPU_GFLOP_PER_ITERATION
    assert cpu["samnnu"]["recommended_configuration"] == "2d"
    assert "GFLOP per iteration" in cpu["samnnu"]["reason"]


def test_volumetric_memory_estimate_matches_its_measurements():
    """The 3D estimate reproduces the peaks it was fitted on (documented next to its constants) within
    10 % and grows linearly in slices and batch; the 2D estimate is unchanged by the 3D terms."""
    from samnnu.modeling.encoders import get_encoder_spec
    from samnnu.plans.samnnu_planner import estimate_training_memory_gb

    spec = get_encoder_spec("litemedsam")
    for slices, batch, measured in ((8, 1, 2.43), (8, 2, 3.46), (40, 1, 7.32)):
        assert abs(estimate_training_memory_gb(spec, 64, batch, slices) / measured - 1) < 0.1
    one, two = (estimate_training_memory_gb(spec, 64, b, 40) for b in (1, 2))
    assert two - one == pytest.approx(estimate_training_memory_gb(spec, 64, 1, 40) - spec.memory_fixed_gb - 0.3)
    per_image = spec.memory_per_sample_gb_constant + spec.memory_per_sample_gb_at_native * (64 / 256) ** 2
    assert estimate_training_memory_gb(spec, 64, 3) == pytest.approx(spec.memory_fixed_gb + 3 * per_image)


def test_the_plans_pick_configuration_and_trainer_when_the_user_does_not():
    from samnnu.pipeline.training import default_model

    plans = {"configurations": {"2d": {"patch_size": [56, 40]}, "3d_fullres": {"patch_size": [40, 56, 40]}},
             "samnnu": {"recommended_configuration": "3d_fullres"}}
    assert default_model(plans, None, None) == ("SAM3DAdapterTrainer", "3d_fullres")
    assert default_model(plans, None, "2d") == ("SAMUNetTrainer", "2d")
    assert default_model(plans, "SAMUNetTrainer", None) == ("SAMUNetTrainer", "3d_fullres")
    plans["samnnu"]["recommended_configuration"] = "2d"
    assert default_model(plans, None, None) == ("SAMUNetTrainer", "2d")
    # nnU-Net's own plans carry no recommendation: 2d, as before
    assert default_model({"configurations": plans["configurations"]}, "nnUNetTrainer", None) == ("nnUNetTrainer", "2d")
