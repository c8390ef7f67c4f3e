"""SAMMed2DAdapterTrainer, SAMUNetTrainer, nnSAMTrainer: parameter split, forward/backward, rebuild, training."""
from __future__ import annotations

import copy

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import predict_held_out_case
from samnnu.modeling.encoders import build_sam_parts
from samnnu.modeling.sammed2d import ParallelAdapter, adapter_parameter_count, apply_adapters
from samnnu.pipeline.training import get_trainer_class

NEW_TRAINERS = ["SAMMed2DAdapterTrainer", "SAMUNetTrainer", "nnSAMTrainer"]
NUM_CLASSES = 3


def _arch(dim: int = 2) -> dict:
    conv = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}[dim]
    norm = {2: "torch.nn.modules.instancenorm.InstanceNorm2d", 3: "torch.nn.modules.instancenorm.InstanceNorm3d"}[dim]
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 4, "features_per_stage": [8, 16, 32, 32], "conv_op": conv,
                            "kernel_sizes": [[3] * dim] * 4, "strides": [[1] * dim] + [[2] * dim] * 3,
                            "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2],
                            "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def make_plans(channels: int, dim: int = 2) -> PlansManager:
    """A plans dict as samnnu's planner writes it (nnU-Net's architecture + a ``sam`` block, tiny encoder)."""
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [48, 40] if dim == 2 else [8, 32, 32], "spacing": [1.0] * dim,
           "normalization_schemes": ["ZScoreNormalization"] * channels, "use_mask_for_norm": [False] * channels,
           "architecture": _arch(dim), "batch_dice": True,
           "sam": {"encoder": "tiny", "input_size": 64, "embedding_grid": 16, "batch_size": 2,
                   "intensity_windows": [[-2.0, 2.0], [-1.5, 3.0], [-1.0, 1.0]][:channels]}}
    return PlansManager({"dataset_name": "Dataset999_Test", "plans_name": "samnnuPlans",
                         "configurations": {"2d" if dim == 2 else "3d_fullres": cfg}})


def build(name: str, channels: int = 1, deep_supervision: bool = True, dim: int = 2):
    pm = make_plans(channels, dim)
    cm = pm.get_configuration("2d" if dim == 2 else "3d_fullres")
    return get_trainer_class(name).build_network_architecture(pm, cm, channels, NUM_CLASSES, deep_supervision)


def numel(params) -> int:
    return sum(p.numel() for p in params)


def split(net) -> tuple[int, int]:
    return (numel(p for p in net.parameters() if p.requires_grad),
            numel(p for p in net.parameters() if not p.requires_grad))


def expected_split(name: str, net) -> tuple[int, int]:
    """(trainable, frozen) from the network's construction, per trainer design."""
    total = numel(net.parameters())
    if name == "SAMMed2DAdapterTrainer":
        trainable = (adapter_parameter_count(net.image_encoder) + numel(net.intensity.parameters())
                     + net.prompt_encoder.no_mask_embed.weight.numel()
                     + numel(net.mask_decoder.parameters()) - numel(net.mask_decoder.iou_prediction_head.parameters()))
    elif name == "SAMUNetTrainer":
        trainable = numel(net.conv_branch.parameters()) + numel(net.decoder.parameters())
        assert numel(net.sam.parameters()) == total - trainable
    else:  # nnSAM: the whole U-Net (decoder.encoder is the same module as encoder) + the projection
        unet = set(net.encoder.parameters()) | set(net.decoder.parameters()) | set(net.sam_proj.parameters())
        trainable = numel(unet)
        assert numel(net.sam.parameters()) == total - trainable
    return trainable, total - trainable


def first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("name", NEW_TRAINERS)
def test_trainable_split_matches_design(name):
    net = build(name)
    assert split(net) == expected_split(name, net)
    assert split(net)[0] > 0 and split(net)[1] > 0


def test_adapters_start_as_identity_and_sit_beside_every_block():
    parts = build_sam_parts("tiny", input_size=64, num_mask_tokens=3)
    enc = parts.image_encoder.eval()
    x = torch.rand(2, 3, 64, 64)
    before = enc(x)
    names_before = set(enc.state_dict())
    n = apply_adapters(enc)
    assert n == sum(len(layer.blocks) for layer in enc.layers[1:])  # every TinyViT attention block
    assert torch.equal(enc(x), before)  # zero-initialised output
    assert names_before <= set(enc.state_dict())  # pretrained names unchanged
    assert all(isinstance(m.mlp.adapter, ParallelAdapter) for layer in enc.layers[1:] for m in layer.blocks)


@pytest.mark.parametrize("name", NEW_TRAINERS)
@pytest.mark.parametrize("channels", [1, 2])
def test_forward_backward_two_sizes(name, channels):
    net = build(name, channels).train()
    for shape in [(48, 40), (64, 64)]:
        out = net(torch.randn(2, channels, *shape))
        outs = out if isinstance(out, (list, tuple)) else [out]
        assert outs[0].shape == (2, NUM_CLASSES, *shape)
        sum(o.float().mean() for o in outs).backward()
    for pname, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, pname
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["SAMUNetTrainer", "nnSAMTrainer"])
def test_frozen_encoder_keeps_batchnorm_statistics(name):
    net = build(name).train()
    bns = [m for m in net.sam.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    stats = copy.deepcopy([m.running_mean for m in bns])
    net(torch.randn(2, 1, 48, 40))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))


def test_nnsam_is_nnunets_unet_with_deep_supervision():
    net = build("nnSAMTrainer", deep_supervision=True).eval()
    x = torch.randn(1, 1, 48, 40)
    outs = net(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(48, 40), (24, 20), (12, 10)]
    net.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
    assert torch.allclose(net(x), outs[0])
    assert net.decoder.transpconvs[0].in_channels == 32 + net.sam_channels


def test_nnsam_network_is_ready_for_3d():
    net = build("nnSAMTrainer", dim=3).train()
    outs = net(torch.randn(1, 1, 8, 32, 32))
    assert outs[0].shape == (1, NUM_CLASSES, 8, 32, 32)
    outs[0].mean().backward()


@pytest.mark.parametrize("name", NEW_TRAINERS)
def test_rebuilt_from_plans_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    net = build(name, channels=2, deep_supervision=False)
    with torch.no_grad():  # move every weight off its initialisation (zero adapter outputs included)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"network_weights": net.state_dict()}, tmp_path / "checkpoint.pth")
    torch.manual_seed(1)
    rebuilt = build(name, channels=2, deep_supervision=False)
    rebuilt.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["network_weights"])
    x = torch.randn(2, 2, 48, 40)
    with torch.no_grad():
        assert torch.equal(first(net.eval()(x)), first(rebuilt.eval()(x)))


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_TRAINERS)
def test_train_two_iterations_then_predict(name, data_root, tmp_path):
    from samnnu.pipeline.training import train

    result = train(4, 0, trainer=name, epochs=1, iters_per_epoch=2, device="cpu", run_chain=False)
    predict_held_out_case(tmp_path, name)
    assert name in result["fold_dir"]
