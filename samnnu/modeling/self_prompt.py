"""Self-prompting SAM (ESP-MedSAM's idea): the network writes its own prompts, so no user prompt is needed.

A light head predicts a coarse multi-class mask from the image embedding; a small conv net turns the
coarse class probabilities into a dense prompt embedding that is added to the image embedding (where
SAM adds its mask-prompt embedding); a set of learned query tokens takes the place of the sparse
point/box prompt tokens. SAM's mask decoder then returns one mask per class, as in SAMed.

The encoder is adapted with LoRA on q and v exactly as :class:`~samnnu.modeling.samed.SAMedNet`, so
the two networks differ only in the prompts: SAMed decodes with the learned no-mask embedding alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from segment_anything.modeling.common import LayerNorm2d

from samnnu.modeling.common import decode_prompt_free, fit_square, unfit_square
from samnnu.modeling.samed import SAMedNet


class SelfPromptOutput(NamedTuple):
    """What :class:`SelfPromptSAMNet` returns in training mode when asked for the coarse mask.

    logits: (B, K, H, W) final logits; coarse: (B, K, H, W) the coarse head's logits, resized to (H, W).
    """

    logits: torch.Tensor
    coarse: torch.Tensor


class CoarseMaskHead(nn.Module):
    """Coarse class logits on the embedding grid: 3x3 conv + GELU + 1x1 conv.

    embedding: (B, D, g, g) -> logits (B, K, g, g)
    """

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(embed_dim, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden, num_classes, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


class MaskToDensePrompt(nn.Module):
    """Coarse class probabilities -> dense prompt embedding, like SAM's mask-prompt downscaling.

    SAM's own mask downscaling takes one mask at 4x the embedding grid; this one takes K class
    probabilities at the embedding grid: 3x3 conv + LayerNorm (over channels, per pixel) + GELU + 1x1 conv to D.
    The last conv starts at zero, so at initialisation the dense prompt adds nothing.

    probabilities: (B, K, g, g) -> (B, D, g, g)
    """

    def __init__(self, num_classes: int, embed_dim: int, hidden: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(num_classes, hidden, 3, padding=1)
        self.norm = LayerNorm2d(hidden)
        self.act = nn.GELU()
        self.out = nn.Conv2d(hidden, embed_dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.norm(self.conv(probabilities))))


class SelfPromptSAMNet(SAMedNet):
    """SAMed's network with self-made prompts: coarse head -> dense prompt, and learned query tokens.

    Trainable: as :class:`SAMedNet` (LoRA, channel mix, no-prompt embedding, mask decoder but its IoU
    head) plus the coarse head, the mask-to-prompt net and the query tokens. The dense prompt is the
    no-mask embedding plus the mask-to-prompt net's output.

    x: (B, C, H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W); in training
    mode with ``return_coarse`` a :class:`SelfPromptOutput` (final and coarse logits, both (B, K, H, W)),
    so that a loss can supervise the coarse head too.
    """

    def __init__(self, *, num_query_tokens: int = 4, return_coarse: bool = False, **kwargs):
        super().__init__(**kwargs)
        # created after SAMedNet set the SAM parts' trainable flags: these all train
        num_classes = self.mask_decoder.num_mask_tokens
        embed_dim = self.mask_decoder.transformer_dim
        self.return_coarse = return_coarse
        self.coarse_head = CoarseMaskHead(embed_dim, num_classes)
        self.mask_prompt = MaskToDensePrompt(num_classes, embed_dim)
        self.query_tokens = nn.Embedding(num_query_tokens, embed_dim)
        nn.init.normal_(self.query_tokens.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor | SelfPromptOutput:
        out_size = tuple(x.shape[-2:])
        x, content = fit_square(self.intensity(x), self.input_size)
        embedding = self.image_encoder(x)
        coarse = self.coarse_head(embedding)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1) + self.mask_prompt(coarse.softmax(1))
        logits = decode_prompt_free(self.prompt_encoder, self.mask_decoder, embedding, dense=dense,
                                    extra_tokens=self.query_tokens.weight.unsqueeze(0))
        logits = unfit_square(logits, content, self.input_size, out_size)
        if self.training and self.return_coarse:
            return SelfPromptOutput(logits, unfit_square(coarse, content, self.input_size, out_size))
        return logits


class CoarseAuxiliaryLoss(nn.Module):
    """``loss(final) + weight * loss(coarse)`` for :class:`SelfPromptOutput`; plain ``loss`` otherwise.

    loss: any segmentation loss taking (logits (B, K, H, W), target (B, 1, H, W)).
    """

    def __init__(self, loss: nn.Module, weight: float):
        super().__init__()
        self.loss = loss
        self.weight = weight

    def forward(self, output: torch.Tensor | SelfPromptOutput, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, SelfPromptOutput):
            return self.loss(output.logits, target) + self.weight * self.loss(output.coarse, target)
        return self.loss(output, target)
