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


@pytest.mark.parametrize("patch", ["smaller", pytest.param("model", marks=pytest.mark.slow)])
def test_one_input_per_pass_is_exactly_nnunets_computation(trained_folds, data_root, patch):
    """What samnnu_predict does on a CPU: the same numbers as nnU-Net's predictor, bit for bit (two folds,
    mirroring over both axes; the model's patch: one tile per slice; a smaller one: overlapping tiles)."""
    torch.manual_seed(0)
    reference, batched = _predictors(trained_folds, 1)
    if patch == "smaller":
        for p in (reference, batched):
            p.configuration_manager.configuration["patch_size"] = [24, 24]
    data = torch.randn(1, 5, 40, 36)  # (C, Z, Y, X), nnU-Net-normalised intensities
    expected = reference.predict_logits_from_preprocessed_data(data)
    got = batched.predict_logits_from_preprocessed_data(data)
    assert got.shape == expected.shape == (3, 5, 40, 36) and torch.equal(got, expected)


@pytest.mark.parametrize("patch,views", [
    ("smaller", 7),  # tiles split across passes, a tile's mirrored copies never split
    pytest.param("smaller", 64, marks=pytest.mark.slow), pytest.param("model", 7, marks=pytest.mark.slow),
    pytest.param("model", 64, marks=pytest.mark.slow),
])
def test_batched_prediction_equals_nnunets(trained_folds, data_root, patch, views):
    """Batches (what samnnu_predict does on a GPU): every tile's mirrored average equals nnU-Net's to float
    rounding (1e-5 in logits); the whole volume to what nnU-Net's half-precision accumulator allows (its
    rounding step at logits of a few units is about 2e-3, which moves a probability by up to about 1e-3)."""
    torch.manual_seed(0)
    reference, batched = _predictors(trained_folds, views)
    if patch == "smaller":
        for p in (reference, batched):
            p.configuration_manager.configuration["patch_size"] = [24, 24]
    for p in (reference, batched):  # the first fold's weights, as the ensemble loop would load them
        p.network.load_state_dict(p.list_of_parameters[0])
        p.network.eval()
    tiles = torch.randn(5, 1, *reference.configuration_manager.patch_size)
    combos = [(2,), (3,), (2, 3)]
    per_tile = torch.cat([reference._internal_maybe_mirror_and_predict(t[None]) for t in tiles])
    assert torch.max(torch.abs(batched.predict_tiles(tiles, combos) - per_tile)).item() < 1e-5
    data = torch.randn(1, 5, 40, 36)
    expected = torch.softmax(reference.predict_logits_from_preprocessed_data(data).float(), 0)
    got = torch.softmax(batched.predict_logits_from_preprocessed_data(data).float(), 0)
    assert torch.max(torch.abs(expected - got)).item() < 2e-3


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


@pytest.mark.slow
def test_frozen_encoder_ensemble_equals_nnunets(prepared_root, tmp_path, monkeypatch):
    """SAMUNetTrainer, two folds (the tiny encoder: each fold has its own random frozen weights, so nothing
    may be shared across them), mirroring: the ensemble with the embedding cache is nnU-Net's, bit for bit."""
    import shutil

    from conftest import use_data_root
    from samnnu.pipeline.training import train

    root = tmp_path / "root"
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(prepared_root / folder, root / folder)
    use_data_root(monkeypatch, root)
    for fold in (0, 1):
        train(4, fold, trainer="SAMUNetTrainer", configuration="2d", epochs=1, iters_per_epoch=1,
              run_chain=False, device="cpu")
    model_dir = root / "nnUNet_results" / "Dataset004_Hippocampus" / "SAMUNetTrainer__samnnuPlans__2d"
    reference, batched = _predictors(model_dir, 1)
    data = torch.randn(1, 4, 40, 36)
    assert torch.equal(batched.predict_logits_from_preprocessed_data(data),
                       reference.predict_logits_from_preprocessed_data(data))
