"""SAM-UNet's network: a frozen SAM encoder, a trainable full-resolution conv branch and a fusion decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from samnnu.modeling.common import fit_square, unfit_square
from samnnu.modeling.conv_branch import ConvBranch, FusionDecoder, branch_widths
from samnnu.modeling.frozen_encoder import FrozenSAMEncoder


class SAMUNet(nn.Module):
    """Frozen SAM encoder + :class:`~samnnu.modeling.conv_branch.ConvBranch` + :class:`~samnnu.modeling.conv_branch.FusionDecoder`.

    Both paths see the patch fitted into the encoder's square input (size S): the encoder through its
    fixed [0, 1] intensity mapping, the conv branch on the nnU-Net-normalised channels themselves.
    Trainable: the conv branch and the decoder. Frozen: the whole SAM encoder (run without autograd).

    With ``context_slices`` = k > 0 (2.5D, :mod:`samnnu.modeling.context`) the network takes each slice
    with k neighbours on each side: ``in_channels`` and ``intensity_windows`` are the image's C channels,
    the input has C * (2k + 1); the conv branch sees all of them, and the encoder's RGB channels start as
    the slices z - 1, z, z + 1 (k = 1). The predictor adds the neighbours (it reads ``context_slices``).

    x: (B, C * (2k + 1), H, W) patch after nnU-Net normalisation -> logits (B, num_classes, H, W)
    """

    def __init__(self, *, encoder: str, input_size: int, in_channels: int, num_classes: int,
                 intensity_windows: list[tuple[float, float]], base_width: int = 32, max_width: int = 256,
                 blocks_per_stage: int = 1, context_slices: int = 0):
        super().__init__()
        if context_slices not in (0, 1):
            raise ValueError(f"context_slices must be 0 or 1 (three slices fill SAM's RGB), not {context_slices}")
        self.context_slices = context_slices
        views = 2 * context_slices + 1
        in_channels, intensity_windows = in_channels * views, list(intensity_windows) * views
        self.sam = FrozenSAMEncoder(encoder=encoder, input_size=input_size, in_channels=in_channels,
                                    intensity_windows=intensity_windows, rgb_groups=context_slices > 0)
        self.encoder_name = encoder
        self.input_size = input_size
        widths = branch_widths(self.sam.stride, base_width, max_width)
        self.conv_branch = ConvBranch(in_channels, widths, blocks_per_stage)
        self.decoder = FusionDecoder(self.sam.embed_dim, widths, num_classes)

    def load_pretrained(self, checkpoint: str | None = None) -> dict[str, list[str]]:
        return self.sam.load_pretrained(checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_size = tuple(x.shape[-2:])
        embedding, content = self.sam(x)
        square, _ = fit_square(x, self.input_size)
        logits = self.decoder(embedding, self.conv_branch(square))
        return unfit_square(logits, content, self.input_size, out_size)
