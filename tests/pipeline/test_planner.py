"""Tests of samnnu's planner: the sizing rules on LiteMedSAM's real registry entry, then the whole
planner on the shipped hippocampus demo data (tiny encoder, CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samnnu.modeling.encoders import ENCODERS
from samnnu.plans.samnnu_planner import (
    CPU_GFLOP_PER_ITERATION,
    MIN_BATCH_SIZE,
    PLANS_NAME,
    estimate_training_memory_gb,
    plan_batch_size,
    plan_input_size,
    training_gflop_per_sample,
)

LITE = ENCODERS["litemedsam"]
HIPPO_PATCH = (56, 40)
HIPPO_VOXELS = 260 * 36 * 50 * 35  # MSD Task04: 260 training cases of about 36x50x35 voxels
DATASET = "Dataset004_Hippocampus"


def assert_within_5_percent(batch: int, patch, n_voxels: float) -> None:
    """nnU-Net's rule: a batch covers at most 5 % of the dataset's voxels (up to rounding to a whole batch)."""
    per_sample = float(np.prod(patch))
    assert batch * per_sample <= 0.05 * n_voxels + per_sample / 2


# --------------------------------------------------------------------------------------------
# sizing rules
# --------------------------------------------------------------------------------------------
def test_input_size_follows_patch_and_is_capped_at_native():
    assert plan_input_size(HIPPO_PATCH, LITE) == 56  # the patch side itself: every attention window tiled
    assert plan_input_size((300, 200), LITE) == LITE.native_size == 256  # 304 would exceed native
    assert plan_input_size((70, 20), LITE) == 72  # 72, 76, 80 pad to the same windows: the smallest
    assert plan_input_size((12, 10), LITE) == 56  # never below the minimum
    for patch in [(56, 40), (70, 20), (100, 100), (129, 3), (300, 200)]:
        size = plan_input_size(patch, LITE)
        assert size % LITE.stride == 0 and size <= LITE.native_size
        assert size >= min(max(patch), LITE.native_size)  # the patch fits unless capped
        assert size <= -(-max(patch) // LITE.size_divisor) * LITE.size_divisor  # never above the old rounding


def test_input_size_avoids_padded_attention_windows():
    """LiteMedSAM's attention runs in windows of 7 / 14 / 7 tokens on grids of input / 2, / 4, / 4: at 64 the
    grids 32 / 16 / 16 are zero-padded to 35 / 28 / 21, so the encoder at 64 processes 2.6x the attention tokens
    it does at 56, where every grid is a whole number of windows."""
    from samnnu.modeling.encoders import padded_attention_tokens

    windows = LITE.attention_windows
    assert windows == ((2, 7, 2), (4, 14, 6), (4, 7, 2))
    assert padded_attention_tokens(56, windows) == 2 * 28 ** 2 + 6 * 14 ** 2 + 2 * 14 ** 2 == 3136
    assert padded_attention_tokens(64, windows) == 2 * 35 ** 2 + 6 * 28 ** 2 + 2 * 21 ** 2 == 8036
    assert padded_attention_tokens(112, windows) == 4 * padded_attention_tokens(56, windows)
    # the choice only moves inside the old range [side, side rounded up to 16], to the least padded size
    for side in range(40, 257, 4):
        size = plan_input_size((side, side), LITE)
        top = min(-(-max(side, 56) // 16) * 16, 256)
        assert max(side, 56) <= size <= top
        assert all(padded_attention_tokens(size, windows) <= padded_attention_tokens(s, windows)
                   for s in range(size, top + 1, 4))
    # the planned size builds and encodes: grid 56 / 4 = 14, windows tiled, no padding needed
    from samnnu.modeling.encoders import build_sam_parts

    encoder = build_sam_parts("litemedsam", input_size=56, num_mask_tokens=1).image_encoder.eval()
    with torch.inference_mode():
        assert encoder(torch.rand(1, 3, 56, 56)).shape == (1, 256, 14, 14)
    # an encoder without windows keeps the plain rule
    vit = ENCODERS["vit_b"]
    assert vit.attention_windows == () and plan_input_size(HIPPO_PATCH, vit) == 64


def test_memory_estimate_is_linear_in_batch_and_grows_with_input():
    fixed = estimate_training_memory_gb(LITE, 128, 0)
    assert fixed == pytest.approx(LITE.memory_fixed_gb)
    m1, m3 = estimate_training_memory_gb(LITE, 128, 1), estimate_training_memory_gb(LITE, 128, 3)
    assert m1 > fixed and m3 - fixed == pytest.approx(3 * (m1 - fixed))
    # a 3D sample of 5 slices costs 5 volumetric slices (a fixed fraction of a 2D image) plus the 3D extra
    from samnnu.plans.samnnu_planner import VOLUMETRIC_FIXED_EXTRA_GB, VOLUMETRIC_PER_SLICE_FACTOR

    assert estimate_training_memory_gb(LITE, 128, 2, slices=5) - fixed - VOLUMETRIC_FIXED_EXTRA_GB == \
        pytest.approx(10 * VOLUMETRIC_PER_SLICE_FACTOR * (m1 - fixed))
    sizes = [64, 128, 256]
    per_image = [estimate_training_memory_gb(LITE, s, 1) - fixed for s in sizes]
    assert per_image == sorted(per_image) and len(set(per_image)) == 3
    # beyond a constant part, it scales with the area: (256^2 - 128^2) = 4 (128^2 - 64^2)
    assert per_image[2] - per_image[1] == pytest.approx(4 * (per_image[1] - per_image[0]))


def test_batch_size_on_cpu_is_bound_by_compute():
    size = plan_input_size(HIPPO_PATCH, LITE)
    batch, why = plan_batch_size(LITE, size, HIPPO_PATCH, HIPPO_VOXELS, "cpu", 8.0)
    assert why["binding"] == "cpu_compute"
    assert batch == why["limits"]["cpu_compute"] == min(why["limits"].values())
    # the largest batch within the per-iteration compute budget
    per_sample = training_gflop_per_sample(LITE, size)
    assert batch * per_sample <= CPU_GFLOP_PER_ITERATION < (batch + 1) * per_sample
    assert MIN_BATCH_SIZE <= batch
    assert_within_5_percent(batch, HIPPO_PATCH, HIPPO_VOXELS)
    assert estimate_training_memory_gb(LITE, size, batch) <= 8.0


def test_batch_size_on_large_gpu_small_dataset_is_bound_by_dataset():
    size = plan_input_size(HIPPO_PATCH, LITE)
    batch, why = plan_batch_size(LITE, size, HIPPO_PATCH, HIPPO_VOXELS, "cuda", 80.0)
    assert "cpu_compute" not in why["limits"]
    assert why["binding"] == "dataset_5_percent" and batch == why["limits"]["dataset_5_percent"]
    assert batch > MIN_BATCH_SIZE
    assert_within_5_percent(batch, HIPPO_PATCH, HIPPO_VOXELS)
    assert (batch + 1) * np.prod(HIPPO_PATCH) > 0.05 * HIPPO_VOXELS  # and no smaller than the rule allows
    assert estimate_training_memory_gb(LITE, size, batch) <= 80.0


def test_batch_size_on_large_gpu_large_images_is_bound_by_memory():
    patch = (300, 200)
    n_voxels = 1000 * 512 * 512 * 100
    size = plan_input_size(patch, LITE)
    batch, why = plan_batch_size(LITE, size, patch, n_voxels, "cuda", 80.0)
    assert why["binding"] == "memory" and batch == why["limits"]["memory"]
    # the largest batch whose estimated memory fits 80 GB
    assert estimate_training_memory_gb(LITE, size, batch) <= 80.0 < estimate_training_memory_gb(LITE, size, batch + 1)
    assert MIN_BATCH_SIZE <= batch
    assert_within_5_percent(batch, patch, n_voxels)


def test_tiny_dataset_still_gets_minimum_batch():
    n_voxels = 5 * 56 * 40  # five 2D images the size of the patch
    batch, why = plan_batch_size(LITE, 64, HIPPO_PATCH, n_voxels, "cpu", 8.0)
    assert why["limits"]["dataset_5_percent"] < MIN_BATCH_SIZE
    assert batch == MIN_BATCH_SIZE == 2 and why["binding"] == "minimum"
    batch, why = plan_batch_size(LITE, 64, HIPPO_PATCH, n_voxels, "cuda", 80.0)
    assert batch == 2 and why["binding"] == "minimum"


def test_too_little_memory_still_gets_minimum_batch():
    batch, why = plan_batch_size(LITE, 256, (256, 256), 1e10, "cuda", 2.0)
    assert why["limits"]["memory"] < MIN_BATCH_SIZE and batch == MIN_BATCH_SIZE and why["binding"] == "minimum"


# --------------------------------------------------------------------------------------------
# the planner on real data (demo subset, converted and preprocessed once in conftest.py)
# --------------------------------------------------------------------------------------------
def test_plans_on_demo_data(data_root, demo_subset):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samnnu.trainers.samed_lora import SAMedLoRATrainer

    _, cases = demo_subset
    pre = data_root / "nnUNet_preprocessed" / DATASET
    plans_file = pre / f"{PLANS_NAME}.json"
    pm = PlansManager(str(plans_file))
    assert pm.plans_name == PLANS_NAME and pm.dataset_name == DATASET
    cm = pm.get_configuration("2d")
    sam = cm.configuration["sam"]
    patch = tuple(cm.patch_size)
    assert len(patch) == 2 and max(patch) <= 64

    assert sam["encoder"] == "tiny"
    assert sam["input_size"] == plan_input_size(patch, ENCODERS["tiny"]) >= max(patch)
    assert sam["embedding_grid"] == sam["input_size"] // 4
    assert sam["device_type"] == "cpu" and sam["device_memory_gb"] == 8.0

    # intensity window after z-scoring (MRI): around zero, and what the data say
    assert cm.normalization_schemes == ["ZScoreNormalization"]
    [[lo, hi]] = sam["intensity_windows"]
    assert lo < 0 < hi
    raw = data_root / "nnUNet_raw" / DATASET / "imagesTr"
    z = []
    for case in cases:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / f"{case}_0000.nii.gz"))).astype(np.float64)
        values = image[image != 0] if cm.use_mask_for_norm[0] else image.ravel()
        z.append((values - values.mean()) / max(values.std(), 1e-8))
    z = np.concatenate(z)
    assert lo == pytest.approx(np.percentile(z, 0.5), abs=0.1)
    assert hi == pytest.approx(np.percentile(z, 99.5), abs=0.1)

    # batch size: within nnU-Net's bounds for this 10-case dataset
    # nnU-Net's dataset size: the median 3D image (after cropping and resampling) times the number of cases
    median_3d = pm.plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"]
    n_voxels = float(np.prod(median_3d)) * len(cases)
    assert sam["batch_size"] >= MIN_BATCH_SIZE
    assert_within_5_percent(sam["batch_size"], patch, n_voxels)
    assert sam["batch_size"] == max(MIN_BATCH_SIZE, min(sam["batch_size_limits"].values()))
    assert sam["estimated_training_memory_gb"] <= 8.0

    # every configuration carries a sam block; a 3D patch runs through the encoder slice by slice
    for name, c in pm.plans["configurations"].items():
        if "patch_size" in c:
            assert c["sam"]["slices_per_sample"] == (c["patch_size"][0] if len(c["patch_size"]) == 3 else 1), name
    # few cases (10 < 20): 2D is recommended even though the volumes are isotropic
    assert pm.plans["samnnu"]["recommended_configuration"] == "2d"
    assert "10 training cases" in pm.plans["samnnu"]["reason"]

    # the network is rebuilt from the plans alone and takes a patch
    net = SAMedLoRATrainer.build_network_architecture(pm, cm, 1, 3)
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 1, *patch))
    assert out.shape == (2, 3, *patch)

    # preprocessing ran with these plans
    assert (pre / cm.data_identifier).is_dir()
    assert sorted(p.name for p in (pre / "gt_segmentations").iterdir()) == sorted(f"{c}.nii.gz" for c in cases)


@pytest.mark.slow
def test_planning_twice_gives_identical_plans(data_root):
    from samnnu.pipeline.planning import plan_and_preprocess

    plans_file = data_root / "nnUNet_preprocessed" / DATASET / f"{PLANS_NAME}.json"
    first = plans_file.read_bytes()
    # fingerprint and plan again (nothing to preprocess: the preprocessed data stay as they are)
    plans = plan_and_preprocess(4, encoder="tiny", configurations=(), device_type="cpu", device_memory_gb=8)
    assert plans_file.read_bytes() == first
    assert json.loads(json.dumps(plans)) == json.loads(first)  # the returned plans are what was written


def test_plan_unknown_dataset(data_root):
    from samnnu.errors import SamnnuError
    from samnnu.pipeline.planning import plan_and_preprocess

    with pytest.raises(SamnnuError, match="unknown dataset ID 999"):
        plan_and_preprocess(999, encoder="tiny", device_type="cpu", device_memory_gb=8)
