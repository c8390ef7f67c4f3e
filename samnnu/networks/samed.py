"""SAMed's network: a SAM encoder with LoRA, prompt-free multi-class masks from SAM's mask decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from samnnu.encoders import SAMParts, build_sam_parts, load_pretrained
from samnnu.lora import apply_lora, is_lora_parameter
from samnnu.networks.common import (IntensityToSAM, decode_prompt_free, fit_square, freeze_batchnorm_stats,
                                    unfit_square)


class SAMedNet(nn.Module):
    """SAM encoder with LoRA on q and v, mask decoder with one mask token per class (background included).

    Trainable: LoRA matrices, the channel mix, the no-prompt embedding and the mask decoder (but its
    IoU head, whose output is unused). Frozen: the rest of the encoder (its BatchNorm statistics too)
    and the unused prompt embeddings.

    x: (B, C, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W)
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int, num_classes: int,
                 intensity_windows: list[tuple[float, float]], lora_rank: int = 4):
        super().__init__()
        parts = build_sam_parts(encoder, input_size=input_size, num_mask_tokens=num_classes)
        self.encoder_name = encoder
        self.input_size = input_size
        self.intensity = IntensityToSAM(in_channels, intensity_windows)
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        self.num_lora_layers = apply_lora(self.image_encoder, lora_rank)
        self._set_trainable()

    def _set_trainable(self) -> None:
        for name, p in self.image_encoder.named_parameters():
            p.requires_grad = is_lora_parameter(name)
        for name, p in self.prompt_encoder.named_parameters():
            p.requires_grad = name.startswith("no_mask_embed")
        for name, p in self.mask_decoder.named_parameters():
            p.requires_grad = not name.startswith("iou_prediction_head")

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        """Load the encoder's pretrained SAM weights (training start only); LoRA stays at its init.

        checkpoint: the user's SAM checkpoint file (``vit_*``, ``mobilesam``); None for bundled weights.
        """
        parts = SAMParts(self.image_encoder, self.prompt_encoder, self.mask_decoder, self.input_size, 0, 0)
        left = load_pretrained(self.encoder_name, parts, checkpoint=checkpoint)
        not_lora = [k for k in left["image_encoder"] if not is_lora_parameter(k)]
        if not_lora or left["prompt_encoder"] or left["mask_decoder"]:
            raise RuntimeError(f"pretrained weights left modules uninitialised: {not_lora[:3]} "
                               f"{left['prompt_encoder'][:3]} {left['mask_decoder'][:3]}")
        return left

    def train(self, mode: bool = True):
        super().train(mode)
        freeze_batchnorm_stats(self.image_encoder)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_size = tuple(x.shape[-2:])
        x, content = fit_square(self.intensity(x), self.input_size)
        logits = decode_prompt_free(self.prompt_encoder, self.mask_decoder, self.image_encoder(x))
        return unfit_square(logits, content, self.input_size, out_size)
