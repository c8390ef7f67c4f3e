"""Tests of samnnu.modeling.encoders, samnnu.modeling.samed, samnnu.modeling.common and samnnu.modeling.samed.

Everything runs on the CPU with the ``tiny`` encoder, except the LiteMedSAM checks (built once, at
input 64, and loaded with the real bundled weights).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from segment_anything.modeling.image_encoder import Attention as SamViTAttention

import samnnu.modeling.encoders
from samnnu.errors import SamnnuError
from samnnu.modeling.common import IntensityToSAM, fit_square, unfit_square
from samnnu.modeling.encoders import (
    ENCODERS,
    adapt_mask_token_weights,
    build_litemedsam,
    build_sam_parts,
    get_encoder_spec,
    litemedsam_checkpoint_path,
    load_pretrained,
)
from samnnu.modeling.samed import LoRAQV, SAMedNet, apply_lora, is_lora_parameter

# input sizes each encoder is built at (litemedsam is heavier: one size only)
SIZES = {"tiny": (32, 64), "litemedsam": (64,)}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on this shared 2-core machine, two are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def litemedsam_state() -> dict[str, torch.Tensor]:
    """The bundled LiteMedSAM checkpoint's state dict (size and SHA-256 verified)."""
    checkpoint = torch.load(litemedsam_checkpoint_path(), map_location="cpu", weights_only=True)
    return checkpoint.get("model", checkpoint)


def attention_modules(encoder: nn.Module) -> dict[str, nn.Module]:
    """TinyViT attention blocks, found by their relative-position biases (not by their qkv layer)."""
    return {name: m for name, m in encoder.named_modules() if hasattr(m, "attention_biases")}


def tiny_net(**kwargs) -> SAMedNet:
    args = dict(encoder="tiny", input_size=64, in_channels=1, num_classes=3, intensity_windows=[(-2.0, 3.0)])
    args.update(kwargs)
    return SAMedNet(**args)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_registry_names_match_specs():
    assert set(SIZES) <= set(ENCODERS)
    for name, spec in ENCODERS.items():
        assert spec.name == name and get_encoder_spec(name) is spec
        assert spec.native_size % spec.size_divisor == 0 and spec.size_divisor % spec.stride == 0


@pytest.mark.parametrize("name,size", [(n, s) for n, sizes in SIZES.items() for s in sizes])
def test_encoder_builds_and_maps_to_quarter_grid(name, size):
    torch.manual_seed(0)
    parts = build_sam_parts(name, input_size=size, num_mask_tokens=4)
    spec = ENCODERS[name]
    assert (parts.input_size, parts.stride, parts.embed_dim) == (size, spec.stride, 256)
    batch = 2 if name == "tiny" else 1
    with torch.no_grad():
        emb = parts.image_encoder.eval()(torch.rand(batch, 3, size, size))
    assert spec.stride == 4
    assert emb.shape == (batch, 256, size // 4, size // 4)
    assert torch.isfinite(emb).all()
    # the prompt encoder is built for the same grid, the decoder for the requested tokens
    assert parts.prompt_encoder.image_embedding_size == (size // 4, size // 4)
    assert parts.prompt_encoder.get_dense_pe().shape == (1, 256, size // 4, size // 4)
    assert parts.mask_decoder.num_mask_tokens == 4


def test_unknown_encoder_and_bad_size_raise():
    with pytest.raises(SamnnuError, match="unknown encoder 'vit_nope'"):
        build_sam_parts("vit_nope", input_size=64, num_mask_tokens=4)
    with pytest.raises(SamnnuError, match="unknown encoder"):
        get_encoder_spec("vit_nope")
    for name in SIZES:  # TinyViTs take any multiple of their stride, 4
        for size in (42, 65, 0):
            with pytest.raises(SamnnuError, match="not a positive multiple of 4"):
                build_sam_parts(name, input_size=size, num_mask_tokens=4)
    with pytest.raises(SamnnuError, match="not a positive multiple of 16"):
        build_sam_parts("vit_b", input_size=40, num_mask_tokens=4)


# --------------------------------------------------------------------------------------------
# LiteMedSAM weights
# --------------------------------------------------------------------------------------------
def test_litemedsam_pretrained_weights_load_completely(litemedsam_state):
    parts = build_litemedsam(input_size=64, num_mask_tokens=4)
    left = load_pretrained("litemedsam", parts)
    assert left == {"image_encoder": [], "prompt_encoder": [], "mask_decoder": []}
    # the weights really arrived (a random init would not match the checkpoint)
    for module, key in (("image_encoder", "patch_embed.seq.0.c.weight"), ("prompt_encoder", "no_mask_embed.weight"),
                        ("mask_decoder", "mask_tokens.weight")):
        assert torch.equal(getattr(parts, module).state_dict()[key], litemedsam_state[f"{module}.{key}"])
    # and the encoder, whose relative-position tables were trained at 256, still runs at 64
    with torch.no_grad():
        emb = parts.image_encoder.eval()(torch.rand(1, 3, 64, 64))
    assert emb.shape == (1, 256, 16, 16) and torch.isfinite(emb).all()


def test_litemedsam_tampered_checksum_is_detected(monkeypatch):
    monkeypatch.setattr(samnnu.modeling.encoders, "LITEMEDSAM_SHA256", "0" * 64)
    with pytest.raises(SamnnuError, match="SHA-256"):
        litemedsam_checkpoint_path()
    with pytest.raises(SamnnuError, match="SHA-256"):
        load_pretrained("litemedsam", build_sam_parts("tiny", input_size=32, num_mask_tokens=4))


def test_tiny_has_no_pretrained_weights():
    with pytest.raises(SamnnuError, match="no pretrained weights"):
        load_pretrained("tiny", build_sam_parts("tiny", input_size=32, num_mask_tokens=4))


@pytest.mark.parametrize("n_tokens", [3, 6])
def test_adapt_mask_token_weights(litemedsam_state, n_tokens):
    prefix = "mask_decoder."
    state = {k[len(prefix):]: v for k, v in litemedsam_state.items() if k.startswith(prefix)}
    before = {k: v.clone() for k, v in state.items()}
    n_old = state["mask_tokens.weight"].shape[0]
    assert n_old == 4

    out = adapt_mask_token_weights(state, n_tokens)

    assert all(torch.equal(state[k], before[k]) for k in before) and state.keys() == before.keys(), "input changed"
    assert out["mask_tokens.weight"].shape == (n_tokens, 256)
    mlp_keys = sorted({k.split(".", 2)[2] for k in state if k.startswith("output_hypernetworks_mlps.")})
    assert {int(k.split(".")[1]) for k in out if k.startswith("output_hypernetworks_mlps.")} == set(range(n_tokens))
    for i in range(n_tokens):
        assert torch.equal(out["mask_tokens.weight"][i], state["mask_tokens.weight"][i % n_old])
        for k in mlp_keys:
            assert torch.equal(out[f"output_hypernetworks_mlps.{i}.{k}"],
                               state[f"output_hypernetworks_mlps.{i % n_old}.{k}"])
    # the result is exactly what a decoder with n_tokens mask tokens expects
    decoder = build_litemedsam(input_size=64, num_mask_tokens=n_tokens).mask_decoder
    decoder.load_state_dict(out, strict=True)
    assert torch.equal(decoder.mask_tokens.weight[n_tokens - 1], state["mask_tokens.weight"][(n_tokens - 1) % n_old])


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
def test_apply_lora_wraps_each_attention_block_once():
    torch.manual_seed(0)
    encoder = build_sam_parts("tiny", input_size=32, num_mask_tokens=4).image_encoder
    attns = attention_modules(encoder)
    assert len(attns) == 3  # tiny: one attention block in each of the 3 transformer stages

    assert apply_lora(encoder, rank=2) == len(attns)
    assert all(isinstance(m.qkv, LoRAQV) for m in attns.values())
    assert sum(isinstance(m, LoRAQV) for m in encoder.modules()) == len(attns)
    assert all(m.qkv.rank == 2 for m in attns.values())
    assert apply_lora(encoder, rank=2) == 0, "applying LoRA twice must not wrap a wrapper"
    assert sum(isinstance(m, LoRAQV) for m in encoder.modules()) == len(attns)


def test_fresh_lora_encoder_computes_the_same():
    torch.manual_seed(0)
    base = build_sam_parts("tiny", input_size=32, num_mask_tokens=4).image_encoder.eval()
    wrapped = copy.deepcopy(base)
    apply_lora(wrapped)
    wrapped.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), base(x), atol=1e-6)
        # a nonzero update must change the output (the comparison above is not vacuous)
        for m in wrapped.modules():
            if isinstance(m, LoRAQV):
                m.lora_q_b.weight.fill_(0.5)
        assert not torch.allclose(wrapped(x), base(x), atol=1e-3)


def _split_tinyvit(out: torch.Tensor, attn: nn.Module) -> dict[str, torch.Tensor]:
    """q, k, v parts of a TinyViT qkv output, split the way TinyViT's Attention.forward splits them."""
    q, k, v = out.view(*out.shape[:-1], attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=-1)
    return {"q": q, "k": k, "v": v}


def _split_sam_vit(out: torch.Tensor, attn: nn.Module) -> dict[str, torch.Tensor]:
    """q, k, v parts of a SAM ViT qkv output (reshape(B, N, 3, heads, -1), as its Attention.forward does)."""
    q, k, v = out.view(*out.shape[:-1], 3, attn.num_heads, -1).unbind(-3)
    return {"q": q, "k": k, "v": v}


def _lora_changes(attn: nn.Module, which: str, splitter) -> set[str]:
    """Which of q, k, v change in attn.qkv's output when only LoRA's ``which`` update is nonzero."""
    base = copy.deepcopy(attn.qkv)
    host = copy.deepcopy(attn)
    apply_lora(host)
    lora = host.qkv
    with torch.no_grad():
        getattr(lora, f"lora_{which}_b").weight.normal_()
        x = torch.randn(7, base.in_features)
        before, after = splitter(base(x), attn), splitter(lora(x), attn)
    changed = {part for part in before if not torch.equal(before[part], after[part])}
    for part in changed:  # every feature of a changed part moves, not just some
        assert ((after[part] - before[part]).abs() > 0).all(), f"only some {part} features changed"
    return changed


@pytest.mark.parametrize("which", ["q", "v"])
def test_lora_updates_only_its_own_projection_tinyvit(which):
    torch.manual_seed(0)
    encoder = build_sam_parts("tiny", input_size=32, num_mask_tokens=4).image_encoder
    attns = attention_modules(encoder)
    assert any(m.num_heads > 1 for m in attns.values())  # the per-head interleaving is exercised
    for attn in attns.values():
        assert _lora_changes(attn, which, _split_tinyvit) == {which}


@pytest.mark.parametrize("which", ["q", "v"])
def test_lora_updates_only_its_own_projection_sam_vit(which):
    torch.manual_seed(0)
    attn = SamViTAttention(dim=16, num_heads=2)
    assert _lora_changes(attn, which, _split_sam_vit) == {which}


def test_wrapped_state_dict_keeps_base_keys():
    torch.manual_seed(0)
    base = build_sam_parts("tiny", input_size=32, num_mask_tokens=4).image_encoder
    plain_state = base.state_dict()
    wrapped = copy.deepcopy(base)
    apply_lora(wrapped)
    state = wrapped.state_dict()
    for name in attention_modules(base):
        for suffix in ("weight", "bias"):
            key = f"{name}.qkv.{suffix}"
            assert key in state and torch.equal(state[key], plain_state[key])
    # a plain (pretrained-style) state dict loads into the wrapped encoder; only LoRA keys stay missing
    fresh = build_sam_parts("tiny", input_size=32, num_mask_tokens=4).image_encoder
    apply_lora(fresh)
    result = fresh.load_state_dict(plain_state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(is_lora_parameter(k) for k in result.missing_keys)
    assert len(result.missing_keys) == 4 * len(attention_modules(base))


# --------------------------------------------------------------------------------------------
# SAMedNet
# --------------------------------------------------------------------------------------------
def test_samednet_trainable_parameters():
    torch.manual_seed(0)
    net = tiny_net()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}

    lora = {f"image_encoder.{n}" for n, _ in net.image_encoder.named_parameters() if ".lora_" in n}
    decoder = {f"mask_decoder.{n}" for n, _ in net.mask_decoder.named_parameters()
               if not n.startswith("iou_prediction_head.")}
    expected = lora | decoder | {"intensity.mix.weight", "intensity.mix.bias", "prompt_encoder.no_mask_embed.weight"}
    assert len(lora) == 4 * net.num_lora_layers == 4 * len(attention_modules(net.image_encoder))
    assert "mask_decoder.iou_token.weight" in trainable and "mask_decoder.mask_tokens.weight" in trainable
    assert trainable == expected

    wrappers = [m for m in net.image_encoder.modules() if isinstance(m, LoRAQV)]
    expected_count = (
        sum(p.numel() for w in wrappers for lin in (w.lora_q_a, w.lora_q_b, w.lora_v_a, w.lora_v_b)
            for p in lin.parameters())
        + sum(p.numel() for p in net.intensity.mix.parameters())
        + net.prompt_encoder.no_mask_embed.weight.numel()
        + sum(p.numel() for p in net.mask_decoder.parameters())
        - sum(p.numel() for p in net.mask_decoder.iou_prediction_head.parameters())
    )
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == expected_count


def test_samednet_frozen_batchnorm_stays_in_eval():
    net = tiny_net()
    bns = [m for m in net.image_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    net.train()
    assert net.training and net.mask_decoder.training and net.intensity.training
    assert not any(bn.training for bn in bns)
    stats = [bn.running_mean.clone() for bn in bns]
    net(torch.randn(2, 1, 32, 32))
    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(bns, stats)), "frozen BatchNorm statistics moved"
    net.eval()
    assert not net.training and not any(bn.training for bn in bns)


@pytest.mark.parametrize("shape", [(56, 40), (30, 30)])
def test_samednet_forward_backward(shape):
    torch.manual_seed(0)
    net = tiny_net().train()
    x = torch.randn(2, 1, *shape)
    target = torch.randint(0, 3, (2, *shape))
    logits = net(x)
    assert logits.shape == (2, 3, *shape)
    nn.functional.cross_entropy(logits, target).backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"frozen parameter {name} got a gradient"
    # the trainable path reaches the loss: the decoder and LoRA's B matrices receive nonzero gradients
    assert net.mask_decoder.mask_tokens.weight.grad.abs().sum() > 0
    assert all(m.lora_q_b.weight.grad.abs().sum() > 0 for m in net.image_encoder.modules() if isinstance(m, LoRAQV))


def test_samednet_output_independent_of_raw_intensity_scale():
    torch.manual_seed(0)
    net = tiny_net(intensity_windows=[(-1.5, 2.0)]).eval()
    raw = torch.rand(1, 1, 40, 32) * 300.0

    def zscore(v):
        return (v - v.mean()) / v.std()

    with torch.no_grad():
        out = net(zscore(raw))
        # the same anatomy stored with another gain and offset (e.g. uint8 vs float32 scans)
        assert torch.allclose(net(zscore(raw * 0.01 + 7.0)), out, atol=1e-4)
        # values beyond the window are clipped: pushing them further out changes nothing
        z = zscore(raw)
        pushed = torch.where(z > 2.0, z + 50.0, torch.where(z < -1.5, z - 50.0, z))
        assert (pushed != z).any()
        assert torch.equal(net.intensity(pushed), net.intensity(z))
        assert torch.allclose(net(pushed), out, atol=1e-5)
        # but a change inside the window does reach the output
        assert not torch.allclose(net(z * 0.5), out, atol=1e-4)


def test_intensity_to_sam_window_maps_to_unit_range():
    layer = IntensityToSAM(2, [(-1.0, 1.0), (0.0, 4.0)])
    x = torch.tensor([-5.0, -1.0, 0.0, 1.0, 4.0, 9.0]).view(1, 1, 1, 6).expand(1, 2, 1, 6)
    y = layer(x)
    assert y.shape == (1, 3, 1, 6)
    # mix starts as the channel mean: (clip01((x+1)/2) + clip01(x/4)) / 2
    expected = torch.tensor([0.0, 0.0, 0.25, 0.625, 1.0, 1.0])
    for c in range(3):
        assert torch.allclose(y[0, c, 0], expected)
    with pytest.raises(ValueError):
        IntensityToSAM(2, [(-1.0, 1.0)])


# --------------------------------------------------------------------------------------------
# fit_square / unfit_square
# --------------------------------------------------------------------------------------------
def test_fit_unfit_square_roundtrip_without_scaling():
    x = torch.randn(2, 3, 64, 40)
    square, content = fit_square(x, 64)
    assert square.shape == (2, 3, 64, 64) and content == (64, 40)
    assert torch.equal(square[..., :40], x) and (square[..., 40:] == 0).all()
    back = unfit_square(square, content, 64, (64, 40))
    assert back.shape == x.shape and torch.equal(back, x)


@pytest.mark.parametrize("shape", [(16, 8), (30, 30), (56, 40), (40, 56)])
def test_fit_unfit_square_roundtrip_with_scaling(shape):
    h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([yy + 2 * xx, torch.full((h, w), 3.0)])[None]  # (1, 2, h, w)
    square, content = fit_square(smooth, 64)
    assert square.shape == (1, 2, 64, 64)
    assert max(content) == 64 and abs(content[0] / content[1] - h / w) < 0.05  # aspect ratio kept
    back = unfit_square(square, content, 64, shape)
    assert back.shape == smooth.shape
    assert torch.allclose(back[0, 1], smooth[0, 1])  # a constant stays constant: no padding leaks in
    assert (back[0, 0] - smooth[0, 0]).abs().max() < 0.1
    # a blob stays where it was
    blob = torch.zeros(1, 1, h, w)
    blob[..., h // 4: h // 2, w // 4: w // 2] = 1.0
    back_blob = unfit_square(fit_square(blob, 64)[0], content, 64, shape)
    assert ((back_blob > 0.5) == (blob > 0.5)).float().mean() > 0.9


def test_unfit_square_from_lower_resolution_logits():
    x = torch.zeros(1, 1, 48, 24)
    x[..., :24, :] = 1.0  # top half
    square, content = fit_square(x, 64)
    low = torch.nn.functional.interpolate(square, size=(16, 16), mode="nearest")
    back = unfit_square(low, content, 64, (48, 24))
    assert back.shape == (1, 1, 48, 24)
    assert back[..., :20, :].min() > 0.5 and back[..., 28:, :].max() < 0.5
