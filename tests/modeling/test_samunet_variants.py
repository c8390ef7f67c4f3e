"""SAMUNetTrainer's measured variants (samnnu.trainers.samunet_variants): deep supervision in the fusion
decoder, LoRA in the frozen encoder, a larger encoder input, the encoder alone at half the input."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from test_trainers_adapters import build, numel

from conftest import train_validate_and_predict
from samnnu.modeling.common import fit_square, unfit_square
from samnnu.modeling.frozen_encoder import FrozenSAMEncoder
from samnnu.modeling.samed import is_lora_parameter
from samnnu.pipeline.training import get_trainer_class


@pytest.mark.parametrize("patch", [(56, 40), (48, 37)])
def test_deep_supervision_outputs_have_the_size_of_nnunets_downsampled_targets(patch):
    cls = get_trainer_class("SAMUNetDeepSupervisionTrainer")
    net = build("SAMUNetDeepSupervisionTrainer", deep_supervision=True).train()
    outs = net(torch.randn(2, 1, *patch))
    assert isinstance(outs, list) and len(outs) == net.deep_supervision_levels == 3
    # the scales the trainer hands nnU-Net's data pipeline, and the targets it makes from them
    trainer = SimpleNamespace(enable_deep_supervision=True, configuration_manager=SimpleNamespace(patch_size=patch),
                              _bare_network=lambda: net)
    scales = cls._get_deep_supervision_scales(trainer)
    assert scales == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
    seg = torch.randint(0, 3, (1, *patch), dtype=torch.int16)
    targets = DownsampleSegForDSTransform(scales)._apply_to_segmentation(seg)
    assert [tuple(o.shape[2:]) for o in outs] == [tuple(t.shape[1:]) for t in targets]
    sum(o.mean() for o in outs).backward()
    assert all(h.weight.grad is not None for h in net.decoder.aux_heads)


def test_deep_supervision_off_gives_the_full_resolution_output_and_the_same_weights():
    trained = build("SAMUNetDeepSupervisionTrainer", deep_supervision=True).eval()
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        outs = trained(x)
        # what the predictor builds (deep supervision off) loads the training checkpoint as it is
        inference = build("SAMUNetDeepSupervisionTrainer", deep_supervision=False).eval()
        inference.load_state_dict(trained.state_dict(), strict=True)
        assert torch.equal(inference(x), outs[0])
        # the default trainer has no heads: switching it on changes nothing
        plain = build("SAMUNetTrainer", deep_supervision=True).eval()
        assert plain.deep_supervision_levels == 1 and not plain.deep_supervision
        assert plain(x).shape == (1, 3, 56, 40)


def test_lora_trains_only_its_matrices_in_the_encoder_and_starts_as_the_frozen_encoder():
    lora = build("SAMUNetLoRATrainer").train()
    plain = build("SAMUNetTrainer").train()
    sam_trainable = {n for n, p in lora.sam.named_parameters() if p.requires_grad}
    assert sam_trainable and all(is_lora_parameter(n) for n in sam_trainable)
    assert numel(p for p in lora.parameters() if p.requires_grad) == (
        numel(lora.conv_branch.parameters()) + numel(lora.decoder.parameters())
        + numel(p for p in lora.sam.parameters() if p.requires_grad))
    missing, unexpected = lora.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(is_lora_parameter(k) for k in missing)
    x = torch.randn(2, 1, 56, 40)
    with torch.no_grad():
        assert torch.allclose(lora(x), plain(x), atol=1e-6)  # B matrices start at zero
    lora(x).mean().backward()
    grads = {n for n, p in lora.sam.named_parameters() if p.grad is not None}
    assert grads and grads <= sam_trainable
    assert any(p.grad.abs().sum() > 0 for n, p in lora.sam.named_parameters() if n.endswith("_b.weight"))


def test_lora_encoder_loads_litemedsam_leaving_only_the_lora_matrices():
    enc = FrozenSAMEncoder(encoder="litemedsam", input_size=64, in_channels=1, intensity_windows=[(-2.0, 2.0)],
                           lora_rank=4)
    left = enc.load_pretrained()
    assert left["image_encoder"] and all(is_lora_parameter(k) for k in left["image_encoder"])


def test_input2x_doubles_the_encoder_input_and_keeps_the_patch():
    net = build("SAMUNetInput2xTrainer")
    assert net.input_size == 2 * build("SAMUNetTrainer").input_size
    assert net(torch.randn(1, 1, 56, 40)).shape == (1, 3, 56, 40)


@pytest.mark.parametrize("patch", [(56, 40), (48, 37)])
def test_half_encoder_sees_the_patch_at_half_size_and_the_branch_meets_its_grid(patch):
    net = build("SAMUNetHalfEncoderTrainer").eval()
    plain = build("SAMUNetTrainer")
    assert net.input_size == plain.input_size and net.sam.input_size == plain.input_size // 2
    # one more conv stage, whose coarsest map has the encoder's (coarser) grid
    assert len(net.conv_branch.stages) == len(plain.conv_branch.stages) + 1
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        square, content = fit_square(x, net.input_size)
        features = net.conv_branch(square)
        embedding, _ = net.sam(x)
        assert features[-1].shape[-2:] == embedding.shape[-2:] == (net.sam.input_size // net.sam.stride,) * 2
        # the output is the decoder's map cut to the patch's place in the network's square, not the encoder's
        expected = unfit_square(net.decoder(embedding, features), content, net.input_size, patch)
        assert torch.allclose(net(x), expected, atol=1e-6) and expected.shape == (2, 3, *patch)
    net.train()(x).mean().backward()
    assert all(p.grad is None for p in net.sam.parameters())
    assert all(p.grad is not None for p in net.conv_branch.parameters())


def test_encoder_input_must_divide_the_network_input():
    from samnnu.modeling.samunet import SAMUNet

    with pytest.raises(ValueError, match="must divide"):
        SAMUNet(encoder="tiny", input_size=64, encoder_input_size=40, in_channels=1, num_classes=3,
                intensity_windows=[(-2.0, 2.0)])


@pytest.mark.slow
def test_deep_supervision_trainer_trains_validates_and_predicts(data_root, tmp_path):
    train_validate_and_predict(tmp_path, "SAMUNetDeepSupervisionTrainer")
