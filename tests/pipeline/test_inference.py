"""Batched sliding-window inference gives nnU-Net's own predictor's result."""
from __future__ import annotations

import pytest
import torch


def _predictors(model_dir, views: int, folds=(0, 1), precision: str = "fp32"):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from samnnu.pipeline.inference import BatchedPredictor
    from samnnu.safe_io import weights_only_loading

    made = []
    for cls, extra in ((nnUNetPredictor, {}), (BatchedPredictor, {"views_per_pass": views, "precision": precision})):
        p = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                device=torch.device("cpu"), verbose=False, allow_tqdm=False, **extra)
        with weights_only_loading():
            p.initialize_from_trained_model_folder(str(model_dir), use_folds=folds, checkpoint_name="checkpoint_final.pth")
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


def test_one_fold_is_loaded_into_the_network_once(trained_folds, data_root, monkeypatch):
    """nnU-Net loads a fold's weights again for every volume; samnnu's predictor loads them for the first volume
    of a model only, with the same numbers as nnU-Net's (bit for bit at one input per pass)."""
    torch.manual_seed(0)
    reference, batched = _predictors(trained_folds, 1, folds=(0,))
    fold0 = batched.list_of_parameters[0]
    loads = []
    load = batched.network.load_state_dict
    monkeypatch.setattr(batched.network, "load_state_dict", lambda sd, *a, **k: loads.append(sd) or load(sd, *a, **k))
    for _ in range(3):
        data = torch.randn(1, 5, 40, 36)
        assert torch.equal(batched.predict_logits_from_preprocessed_data(data),
                           reference.predict_logits_from_preprocessed_data(data))
    assert len(loads) == 1
    other, _ = _predictors(trained_folds, 1, folds=(1,))
    batched.list_of_parameters = other.list_of_parameters  # another model's weights: loaded at its first volume
    data = torch.randn(1, 5, 40, 36)
    assert torch.equal(batched.predict_logits_from_preprocessed_data(data),
                       other.predict_logits_from_preprocessed_data(data))
    assert len(loads) == 2 and loads[1] is other.list_of_parameters[0]
    batched.list_of_parameters = [fold0, other.list_of_parameters[0]]  # an ensemble leaves fold 1 loaded ...
    batched.predict_logits_from_preprocessed_data(data)
    batched.list_of_parameters = [fold0]  # ... so fold 0 alone is loaded again
    assert torch.equal(batched.predict_logits_from_preprocessed_data(data),
                       reference.predict_logits_from_preprocessed_data(data))


def test_in_process_prediction_writes_what_the_workers_write(trained_folds, data_root, tmp_path):
    """No worker processes (samnnu_predict on a machine of 2 cores): nnU-Net's preprocessing and export run in
    this process, and the label files equal those of nnU-Net's worker path."""
    import numpy as np
    import SimpleITK as sitk

    from samnnu.config import current_paths

    images = sorted((current_paths().raw / "Dataset004_Hippocampus" / "imagesTr").glob("*_0000.nii.gz"))[:2]
    lists = [[str(p)] for p in images]
    _, batched = _predictors(trained_folds, 4, folds=(0,))
    batched.case_progress = True
    written = {}
    for processes in ((1, 1), (0, 0)):
        out = tmp_path / f"out{processes[0]}"
        out.mkdir()
        batched.predict_from_files(lists, [str(out / p.name[:-len("_0000.nii.gz")]) for p in images],
                                   num_processes_preprocessing=processes[0],
                                   num_processes_segmentation_export=processes[1])
        written[processes] = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in out.glob("*.nii.gz")}
    assert sorted(written[(0, 0)]) == sorted(written[(1, 1)]) and len(written[(0, 0)]) == 2
    for name, labels in written[(0, 0)].items():
        assert np.array_equal(labels, written[(1, 1)][name])


def test_prediction_processes_follow_the_available_cores(monkeypatch):
    from samnnu.config import prediction_processes

    monkeypatch.setenv("SAMNNU_NUM_THREADS", "2")
    assert prediction_processes() == (0, 0)  # all in this process
    assert prediction_processes("cuda") != (0, 0)  # workers overlap their CPU work with the GPU
    monkeypatch.setenv("SAMNNU_NUM_THREADS", "8")
    monkeypatch.setenv("nnUNet_def_n_proc", "8")
    assert prediction_processes() == (1, 2)


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


def test_precision_is_checked(monkeypatch):
    """bf16 runs only on a CPU that computes bfloat16 natively (elsewhere it is slower than fp32); a GPU already
    predicts under nnU-Net's float16 autocast."""
    import samnnu.pipeline.inference as inference

    cpu = torch.device("cpu")
    inference.check_precision("fp32", cpu)
    with pytest.raises(ValueError, match="one of fp32, bf16"):
        inference.check_precision("fp16", cpu)
    with pytest.raises(ValueError, match="for prediction on a CPU"):
        inference.check_precision("bf16", torch.device("cuda"))
    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda: False)
    with pytest.raises(ValueError, match="natively"):
        inference.check_precision("bf16", cpu)
    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda: True)
    inference.check_precision("bf16", cpu)


@pytest.mark.parametrize("folds", [(0,), (0, 1)])
def test_bf16_runs_every_forward_pass_in_bfloat16_autocast(trained_folds, data_root, monkeypatch, folds):
    """samnnu_predict --precision bf16, one fold and an ensemble: each forward pass (tiles and mirrored copies, every
    fold) under the CPU's bfloat16 autocast, its bfloat16 logits returned in float32; the probabilities move a
    little from fp32's, not more. fp32 runs no autocast."""
    import samnnu.pipeline.inference as inference

    monkeypatch.setattr(inference, "cpu_computes_bf16", lambda: True)  # autocast itself runs on any CPU
    torch.manual_seed(0)
    _, fp32 = _predictors(trained_folds, 4, folds=folds)
    _, bf16 = _predictors(trained_folds, 4, folds=folds, precision="bf16")
    seen = {}
    for name, p in (("fp32", fp32), ("bf16", bf16)):
        forward, seen[name] = p.network.forward, []

        def recording(x, forward=forward, calls=seen[name]):
            out = forward(x)
            calls.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None, out.dtype))
            return out

        monkeypatch.setattr(p.network, "forward", recording)
    data = torch.randn(1, 5, 40, 36)
    probabilities = {name: torch.softmax(p.predict_logits_from_preprocessed_data(data).float(), 0)
                     for name, p in (("fp32", fp32), ("bf16", bf16))}
    assert seen["fp32"] and set(seen["fp32"]) == {(None, torch.float32)}
    assert seen["bf16"] and set(seen["bf16"]) == {(torch.bfloat16, torch.bfloat16)}
    assert len(seen["bf16"]) == len(seen["fp32"])  # the same passes
    if len(folds) == 1:
        tiles = torch.randn(3, 1, *bf16.configuration_manager.patch_size)
        assert bf16.predict_tiles(tiles, [(2,), (3,)]).dtype == torch.float32
    difference = torch.max(torch.abs(probabilities["bf16"] - probabilities["fp32"])).item()
    assert 0 < difference < 0.05
