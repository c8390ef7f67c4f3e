"""Forward GFLOP of each registered image encoder at its native input, counted on the meta device.

    python benchmarks/encoder_flops.py [--size N]

torch.utils.flop_counter counts matmul/conv FLOPs (2 per multiply-add) without running real math,
so even vit_h at 1024 costs nothing to count (TinyViTs are built on the CPU). Elementwise ops, softmax and norms are not counted.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from samnnu.modeling.encoders import ENCODERS, build_sam_parts


def encoder_gflop(name: str, size: int) -> float:
    # TinyViT's constructor calls .item(): build it on the CPU (it is small); ViTs on the meta device
    with torch.device("meta" if name.startswith("vit_") else "cpu"):
        parts = build_sam_parts(name, input_size=size, num_mask_tokens=4)
        x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        parts.image_encoder(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="input size (default: each encoder's native size)")
    args = p.parse_args()
    for name, spec in ENCODERS.items():
        size = args.size or spec.native_size
        print(f"{name:11s} input {size:5d}: {encoder_gflop(name, size):9.1f} GFLOP")


if __name__ == "__main__":
    main()
