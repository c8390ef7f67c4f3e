"""Per-image inference time of samnnu's default network on a CPU: batch size, channels-last, bf16.

    python benchmarks/cpu_inference_variants.py [--encoder litemedsam] [--size 64] [-o OUT.json]

Times (median of 5 after a warm-up, ``torch.inference_mode``) the SAM image encoder and the whole
SAMedNet (encoder + prompt-free mask decoder) at the planned input size for batches 1, 4 and 16, in
fp32 and under bf16 autocast, with and without channels-last memory format; reports how far bf16 moves
SAMedNet's class probabilities from fp32 (the prediction must stay within 1e-4 of nnU-Net's path),
and the operators that take the most time at batch 4. Run it alone: torch uses every available core.
"""
from __future__ import annotations

import argparse

import torch
from encoder_flops import median_seconds  # benchmarks/encoder_flops.py, beside this script

from samnnu.config import configure_threads
from samnnu.modeling.samed import SAMedNet
from samnnu.safe_io import write_json_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="litemedsam")
    p.add_argument("--size", type=int, default=64, help="encoder input size (the hippocampus plans: 64)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("-o", "--output", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    threads = configure_threads()
    torch.manual_seed(0)
    net = SAMedNet(encoder=args.encoder, input_size=args.size, in_channels=1, num_classes=3,
                   intensity_windows=[(-2.0, 2.0)]).eval()
    result = {"threads": threads, "encoder": args.encoder, "input_size": args.size, "rows": []}
    print(f"{threads} threads; ms per image")
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        for batch in args.batches:
            image = torch.rand(batch, 3, args.size, args.size).to(memory_format=fmt)
            patch = torch.randn(batch, 1, 56, 40)
            row = {"channels_last": channels_last, "batch": batch}
            with torch.inference_mode():
                for dtype in ("fp32", "bf16"):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        row[f"encoder_ms_{dtype}"] = median_seconds(lambda: net.image_encoder(image)) / batch * 1e3
                        row[f"samednet_ms_{dtype}"] = median_seconds(lambda: net(patch)) / batch * 1e3
            result["rows"].append(row)
            print(f"channels_last={channels_last!s:5} batch {batch:3d}: encoder fp32 {row['encoder_ms_fp32']:6.1f} "
                  f"bf16 {row['encoder_ms_bf16']:6.1f} | SAMedNet fp32 {row['samednet_ms_fp32']:6.1f} "
                  f"bf16 {row['samednet_ms_bf16']:6.1f}")
    net = net.to(memory_format=torch.contiguous_format)
    patch = torch.randn(8, 1, 56, 40)
    with torch.inference_mode():
        p32 = torch.softmax(net(patch).float(), 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = torch.softmax(net(patch).float(), 1)
    result["bf16_max_probability_difference"] = float((p32 - p16).abs().max())
    print(f"bf16 vs fp32, largest change of a class probability: {result['bf16_max_probability_difference']:.4f}")
    with torch.inference_mode(), torch.profiler.profile() as prof:
        net(torch.randn(4, 1, 56, 40))
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    result["top_operators_batch4"] = [(e.key, e.self_cpu_time_total / total) for e in ops[:10]]
    print("batch 4, share of CPU time: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in result["top_operators_batch4"]))
    if args.output:
        write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()
