"""samnnu_distill: a tiny teacher distilled into a tiny student, resumed, cached, loaded by every trainer family."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samnnu.errors import SamnnuError

ALL_2D = ["SAMedLoRATrainer", "SAMMed2DAdapterTrainer", "SAMUNetTrainer", "nnSAMTrainer", "SelfPromptTrainer",
          "ImplicitDecoderTrainer"]


@pytest.fixture(scope="module")
def student_file(prepared_root, tmp_path_factory):
    """A tiny_student distilled from the (random) tiny teacher for 3 augmented steps on the demo subset."""
    from conftest import use_data_root
    from samnnu.pipeline.distill import distill

    out = tmp_path_factory.mktemp("distill") / "student.pth"
    with pytest.MonkeyPatch.context() as mp:
        use_data_root(mp, prepared_root)
        record = distill([4], out, teacher="tiny", student="tiny_student", steps=3, batch_size=2, cache="off",
                         progress=False)
    return out, record


def test_distilled_student_is_a_checkpoint_the_planner_recognises(student_file):
    from samnnu.modeling.encoders import build_sam_parts, load_pretrained, read_checkpoint
    from samnnu.pipeline.distill import RECORD
    from samnnu.plans.samnnu_planner import encoder_for_checkpoint

    path, record = student_file
    assert record["steps"] == 3 and record["cache"] is False and np.isfinite(record["final_mse"])
    assert record["teacher"] == "tiny" and record["datasets"] == ["Dataset004_Hippocampus"]
    assert encoder_for_checkpoint(path) == "tiny_student"  # the variant is read from the file
    state = read_checkpoint(path)  # weights only: the record is plain text
    assert json.loads(state[RECORD])["student"] == "tiny_student"
    # round trip: the student's weights and the teacher's decoder load back exactly
    parts = build_sam_parts("tiny_student", input_size=64, num_mask_tokens=4)
    left = load_pretrained("tiny_student", parts, checkpoint=path)
    assert not any(left.values())
    for k, v in parts.image_encoder.state_dict().items():
        if f"image_encoder.{k}" in state:
            assert torch.equal(v, state[f"image_encoder.{k}"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = build_sam_parts("tiny", input_size=64, num_mask_tokens=4)
    for k, v in teacher.mask_decoder.state_dict().items():
        assert torch.equal(v, parts.mask_decoder.state_dict()[k])  # the teacher's decoder, untouched


@pytest.mark.parametrize("trainer", ALL_2D + ["SAM3DAdapterTrainer"])
def test_student_loads_into_every_trainer_family(student_file, trainer):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samnnu.pipeline.training import get_trainer_class

    path, _ = student_file
    dim = 3 if trainer == "SAM3DAdapterTrainer" else 2
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 16],
                            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": [[3] * dim] * 3,
                            "strides": [[1] * dim] + [[2] * dim] * 2, "n_conv_per_stage": [2, 2, 2],
                            "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    name = "2d" if dim == 2 else "3d_fullres"
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [48, 40] if dim == 2 else [4, 32, 32], "spacing": [1.0] * dim,
           "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], "architecture": arch,
           "batch_dice": True, "sam": {"encoder": "tiny_student", "input_size": 64, "embedding_grid": 16,
                                       "batch_size": 2, "intensity_windows": [[-2.0, 2.0]],
                                       "slices_per_sample": 4 if dim == 3 else 1, "sam_checkpoint": str(path)}}
    pm = PlansManager({"dataset_name": "Dataset999_Test", "plans_name": "samnnuPlans", "configurations": {name: cfg}})
    net = get_trainer_class(trainer).build_network_architecture(pm, pm.get_configuration(name), 1, 3, False)
    assert net.encoder_name == "tiny_student"
    net.load_pretrained(checkpoint=str(path))
    x = torch.randn(1, 1, *cfg["patch_size"])
    net.eval()
    with torch.no_grad():
        out = net(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == (1, 3, *cfg["patch_size"]) and torch.isfinite(out).all()


def test_an_interrupted_distillation_resumes_and_the_teacher_cache_is_exact(data_root, tmp_path, monkeypatch):
    import samnnu.pipeline.distill as d

    out = tmp_path / "s.pth"
    calls = {"n": 0}
    real = d.F.mse_loss

    def stop_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(d.F, "mse_loss", stop_on_third)
    kwargs = dict(teacher="tiny", student="tiny_student", steps=4, batch_size=2, cache="on", save_every=2,
                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        d.distill([4], out, **kwargs)
    partial = tmp_path / "s.partial.pth"
    assert partial.is_file() and torch.load(partial, weights_only=True)["step"] == 2 and not out.exists()
    monkeypatch.setattr(d.F, "mse_loss", real)
    calls["n"] = 0
    counted = []
    monkeypatch.setattr(d.F, "mse_loss", lambda *a, **k: counted.append(1) or real(*a, **k))
    record = d.distill([4], out, **kwargs)
    assert len(counted) == 2 and out.is_file() and not partial.exists()  # steps 3 and 4 only
    assert record["cache"] is True
    # the cache holds the teacher's embedding of each slice's unaugmented input
    source = d.SliceSource(["4"])
    inputs, embeddings = np.load(tmp_path / "s.teacher_inputs.npy"), np.load(tmp_path / "s.teacher.npy")
    assert len(inputs) == len(embeddings) == len(source.all_slices())
    size = inputs.shape[-1]  # the planned input size (distill's default)
    assert size == record["input_size"]
    teacher = d.build_parts("tiny", size).image_encoder.eval()
    row = len(inputs) // 2
    x = source.encoder_input(row, size)
    assert np.allclose(inputs[row, 0], x[0, 0].numpy(), atol=1e-3)
    with torch.no_grad():
        assert np.allclose(embeddings[row], teacher(x)[0].numpy(), atol=2e-2, rtol=1e-2)
    # other settings do not resume someone else's partial run
    partial.write_bytes(b"")
    torch.save({"settings": {"teacher": "other"}, "step": 1}, partial)
    with pytest.raises(SamnnuError, match="other settings"):
        d.distill([4], out, **kwargs)


def test_bad_requests_are_one_line_errors(data_root, tmp_path, capsys):
    from samnnu.cli import distill_main

    base = ["-o", str(tmp_path / "s.pth"), "--data-root", str(data_root)]
    for args, expected in ((["-d", "4", "--teacher", "nosuch"], "unknown teacher 'nosuch'"),
                           (["-d", "4", "--teacher", "tiny", "--student", "tiny"], "unknown student 'tiny'"),
                           (["-d", "4", "--teacher", "litemedsam", "--student", "tiny_student"], "does not fit teacher"),
                           (["-d", "77", "--teacher", "tiny", "--student", "tiny_student"], "unknown dataset ID 77")):
        assert distill_main(args + base) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("samnnu_distill: error:") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.pth").exists()


def test_a_dataset_without_preprocessed_slices_is_refused(data_root, tmp_path):
    import shutil

    from samnnu.pipeline.distill import SliceSource

    pre = data_root / "nnUNet_preprocessed" / "Dataset004_Hippocampus"
    empty = data_root / "nnUNet_preprocessed" / "Dataset005_Empty"
    empty.mkdir()
    try:
        shutil.copy(pre / "samnnuPlans.json", empty / "samnnuPlans.json")
        plans = json.loads((empty / "samnnuPlans.json").read_text())
        (empty / plans["configurations"]["2d"]["data_identifier"]).mkdir()
        with pytest.raises(SamnnuError, match="not preprocessed"):
            SliceSource(["Dataset005_Empty"])
    finally:
        shutil.rmtree(empty)


def test_warm_start_copies_only_the_neck_and_last_stage_the_student_shares():
    from samnnu.pipeline.distill import build_parts, warm_start

    teacher = build_parts("tiny", 64).image_encoder
    student = build_parts("tiny_student", 64, pretrained=False).image_encoder
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copied = warm_start(student, teacher)
    assert copied and all(k.startswith(("neck.", "layers.3.")) for k in copied)
    after, theirs = student.state_dict(), teacher.state_dict()
    assert all(torch.equal(after[k], theirs[k]) for k in copied)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in copied)  # the rest untouched
    assert any(k.startswith("neck.") for k in copied)
