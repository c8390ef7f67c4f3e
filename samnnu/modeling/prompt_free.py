"""The shared shape of the encoder-adapting SAM networks: adapted encoder + prompt-free mask decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from samnnu.modeling.common import IntensityToSAM, decode_prompt_free, fit_square, freeze_batchnorm_stats, unfit_square
from samnnu.modeling.encoders import SAMParts, build_sam_parts, load_pretrained


class PromptFreeSAMNet(nn.Module):
    """A SAM encoder adapted in place, and SAM's mask decoder with one mask token per class, no prompts.

    Subclasses say how the encoder is adapted (:meth:`adapt_encoder`) and which encoder parameters
    train (:meth:`is_encoder_trainable`). Trainable besides those: the channel mix, the no-prompt
    embedding and the mask decoder (but its IoU head, whose output is unused). Frozen: the rest of
    the encoder (its BatchNorm statistics too) and the unused prompt embeddings.

    x: (B, C, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W)
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int, num_classes: int,
                 intensity_windows: list[tuple[float, float]]):
        super().__init__()
        parts = build_sam_parts(encoder, input_size=input_size, num_mask_tokens=num_classes)
        self.encoder_name = encoder
        self.input_size = input_size
        self.intensity = IntensityToSAM(in_channels, intensity_windows)
        self.image_encoder = parts.image_encoder
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        self.num_adapted = self.adapt_encoder(self.image_encoder)
        self._set_trainable()

    def adapt_encoder(self, encoder: nn.Module) -> int:
        """Modify ``encoder`` in place; return how many places were adapted."""
        raise NotImplementedError

    def is_encoder_trainable(self, name: str) -> bool:
        """Whether the encoder parameter ``name`` trains (the adaptation's own parameters)."""
        raise NotImplementedError

    def _set_trainable(self) -> None:
        for name, p in self.image_encoder.named_parameters():
            p.requires_grad = self.is_encoder_trainable(name)
        for name, p in self.prompt_encoder.named_parameters():
            p.requires_grad = name.startswith("no_mask_embed")
        for name, p in self.mask_decoder.named_parameters():
            p.requires_grad = not name.startswith("iou_prediction_head")

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        """Load the encoder's pretrained SAM weights (training start only); the adaptation keeps its init.

        checkpoint: the user's SAM checkpoint file (``vit_*``, ``mobilesam``); None for bundled weights.
        """
        parts = SAMParts(self.image_encoder, self.prompt_encoder, self.mask_decoder, self.input_size, 0, 0)
        return load_pretrained(self.encoder_name, parts, checkpoint=checkpoint,
                               new_encoder_keys=self.is_encoder_trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        freeze_batchnorm_stats(self.image_encoder)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_size = tuple(x.shape[-2:])
        x, content = fit_square(self.intensity(x), self.input_size)
        logits = decode_prompt_free(self.prompt_encoder, self.mask_decoder, self.image_encoder(x))
        return unfit_square(logits, content, self.input_size, out_size)
