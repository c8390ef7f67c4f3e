"""SelfPromptTrainer and ImplicitDecoderTrainer: shapes, gradients, parameter split, rebuild, point sampling,
resolution-free output, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import predict_held_out_case
from samnnu.modeling.implicit_decoder import (
    PointLogits,
    PointSampledLoss,
    pixel_centers,
    sample_features,
    sample_labels,
    uncertain_points,
)
from samnnu.modeling.samed import LoRAQV, SAMedNet
from samnnu.modeling.self_prompt import CoarseAuxiliaryLoss, SelfPromptOutput
from samnnu.pipeline.training import get_trainer_class

TRAINERS = ["SelfPromptTrainer", "ImplicitDecoderTrainer"]
NUM_CLASSES = 3
WINDOWS = [[-2.0, 2.0], [-1.5, 3.0]]


def make_plans(channels: int) -> PlansManager:
    """A 2d configuration as samnnu's planner writes it, with the tiny encoder at input 64."""
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [48, 40], "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"] * channels,
           "use_mask_for_norm": [False] * channels, "batch_dice": True,
           "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
           "sam": {"encoder": "tiny", "input_size": 64, "embedding_grid": 16, "batch_size": 2,
                   "intensity_windows": WINDOWS[:channels]}}
    return PlansManager({"dataset_name": "Dataset999_Test", "plans_name": "samnnuPlans", "configurations": {"2d": cfg}})


def build(name: str, channels: int = 1):
    pm = make_plans(channels)
    return get_trainer_class(name).build_network_architecture(pm, pm.get_configuration("2d"), channels, NUM_CLASSES,
                                                              False)


def numel(params) -> int:
    return sum(p.numel() for p in params)


def lora_count(encoder: torch.nn.Module) -> int:
    return numel(p for m in encoder.modules() if isinstance(m, LoRAQV)
                 for sub in (m.lora_q_a, m.lora_q_b, m.lora_v_a, m.lora_v_b) for p in sub.parameters())


def split(net) -> tuple[int, int]:
    return (numel(p for p in net.parameters() if p.requires_grad),
            numel(p for p in net.parameters() if not p.requires_grad))


def perturb(net: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every weight off its initialisation (zero-initialised LoRA B and prompt output included)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def dense_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target[:, 0].long())


def train_loss(name: str):
    return CoarseAuxiliaryLoss(dense_loss, 0.4) if name == "SelfPromptTrainer" else PointSampledLoss(dense_loss)


def test_trainable_split_self_prompt():
    net = build("SelfPromptTrainer")
    enc = net.image_encoder
    assert net.num_lora_layers == sum(len(layer.blocks) for layer in enc.layers[1:]) > 0
    own = numel(net.coarse_head.parameters()) + numel(net.mask_prompt.parameters()) + net.query_tokens.weight.numel()
    trainable = (lora_count(enc) + numel(net.intensity.parameters()) + net.prompt_encoder.no_mask_embed.weight.numel()
                 + numel(net.mask_decoder.parameters()) - numel(net.mask_decoder.iou_prediction_head.parameters())
                 + own)
    total = numel(net.parameters())
    assert split(net) == (trainable, total - trainable)
    # the same as SAMed's network plus the self-prompt modules
    samed = SAMedNet(encoder="tiny", input_size=64, in_channels=1, num_classes=NUM_CLASSES,
                     intensity_windows=WINDOWS[:1])
    assert split(net)[0] - split(samed)[0] == own > 0
    assert split(net)[1] == split(samed)[1]


def test_trainable_split_implicit_decoder():
    net = build("ImplicitDecoderTrainer")
    enc = net.image_encoder
    assert net.num_lora_layers == sum(len(layer.blocks) for layer in enc.layers[1:]) > 0
    trainable = (lora_count(enc) + numel(net.intensity.parameters()) + numel(net.embed_proj.parameters())
                 + numel(net.stem.parameters()) + numel(net.mlp.parameters()))
    assert split(net) == (trainable, numel(enc.parameters()) - lora_count(enc))
    assert not hasattr(net, "mask_decoder")  # SAM's decoder is replaced, not carried along


@pytest.mark.parametrize("name", TRAINERS)
@pytest.mark.parametrize("channels", [1, 2])
def test_dense_output_at_two_input_sizes(name, channels):
    net = build(name, channels).eval()
    for shape in [(48, 40), (64, 64)]:
        with torch.no_grad():
            out = net(torch.randn(2, channels, *shape))
        assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES, *shape)


@pytest.mark.parametrize("shape", [(48, 40), (64, 64)])
def test_training_outputs(shape):
    x = torch.randn(2, 1, *shape)
    out = build("SelfPromptTrainer").train()(x)
    assert isinstance(out, SelfPromptOutput)
    assert out.logits.shape == out.coarse.shape == (2, NUM_CLASSES, *shape)
    net = build("ImplicitDecoderTrainer").train()
    points = net(x)
    n_coarse = round(shape[0] / net.coarse_stride) * round(shape[1] / net.coarse_stride)
    n = n_coarse + round(net.point_fraction * shape[0] * shape[1])
    assert isinstance(points, PointLogits)
    assert points.logits.shape == (2, NUM_CLASSES, n) and points.coords.shape == (2, n, 2)
    assert points.coords.abs().max() <= 1
    assert torch.equal(points.coords[0, :n_coarse], pixel_centers((shape[0] // 4, shape[1] // 4)))


@pytest.mark.parametrize("name", TRAINERS)
def test_forward_backward_reaches_every_trainable_parameter(name):
    torch.manual_seed(0)
    net = build(name, channels=2)
    perturb(net)
    x, target = torch.randn(2, 2, 48, 40), torch.randint(0, NUM_CLASSES, (2, 1, 48, 40)).float()
    train_loss(name)(net.train()(x), target).backward()
    for pname, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize("name", TRAINERS)
def test_rebuilt_from_plans_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    net = build(name, channels=2)
    perturb(net, 0.01)
    torch.save({"network_weights": net.state_dict()}, tmp_path / "checkpoint.pth")
    torch.manual_seed(1)
    rebuilt = build(name, channels=2)
    x = torch.randn(2, 2, 48, 40)
    with torch.no_grad():
        assert not torch.equal(net.eval()(x), rebuilt.eval()(x))
        rebuilt.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["network_weights"])
        # eval() after loading, as at prediction: TinyViT caches its attention biases when switched to eval
        assert torch.equal(net(x), rebuilt.eval()(x))


def test_coarse_auxiliary_loss_adds_weighted_coarse_term():
    logits, coarse = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8)).float()
    loss = CoarseAuxiliaryLoss(dense_loss, 0.4)
    expected = dense_loss(logits, target) + 0.4 * dense_loss(coarse, target)
    assert torch.allclose(loss(SelfPromptOutput(logits, coarse), target), expected)
    assert torch.equal(loss(logits, target), dense_loss(logits, target))


def test_sampling_at_pixel_centres_reads_the_pixels():
    features = torch.randn(2, 4, 6, 5)
    labels = torch.arange(60).view(2, 1, 6, 5).to(torch.int16)
    centres = pixel_centers((6, 5)).unsqueeze(0).expand(2, -1, -1)
    assert torch.allclose(sample_features(features, centres), features.flatten(2), atol=1e-6)
    assert torch.equal(sample_labels(labels, centres), labels.flatten(2))
    # (y, x) order: a point just right of the centre of pixel (0, 0) is still in pixel (0, 0), one a pixel right
    # is in (0, 1)
    probe = torch.tensor([[[-5 / 6, -0.8 + 0.15], [-5 / 6, -0.8 + 0.4]]])
    assert sample_labels(labels[:1], probe).flatten().tolist() == [0, 1]


def test_point_loss_at_every_pixel_centre_equals_dense_loss():
    logits, target = torch.randn(2, 3, 6, 5), torch.randint(0, 3, (2, 1, 6, 5)).float()
    centres = pixel_centers((6, 5)).unsqueeze(0).expand(2, -1, -1)
    loss = PointSampledLoss(dense_loss)
    assert torch.allclose(loss(PointLogits(logits.flatten(2), centres), target), dense_loss(logits, target))
    assert torch.equal(loss(logits, target), dense_loss(logits, target))


def test_uncertain_points_gather_at_the_class_boundary():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 16)
    coarse = torch.stack([-8 * x, 8 * x]).view(1, 2, 1, 16).expand(3, 2, 16, 16)  # boundary at x = 0
    guided = uncertain_points(coarse, 200, oversample=4, importance=1.0)
    uniform = uncertain_points(coarse, 200, oversample=4, importance=0.0)
    assert guided.shape == uniform.shape == (3, 200, 2)
    assert guided[..., 1].abs().mean() < 0.5 * uniform[..., 1].abs().mean()
    assert guided[..., 0].abs().mean() > 0.3  # no preference along y


def _structured_image(h: int, w: int) -> torch.Tensor:
    """(1, 1, h, w): two smooth blobs and a gradient, asymmetric left-right and up-down."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    img = 2.5 * torch.exp(-((ys - 0.3) ** 2 + (xs + 0.4) ** 2) / 0.08) - 2 * torch.exp(-((ys + 0.4) ** 2
                                                                                         + (xs - 0.3) ** 2) / 0.05)
    return (img + 0.8 * xs).view(1, 1, h, w)


@pytest.mark.slow
def test_implicit_decoder_outputs_agree_across_resolutions():
    torch.manual_seed(0)
    net = build("ImplicitDecoderTrainer").eval()
    perturb(net, 0.02)
    x = _structured_image(48, 40)
    with torch.no_grad():
        low = net(x)
        high = net.predict_at(x, (96, 80))
        assert torch.equal(net.predict_at(x, (48, 40)), low)
        assert net.predict_at(x, (37, 53)).shape == (1, NUM_CLASSES, 37, 53)
        net.points_per_chunk = 100  # chunked evaluation gives the same logits
        assert torch.allclose(net.predict_at(x, (96, 80)), high, atol=1e-5)
    labels = low.argmax(1)
    assert (labels.flatten().bincount(minlength=NUM_CLASSES) >= 0.05 * labels.numel()).sum() >= 2  # not one class

    def disagreement(hi: torch.Tensor) -> tuple[float, float]:
        down = F.avg_pool2d(hi, 2)
        return (float((down.argmax(1) != labels).float().mean()),
                float((down - low).abs().mean() / (low - low.mean()).abs().mean()))

    aligned = disagreement(high)
    shifted = disagreement(high.roll(2, dims=-1))  # one low-resolution pixel to the right
    assert aligned[0] < 0.01 and aligned[1] < 0.03  # an align_corners=True grid gives about 0.013, 0.046
    assert shifted[0] > 2 * aligned[0] and shifted[1] > 2 * aligned[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_train_two_iterations_then_predict(name, data_root, tmp_path, monkeypatch):
    from samnnu.pipeline.training import train

    wrapper = CoarseAuxiliaryLoss if name == "SelfPromptTrainer" else PointSampledLoss
    seen = []
    original = wrapper.forward

    def recording_forward(self, output, target):
        seen.append(type(output).__name__)
        return original(self, output, target)

    monkeypatch.setattr(wrapper, "forward", recording_forward)
    result = train(4, 0, trainer=name, epochs=1, iters_per_epoch=2, device="cpu", mirroring=False, run_chain=False)
    # two training steps on the training outputs, then validation on dense logits
    expected = "SelfPromptOutput" if name == "SelfPromptTrainer" else "PointLogits"
    assert seen[:2] == [expected] * 2 and set(seen[2:]) == {"Tensor"}
    predict_held_out_case(tmp_path, name)
    assert name in result["fold_dir"]
