"""SAM-UNet's network: a frozen SAM encoder, a trainable full-resolution conv branch and a fusion decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from samnnu.modeling.common import fit_square, unfit_square
from samnnu.modeling.conv_branch import ConvBranch, FusionDecoder, branch_widths
from samnnu.modeling.frozen_encoder import FrozenSAMEncoder


class SAMUNet(nn.Module):
    """Frozen SAM encoder + :class:`~samnnu.modeling.conv_branch.ConvBranch` + :class:`~samnnu.modeling.conv_branch.FusionDecoder`.

    Both paths see the patch fitted into a square (size S = ``input_size``; the encoder's may be smaller,
    below): the encoder through its fixed [0, 1] intensity mapping, the conv branch on the
    nnU-Net-normalised channels themselves.
    Trainable: the conv branch and the decoder. Frozen: the whole SAM encoder (run without autograd).

    With ``context_slices`` = k > 0 (2.5D, :mod:`samnnu.modeling.context`) the network takes each slice
    with k neighbours on each side: ``in_channels`` and ``intensity_windows`` are the image's C channels,
    the input has C * (2k + 1); the conv branch sees all of them, and the encoder's RGB channels start as
    the slices z - 1, z, z + 1 (k = 1). The predictor adds the neighbours (it reads ``context_slices``).

    ``encoder_input_size`` (default ``input_size``) lets the encoder see the patch at another square size
    than the conv branch and decoder: at ``input_size`` / 2 the encoder costs about a third, its embedding
    grid is half as fine, and the conv branch gets one more stage so that its coarsest features meet that
    grid (both squares hold the patch at the top left, padded at the bottom and right, so the grids cover
    the same image up to the rounding of the content's size in each).

    ``lora_rank`` > 0 adds LoRA to the SAM encoder's attention (trainable; the rest stays frozen).
    ``deep_supervision_heads`` adds a segmentation head at every coarser decoder level; while
    ``deep_supervision`` is on, the network returns one output per level, each cropped and resized to
    the patch scaled by 1 / 2^i exactly as nnU-Net downsamples its targets (round(H / 2^i)).

    x: (B, C * (2k + 1), H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W), or
       with ``deep_supervision`` on [(B, num_classes, round(H / 2^i), round(W / 2^i)) for i = 0, 1, ...]
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int, num_classes: int,
                 intensity_windows: list[tuple[float, float]], base_width: int = 32, max_width: int = 256,
                 blocks_per_stage: int = 1, context_slices: int = 0, lora_rank: int = 0,
                 deep_supervision_heads: bool = False, encoder_input_size: int | None = None):
        super().__init__()
        if context_slices not in (0, 1):
            raise ValueError(f"context_slices must be 0 or 1 (three slices fill SAM's RGB), not {context_slices}")
        self.context_slices = context_slices
        views = 2 * context_slices + 1
        in_channels, intensity_windows = in_channels * views, list(intensity_windows) * views
        encoder_input_size = input_size if encoder_input_size is None else encoder_input_size
        if input_size % encoder_input_size:
            raise ValueError(f"the encoder's input {encoder_input_size} must divide the network's input {input_size}")
        self.sam = FrozenSAMEncoder(encoder=encoder, input_size=encoder_input_size, in_channels=in_channels,
                                    intensity_windows=intensity_windows, rgb_groups=context_slices > 0,
                                    lora_rank=lora_rank)
        self.encoder_name = encoder
        self.input_size = input_size
        # the embedding grid's stride relative to the network's input
        widths = branch_widths(self.sam.stride * input_size // encoder_input_size, base_width, max_width)
        self.conv_branch = ConvBranch(in_channels, widths, blocks_per_stage)
        self.decoder = FusionDecoder(self.sam.embed_dim, widths, num_classes, deep_supervision_heads)

    @property
    def deep_supervision_levels(self) -> int:
        """Outputs while ``deep_supervision`` is on: full resolution plus one per coarser decoder level."""
        heads = self.decoder.aux_heads
        return 1 + (len(heads) if heads is not None else 0)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, on: bool) -> None:
        self.decoder.deep_supervision = bool(on) and self.decoder.aux_heads is not None

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        return self.sam.load_pretrained(checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        h, w = x.shape[-2:]
        embedding, _ = self.sam(x)
        # the content's size in the network's square (the encoder's own square may be smaller)
        square, content = fit_square(x, self.input_size)
        logits = self.decoder(embedding, self.conv_branch(square))
        if not isinstance(logits, list):
            return unfit_square(logits, content, self.input_size, (h, w))
        return [unfit_square(out, content, self.input_size, (round(h / 2 ** i), round(w / 2 ** i)))
                for i, out in enumerate(logits)]
