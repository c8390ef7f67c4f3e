"""SAM ViT (vit_b/l/h) and MobileSAM encoders: architecture at small inputs, checkpoint adaptation and errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samnnu.errors import SamnnuError
from samnnu.modeling.encoders import (
    ENCODERS,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    build_sam_parts,
    checkpoint_filter_fn,
    checkpoint_variant,
    load_pretrained,
)

PUBLISHED = {  # embed dim, depth, heads, global attention blocks (segment_anything.build_sam)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def _full_state(parts) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m in ("image_encoder", "prompt_encoder", "mask_decoder")
            for k, v in getattr(parts, m).state_dict().items()}


@pytest.fixture(scope="module")
def vit_b_64():
    torch.manual_seed(0)
    return build_sam_parts("vit_b", input_size=64, num_mask_tokens=3)


@pytest.mark.slow
def test_vit_b_runs_at_64_with_sam_pixel_normalisation(vit_b_64):
    enc = vit_b_64.image_encoder
    assert len(enc.blocks) == 12 and enc.pos_embed.shape == (1, 4, 4, 768)
    assert torch.allclose(enc.input_mean.flatten(), torch.tensor(SAM_PIXEL_MEAN))
    assert torch.allclose(enc.input_std.flatten(), torch.tensor(SAM_PIXEL_STD))
    x = torch.rand(2, 3, 64, 64)
    out = enc(x)
    assert out.shape == (2, 256, 4, 4) and torch.isfinite(out).all()
    out.mean().backward()
    # the normalisation is the spec's data: the same encoder without it sees a different input
    del enc.input_mean
    assert not torch.allclose(enc(x), out)
    assert "input_mean" not in enc.state_dict() and "input_std" not in enc.state_dict()


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_vit_parameter_shapes_follow_the_input_size(name):
    dim, depth, heads, global_blocks = PUBLISHED[name]
    with torch.device("meta"):
        parts = build_sam_parts(name, input_size=64, num_mask_tokens=3)
    enc = parts.image_encoder
    assert len(enc.blocks) == depth and enc.pos_embed.shape == (1, 4, 4, dim)
    for i, block in enumerate(enc.blocks):
        head_dim = dim // heads
        expected = 2 * 4 - 1 if i in global_blocks else 2 * 14 - 1  # global: grid; windowed: 14
        assert block.attn.rel_pos_h.shape == (expected, head_dim), (i, block.attn.rel_pos_h.shape)
        assert block.window_size == (0 if i in global_blocks else 14)
    assert checkpoint_variant(enc.state_dict()) == {"embed_dim": dim, "depth": depth}
    assert parts.stride == 16 and ENCODERS[name].native_size == 1024


@pytest.mark.slow
def test_mobilesam_uses_the_strided_patch_embedding():
    parts = build_sam_parts("mobilesam", input_size=64, num_mask_tokens=3)
    enc = parts.image_encoder
    conv = enc.patch_embed.seq[0].c
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2)
    assert [layer.blocks[0].dim if hasattr(layer.blocks[0], "dim") else None for layer in enc.layers][1:] == \
        [128, 160, 320]
    assert [len(layer.blocks) for layer in enc.layers] == [2, 2, 6, 2]
    out = enc(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 256, 4, 4)
    assert checkpoint_variant(enc.state_dict()) == {"embed_dims": (64, 128, 160, 320)}
    assert torch.allclose(enc.input_mean.flatten(), torch.tensor(SAM_PIXEL_MEAN))
    assert not hasattr(build_sam_parts("litemedsam", input_size=64, num_mask_tokens=3).image_encoder, "input_mean")


def test_checkpoint_filter_fn_resizes_position_embeddings_and_is_pure(vit_b_64):
    state = _full_state(vit_b_64)
    # pretend the checkpoint was trained at 1024: a 64x64 absolute grid, global rel pos of length 127
    state["image_encoder.pos_embed"] = torch.randn(1, 64, 64, 768)
    state["image_encoder.blocks.2.attn.rel_pos_h"] = torch.linspace(0, 1, 127)[:, None].repeat(1, 64)
    state["image_encoder.blocks.0.attn.rel_pos_w"] = torch.randn(27, 64)  # windowed: already right
    before = {k: v.clone() for k, v in state.items()}
    out = checkpoint_filter_fn(state, vit_b_64)
    assert all(torch.equal(state[k], before[k]) for k in state)  # inputs untouched
    enc = out["image_encoder"]
    assert enc["pos_embed"].shape == (1, 4, 4, 768)
    expected = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(enc["pos_embed"], expected)
    rel = enc["blocks.2.attn.rel_pos_h"]
    assert rel.shape == (7, 64)
    assert torch.all(rel[1:, 0] > rel[:-1, 0]) and 0 <= rel.min() and rel.max() <= 1  # linear, monotone
    assert torch.equal(enc["blocks.0.attn.rel_pos_w"], state["image_encoder.blocks.0.attn.rel_pos_w"])
    assert out["mask_decoder"]["mask_tokens.weight"].shape[0] == 3


def test_load_pretrained_round_trip_from_another_input_size(tmp_path, vit_b_64):
    torch.manual_seed(1)
    source = build_sam_parts("vit_b", input_size=128, num_mask_tokens=4)
    state = _full_state(source)
    state["image_encoder.head.weight"] = torch.zeros(2, 2)  # classification heads are dropped
    path = tmp_path / "sam_vit_b.pth"
    torch.save(state, path)
    left = load_pretrained("vit_b", vit_b_64, checkpoint=path)
    assert left == {"image_encoder": [], "prompt_encoder": [], "mask_decoder": []}
    assert torch.equal(vit_b_64.image_encoder.blocks[3].mlp.lin1.weight, source.image_encoder.blocks[3].mlp.lin1.weight)
    assert vit_b_64.image_encoder.pos_embed.shape == (1, 4, 4, 768)


def test_checkpoint_errors_are_one_line_and_name_file_and_variant(tmp_path, vit_b_64):
    with pytest.raises(SamnnuError, match="needs a checkpoint file.*--sam-checkpoint"):
        load_pretrained("vit_b", vit_b_64)
    missing = tmp_path / "nope.pth"
    with pytest.raises(SamnnuError, match="nope.pth: SAM checkpoint not found"):
        load_pretrained("vit_b", vit_b_64, checkpoint=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SamnnuError, match="garbage.pth: not a readable PyTorch checkpoint"):
        load_pretrained("vit_b", vit_b_64, checkpoint=garbage)
    vit_b_file = tmp_path / "sam_vit_b.pth"
    torch.save(_full_state(vit_b_64), vit_b_file)
    with torch.device("meta"):
        vit_l = build_sam_parts("vit_l", input_size=64, num_mask_tokens=3)
    with pytest.raises(SamnnuError) as err:
        load_pretrained("vit_l", vit_l, checkpoint=vit_b_file)
    msg = str(err.value)
    assert "sam_vit_b.pth" in msg and "embed_dim 768, depth 12" in msg and "embed_dim 1024, depth 24" in msg
    assert "\n" not in msg
    mobile = build_sam_parts("mobilesam", input_size=64, num_mask_tokens=3)
    with pytest.raises(SamnnuError, match="sam_vit_b.pth.*'mobilesam' expects embed_dims"):
        load_pretrained("mobilesam", mobile, checkpoint=vit_b_file)
    with pytest.raises(SamnnuError, match="has no pretrained weights"):
        load_pretrained("tiny", build_sam_parts("tiny", input_size=64, num_mask_tokens=3))


def test_mobilesam_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    source = build_sam_parts("mobilesam", input_size=128, num_mask_tokens=4)
    state = _full_state(source)
    state["image_encoder.norm_head.weight"] = torch.ones(320)  # MobileSAM keeps TinyViT's head: dropped
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    target = build_sam_parts("mobilesam", input_size=64, num_mask_tokens=3)
    left = load_pretrained("mobilesam", target, checkpoint=path)
    assert left["image_encoder"] == [] and left["mask_decoder"] == []
