"""SAMUNetContextTrainer: SAM-UNet in 2.5D, each slice seen with its two neighbours.

The slices z - 1, z, z + 1 are the network's input channels (:mod:`samnnu.modeling.context`): they
fill the frozen SAM encoder's three RGB channels and all reach the conv branch, so a 2D model gets the
through-plane context nnU-Net's 3d_fullres has, at 2D cost. Everything else is SAMUNetTrainer's.
"""
from __future__ import annotations

from samnnu.trainers.samunet import SAMUNetTrainer


class SAMUNetContextTrainer(SAMUNetTrainer):
    """SAMUNetTrainer with one neighbouring slice on each side as extra input channels."""

    context_slices = 1
