"""Measure training memory of SAMedNet (2D) or SAM3DAdapterNet (3D) and compare it with the planner's estimate.

Each (encoder, input size, batch, slices) point runs in a fresh process: build the network, two
forward + backward + AdamW steps on random data, then report the peak resident set size (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). A least-squares fit of peak = fixed + batch * per_sample
at each input size gives the coefficients the planner's memory model (``EncoderSpec``) should use.

    python benchmarks/memory_model.py --encoder litemedsam --sizes 64 128 --batches 2 8 --device cpu
    python benchmarks/memory_model.py --network sam3d --sizes 64 --batches 1 2 --slices 16 --device cpu
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, resource, sys, torch
enc, size, batch, device, network, slices = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                             sys.argv[5], int(sys.argv[6]))
torch.manual_seed(0)
common = dict(encoder=enc, input_size=size, in_channels=1, num_classes=3, intensity_windows=[(-2.0, 2.0)])
if network == "sam3d":
    from samnnu.modeling.sam3d import SAM3DAdapterNet
    net = SAM3DAdapterNet(depth=slices, **common).to(device)
    shape = (batch, slices, size, size)
else:
    from samnnu.modeling.samed import SAMedNet
    net = SAMedNet(**common).to(device)
    shape = (batch, size, size)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
x = torch.randn(shape[0], 1, *shape[1:], device=device)
y = torch.randint(0, 3, shape, device=device)
for _ in range(2):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
print(json.dumps({"peak_gb": peak}))
"""


def measure(encoder: str, size: int, batch: int, device: str, network: str = "samed", slices: int = 1) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, encoder, str(size), str(batch), device, network, str(slices)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gb"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="litemedsam")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--network", choices=["samed", "sam3d"], default="samed")
    p.add_argument("--slices", type=int, default=1, help="slices per 3D sample (sam3d)")
    args = p.parse_args(argv)
    slices = args.slices if args.network == "sam3d" else 1

    from samnnu.modeling.encoders import get_encoder_spec
    from samnnu.plans.samnnu_planner import estimate_training_memory_gb

    spec = get_encoder_spec(args.encoder)
    rows = []
    print(f"network {args.network}, {slices} slice(s) per sample, device {args.device}")
    print("| input | batch | measured peak GB | planner estimate GB | estimate / measured |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        peaks = []
        for batch in args.batches:
            peak = measure(args.encoder, size, batch, args.device, args.network, slices)
            est = estimate_training_memory_gb(spec, size, batch, slices)
            peaks.append(peak)
            rows.append({"input": size, "batch": batch, "slices": slices, "peak_gb": peak, "estimate_gb": est})
            print(f"| {size} | {batch} | {peak:.2f} | {est:.2f} | {est / peak:.2f} |", flush=True)
        slope, intercept = np.polyfit(args.batches, peaks, 1)
        per_native = slope * (spec.native_size / size) ** 2
        print(f"fit at {size}: fixed {intercept:.2f} GB + {slope:.3f} GB per sample "
              f"(= {per_native:.2f} GB per sample at the native {spec.native_size})")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
