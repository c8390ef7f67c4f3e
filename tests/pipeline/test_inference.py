"""Batched sliding-window inference gives nnU-Net's own predictor's result."""
from __future__ import annotations

import pytest
import torch


def _predictors(model_dir, views: int):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from samnnu.pipeline.inference import BatchedPredictor
    from samnnu.safe_io import weights_only_loading

    made = []
    for cls, extra in ((nnUNetPredictor, {}), (BatchedPredictor, {"views_per_pass": views})):
        p = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                device=torch.device("cpu"), verbose=False, allow_tqdm=False, **extra)
        with weights_only_loading():
            p.initialize_from_trained_model_folder(str(model_dir), use_folds=(0, 1), checkpoint_name="checkpoint_final.pth")
        p.allowed_mirroring_axes = (0, 1)  # the tiny model was trained without test-time mirroring
        made.append(p)
    return made


@pytest.mark.parametrize("patch,views", [
    ("smaller", 7),  # the thorough case runs in the quick set; the others are slow
    pytest.param("smaller", 1, marks=pytest.mark.slow), pytest.param("smaller", 64, marks=pytest.mark.slow),
    pytest.param("model", 1, marks=pytest.mark.slow), pytest.param("model", 7, marks=pytest.mark.slow),
    pytest.param("model", 64, marks=pytest.mark.slow),
])
def test_batched_prediction_equals_nnunets(trained_folds, data_root, patch, views):
    """Two folds, mirroring over both axes, a volume of several slices; with the model's patch (one tile per
    slice) and with a smaller patch (several overlapping tiles per slice, so the Gaussian weighting matters).
    Batches of 1, 7 (tiles split across passes, mirrored copies of one tile never split) and 64 views."""
    torch.manual_seed(0)
    reference, batched = _predictors(trained_folds, views)
    if patch == "smaller":
        for p in (reference, batched):
            p.configuration_manager.configuration["patch_size"] = [24, 24]
    data = torch.randn(1, 5, 40, 36)  # (C, Z, Y, X), nnU-Net-normalised intensities
    expected = reference.predict_logits_from_preprocessed_data(data).float()
    got = batched.predict_logits_from_preprocessed_data(data).float()
    assert got.shape == expected.shape == (3, 5, 40, 36)
    p_expected, p_got = torch.softmax(expected, 0), torch.softmax(got, 0)
    assert torch.max(torch.abs(p_expected - p_got)).item() < 1e-4


def test_views_per_pass_follows_the_memory_model():
    from samnnu.modeling.encoders import get_encoder_spec
    from samnnu.pipeline.inference import CPU_VIEWS_PER_PASS, views_in_budget, views_per_pass

    small, large = (views_in_budget({"encoder": "litemedsam", "input_size": s}, 4.0) for s in (64, 256))
    assert small > large >= 1  # a 16x larger input area: fewer views per pass
    spec = get_encoder_spec("litemedsam")
    per_view = spec.memory_per_sample_gb_at_native + spec.memory_per_sample_gb_constant
    assert large == max(1, int(4.0 / per_view))
    assert views_in_budget({"encoder": "litemedsam", "input_size": 64, "slices_per_sample": 8}, 4.0) < small
    assert views_per_pass({"encoder": "litemedsam", "input_size": 64}, torch.device("cpu")) == CPU_VIEWS_PER_PASS
