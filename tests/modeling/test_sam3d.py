"""SAM3DAdapterTrainer / SAM3DAdapterNet: identity at step 0, trainable split, rebuild, 3d_fullres train + predict."""
from __future__ import annotations

import copy

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import copy_demo_cases, demo_cases, use_data_root
from samnnu.defaults import DEFAULT_TRAINERS
from samnnu.modeling.encoders import build_sam_parts
from samnnu.modeling.sam3d import (
    DepthEmbedding,
    DepthwiseAdapter3D,
    SAM3DAdapterNet,
    adapter3d_modules,
    apply_adapters3d,
    norm_parameter_names,
    set_depth,
)
from samnnu.pipeline.training import get_trainer_class

NAME = "SAM3DAdapterTrainer"
NUM_CLASSES = 3
DEPTH = 6


def make_plans(channels: int = 1) -> PlansManager:
    """A 3d_fullres configuration as samnnu's planner writes it (tiny encoder, 6-slice patch)."""
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [DEPTH, 32, 32], "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["ZScoreNormalization"] * channels, "use_mask_for_norm": [False] * channels,
           "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
           "batch_dice": True,
           "sam": {"encoder": "tiny", "input_size": 32, "embedding_grid": 8, "slices_per_sample": DEPTH,
                   "batch_size": 2, "intensity_windows": [[-2.0, 2.0], [-1.5, 3.0]][:channels]}}
    return PlansManager({"dataset_name": "Dataset999_Test", "plans_name": "samnnuPlans",
                         "configurations": {"3d_fullres": cfg}})


def build(channels: int = 1) -> SAM3DAdapterNet:
    pm = make_plans(channels)
    return get_trainer_class(NAME).build_network_architecture(pm, pm.get_configuration("3d_fullres"), channels,
                                                              NUM_CLASSES, False)


def numel(params) -> int:
    return sum(p.numel() for p in params)


def test_registered_as_the_3d_trainer():
    assert DEFAULT_TRAINERS[3] == NAME and get_trainer_class(NAME).patch_dimensions == (3,)
    assert isinstance(build(), SAM3DAdapterNet)


def test_forward_backward_small_patch():
    torch.manual_seed(0)
    net = build()
    x = torch.randn(1, 1, DEPTH, 30, 26)
    out = net(x)
    assert out.shape == (1, NUM_CLASSES, DEPTH, 30, 26)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.decoder.parameters())
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    # the adapters' zero-initialised output layers get gradients (the rest of each adapter does once they move)
    assert all(m.up.weight.grad is not None and m.up.weight.grad.abs().sum() > 0 for m in adapter3d_modules(net))


def test_zero_initialised_adapters_give_the_2d_encoder_features_per_slice():
    torch.manual_seed(0)
    net = build()
    plain = build_sam_parts("tiny", input_size=32, num_mask_tokens=1).image_encoder
    result = plain.load_state_dict(net.image_encoder.state_dict(), strict=False)
    assert result.missing_keys == [] and all(".adapter3d." in k or ".depth_embed." in k
                                             for k in result.unexpected_keys)
    net.eval(), plain.eval()
    x = torch.randn(2, 1, DEPTH, 30, 26)
    sam_in, _, _ = net.fit_slices(x)
    with torch.no_grad():
        volumetric = net.encode(sam_in, DEPTH)                      # (B, E, D, g, g)
        per_slice = plain(sam_in)                                   # (B*D, E, g, g)
    expected = per_slice.view(2, DEPTH, *per_slice.shape[1:]).transpose(1, 2)
    assert torch.allclose(volumetric, expected, atol=1e-6)
    # once the adapters move, slices see their neighbours: changing one slice changes the next one's features
    with torch.no_grad():
        for m in adapter3d_modules(net):
            m.up.weight.normal_(std=0.1)
        x2 = x.clone()
        x2[0, :, 2] += 1.0
        a = net.encode(net.fit_slices(x)[0], DEPTH)
        b = net.encode(net.fit_slices(x2)[0], DEPTH)
    assert not torch.allclose(a[0, :, 3], b[0, :, 3])
    assert torch.allclose(a[1], b[1])  # volumes of a batch stay apart: the unchanged volume is unchanged


def test_adapters_sit_at_the_start_of_every_block_and_keep_pretrained_names():
    parts = build_sam_parts("tiny", input_size=32, num_mask_tokens=1)
    names = set(parts.image_encoder.state_dict())
    encoder = copy.deepcopy(parts.image_encoder)
    count = apply_adapters3d(encoder, depth=DEPTH)
    blocks = [m for m in encoder.modules() if hasattr(m, "attn") and hasattr(m, "mlp")]
    assert count == len(blocks) == 3  # the tiny TinyViT has one attention block in each of its last 3 stages
    assert all(isinstance(b.adapter3d, DepthwiseAdapter3D) for b in blocks)
    assert isinstance(encoder.patch_embed.depth_embed, DepthEmbedding)
    assert names <= set(encoder.state_dict())
    assert apply_adapters3d(encoder, depth=DEPTH) == 0  # idempotent


def test_sam_vit_blocks_take_3d_adapters():
    from segment_anything.modeling import ImageEncoderViT

    encoder = ImageEncoderViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, out_chans=8,
                              window_size=2, global_attn_indexes=(1,), use_rel_pos=True)
    x = torch.randn(2 * 3, 3, 32, 32)
    with torch.no_grad():
        before = encoder(x)
        assert apply_adapters3d(encoder, depth=3) == 2
        set_depth(encoder, 3)
        assert torch.allclose(encoder(x), before, atol=1e-6)


def test_trainable_split_matches_design():
    net = build()
    enc = net.image_encoder
    adapted = numel(p for m in adapter3d_modules(enc) for p in m.parameters()) + enc.patch_embed.depth_embed.weight.numel()
    norms = norm_parameter_names(enc)
    assert norms and all(n.endswith(("weight", "bias")) for n in norms)
    norm_count = numel(p for n, p in enc.named_parameters() if n in norms)
    expected = (adapted + norm_count + numel(net.intensity.parameters()) + numel(net.stem.parameters())
                + numel(net.decoder.parameters()))
    trainable = numel(p for p in net.parameters() if p.requires_grad)
    assert trainable == expected
    frozen = numel(p for p in net.parameters() if not p.requires_grad)
    assert frozen == numel(enc.parameters()) - adapted - norm_count > 0
    # BatchNorm statistics stay frozen in training mode
    net.train()
    assert all(not m.training for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_rebuilt_from_plans_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = build(channels=2)
    with torch.no_grad():  # move every weight off its initialisation (zero adapter outputs included)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"network_weights": net.state_dict()}, tmp_path / "checkpoint.pth")
    torch.manual_seed(1)
    rebuilt = build(channels=2)
    rebuilt.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["network_weights"])
    x = torch.randn(1, 2, DEPTH, 30, 26)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), rebuilt.eval()(x))


def test_refuses_a_2d_configuration():
    from samnnu.errors import SamnnuError

    pm = make_plans()
    cfg = copy.deepcopy(pm.plans["configurations"]["3d_fullres"])
    cfg["patch_size"] = [32, 32]
    pm.plans["configurations"]["2d"] = cfg
    with pytest.raises(SamnnuError, match="3D configurations"):
        get_trainer_class(NAME).build_network_architecture(pm, pm.get_configuration("2d"), 1, NUM_CLASSES, False)


@pytest.fixture(scope="module")
def root_3d(tmp_path_factory):
    """A data root with 5 demo cases converted, planned (tiny encoder, CPU 8 GB) and preprocessed (3d_fullres)."""
    from samnnu.dataset_conversion.hippocampus import convert_hippocampus
    from samnnu.pipeline.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("data_root_3d")
    src = copy_demo_cases(tmp_path_factory.mktemp("demo_3d"), demo_cases()[:5])
    with pytest.MonkeyPatch.context() as mp:
        paths = use_data_root(mp, root)
        convert_hippocampus(src, 4, raw_root=paths.raw)
        plan_and_preprocess(4, encoder="tiny", configurations=("3d_fullres",), device_type="cpu",
                            device_memory_gb=8)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("trainer", [NAME, "nnSAMTrainer"])
def test_train_3d_fullres_then_predict(trainer, root_3d, monkeypatch, tmp_path):
    """Both volumetric SAM trainers train on the planner's own 3d_fullres configuration and predict with it."""
    import json

    import SimpleITK as sitk

    from samnnu.demo_data import demo_dataset_path
    from samnnu.pipeline.prediction import predict
    from samnnu.pipeline.training import train

    use_data_root(monkeypatch, root_3d)
    plans = json.loads((root_3d / "nnUNet_preprocessed" / "Dataset004_Hippocampus" / "samnnuPlans.json").read_text())
    assert "no 3D SAM trainer" not in plans["samnnu"]["reason"]
    result = train(4, 0, trainer=trainer, configuration="3d_fullres", epochs=1, iters_per_epoch=2, mirroring=False,
                   device="cpu")
    assert trainer in result["fold_dir"] and "3d_fullres" in result["fold_dir"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    case = sorted((demo_dataset_path() / "images").glob("*.nii.gz"))[-1]  # not among the training cases
    (inputs / case.name).write_bytes(case.read_bytes())
    written = predict(inputs, tmp_path / "out", 4, folds=(0,), trainer=trainer, configuration="3d_fullres",
                      device="cpu", mirroring=False)
    assert [p.name for p in written] == [case.name]
    image, label = sitk.ReadImage(str(case)), sitk.ReadImage(str(written[0]))
    assert label.GetSize() == image.GetSize() and label.GetSpacing() == image.GetSpacing()
    assert set(sitk.GetArrayFromImage(label).ravel().tolist()) <= {0, 1, 2}
