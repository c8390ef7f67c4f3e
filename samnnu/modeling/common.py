"""Pieces every samnnu network shares: SAM-range inputs, square encoder inputs, prompt-free decoding."""
from __future__ import annotations

import platform

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder


class IntensityToSAM(nn.Module):
    """Maps nnU-Net-normalised channels to the 3-channel [0, 1] images SAM encoders were trained on.

    Each input channel is clipped to its planned intensity window (values after nnU-Net's
    normalisation, chosen by the planner from the data) and scaled to [0, 1]; a trainable 1x1
    convolution, initialised to the channel mean, mixes C channels into 3. With ``rgb_groups`` (2.5D
    context, :mod:`samnnu.modeling.context`) the channels form three consecutive groups of C / 3
    (the slices z - 1, z, z + 1) and output channel g starts as the mean of group g instead.

    x: (B, C, H, W) -> (B, 3, H, W)
    """

    def __init__(self, in_channels: int, windows: list[tuple[float, float]], rgb_groups: bool = False):
        super().__init__()
        if len(windows) != in_channels:
            raise ValueError(f"{len(windows)} intensity windows for {in_channels} channels")
        if rgb_groups and in_channels % 3:
            raise ValueError(f"{in_channels} channels do not form three groups")
        lo = torch.tensor([w[0] for w in windows], dtype=torch.float32).view(1, -1, 1, 1)
        hi = torch.tensor([w[1] for w in windows], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("width", (hi - lo).clamp_min(1e-6), persistent=False)
        self.mix = nn.Conv2d(in_channels, 3, kernel_size=1, bias=True)
        with torch.no_grad():
            if rgb_groups:
                group = in_channels // 3
                self.mix.weight.zero_()
                for g in range(3):
                    self.mix.weight[g, g * group:(g + 1) * group] = 1.0 / group
            else:
                self.mix.weight.fill_(1.0 / in_channels)
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.lo) / self.width).clamp(0.0, 1.0)
        return self.mix(x)


def fit_square(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Scale (keeping the aspect ratio) so the longer side is ``size``, then zero-pad to size x size.

    x: (B, C, H, W) -> ((B, C, size, size), (h, w)) where (h, w) is the unpadded content's size.
    """
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    return F.pad(x, (0, size - nw, 0, size - nh)), (nh, nw)


def unfit_square(logits: torch.Tensor, content: tuple[int, int], input_size: int,
                 out_size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`fit_square` on decoder logits of any resolution.

    logits: (B, K, r, r) covering the size x size padded input -> (B, K, *out_size)
    """
    r = logits.shape[-1]
    ch = max(1, round(content[0] * r / input_size))
    cw = max(1, round(content[1] * r / input_size))
    logits = logits[..., :ch, :cw]
    if (ch, cw) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


def decode_prompt_free(prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                       image_embeddings: torch.Tensor, *, dense: torch.Tensor | None = None,
                       extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Run SAM's mask decoder with no prompts and return the masks of all its mask tokens.

    The sparse prompt is empty and the dense prompt is the prompt encoder's learned no-mask
    embedding, as when SAM is called without prompts; unlike SAM's own ``predict_masks`` this
    handles a batch of images (one token set per image) and keeps every mask token (one per class).
    Networks that make their own prompts pass them instead of user prompts:

    image_embeddings: (B, D, h, w) -> logits (B, num_mask_tokens, 4h, 4w)
    dense: (B or 1, D, h, w) dense prompt added to the embedding (default: the no-mask embedding)
    extra_tokens: (B or 1, T, D) sparse prompt tokens appended after the mask tokens (default: none)
    """
    b, d, h, w = image_embeddings.shape
    tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = tokens.unsqueeze(0).expand(b, -1, -1)
    if extra_tokens is not None:
        tokens = torch.cat([tokens, extra_tokens.to(tokens.dtype).expand(b, -1, -1)], dim=1)
    if dense is None:
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    src = image_embeddings + dense
    pos = prompt_encoder.pe_layer((h, w)).unsqueeze(0).to(src.dtype)
    hs, src = mask_decoder.transformer(src, pos, tokens)
    n = mask_decoder.num_mask_tokens
    mask_tokens_out = hs[:, 1:1 + n, :]
    src = src.transpose(1, 2).reshape(b, d, h, w)
    upscaled = mask_decoder.output_upscaling(src)
    hyper = torch.stack([mask_decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(n)],
                        dim=1)
    bu, cu, hu, wu = upscaled.shape
    return (hyper @ upscaled.view(bu, cu, hu * wu)).view(bu, n, hu, wu)


#: what a forward pass computes in: float32, or bfloat16 autocast (on a CPU that computes it natively)
PRECISIONS = ("fp32", "bf16")


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: on x86 AVX512-BF16 or AMX (oneDNN's own check also
    accepts plain AVX-512, which only emulates it), elsewhere oneDNN's check. Where bfloat16 is emulated,
    autocast to it is slower than float32."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode (frozen encoders keep their statistics)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def transformer_blocks(encoder: nn.Module):
    """(block, token dim, token grid or None) for every transformer block with an MLP."""
    for module in encoder.modules():
        mlp = getattr(module, "mlp", None)
        if mlp is None or not hasattr(module, "attn"):
            continue
        dim = getattr(module, "dim", None) or module.norm1.normalized_shape[0]
        resolution = getattr(module, "input_resolution", None)  # TinyViT keeps tokens as (B, L, C)
        yield module, int(dim), resolution
